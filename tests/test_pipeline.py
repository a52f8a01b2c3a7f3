"""The tf.data pipeline: shapes, label pairing, determinism, sharding, resume."""

import numpy as np
import pytest
import tensorflow as tf

from grafit_tf import augment
from grafit_tf.config import Config
from grafit_tf.data import hierarchy, pipeline, types
from grafit_tf.rand_augment import rand_augment


def make_source(n=40, size=10):
    # Image i is filled with the value i: a view of it is still recognisable.
    images = np.repeat(np.arange(n, dtype=np.uint8)[:, None, None, None] * 5, size * size,
                       axis=1).reshape(n, size, size, 1)
    fine = np.arange(n, dtype=np.int32) % 4
    hier = hierarchy.from_mapping(["a", "b", "c", "d"], {"a": "x", "b": "y", "c": "x", "d": "y"})
    split = types.Split(images=images, fine=fine, coarse=hier.coarse_of(fine))
    return types.Source("t", split, split, hier, (size, size, 1), (0.0,), (1.0,))


def batches(fn, ctx=None, count=None):
    out = []
    for b in fn(ctx):
        out.append({k: v.numpy() for k, v in b.items()})
        if count and len(out) == count:
            break
    return out


CONFIG = Config(batch_size=8, epochs=2, seed=5, crop_scale_min=0.9)


def test_shapes_and_label_pairing():
    source = make_source()
    fn = pipeline.train_dataset_fn(source, CONFIG)
    out = batches(fn)
    assert fn.steps_per_epoch == 5 and fn.total_steps == 10 and len(out) == 10
    b = out[0]
    assert b["views"].shape == (8, 2, 10, 10, 1) and b["views"].dtype == np.float32
    np.testing.assert_array_equal(b["label"], source.train.coarse[b["index"]])
    # Each epoch visits every image exactly once.
    first = np.concatenate([o["index"] for o in out[:5]])
    assert sorted(first) == list(range(40))
    # The views are of the right image (constant images stay near their value),
    # and the two views differ (independent augmentation).
    centre = b["views"][:, :, 5, 5, 0]
    assert np.all(np.abs(centre - 5.0 * b["index"][:, None]) <= 0.45 * 255)
    assert not np.allclose(b["views"][:, 0], b["views"][:, 1])


def test_fine_labels_only_for_the_oracle():
    source = make_source()
    b = batches(pipeline.train_dataset_fn(source, CONFIG.replace(method="fine_ce")), count=1)[0]
    np.testing.assert_array_equal(b["label"], source.train.fine[b["index"]])


def test_deterministic_under_seed_and_differs_across_seeds():
    source = make_source()
    a = batches(pipeline.train_dataset_fn(source, CONFIG), count=3)
    b = batches(pipeline.train_dataset_fn(source, CONFIG), count=3)
    c = batches(pipeline.train_dataset_fn(source, CONFIG.replace(seed=6)), count=3)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x["index"], y["index"])
        np.testing.assert_array_equal(x["views"], y["views"])
    assert not all(np.array_equal(x["index"], z["index"]) for x, z in zip(a, c))


def test_start_step_resumes_the_same_stream():
    source = make_source()
    full = batches(pipeline.train_dataset_fn(source, CONFIG))
    resumed = batches(pipeline.train_dataset_fn(source, CONFIG, start_step=7))
    assert len(resumed) == 3
    for x, y in zip(full[7:], resumed):
        np.testing.assert_array_equal(x["index"], y["index"])
        np.testing.assert_array_equal(x["views"], y["views"])


class _Context:
    def __init__(self, pipelines, pipeline_id, replicas):
        self.num_input_pipelines, self.input_pipeline_id = pipelines, pipeline_id
        self.replicas = replicas

    def get_per_replica_batch_size(self, global_batch):
        return global_batch // self.replicas


