"""Config validation, flags, and every file in configs/."""

import dataclasses
import glob
import os

import pytest
from absl import flags

import train
from grafit_tf.config import Config
from grafit_tf.errors import UserError
from tests.conftest import REPO

CONFIGS = sorted(glob.glob(os.path.join(REPO, "configs", "*.cfg")))


def parse(argv):
    train.define_flags()
    flags.FLAGS.unparse_flags()
    flags.FLAGS(["train.py", *argv])
    return train.config_from_flags()


def test_every_field_has_a_flag_with_help():
    train.define_flags()
    for field in dataclasses.fields(Config):
        flag = flags.FLAGS[field.name]
        assert flag.help and len(flag.help) > 10, field.name
        assert flag.default == field.default, field.name


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_config_file_parses_and_validates(path, monkeypatch):
    monkeypatch.chdir(REPO)  # Nested flagfiles are relative to the repo root.
    config = parse([f"--flagfile={path}", "--workdir=/tmp/x"])
    config.validate()
    first = open(path, encoding="utf-8").readline()
    assert first.startswith("#"), "each config starts with a comment saying what it reproduces"


def test_baseline_configs_exist_and_differ_only_by_method(monkeypatch):
    monkeypatch.chdir(REPO)
    base = parse(["--flagfile=configs/fashion_mnist.cfg", "--workdir=/tmp/x"])
    assert base.method == "grafit"
    for method in ("coarse_ce", "instance", "fine_ce"):
        other = parse([f"--flagfile=configs/fashion_mnist_{method}.cfg", "--workdir=/tmp/x"])
        assert other == base.replace(method=method)


# The default's three changes from the fourth default (pinned as
# fashion_mnist_two_views.cfg, which most of BENCHMARKS.md was measured with).
FIFTH_DEFAULT = dict(num_views=3, gamma_jitter=0.5, weight_decay=0.2)


@pytest.mark.parametrize("name,changes", [
    ("fashion_mnist.cfg", FIFTH_DEFAULT),
    ("fashion_mnist_full.cfg", dict(width=32)),
    ("fashion_mnist_views3_gamma.cfg", dict(num_views=3, gamma_jitter=0.5)),
    ("fashion_mnist_views3_gamma_wd.cfg", FIFTH_DEFAULT),
], ids=["default", "full", "views3_gamma", "views3_gamma_wd"])
def test_preset_config_is_the_fourth_default_with_its_changes(name, changes, monkeypatch):
    monkeypatch.chdir(REPO)
    base = parse(["--flagfile=configs/fashion_mnist_two_views.cfg", "--workdir=/tmp/x"])
    assert base.num_views == 2 and base.weight_decay == 0.05 and base.gamma_jitter == 0.0
    preset = parse([f"--flagfile=configs/{name}", "--workdir=/tmp/x"])
    assert preset == base.replace(**changes)


def test_flags_after_flagfile_override(monkeypatch):
    monkeypatch.chdir(REPO)
    config = parse(["--flagfile=configs/fashion_mnist.cfg", "--workdir=/tmp/x", "--epochs=1",
                    "--max_train_examples=2000"])
    assert config.epochs == 1 and config.max_train_examples == 2000


@pytest.mark.parametrize("changes,needle", [
    (dict(method="nope"), "--method"),
    (dict(dataset="mnist"), "--dataset"),
    (dict(memory="queue", queue_size=8, batch_size=16), "--queue_size"),
    (dict(num_views=1), "--num_views"),
    (dict(num_views=1, method="instance"), "--num_views"),
    (dict(num_views=0, method="coarse_ce"), "--num_views"),
    (dict(embedding="knn_head", method="coarse_ce"), "--embedding"),
    (dict(embedding_transform="pca"), "--embedding_transform"),
    (dict(embedding_transform="whiten", whiten_shrinkage=-1.0), "--whiten_shrinkage"),
    (dict(head_layers=0), "--head_layers"),
    (dict(ema_schedule="linear"), "--ema_schedule"),
    (dict(nca_keys="ema"), "--nca_keys"),
    (dict(nca_keys="target", lambda_inst=0.0), "--nca_keys"),
    (dict(aug_pred_weight=-1.0), "--aug_pred_weight"),
    (dict(aug_pred_weight=1.0, method="coarse_ce"), "--aug_pred_weight"),
    (dict(aug_pred_weight=1.0, method="grafit_maskcon"), "--aug_pred_weight"),
    (dict(erase_prob=1.5), "--erase_prob"),
    (dict(gamma_jitter=-0.1), "--gamma_jitter"),
    (dict(gamma_jitter=2.5), "--gamma_jitter"),
    (dict(erase_scale_max=0.01), "--erase_scale_max"),
    (dict(instance_decoupled=True, instance_loss="byol"), "--instance_decoupled"),
    (dict(instance_decoupled=True, instance_loss="infonce", instance_targets="coarse_soft"),
     "--instance_decoupled"),
    (dict(subclusters_per_coarse=-1), "--subclusters_per_coarse"),
    (dict(subclusters_per_coarse=8, method="coarse_ce"), "--subclusters_per_coarse"),
    (dict(subclusters_per_coarse=8, subcluster_tau=0.0), "--subcluster_weight"),
    (dict(subclusters_per_coarse=8, subcluster_weight=-1.0), "--subcluster_weight"),
    (dict(subclusters_per_coarse=8, subcluster_start_epochs=0), "--subcluster_start_epochs"),
    (dict(subclusters_per_coarse=8, subcluster_start_epochs=10), "--subcluster_start_epochs"),
])
def test_validate_rejects(changes, needle):
    with pytest.raises(UserError, match=needle):
        Config(**changes).validate()


@pytest.mark.parametrize("method", ["coarse_ce", "fine_ce", "finetune"])
def test_cross_entropy_methods_may_train_on_one_view(method):
    Config(method=method, num_views=1).validate()


@pytest.mark.parametrize("method", ["coarse_ce", "instance", "fine_ce", "grafit_maskcon"])
def test_target_nca_keys_are_ignored_by_methods_without_the_kNN_loss(method):
    # A bench's --override=--nca_keys=target reaches every method it trains.
    Config(method=method, nca_keys="target", lambda_inst=0.0).validate()


def test_round_trip():
    config = Config(epochs=3, tau=0.1)
    assert Config.from_dict(dict(config.to_dict(), unknown_key=1)) == config


def test_differences_from_a_saved_run():
    stored = dict(Config().to_dict(), data={"image_shape": [28, 28, 1]}, num_replicas=1)
    assert Config().differences(stored) == []
    del stored["instance_negatives"]  # A run older than the field used its default.
    assert Config().differences(stored) == []
    assert Config(verbose=0, eval_every=3).differences(stored) == []  # Operational only.
    assert Config(tau=0.1, epochs=2).differences(stored) == ["tau: 0.05 -> 0.1",
                                                             "epochs: 10 -> 2"]
    stored["instance_negatives"] = "same_coarse"
    assert Config().differences(stored) == ["instance_negatives: 'same_coarse' -> 'all'"]
