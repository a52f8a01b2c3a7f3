"""`builders`: the `Objective` derived from a `Config`, and the model's assembly."""

import dataclasses

import keras
import numpy as np

from grafit_tf import augment, builders
from grafit_tf.config import Config
from grafit_tf.data import pipeline, types
from grafit_tf.model import Objective
from tests.synthetic import synthetic_source

# Objective fields that are not copied from the Config field of the same name.
DERIVED = {"method", "total_steps"}


def changed_value(field, default):
    """A valid value of a Config field other than its default."""
    meta = field.metadata
    if meta["choices"]:
        return next(c for c in meta["choices"] if c != default)
    if isinstance(default, bool):
        return not default
    top = meta["high"] if meta["high"] is not None else meta["below"]
    return default + 3 if top is None else (default + top) / 2


def changed_config(method):
    """A (valid) Config whose every Objective-shared field differs from its default."""
    config_fields = {f.name: f for f in dataclasses.fields(Config)}
    values = {}
    for f in dataclasses.fields(Objective):
        if f.name in DERIVED or f.name not in config_fields:
            continue
        values[f.name] = changed_value(config_fields[f.name], getattr(Config(), f.name))
    config = Config(method=method, epochs=4, **values)
    config.validate()
    return config, values


def test_every_shared_field_is_copied():
    config, values = changed_config("grafit")
    obj = builders.objective(config, total_steps=400)
    assert values, "the test changes no field"
    for name, value in values.items():
        assert getattr(obj, name) == value, name
    assert obj.method == "grafit" and obj.total_steps == 400


def test_every_objective_field_comes_from_the_config_or_is_derived():
    shared = {f.name for f in dataclasses.fields(Objective)} - DERIVED
    names = {f.name for f in dataclasses.fields(Config)}
    missing = shared - names
    assert not missing, f"Objective fields the Config cannot set: {missing}"


def test_finetune_trains_as_fine_ce_and_total_steps_is_positive():
    obj = builders.objective(Config(method="finetune"), total_steps=0)
    assert obj.method == "fine_ce" and obj.cross_entropy and obj.total_steps == 1


def test_init_trunk_loads_the_trunk_before_the_target_copies_it():
    config = Config(batch_size=8, width=4, proj_hidden=16, knn_dim=8, proj_dim=8, epochs=1,
                    warmup_epochs=0)
    seen = []

    def init_trunk(trunk):
        seen.append(trunk)
        for w in trunk.weights:
            w.assign(np.full(w.shape, 0.25, w.dtype))

    model = builders.build_model(config, synthetic_source(), total_steps=4,
                                 init_trunk=init_trunk)
    assert seen == [model.backbone]
    assert all(np.all(w.numpy() == 0.25) for w in model.backbone.weights)
    # The EMA target starts as a copy of the loaded trunk, not of the random one.
    for online, target in zip(model.backbone.weights, model.target_backbone.weights):
        np.testing.assert_array_equal(online.numpy(), target.numpy())


def test_optimizer_warms_up_then_decays_to_zero():
    config = Config(learning_rate=0.1, warmup_epochs=1, epochs=4)
    opt = builders.build_optimizer(config, total_steps=40, steps_per_epoch=10)
    got = []
    for step in (0, 5, 10, 25, 40):
        opt.iterations.assign(step)
        got.append(float(opt.learning_rate))
    # 10 warm-up steps to 0.1, then a cosine over the 30 others (half-way: 0.05).
    np.testing.assert_allclose(got, [0.0, 0.05, 0.1, 0.05, 0.0], atol=1e-6)
    sgd = builders.build_optimizer(config.replace(optimizer="sgd"), 40, 10)
    assert sgd.momentum == 0.9 and sgd.nesterov


def test_sgd_l2_steps_as_torch_sgd_with_weight_decay():
    """--optimizer=sgd_l2 is torch.optim.SGD(momentum=0.9, weight_decay=wd), transcribed:
    g <- g + wd w (every weight); b <- 0.9 b + g; w <- w - lr b (at a constant rate)."""
    config = Config(optimizer="sgd_l2", learning_rate=0.1, weight_decay=0.05, epochs=1,
                    warmup_epochs=0)
    optimizer = builders.build_optimizer(config, total_steps=10**6, steps_per_epoch=10**6)
    w = keras.Variable(np.array([1.0, -2.0, 0.5], "float32"), name="bn_gamma")
    want, buf = w.numpy().astype(np.float64), np.zeros(3)
    for g in ([0.3, 0.1, -0.2], [0.0, 0.4, 0.1], [-0.1, 0.0, 0.2]):
        optimizer.apply([np.array(g, "float32")], [w])
        buf = 0.9 * buf + np.array(g) + 0.05 * want
        want = want - 0.1 * buf
        np.testing.assert_allclose(w.numpy(), want, rtol=2e-6)


def test_rgb_views_are_colour_jittered_in_the_train_step():
    """RGB views leave the pipeline unjittered, with their draws; `GrafitModel.views` (the
    train step's input) jitters them with the config's strength and gamma. One-channel
    views come from the pipeline final."""
    gray = synthetic_source(16)
    rgb_split = dataclasses.replace(gray.train, images=np.repeat(gray.train.images, 3, -1))
    rgb = types.Source("rgb", rgb_split, rgb_split, gray.hierarchy, (12, 12, 3),
                       (127.0,) * 3, (70.0,) * 3)
    config = Config(batch_size=8, width=4, proj_hidden=8, proj_dim=8, knn_dim=8, epochs=1,
                    num_views=2, jitter_strength=0.3, gamma_jitter=0.5)
    batch = next(iter(pipeline.train_dataset_fn(rgb, config)()))
    got = builders.build_model(config, rgb, total_steps=2).views(batch)
    want = augment.colour(batch["views"], batch["colour"], 0.3, gamma=0.5)
    np.testing.assert_array_equal(got, want)
    assert not np.allclose(got, batch["views"], atol=1)
    batch = next(iter(pipeline.train_dataset_fn(gray, config)()))
    assert "colour" not in batch
    assert builders.build_model(config, gray, total_steps=2).views(batch) is batch["views"]
