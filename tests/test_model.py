"""GrafitModel: its parts per method, forward shapes, the loss terms, mixed precision dtypes,
the EMA target, jit_compile."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from grafit_tf import builders, heads, losses
from grafit_tf import model as model_lib
from grafit_tf.config import Config
from tests.synthetic import synthetic_source


def small_config(**changes):
    """A tiny model's Config; `changes` may override these defaults too (epochs=2, say)."""
    return Config(**{**dict(batch_size=8, width=4, proj_hidden=16, knn_dim=8, proj_dim=8,
                            epochs=1, warmup_epochs=0), **changes})


def batch(source, n=8, views=2):
    rng = np.random.default_rng(0)
    index = np.arange(n, dtype=np.int32)
    return {"views": tf.constant(rng.uniform(0, 255, (n, views, 12, 12, 1)), tf.float32),
            "index": tf.constant(index), "label": tf.constant(source.train.coarse[index])}


@pytest.fixture
def policy():
    yield keras.mixed_precision.set_global_policy
    keras.mixed_precision.set_global_policy("float32")


@pytest.mark.parametrize("precision", ["mixed_bfloat16", "mixed_float16"])
def test_mixed_precision_keeps_losses_and_memory_float32(precision, policy):
    policy(precision)
    source = synthetic_source()
    config = small_config(mixed_precision=precision)
    model = builders.build_model(config, source, total_steps=4)
    model.compile(optimizer=builders.build_optimizer(config, 4, 4), jit_compile=False)
    model.optimizer.build(model.trainable_variables)
    if precision == "mixed_float16":
        assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    data = batch(source)
    feats = model.backbone(tf.reshape(data["views"], [-1, 12, 12, 1]))
    assert feats.dtype == tf.as_dtype(precision.split("_")[1])  # Computes in low precision.
    out = model.forward(data["views"])
    assert all(v.dtype == tf.float32 for v in out.values())
    terms = model.loss_terms(out, data["label"], data["index"])
    assert all(v.dtype == tf.float32 for v in terms.values())
    assert model.memory.embeddings.dtype == "float32"
    assert all(w.dtype == "float32" for w in model.trainable_weights)
    logs = tf.function(model.train_step)(data)
    assert np.isfinite(float(logs["loss"]))
    assert model.memory.embeddings.value.dtype == tf.float32


def test_target_starts_as_copy_and_follows_by_ema():
    source = synthetic_source()
    config = small_config(method="instance", ema_decay=0.5)
    model = builders.build_model(config, source, total_steps=1000)
    model.compile(optimizer=builders.build_optimizer(config, 1000, 4))
    model.optimizer.build(model.trainable_variables)
    for o, t in zip(model.backbone.weights, model.target_backbone.weights):
        np.testing.assert_array_equal(o.numpy(), t.numpy())
    before = [t.numpy().copy() for t in model.target_backbone.weights]
    tf.function(model.train_step)(batch(source))
    decay = float(model.ema_decay())  # Step 1 of 1000: just above 0.5.
    assert 0.5 <= decay < 0.51
    kernel = [i for i, w in enumerate(model.backbone.weights) if "stem_conv" in w.path][0]
    online = model.backbone.weights[kernel].numpy()
    target = model.target_backbone.weights[kernel].numpy()
    # The decay used inside the step was the one at step 0 (exactly 0.5).
    np.testing.assert_allclose(target, 0.5 * before[kernel] + 0.5 * online, rtol=1e-5, atol=1e-6)
    assert not model.target_backbone.trainable
    assert not any("target" in w.path for w in model.trainable_weights)


@pytest.mark.parametrize("method,want", [
    ("grafit", [0.9, 0.95, 1.0]),  # BYOL: 1 - (1 - base) (cos(pi t) + 1) / 2.
    ("instance", [0.9, 0.95, 1.0]),
    ("grafit_maskcon", [0.9, 0.9, 0.9]),  # MoCo: always constant.
    ("maskcon", [0.9, 0.9, 0.9]),
])
def test_ema_decay_schedule(method, want):
    source = synthetic_source()
    config = small_config(method=method, ema_decay=0.9, queue_size=16)
    model = builders.build_model(config, source, total_steps=100)
    model.compile(optimizer=builders.build_optimizer(config, 100, 4))
    model.optimizer.build(model.trainable_variables)
    got = []
    for step in (0, 50, 100):
        model.optimizer.iterations.assign(step)
        got.append(float(model.ema_decay()))
    np.testing.assert_allclose(got, want, rtol=1e-6)


