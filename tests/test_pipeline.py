"""The tf.data pipeline: shapes, label pairing, determinism, sharding, resume."""

import numpy as np
import pytest

from grafit_tf.config import Config
from grafit_tf.data import hierarchy, pipeline, sources
from grafit_tf.errors import UserError


def make_source(n=40, size=10):
    # Image i is filled with the value i: a view of it is still recognisable.
    images = np.repeat(np.arange(n, dtype=np.uint8)[:, None, None, None] * 5, size * size,
                       axis=1).reshape(n, size, size, 1)
    fine = np.arange(n, dtype=np.int32) % 4
    hier = hierarchy.from_mapping(["a", "b", "c", "d"], {"a": "x", "b": "y", "c": "x", "d": "y"})
    split = sources.Split(images=images, fine=fine, coarse=hier.coarse_of(fine))
    return sources.Source("t", split, split, hier, (size, size, 1), (0.0,), (1.0,))


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


def test_local_crops_come_with_the_same_global_views():
    source = make_source()
    local = CONFIG.replace(local_crops=3, local_crop_size=6)
    a = batches(pipeline.train_dataset_fn(source, CONFIG), count=2)
    b = batches(pipeline.train_dataset_fn(source, local), count=2)
    assert "local_views" not in a[0]
    assert b[0]["local_views"].shape == (8, 3, 6, 6, 1)
    for x, y in zip(a, b):  # Adding local crops leaves the global views as they were.
        np.testing.assert_array_equal(x["views"], y["views"])
    centre = b[0]["local_views"][:, :, 3, 3, 0]  # Crops of the right image, all different.
    assert np.all(np.abs(centre - 5.0 * b[0]["index"][:, None]) <= 0.45 * 255)
    assert not np.allclose(b[0]["local_views"][:, 0], b[0]["local_views"][:, 1])
    # Methods without an instance loss get none.
    for method in ("coarse_ce", "fine_ce"):
        c = batches(pipeline.train_dataset_fn(source, local.replace(method=method)), count=1)
        assert "local_views" not in c[0]
    assert local.replace(lambda_inst=0.0).num_local_views == 0
    assert local.replace(method="instance").num_local_views == 3


def test_aug_prediction_adds_each_views_draws_to_the_same_views():
    source = make_source()
    aware = CONFIG.replace(aug_pred_weight=1.0)
    a = batches(pipeline.train_dataset_fn(source, CONFIG), count=2)
    b = batches(pipeline.train_dataset_fn(source, aware), count=2)
    assert "aug_params" not in a[0]
    assert b[0]["aug_params"].shape == (8, 2, 6) and b[0]["aug_params"].dtype == np.float32
    for x, y in zip(a, b):  # The views are those of a run without the term.
        np.testing.assert_array_equal(x["views"], y["views"])
    params = b[0]["aug_params"]
    area = params[..., 2] * params[..., 3]  # Box height x width: --crop_scale_min=0.9.
    assert np.all((area >= 0.85) & (area <= 1.0))
    assert not np.allclose(params[:, 0], params[:, 1])  # Each view its own draws.
    with pytest.raises(UserError, match="aug_pred_weight"):
        pipeline.view_fn(aware.replace(augment="rgb"), (10, 10, 3))


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


def test_random_erasing_changes_one_box_of_each_view_and_nothing_else():
    source = make_source()
    plain = batches(pipeline.train_dataset_fn(source, CONFIG), count=1)[0]["views"]
    erased = batches(pipeline.train_dataset_fn(source, CONFIG.replace(erase_prob=1.0)),
                     count=1)[0]["views"]
    for a, b in zip(plain.reshape(-1, 10, 10, 1), erased.reshape(-1, 10, 10, 1)):
        changed = (a != b)[..., 0]
        rows, cols = np.nonzero(changed)
        assert rows.size  # Every view erased (probability 1)...
        box = changed[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
        # ...in one box; noise may repeat a pixel's value, so most, not all, of it differs.
        assert box.mean() > 0.9 and changed.sum() == box.sum()
    # The erasing leaves the draws --aug_pred_weight regresses as they were.
    aware = CONFIG.replace(aug_pred_weight=1.0)
    a = batches(pipeline.train_dataset_fn(source, aware), count=1)[0]
    b = batches(pipeline.train_dataset_fn(source, aware.replace(erase_prob=1.0)), count=1)[0]
    np.testing.assert_array_equal(a["aug_params"], b["aug_params"])
    np.testing.assert_array_equal(b["views"], erased)
