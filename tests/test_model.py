"""GrafitModel: forward shapes, mixed precision dtypes, the EMA target, jit_compile."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from grafit_tf import builders, losses
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


def test_target_nca_keys_fill_the_memory_from_the_ema_copy():
    source = synthetic_source()
    # memory_momentum 0: a slot holds its image's latest key, nothing of the older one.
    config = small_config(nca_keys="target", memory_momentum=0.0, ema_decay=0.5,
                          instance_loss="infonce")
    model = builders.build_model(config, source, total_steps=1000)
    # The EMA copy of the kNN head starts as the head itself and is never trained.
    for o, t in zip(model.knn_head.weights, model.target_knn_head.weights):
        np.testing.assert_array_equal(o.numpy(), t.numpy())
    assert not any("target_knn_head" in w.path for w in model.trainable_weights)
    model.compile(optimizer=builders.build_optimizer(config, 1000, 4), jit_compile=False)
    model.optimizer.build(model.trainable_variables)
    step = tf.function(model.train_step)
    step(batch(source))  # Online and target part ways (decay 0.5 at step 0).
    data = batch(source)
    out = model.forward(data["views"])
    keys, online = model_lib._mean_view(out["knn_key"]), model_lib._mean_view(out["knn"])
    assert np.abs(keys.numpy() - online.numpy()).max() > 1e-3  # The test can tell them apart.
    head_before = [w.numpy().copy() for w in model.target_knn_head.weights]
    decay = float(model.ema_decay())
    step(data)
    # The images' slots hold the EMA copy's keys of their views (batch statistics, the
    # same weights as the forward pass above), not the online head's embeddings.
    np.testing.assert_allclose(model.memory.embeddings.numpy()[data["index"].numpy()],
                               keys.numpy(), rtol=1e-4, atol=1e-5)
    # And the copy follows the online head by EMA, with the trunk and the projector (the
    # batch-norm moving statistics, which each forward pass also moves, are left out).
    for before, online_w, target_w in zip(head_before, model.knn_head.weights,
                                          model.target_knn_head.weights):
        if "moving" in target_w.path:
            continue
        np.testing.assert_allclose(target_w.numpy(),
                                   decay * before + (1 - decay) * online_w.numpy(),
                                   rtol=1e-5, atol=1e-6)


def test_online_nca_keys_build_no_copy_of_the_knn_head():
    model = builders.build_model(small_config(), synthetic_source(), total_steps=4)
    assert model.target_knn_head is None
    assert "knn_key" not in model.forward(batch(synthetic_source())["views"])


@pytest.mark.parametrize("method,schedule,want", [
    ("grafit", "cosine", [0.9, 0.95, 1.0]),  # BYOL: 1 - (1 - base) (cos(pi t) + 1) / 2.
    ("grafit", "constant", [0.9, 0.9, 0.9]),
    ("grafit_maskcon", "cosine", [0.9, 0.9, 0.9]),  # MoCo: always constant.
])
def test_ema_decay_schedule(method, schedule, want):
    source = synthetic_source()
    config = small_config(method=method, ema_decay=0.9, ema_schedule=schedule, queue_size=16)
    model = builders.build_model(config, source, total_steps=100)
    model.compile(optimizer=builders.build_optimizer(config, 100, 4))
    model.optimizer.build(model.trainable_variables)
    got = []
    for step in (0, 50, 100):
        model.optimizer.iterations.assign(step)
        got.append(float(model.ema_decay()))
    np.testing.assert_allclose(got, want, rtol=1e-6)


@pytest.mark.parametrize("method", ["grafit", "coarse_ce", "instance", "fine_ce",
                                    "grafit_maskcon", "grafit+infonce"])
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
                "grafit_maskcon": {"maskcon_loss"}}[method]
    assert set(logs) == expected | {"loss"}
    assert all(np.isfinite(float(v)) for v in logs.values())
    if method == "grafit_maskcon":  # The step's keys went into the FIFO queue.
        assert int(model.memory.pointer.numpy()) == 8
        np.testing.assert_array_equal(model.memory.labels.numpy()[:8], source.train.coarse[:8])
    z = builders.build_embedder(model)(np.zeros((3, 12, 12, 1), np.float32))
    np.testing.assert_allclose(np.linalg.norm(z, axis=1), 1.0, rtol=1e-5)


def test_head_layers_deepen_the_knn_head_and_projectors_not_the_predictor():
    source = synthetic_source()

    def dense_widths(head):
        return [layer.units for layer in head.layers if isinstance(layer, keras.layers.Dense)]
    for layers_, want in [(1, [16, 8]), (2, [16, 16, 8])]:
        config = small_config(head_layers=layers_, instance_loss="infonce")
        model = builders.build_model(config, source, total_steps=4)
        if layers_ == 2:  # The 1-layer step is every other model test's.
            model.compile(optimizer=builders.build_optimizer(config, 4, 4), jit_compile=False)
            model.optimizer.build(model.trainable_variables)
            logs = tf.function(model.train_step)(batch(source))
            assert all(np.isfinite(float(v)) for v in logs.values())
        for head in (model.knn_head, model.projector, model.target_projector):
            assert dense_widths(head) == want
        assert dense_widths(model.predictor) == [16, 8]


@pytest.mark.parametrize("method", ["grafit", "instance"])
def test_instance_queue_adds_negatives_and_takes_every_views_target_keys(method):
    source = synthetic_source()
    config = small_config(method=method, instance_loss="infonce", instance_queue=32)
    model = builders.build_model(config, source, total_steps=4)
    model.compile(optimizer=builders.build_optimizer(config, 4, 4), jit_compile=False)
    model.optimizer.build(model.trainable_variables)
    data = batch(source)
    out = model.forward(data["views"])
    with_queue = float(model.loss_terms(out, data["label"], data["index"])["instance_loss"])
    queue, model.instance_queue = model.instance_queue, None
    in_batch = float(model.loss_terms(out, data["label"], data["index"])["instance_loss"])
    model.instance_queue = queue
    assert with_queue > in_batch  # 32 more negatives per query.
    tf.function(model.train_step)(data)
    # 2 views x 8 images went in, view-major, each an L2-normalised target key.
    assert int(queue.pointer.numpy()) == 16
    keys = queue.embeddings.numpy()[:16]
    np.testing.assert_allclose(np.linalg.norm(keys, axis=1), 1.0, rtol=1e-5)
    assert not np.allclose(keys[:8], keys[8:])


def test_instance_queue_needs_infonce_and_one_steps_keys():
    from grafit_tf.errors import UserError

    with pytest.raises(UserError, match="--instance_loss=infonce"):
        small_config(instance_queue=64).validate()
    with pytest.raises(UserError, match="shorter than one step"):
        small_config(instance_loss="infonce", instance_queue=8).validate()
    small_config(instance_loss="infonce", instance_queue=16).validate()


def test_same_coarse_negatives_reach_grafit_only():
    source = synthetic_source()
    data = batch(source)
    assert len(set(data["label"].numpy())) > 1  # Otherwise the mask changes nothing.

    def instance_loss(method, negatives):
        config = small_config(method=method, instance_loss="infonce",
                              instance_negatives=negatives)
        tf.random.set_seed(0)
        keras.utils.set_random_seed(0)
        model = builders.build_model(config, source, total_steps=4)
        out = model.forward(data["views"])
        return float(model.loss_terms(out, data["label"], data["index"])["instance_loss"])

    # Fewer negatives (same seed, same weights): a lower loss, in grafit.
    assert instance_loss("grafit", "same_coarse") < instance_loss("grafit", "all")
    # The self-supervised `instance` never reads the labels, whatever the flag says.
    assert instance_loss("instance", "same_coarse") == instance_loss("instance", "all")


def test_coarse_soft_targets_reach_grafit_only():
    source = synthetic_source()
    data = batch(source)

    def terms(method, targets, **extra):
        config = small_config(method=method, instance_loss="infonce", instance_targets=targets,
                              **extra)
        tf.random.set_seed(0)
        keras.utils.set_random_seed(0)
        model = builders.build_model(config, source, total_steps=4)
        out = model.forward(data["views"])
        terms = model.loss_terms(out, data["label"], data["index"])
        # The term: lambda x the mean over the two (view, other view's key) pairs
        # of InfoNCE against MaskCon's targets built from the keys and coarse labels.
        pairs = []
        for i, j in ((0, 1), (1, 0)):
            t = tf.math.l2_normalize(out["target"][j], -1)
            soft = losses.coarse_soft_targets(t, data["label"], config.soft_target_tau,
                                              config.soft_target_weight)
            pairs.append(losses.info_nce_loss(tf.math.l2_normalize(out["pred"][i], -1), t,
                                              config.instance_tau, targets=soft))
        return float(terms["instance_loss"]), config.lambda_inst * float(np.mean(pairs))

    got, want = terms("grafit", "coarse_soft")
    plain = terms("grafit", "own")[0]
    assert got == pytest.approx(want, rel=1e-5)
    assert got != pytest.approx(plain, rel=1e-3)
    # Weight 0 is the one-hot target.
    assert terms("grafit", "coarse_soft", soft_target_weight=0.0)[0] == pytest.approx(plain)
    # The self-supervised `instance` never reads the labels, whatever the flag says.
    assert terms("instance", "coarse_soft")[0] == terms("instance", "own")[0]


@pytest.mark.parametrize("method", ["grafit", "instance"])
def test_decoupled_infonce_reaches_the_instance_term(method):
    source = synthetic_source()
    data = batch(source)
    config = small_config(method=method, instance_loss="infonce", instance_decoupled=True)
    model = builders.build_model(config, source, total_steps=4)
    out = model.forward(data["views"])
    got = float(model.loss_terms(out, data["label"], data["index"])["instance_loss"])
    unit = lambda t: tf.math.l2_normalize(t, -1)
    want = model.objective_weight() * np.mean([losses.info_nce_loss(
        unit(out["pred"][i]), unit(out["target"][1 - i]), config.instance_tau,
        decoupled=True).numpy() for i in range(2)])
    assert got == pytest.approx(want, rel=1e-5)


def test_coarse_soft_targets_need_infonce():
    from grafit_tf.errors import UserError

    with pytest.raises(UserError, match="coarse_soft"):
        small_config(instance_targets="coarse_soft").validate()  # byol
    with pytest.raises(UserError, match="soft_target"):
        small_config(instance_loss="infonce", soft_target_weight=1.5).validate()
    with pytest.raises(UserError, match="instance_targets"):
        small_config(instance_targets="hard").validate()
    small_config(instance_loss="infonce", instance_targets="coarse_soft").validate()


def test_same_coarse_negatives_need_plain_infonce():
    from grafit_tf.errors import UserError

    with pytest.raises(UserError, match="same_coarse"):
        small_config(instance_negatives="same_coarse").validate()  # byol
    with pytest.raises(UserError, match="same_coarse"):
        small_config(instance_loss="infonce", instance_queue=16,
                     instance_negatives="same_coarse").validate()
    with pytest.raises(UserError, match="instance_negatives"):
        small_config(instance_negatives="hard").validate()
    small_config(instance_loss="infonce", instance_negatives="same_coarse").validate()
    small_config(method="coarse_ce", instance_negatives="same_coarse").validate()  # Ignored.


@pytest.mark.parametrize("method", ["grafit", "instance"])
def test_local_crops_add_local_to_global_pairs(method):
    source = synthetic_source()
    config = small_config(method=method, instance_loss="infonce", local_crops=2,
                          local_crop_size=6)
    model = builders.build_model(config, source, total_steps=4)
    model.compile(optimizer=builders.build_optimizer(config, 4, 4), jit_compile=False)
    data = batch(source)
    rng = np.random.default_rng(1)
    data["local_views"] = tf.constant(rng.uniform(0, 255, (8, 2, 6, 6, 1)), tf.float32)
    out = model.forward(data["views"], local_views=data["local_views"])
    assert out["local_pred"].shape == (2, 8, 8) and out["local_pred"].dtype == tf.float32
    with_local = model.loss_terms(out, data["label"], data["index"])["instance_loss"]
    # 2 global pairs + 2 local crops x 2 global targets, averaged over the 6 pairs.
    fn = model._instance_fn(data["label"])
    weight = model.objective_weight()
    pairs = [fn(out["pred"][0], out["target"][1]), fn(out["pred"][1], out["target"][0])]
    pairs += [fn(out["local_pred"][k], out["target"][j]) for k in range(2) for j in range(2)]
    np.testing.assert_allclose(float(with_local), weight * float(tf.add_n(pairs)) / 6, rtol=1e-5)
    del out["local_pred"]
    without = model.loss_terms(out, data["label"], data["index"])["instance_loss"]
    assert float(with_local) != float(without)
    # A train step takes them from the batch and trains on them.
    model.optimizer.build(model.trainable_variables)
    logs = tf.function(model.train_step)(data)
    assert np.isfinite(float(logs["loss"]))


@pytest.mark.parametrize("method", ["grafit", "coarse_ce"])
def test_koleo_term_spreads_each_view_of_the_trunk_feature(method):
    source = synthetic_source()
    data = batch(source)
    config = small_config(method=method, koleo_weight=0.3)
    # No batch norm, so that training and inference features agree.
    model = builders.build_model(config, source, total_steps=4, use_bn=False)
    out = model.forward(data["views"])
    terms = model.loss_terms(out, data["label"], data["index"])
    # The retrieval embedding of `call()`, view by view.
    for v in range(2):
        np.testing.assert_allclose(out["feature"][v].numpy(),
                                   model(data["views"][:, v]).numpy(), atol=1e-5)
    want = 0.3 * np.mean([losses.koleo_loss(out["feature"][v]).numpy() for v in range(2)])
    assert float(terms["koleo_loss"]) == pytest.approx(want, rel=1e-5)
    assert "koleo_loss" in model.objective.terms()
    # Off by default: no term, no extra output.
    plain = builders.build_model(small_config(method=method), source, total_steps=4)
    assert "feature" not in plain.forward(data["views"])
    assert "koleo_loss" not in plain.objective.terms()


def test_koleo_weight_is_validated():
    from grafit_tf.errors import UserError

    with pytest.raises(UserError, match="koleo_weight"):
        small_config(koleo_weight=-0.1).validate()
    small_config(koleo_weight=0.1).validate()


def test_coarse_nn_positives_reach_grafit_only_and_fill_the_support():
    source = synthetic_source()
    data = batch(source)

    def built(method, positives):
        config = small_config(method=method, instance_loss="infonce",
                              instance_positives=positives, support_size=16)
        tf.random.set_seed(0)
        keras.utils.set_random_seed(0)
        return config, builders.build_model(config, source, total_steps=4)

    config, model = built("grafit", "coarse_nn")
    model.compile(optimizer=builders.build_optimizer(config, 4, 4))  # update_state's EMA.
    model.optimizer.build(model.trainable_variables)
    # A support set of real keys: two batches' worth, labelled.
    rng = np.random.default_rng(1)
    support = rng.normal(size=(16, config.proj_dim)).astype(np.float32)
    support /= np.linalg.norm(support, axis=1, keepdims=True)
    support_labels = np.concatenate([source.train.coarse[:8], source.train.coarse[:8]])
    model.support.fill(support, support_labels)
    out = model.forward(data["views"])
    got = float(model.loss_terms(out, data["label"], data["index"])["instance_loss"])
    pairs = []
    for i, j in ((0, 1), (1, 0)):
        t = losses.coarse_nearest_keys(tf.math.l2_normalize(out["target"][j], -1), data["label"],
                                       support, support_labels)
        pairs.append(losses.info_nce_loss(tf.math.l2_normalize(out["pred"][i], -1), t,
                                          config.instance_tau))
    assert got == pytest.approx(config.lambda_inst * float(np.mean(pairs)), rel=1e-5)
    _, plain = built("grafit", "own")
    plain_out = plain.forward(data["views"])
    assert got != pytest.approx(
        float(plain.loss_terms(plain_out, data["label"], data["index"])["instance_loss"]),
        rel=1e-3)
    # After the step, the support queue holds view 0's keys and their coarse labels.
    model.update_state(out, data["label"], data["index"])
    np.testing.assert_array_equal(model.support.labels.numpy()[:8], data["label"].numpy())
    np.testing.assert_allclose(model.support.embeddings.numpy()[:8],
                               tf.math.l2_normalize(out["target"][0], -1).numpy(), atol=1e-6)
    # The self-supervised `instance` never reads the labels: no support set.
    _, instance = built("instance", "coarse_nn")
    assert instance.support is None


def test_coarse_nn_positives_are_validated():
    from grafit_tf.errors import UserError

    with pytest.raises(UserError, match="coarse_nn"):
        small_config(instance_positives="coarse_nn").validate()  # byol
    with pytest.raises(UserError, match="coarse_nn"):
        small_config(instance_loss="infonce", instance_positives="coarse_nn",
                     instance_targets="coarse_soft").validate()
    with pytest.raises(UserError, match="support_size"):
        small_config(instance_loss="infonce", instance_positives="coarse_nn",
                     support_size=4).validate()
    small_config(support_size=4).validate()  # Read only with coarse_nn.
    with pytest.raises(UserError, match="instance_positives"):
        small_config(instance_positives="nearest").validate()
    small_config(instance_loss="infonce", instance_positives="coarse_nn").validate()


def test_coarse_nn_positives_start_at_their_step():
    source = synthetic_source()
    data = batch(source)
    # 1 epoch of 4 steps: nn_start_epochs=0.5 -> step 2.
    config = small_config(instance_loss="infonce", instance_positives="coarse_nn",
                          support_size=16, nn_start_epochs=0.5)
    model = builders.build_model(config, source, total_steps=4)
    assert model.objective.nn_start_step == 2
    model.compile(optimizer=builders.build_optimizer(config, 4, 4))
    model.optimizer.build(model.trainable_variables)
    model.support.fill(np.tile(np.eye(config.proj_dim, dtype=np.float32), (2, 1)),
                       np.tile(source.train.coarse[:8], 2))
    out = model.forward(data["views"])

    def instance_loss():
        return float(model.loss_terms(out, data["label"], data["index"])["instance_loss"])

    def own_keys_loss():
        pairs = [losses.info_nce_loss(tf.math.l2_normalize(out["pred"][i], -1),
                                      tf.math.l2_normalize(out["target"][j], -1),
                                      config.instance_tau) for i, j in ((0, 1), (1, 0))]
        return config.lambda_inst * float(np.mean(pairs))

    before = instance_loss()
    assert before == pytest.approx(own_keys_loss(), rel=1e-5)
    model.optimizer.iterations.assign(2)
    assert instance_loss() != pytest.approx(before, rel=1e-3)
    from grafit_tf.errors import UserError

    with pytest.raises(UserError, match="nn_start_epochs"):
        small_config(instance_loss="infonce", instance_positives="coarse_nn",
                     nn_start_epochs=1.0).validate()


def test_prototype_term_swaps_codes_between_views_and_trains_the_prototypes():
    source = synthetic_source()
    data = batch(source)
    config = small_config(instance_loss="infonce", prototypes_per_coarse=3,
                          prototype_weight=0.7)
    model = builders.build_model(config, source, total_steps=4)
    num_coarse = source.hierarchy.num_coarse
    assert model.prototypes.kernel.shape == (3 * num_coarse, config.proj_dim)
    assert "prototype_loss" in model.objective.terms()
    out = model.forward(data["views"])
    terms = model.loss_terms(out, data["label"], data["index"])
    unit = lambda t: tf.math.l2_normalize(t, -1)
    want = 0.7 * np.mean([losses.coarse_prototype_loss(
        unit(out["pred"][a]), unit(out["target"][1 - a]), data["label"],
        model.prototypes.unit(), 3, config.prototype_tau, config.sinkhorn_epsilon).numpy()
        for a in range(2)])
    assert float(terms["prototype_loss"]) == pytest.approx(want, rel=1e-5)
    model.compile(optimizer=builders.build_optimizer(config, 4, 4))
    model.optimizer.build(model.trainable_variables)
    before = model.prototypes.kernel.numpy().copy()
    logs = tf.function(model.train_step)(data)
    assert np.isfinite(float(logs["prototype_loss"]))
    assert np.abs(model.prototypes.kernel.numpy() - before).max() > 0
    # Off by default, and never for the self-supervised `instance` (no labels).
    for plain in (small_config(instance_loss="infonce"), small_config(method="instance")):
        model = builders.build_model(plain, source, total_steps=4)
        assert model.prototypes is None and "prototype_loss" not in model.objective.terms()


def test_prototype_options_are_validated():
    from grafit_tf.errors import UserError

    for bad in (dict(prototypes_per_coarse=-1), dict(prototypes_per_coarse=2, lambda_inst=0.0),
                dict(prototypes_per_coarse=2, method="coarse_ce"),
                dict(prototypes_per_coarse=2, sinkhorn_epsilon=0.0),
                dict(prototypes_per_coarse=2, prototype_tau=-1.0)):
        with pytest.raises(UserError, match="prototype|sinkhorn"):
            small_config(**bad).validate()
    small_config(prototypes_per_coarse=2).validate()


def test_subcluster_term_reads_the_assignments_and_the_step_fills_the_bank():
    source = synthetic_source()
    data = batch(source)
    # 2 epochs: room for a term that starts after the first.
    config = small_config(epochs=2, subclusters_per_coarse=2, subcluster_weight=0.7,
                          subcluster_start_epochs=1)
    model = builders.build_model(config, source, total_steps=4)
    state = model.subclusters
    width = model.backbone.output_shape[-1]
    assert state.centroids.shape == (2 * source.hierarchy.num_coarse, width)
    assert "subcluster_loss" in model.objective.terms()
    out = model.forward(data["views"])
    # Before the first clustering every assignment is -1: the term is 0.
    assert float(model.loss_terms(out, data["label"], data["index"])["subcluster_loss"]) == 0.0
    rng = np.random.default_rng(1)
    state.bank.fill(rng.normal(size=(len(source.train.coarse), width)))
    state.recluster(round_=0)
    before = state.bank.embeddings.numpy().copy()
    terms = model.loss_terms(out, data["label"], data["index"])
    assigned = tf.gather(state.assignments, data["index"])
    want = 0.7 * np.mean([losses.subcluster_loss(
        out["feature"][v], data["label"], assigned, state.centroids, 2,
        config.subcluster_tau).numpy() for v in range(2)])
    assert want > 0 and float(terms["subcluster_loss"]) == pytest.approx(want, rel=1e-5)
    model.compile(optimizer=builders.build_optimizer(config, 4, 4))
    model.optimizer.build(model.trainable_variables)
    logs = tf.function(model.train_step)(data)
    assert np.isfinite(float(logs["subcluster_loss"]))
    # The step wrote its images' mean-view trunk features (those of the weights
    # before its update, as `out`) into their bank slots, and no other slot.
    mean_view = tf.math.l2_normalize(tf.reduce_mean(out["feature"], axis=0), axis=1).numpy()
    bank = state.bank.embeddings.numpy()
    np.testing.assert_allclose(bank[data["index"].numpy()], mean_view, atol=1e-5)
    np.testing.assert_array_equal(bank[8:], before[8:])
    # Off by default.
    plain = builders.build_model(small_config(), source, total_steps=4)
    assert plain.subclusters is None and "subcluster_loss" not in plain.objective.terms()


def test_aug_prediction_term_regresses_the_views_draws_and_trains_its_head():
    source = synthetic_source()
    data = batch(source, views=3)
    rng = np.random.default_rng(1)
    data["aug_params"] = tf.constant(rng.uniform(-1, 1, (8, 3, 6)), tf.float32)
    config = small_config(instance_loss="infonce", num_views=3, aug_pred_weight=0.7)
    model = builders.build_model(config, source, total_steps=4)
    assert "aug_loss" in model.objective.terms()
    out = model.forward(data["views"])
    terms = model.loss_terms(out, data["label"], data["index"], data["aug_params"])
    params = np.transpose(data["aug_params"].numpy(), (1, 0, 2))
    want = 0.7 * np.mean([losses.augmentation_prediction_loss(
        model.aug_head(tf.concat([out["trunk"][a], out["trunk"][b]], -1), training=True),
        params[a], params[b]).numpy() for a in range(3) for b in range(3) if a != b])
    assert float(terms["aug_loss"]) == pytest.approx(want, rel=1e-5)
    model.compile(optimizer=builders.build_optimizer(config, 4, 4))
    model.optimizer.build(model.trainable_variables)
    head_before = [w.numpy().copy() for w in model.aug_head.trainable_weights]
    logs = tf.function(model.train_step)(data)
    assert np.isfinite(float(logs["aug_loss"]))
    assert all(np.abs(w.numpy() - b).max() > 0
               for w, b in zip(model.aug_head.trainable_weights, head_before))
    # Off by default; the self-supervised `instance` may use it too.
    model = builders.build_model(small_config(), source, total_steps=4)
    assert model.aug_head is None and "aug_loss" not in model.objective.terms()
    model = builders.build_model(small_config(method="instance", aug_pred_weight=1.0), source,
                                 total_steps=4)
    assert model.aug_head is not None and "aug_loss" in model.objective.terms()