@pytest.mark.parametrize("method", ["grafit", "coarse_ce", "instance", "fine_ce",
                                    "grafit_maskcon", "maskcon", "grafit+infonce"])
def test_each_method_has_its_losses_and_embeds(method):
    source = synthetic_source()
    method, _, instance_loss = method.partition("+")
    config = small_config(method=method, instance_loss=instance_loss or "byol", queue_size=16)
    model = builders.build_model(config, source, total_steps=4)
    model.compile(optimizer=builders.build_optimizer(config, 4, 4), jit_compile=True)
    assert model.jit_compile is True  # Explicit, never Keras's "auto".
    model.compile(optimizer=builders.build_optimizer(config, 4, 4), jit_compile=False)
    # Built ahead, as the trainer does: a first trace that creates the optimizer's
    # variables makes tf.function trace the step a second time.
    model.optimizer.build(model.trainable_variables)
    logs = tf.function(model.train_step)(batch(source))
    expected = {"grafit": {"nca_loss", "instance_loss"}, "coarse_ce": {"ce_loss"},
                "instance": {"instance_loss"}, "fine_ce": {"ce_loss"},
                "grafit_maskcon": {"maskcon_loss"}, "maskcon": {"maskcon_loss"}}[method]
    assert set(logs) == expected | {"loss"}
    assert all(np.isfinite(float(v)) for v in logs.values())
    if method in ("grafit_maskcon", "maskcon"):  # The step's keys went into the FIFO queue.
        assert int(model.memory.pointer.numpy()) == 8
        np.testing.assert_array_equal(model.memory.labels.numpy()[:8], source.train.coarse[:8])
    z = heads.embedder(model.backbone)(np.zeros((3, 12, 12, 1), np.float32))
    np.testing.assert_allclose(np.linalg.norm(z, axis=1), 1.0, rtol=1e-5)


def dense_widths(head):
    return [layer.units for layer in head.layers if isinstance(layer, keras.layers.Dense)]


def test_every_head_is_one_hidden_layer_and_the_parts_follow_the_method():
    source = synthetic_source()
    model = builders.build_model(small_config(), source, total_steps=4)  # grafit, byol
    for head in (model.knn_head, model.projector, model.target_projector, model.predictor):
        assert dense_widths(head) == [16, 8]  # proj_hidden, then knn_dim / proj_dim.
    assert model.memory.kind == "full" and model.classifier is None
    assert model.objective.terms() == ["nca_loss", "instance_loss"]
    # Without the instance term grafit is the kNN loss alone: no target network at all.
    alone = builders.build_model(small_config(lambda_inst=0.0), source, total_steps=4)
    assert alone.objective.terms() == ["nca_loss"]
    assert (alone.projector, alone.predictor, alone.target_backbone) == (None, None, None)
    # grafit_maskcon: one projector (no predictor) and a FIFO queue of its keys.
    maskcon = builders.build_model(small_config(method="grafit_maskcon", queue_size=16), source,
                                   total_steps=4)
    assert maskcon.predictor is None and maskcon.knn_head is None
    assert maskcon.memory.kind == "queue" and maskcon.memory.size == 16
    # The cross-entropy methods: a linear classifier over coarse or fine labels.
    for method, classes in (("coarse_ce", source.hierarchy.num_coarse),
                            ("fine_ce", source.hierarchy.num_fine)):
        ce = builders.build_model(small_config(method=method), source, total_steps=4)
        assert ce.classifier.units == classes and ce.memory is None and ce.projector is None


@pytest.mark.parametrize("method,instance_loss", [("grafit", "infonce"), ("grafit", "byol"),
                                                  ("instance", "infonce")])
def test_instance_term_averages_the_ordered_view_pairs(method, instance_loss):
    source = synthetic_source()
    data = batch(source, views=3)
    config = small_config(method=method, instance_loss=instance_loss, num_views=3,
                          lambda_inst=0.7)
    model = builders.build_model(config, source, total_steps=4)
    out = model.forward(data["views"])
    got = float(model.loss_terms(out, data["label"], data["index"])["instance_loss"])
    unit = lambda t: tf.math.l2_normalize(t, -1)
    if instance_loss == "infonce":
        def pair(i, j):
            return losses.info_nce_loss(unit(out["pred"][i]), unit(out["target"][j]),
                                        config.instance_tau).numpy()
    else:
        def pair(i, j):
            return losses.byol_loss(out["pred"][i], out["target"][j]).numpy()
    # lambda_inst weighs it in grafit; the self-supervised `instance` has no other term.
    weight = 0.7 if method == "grafit" else 1.0
    want = weight * np.mean([pair(i, j) for i in range(3) for j in range(3) if i != j])
    assert got == pytest.approx(want, rel=1e-5)


