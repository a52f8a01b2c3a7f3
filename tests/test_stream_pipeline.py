"""Streamed splits: no random access, yet deterministic, sharded and resumable."""

import numpy as np
import tensorflow as tf

from grafit_tf.config import Config
from grafit_tf.data import hierarchy, pipeline, types

N = 24


def stream_source(eval_resize=""):
    """24 PNGs of varied sizes and aspect ratios; pixel value = index (to identify them)."""
    rng = np.random.default_rng(0)
    encoded = [tf.io.encode_png(np.full((int(h), int(w), 3), i, np.uint8)).numpy()
               for i, (h, w) in enumerate(rng.integers(20, 70, (N, 2)))]
    fine = np.arange(N, dtype=np.int32) % 6
    hier = hierarchy.from_mapping([f"f{i}" for i in range(6)],
                                  {f"f{i}": f"c{i % 2}" for i in range(6)})
    split = types.Split(
        stream=types.Stream(lambda: tf.data.Dataset.from_tensor_slices(encoded)),
        fine=fine, coarse=hier.coarse_of(fine))
    return types.Source(name="s", train=split, test=split, hierarchy=hier,
                          image_shape=(16, 16, 3), mean=(0.0,) * 3, std=(1.0,) * 3,
                          resize="resize_center_crop", eval_resize=eval_resize)


class Context:
    def __init__(self, pipelines, pid):
        self.num_input_pipelines, self.input_pipeline_id = pipelines, pid

    def get_per_replica_batch_size(self, global_batch):
        return global_batch // self.num_input_pipelines


def batches(source, config, start_step=0, context=None):
    ds = pipeline.train_dataset_fn(source, config, start_step)(context)
    return [{k: v.numpy() for k, v in b.items()} for b in ds]


def test_stream_views_are_the_image_of_their_index(monkeypatch):
    # Resize-only views, so that pixel values still name the image.
    monkeypatch.setattr(pipeline, "rgb_views", lambda config, size, seeds, data: (tf.stack(
        [tf.image.resize(pipeline.decode(data, 3), size) for _ in seeds]), tf.ones([len(seeds), 8])))
    source = stream_source()
    for b in batches(source, Config(batch_size=8, epochs=1, shuffle_buffer=10)):
        np.testing.assert_allclose(b["views"].mean(axis=(1, 2, 3, 4)), b["index"], atol=1e-3)


def test_stream_training_is_deterministic_sharded_and_resumable():
    source = stream_source()
    config = Config(batch_size=8, epochs=2, shuffle_buffer=10)  # RGB images: the rgb recipe.
    run = batches(source, config)
    assert len(run) == 2 * (N // 8)
    for b in run:
        np.testing.assert_array_equal(b["label"], source.train.coarse[b["index"]])
    epoch0 = np.concatenate([b["index"] for b in run[:3]])
    epoch1 = np.concatenate([b["index"] for b in run[3:]])
    assert sorted(epoch0) == list(range(N)) and sorted(epoch1) == list(range(N))
    assert list(epoch0) != list(range(N)) and list(epoch0) != list(epoch1)
    again = batches(source, config)
    for a, b in zip(run, again):
        np.testing.assert_array_equal(a["views"], b["views"])
    resumed = batches(source, config, start_step=4)
    for a, b in zip(run[4:], resumed):
        np.testing.assert_array_equal(a["index"], b["index"])
        np.testing.assert_array_equal(a["views"], b["views"])
    shards = [batches(source, config, context=Context(2, p)) for p in range(2)]
    for step, b in enumerate(run):
        np.testing.assert_array_equal(
            np.concatenate([shards[0][step]["index"], shards[1][step]["index"]]), b["index"])


def test_stream_evaluation_in_order_with_either_resize():
    for method in ("", "resize"):
        source = stream_source(method)
        images = np.concatenate(list(pipeline.eval_dataset(source.test, source, batch_size=5)))
        assert images.shape == (N, 16, 16, 3)
        np.testing.assert_allclose(images.mean(axis=(1, 2, 3)), np.arange(N), atol=1e-3)


def test_max_examples_limits_a_stream():
    source = stream_source()
    small = source.train.take(10)
    assert len(small) == 10 and len(list(small.stream.dataset())) == 10