@pytest.mark.parametrize("pipelines,replicas", [(1, 2), (2, 2), (2, 4)])
def test_replica_batches_partition_the_global_batch(pipelines, replicas):
    source = make_source()
    single = batches(pipeline.train_dataset_fn(source, CONFIG), count=2)
    per_pipeline = replicas // pipelines
    shards = [batches(pipeline.train_dataset_fn(source, CONFIG),
                      _Context(pipelines, p, replicas), count=2 * per_pipeline)
              for p in range(pipelines)]
    for step in range(2):
        parts = [shards[p][step * per_pipeline + r]["index"]
                 for p in range(pipelines) for r in range(per_pipeline)]
        np.testing.assert_array_equal(np.concatenate(parts), single[step]["index"])


def test_eval_dataset_is_in_order_and_unaugmented():
    source = make_source()
    x = np.concatenate([b.numpy() for b in pipeline.eval_dataset(source.test, source, 16)])
    np.testing.assert_array_equal(x, source.test.images.astype(np.float32))


def test_view_recipe_follows_the_image_shape():
    """grayscale_small for one-channel images of any size, rgb for colour ones, each
    with the config's crop, jitter and gamma."""
    config = CONFIG.replace(crop_scale_min=0.6, jitter_strength=0.3, gamma_jitter=0.5)
    rng = np.random.default_rng(2)
    for shape in [(10, 10, 1), (64, 48, 1), (96, 80, 1), (16, 20, 3), (80, 80, 3)]:
        x = tf.constant(rng.uniform(0, 255, shape), tf.float32)
        for i in range(4):
            seed = tf.constant([i, 9])
            if shape[-1] == 1:
                got = pipeline.view_fn(config)(x, seed)
                want = augment.grayscale_small(x, seed, 0.6, 0.3, 0.5)
            else:  # The colour jitter's draws come along, for the train step.
                got, draws = pipeline.rgb_views(config, shape[:2], [seed], image=x)
                got, want = got[0], augment.rgb(x, seed, shape[:2], 0.6)
                np.testing.assert_array_equal(draws[0], augment.colour_draws(seed))
            np.testing.assert_array_equal(got, want)
            assert got.shape == shape


def test_rand_augment_comes_after_crop_and_flip():
    config = CONFIG.replace(rand_augment=True)
    x = tf.constant(np.random.default_rng(3).uniform(0, 255, (16, 16, 3)), tf.float32)
    for i in range(4):
        seed = tf.constant([i, 1])
        want = rand_augment(augment.rgb(x, seed, (16, 16), config.crop_scale_min),
                            augment.fold(seed, 5))
        np.testing.assert_array_equal(
            pipeline.rgb_views(config, (16, 16), [seed], image=x)[0][0], want)


def test_crop_windows_decode_what_the_whole_image_gives():
    """A JPEG's windows, decoded alone, are the windows of the decoded image (libjpeg
    upsamples the colour of a window's edge pixels from fewer neighbours); other
    formats are cut from the decoded image exactly."""
    rng = np.random.default_rng(4)
    y, x = np.mgrid[0:75, 0:100]
    pixels = np.clip(np.stack([127 + 100 * np.sin(x / 7 + c + y / 11) for c in range(3)], -1)
                     + rng.normal(0, 5, (75, 100, 3)), 0, 255).astype(np.uint8)
    seeds = [tf.constant([s, 2]) for s in range(6)]
    for data in (tf.io.encode_jpeg(pixels, quality=95), tf.io.encode_png(pixels)):
        whole = tf.io.decode_image(data, channels=3).numpy().astype(np.float32)
        for seed, window in zip(seeds, pipeline.crop_windows(data, seeds, (0.08, 1.0))):
            begin, size = augment.crop_box(tf.constant([75, 100, 3]), augment.fold(seed, 0),
                                           (0.08, 1.0))
            want = whole[begin[0]:begin[0] + size[0], begin[1]:begin[1] + size[1]]
            assert window.dtype == tf.uint8 and window.shape == want.shape
            diff = np.abs(window.numpy().astype(np.float32) - want)
            if tf.io.is_jpeg(data):
                assert diff.mean() < 0.5 and diff[2:-2, 2:-2].max() <= 2
            else:
                np.testing.assert_array_equal(diff, 0)


