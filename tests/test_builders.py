"""`builders.objective`: what `train_step` optimises, derived from a `Config`."""

import dataclasses

from grafit_tf import builders
from grafit_tf.config import Config
from grafit_tf.model import Objective

# Objective fields that are not copied from the Config of the same name.
DERIVED = {"method", "total_steps", "nn_start_step", "instance_negatives", "instance_targets",
           "instance_positives"}


def changed_config(method):
    """A Config whose every Objective-shared field differs from its default."""
    values = {}
    for f in dataclasses.fields(Objective):
        if f.name in DERIVED or not hasattr(Config, f.name):
            continue
        default = getattr(Config, f.name)
        if isinstance(default, bool):
            values[f.name] = not default
        elif isinstance(default, (int, float)):
            values[f.name] = default + 3
        elif f.name == "instance_loss":
            values[f.name] = "infonce" if default == "byol" else "byol"
        elif f.name == "ema_schedule":
            values[f.name] = "constant" if default == "cosine" else "cosine"
        elif f.name == "nca_keys":
            values[f.name] = "target" if default == "online" else "online"
    return Config(method=method, epochs=4, instance_negatives="same_coarse",
                  instance_targets="coarse_soft", instance_positives="coarse_nn",
                  nn_start_epochs=1.0, **values), values


def test_every_shared_field_is_copied():
    config, values = changed_config("grafit")
    obj = builders.objective(config, total_steps=400)
    assert values, "the test changes no field"
    for name, value in values.items():
        assert getattr(obj, name) == value, name
    assert obj.method == "grafit" and obj.total_steps == 400
    assert obj.nn_start_step == 100  # 1 of 4 epochs
    assert (obj.instance_negatives, obj.instance_targets, obj.instance_positives) == (
        "same_coarse", "coarse_soft", "coarse_nn")


def test_every_objective_field_comes_from_the_config_or_is_derived():
    shared = {f.name for f in dataclasses.fields(Objective)} - DERIVED
    missing = {name for name in shared if not hasattr(Config, name)}
    assert not missing, f"Objective fields the Config cannot set: {missing}"


def test_labels_reach_the_instance_loss_in_grafit_only():
    config, _ = changed_config("instance")
    obj = builders.objective(config, total_steps=400)
    assert (obj.instance_negatives, obj.instance_targets, obj.instance_positives) == (
        "all", "own", "own")


def test_finetune_trains_as_fine_ce_and_total_steps_is_positive():
    obj = builders.objective(Config(method="finetune"), total_steps=0)
    assert obj.method == "fine_ce" and obj.cross_entropy and obj.total_steps == 1