def test_nca_term_queries_every_view_against_the_memory_without_its_own_slot():
    source = synthetic_source()
    data = batch(source)
    model = builders.build_model(small_config(tau=0.2), source, total_steps=4)
    out = model.forward(data["views"])
    got = float(model.loss_terms(out, data["label"], data["index"])["nca_loss"])
    queries = tf.reshape(out["knn"], [16, -1])
    labels, index = np.tile(data["label"].numpy(), 2), np.tile(data["index"].numpy(), 2)
    want = losses.nca_loss(queries, labels, model.memory.embeddings, model.memory.labels, 0.2,
                           exclude=index)
    assert got == pytest.approx(float(want), rel=1e-6)
    # The full memory then takes each image's views' mean embedding (momentum 0.5).
    before = model.memory.embeddings.numpy()[index[:8]]
    model.compile(optimizer=builders.build_optimizer(small_config(), 4, 4))
    model.optimizer.build(model.trainable_variables)
    model.update_state(out, data["label"], data["index"])
    mean = model_lib._mean_view(out["knn"]).numpy()
    want_slots = 0.5 * before + 0.5 * mean
    want_slots /= np.linalg.norm(want_slots, axis=1, keepdims=True)
    np.testing.assert_allclose(model.memory.embeddings.numpy()[index[:8]], want_slots, rtol=1e-5,
                               atol=1e-6)


def test_the_instance_loss_is_the_mean_over_ordered_view_pairs():
    # The convention the configs' --lambda_inst follows: BYOL sums its two directions,
    # so BYOL's weight 1 is --lambda_inst=2 here (the full-size configs use 2).
    from grafit_tf.model import _over_view_pairs

    pred = tf.constant([[[1.0]], [[2.0]], [[3.0]]])  # [V=3, b=1, P=1]
    target = tf.constant([[[10.0]], [[20.0]], [[30.0]]])
    pairs = [(1, 20), (1, 30), (2, 10), (2, 30), (3, 10), (3, 20)]
    got = _over_view_pairs(pred, target, lambda p, t: tf.reduce_sum(p * t))
    np.testing.assert_allclose(float(got), np.mean([p * t for p, t in pairs]))


def test_maskcon_encoders_each_see_their_own_view_and_head_has_no_batch_norm():
    """As MaskCon: the query encoder sees view 0 only, the key encoder view 1 only (their
    batch-norm statistics never mix), through a Linear-ReLU-Linear head with biases."""
    source = synthetic_source()
    for method in ("maskcon", "grafit_maskcon"):
        model = builders.build_model(small_config(method=method, queue_size=16), source, 4)
        kinds = [type(layer).__name__ for layer in model.projector.layers]
        assert kinds == ["Dense", "ReLU", "Dense"]
        assert all(layer.use_bias for layer in model.projector.layers
                   if isinstance(layer, keras.layers.Dense))
        views = batch(source)["views"].numpy()
        out = model.moco(tf.constant(views), training=True)
        other = views.copy()
        other[:, 1] = 255 - other[:, 1]  # Another key view: the query does not move.
        moved = model.moco(tf.constant(other), training=True)
        np.testing.assert_allclose(moved["query"], out["query"], atol=1e-6)
        assert not np.allclose(moved["key"], out["key"], atol=1e-3)
        other = views.copy()
        other[:, 0] = 255 - other[:, 0]  # Another query view: the key does not move.
        np.testing.assert_allclose(model.moco(tf.constant(other), training=True)["key"],
                                   out["key"], atol=1e-6)


def test_maskcon_weight_is_grafit_weighting_scaled_to_one():
    assert model_lib.Objective(method="maskcon", lambda_inst=1.0).maskcon_weight == 0.5
    assert model_lib.Objective(method="maskcon", lambda_inst=0.25).maskcon_weight == 0.8
    assert model_lib.Objective(method="maskcon", lambda_inst=0.0).maskcon_weight == 1.0