def test_files_and_decoded_images_give_the_same_views(tmp_path):
    """RGB files go through the crop windows; the same images held in memory through
    the decoded path: the views agree (PNG: exactly)."""
    rng = np.random.default_rng(5)
    images = rng.integers(0, 256, (8, 30, 40, 3), dtype=np.uint8)
    paths = []
    for i, im in enumerate(images):
        paths.append(str(tmp_path / f"{i}.png"))
        tf.io.write_file(paths[-1], tf.io.encode_png(im))
    labels = np.zeros(8, np.int32)
    hier = hierarchy.from_mapping(["a"], {"a": "x"})
    make = lambda split: types.Source("t", split, split, hier, (24, 24, 3), (0.0,) * 3,  # noqa
                                      (1.0,) * 3, resize="resize_center_crop")
    config = CONFIG.replace(batch_size=4, epochs=1, crop_scale_min=0.3)
    files = batches(pipeline.train_dataset_fn(make(types.Split(
        paths=np.asarray(paths), fine=labels, coarse=labels)), config))
    memory = batches(pipeline.train_dataset_fn(make(types.Split(
        images=images, fine=labels, coarse=labels)), config))
    for a, b in zip(files, memory):
        np.testing.assert_array_equal(a["index"], b["index"])
        np.testing.assert_array_equal(a["views"], b["views"])
        np.testing.assert_array_equal(a["colour"], b["colour"])


def test_eval_decode_of_other_formats_is_unchanged():
    """`decode_for_eval` == `decode` for PNG, GIF and BMP, even large ones (no DCT scaling;
    JPEGs: tests/test_serving_images.py)."""
    import io

    from PIL import Image

    rng = np.random.default_rng(0)
    source = types.Source("t", None, None, None, (32, 32, 3), (0.0,), (1.0,),
                          resize="resize_center_crop")
    for fmt, (h, w) in (("PNG", (600, 500)), ("GIF", (400, 300)), ("BMP", (320, 300))):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (h, w, 3), np.uint8)).save(buffer, fmt)
        data = tf.constant(buffer.getvalue())
        got = pipeline.decode_for_eval(data, source).numpy()
        assert got.shape == (h, w, 3), fmt
        np.testing.assert_array_equal(got, pipeline.decode(data, 3).numpy())


def test_weak_key_view_is_crop_and_flip_only():
    """--key_view=weak: view 1 (the maskcon methods' key) is cropped and flipped, never
    jittered or RandAugmented; the other views keep the full recipe."""
    config = CONFIG.replace(key_view="weak", crop_scale_min=0.6, jitter_strength=0.4,
                            gamma_jitter=0.5, rand_augment=True)
    rng = np.random.default_rng(4)
    seeds = [tf.constant([i, 3]) for i in range(3)]
    x = tf.constant(rng.uniform(0, 255, (20, 16, 3)), tf.float32)
    got, draws = (t.numpy() for t in pipeline.rgb_views(config, (16, 16), seeds, image=x))
    box = augment.crop_box(tf.shape(x), augment.fold(seeds[1], 0), (0.6, 1.0))
    weak = augment.random_flip(tf.image.resize(tf.slice(x, *box), (16, 16)),
                               augment.fold(seeds[1], 1))
    np.testing.assert_array_equal(got[1], weak)
    np.testing.assert_array_equal(draws[1], 1.0)  # No colour jitter in the train step.
    strong, strong_draws = pipeline.rgb_views(config.replace(key_view="same"), (16, 16), seeds,
                                              image=x)
    np.testing.assert_array_equal(got[[0, 2]], strong.numpy()[[0, 2]])
    np.testing.assert_array_equal(draws[[0, 2]], strong_draws.numpy()[[0, 2]])
    assert not np.array_equal(got[1], strong[1]) and not np.array_equal(draws[1], strong_draws[1])
    gray = tf.constant(rng.uniform(0, 255, (12, 12, 1)), tf.float32)
    np.testing.assert_array_equal(pipeline.view_fn(config, weak=True)(gray, seeds[0]),
                                  augment.grayscale_small(gray, seeds[0], 0.6, 0.0, 0.0))
