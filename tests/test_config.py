"""`Config`: its fields' help and ranges, `validate()`, the flags of train.py, configs/*.cfg."""

import dataclasses
import glob
import json
import math
import os
import subprocess
import sys
import types

import pytest
from absl import flags

import train
from grafit_tf.config import Config
from grafit_tf.errors import UserError
from tests.conftest import REPO

CONFIGS = sorted(glob.glob(os.path.join(REPO, "configs", "*.cfg")))
FIELDS = dataclasses.fields(Config)
NUMERIC = [f for f in FIELDS if isinstance(f.default, (int, float))
           and not isinstance(f.default, bool)]


def parse(argv):
    """The `Config` train.py builds from `argv` (flags only: not validated)."""
    train.define_flags()
    flags.FLAGS.unparse_flags()
    flags.FLAGS(["train.py", *argv])
    return Config(**{f.name: getattr(flags.FLAGS, f.name) for f in FIELDS})


def run_train(*argv):
    """train.py in a subprocess (it imports no TensorFlow before training)."""
    return subprocess.run([sys.executable, "train.py", *argv], cwd=REPO, capture_output=True,
                          text=True, timeout=120)


# --- Fields and flags ---------------------------------------------------------


@pytest.mark.parametrize("field", FIELDS, ids=lambda f: f.name)
def test_every_field_has_help_text(field):
    assert isinstance(field.metadata.get("help"), str)
    assert len(field.metadata["help"].strip()) > 10, field.name


def test_every_field_has_a_flag_with_its_help_and_default():
    train.define_flags()
    for field in FIELDS:
        flag = flags.FLAGS[field.name]
        assert flag.help == field.metadata["help"], field.name
        assert flag.default == field.default, field.name


def test_every_numeric_field_has_a_range_its_default_is_in():
    for field in NUMERIC:
        meta = field.metadata
        assert any(meta[k] is not None for k in ("low", "high", "above", "below")), field.name
    Config().validate()


def test_helpshort_lists_at_most_54_flags():
    result = run_train("--helpshort")
    assert result.returncode in (0, 1), result.stderr
    listed = [line for line in result.stdout.splitlines() if line.startswith("  --")]
    assert len(FIELDS) + 2 == len(listed) <= 54, len(listed)  # + --workdir, --dry_run.


# --- configs/ ------------------------------------------------------------------


def test_there_are_configs():
    assert len(CONFIGS) >= 2


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_config_file_passes_dry_run(path, monkeypatch):
    first = open(path, encoding="utf-8").readline()
    assert first.startswith("#"), "each config starts with a comment saying what it reproduces"
    result = run_train(f"--flagfile={os.path.relpath(path, REPO)}", "--workdir=/tmp/x",
                       "--dry_run")
    assert result.returncode == 0, result.stderr
    printed = Config.from_dict(json.loads(result.stdout))
    monkeypatch.chdir(REPO)  # Nested flagfiles are relative to the repo root.
    assert printed == parse([f"--flagfile={path}", "--workdir=/tmp/x"])


def test_coarse2_config_is_the_default_with_its_coarse_map(monkeypatch):
    monkeypatch.chdir(REPO)
    base = parse(["--flagfile=configs/fashion_mnist.cfg", "--workdir=/tmp/x"])
    coarse2 = parse(["--flagfile=configs/fashion_mnist_coarse2.cfg", "--workdir=/tmp/x"])
    assert coarse2 == base.replace(coarse_map="grafit_tf/data/maps/fashion_mnist_coarse2.json")
    assert os.path.isfile(os.path.join(REPO, coarse2.coarse_map))


def test_flags_after_flagfile_override(monkeypatch):
    monkeypatch.chdir(REPO)
    config = parse(["--flagfile=configs/fashion_mnist.cfg", "--workdir=/tmp/x", "--epochs=1",
                    "--max_train_examples=2000", "--method=coarse_ce"])
    assert config.epochs == 1 and config.max_train_examples == 2000
    assert config.method == "coarse_ce"


# --- validate() ----------------------------------------------------------------


def out_of_range(field):
    """Values just outside a numeric field's range, NaN and the infinities among them."""
    meta = field.metadata
    is_int = isinstance(field.default, int)
    step = 1 if is_int else 1e-3
    bad = [math.nan]
    if meta["low"] is not None:
        bad.append(meta["low"] - step)
    if meta["above"] is not None:
        bad.append(meta["above"])
    if meta["high"] is not None:
        bad.append(meta["high"] + step)
    if meta["below"] is not None:
        bad.append(meta["below"])
    if not is_int:
        bad += [math.inf, -math.inf]
    return bad


BAD_NUMBERS = [(f.name, value) for f in NUMERIC for value in out_of_range(f)]


def assert_one_line_naming(error, flag):
    message = str(error.value)
    assert "\n" not in message and message.startswith(flag), message


@pytest.mark.parametrize("name,value", BAD_NUMBERS,
                         ids=[f"{n}={v}" for n, v in BAD_NUMBERS])
def test_every_numeric_field_rejects_nan_and_values_out_of_its_range(name, value):
    with pytest.raises(UserError) as e:
        Config(**{name: value}).validate()
    assert_one_line_naming(e, f"--{name}=")


@pytest.mark.parametrize("flag", [
    "--learning_rate=nan", "--instance_tau=0", "--width=0", "--crop_scale_min=1.5",
    "--learning_rate=-1", "--weight_decay=-1", "--lambda_inst=nan", "--checkpoint_every=-1",
    "--tau=inf", "--memory_momentum=1", "--label_smoothing=1", "--batch_size=1",
])
def test_bad_flag_values_stop_with_one_line(flag):
    name = flag.split("=")[0]
    with pytest.raises(UserError) as e:
        parse([flag, "--workdir=/tmp/x"]).validate()
    assert_one_line_naming(e, f"{name}=")


def test_train_py_prints_the_one_line_and_exits_2():
    result = run_train("--learning_rate=nan", "--workdir=/tmp/x", "--dry_run")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: --learning_rate=nan: must be in (0.0, 100.0]."]
    assert result.stdout == ""


@pytest.mark.parametrize("field", [f for f in FIELDS if f.metadata["choices"]],
                         ids=lambda f: f.name)
def test_every_choice_field_rejects_an_unknown_value(field):
    for choice in field.metadata["choices"]:
        assert isinstance(choice, str)
    with pytest.raises(UserError) as e:
        Config(**{field.name: "nope"}).validate()
    assert_one_line_naming(e, f"--{field.name}='nope'")


@pytest.mark.parametrize("changes,needle", [
    (dict(method="nope"), "--method"),
    (dict(dataset="mnist"), "--dataset"),
    (dict(memory="queue", queue_size=8, batch_size=16), "--queue_size"),
    (dict(method="grafit_maskcon", queue_size=8, batch_size=16), "--queue_size"),
    (dict(num_views=1), "--num_views"),
    (dict(num_views=1, method="instance"), "--num_views"),
    (dict(num_views=1, method="grafit_maskcon"), "--num_views"),
    (dict(num_views=0, method="coarse_ce"), "--num_views"),
    (dict(gamma_jitter=-0.1), "--gamma_jitter"),
    (dict(gamma_jitter=2.5), "--gamma_jitter"),
    (dict(warmup_epochs=3.0, epochs=2), "--warmup_epochs"),
    (dict(init_from="/tmp/run", weights="w.weights.h5", backbone="resnet50"), "--init_from"),
    (dict(weights="w.weights.h5"), "--weights"),
    (dict(sop_split="maskcon1"), "--sop_split"),
])
def test_validate_rejects(changes, needle):
    with pytest.raises(UserError, match=needle) as e:
        Config(**changes).validate()
    assert "\n" not in str(e.value)


def test_warmup_may_last_the_whole_training():
    Config(warmup_epochs=2.0, epochs=2).validate()
    Config(warmup_epochs=0.0, epochs=1).validate()
    Config(weights="w.weights.h5", backbone="resnet50").validate()
    Config(weights="w.weights.h5", backbone="resnet18").validate()
    Config(memory="queue", queue_size=16, batch_size=16).validate()


@pytest.mark.parametrize("method", ["coarse_ce", "fine_ce", "finetune"])
def test_cross_entropy_methods_may_train_on_one_view(method):
    Config(method=method, num_views=1, init_from="W" if method == "finetune" else "").validate()


def test_finetune_needs_a_trunk_to_start_from():
    with pytest.raises(UserError, match="--method=finetune fine-tunes a trained trunk"):
        Config(method="finetune").validate()


def test_full_size_trunks_need_32_pixels():
    with pytest.raises(UserError, match="--backbone=resnet50 needs images of at least 32 px"):
        Config(backbone="resnet50").validate(fake_source(512, 1))


def fake_source(n, channels):
    """What `validate` reads of a loaded dataset: the training split's length, the shape."""
    return types.SimpleNamespace(train=range(n), image_shape=(28, 28, channels))


def test_validate_checks_the_batch_against_the_replicas():
    config = Config(batch_size=12)
    config.validate(replicas=3)
    config.validate(fake_source(100, 1), replicas=4)
    with pytest.raises(UserError) as e:
        config.validate(replicas=5)
    assert_one_line_naming(e, "--batch_size=12")
    assert "5 replicas" in str(e.value)
    with pytest.raises(UserError, match="--batch_size=12"):
        config.validate(fake_source(100, 1), replicas=8)


def test_validate_checks_the_batch_against_the_training_split():
    config = Config(batch_size=64)
    config.validate(fake_source(64, 1))
    with pytest.raises(UserError, match="holds 63 images.*--batch_size=64") as e:
        config.validate(fake_source(63, 1))
    assert "\n" not in str(e.value)
    # Without the data, nothing that needs it is checked.
    config.validate(None)


def test_rand_augment_needs_rgb_images():
    config = Config(rand_augment=True, batch_size=8)
    config.validate()  # The data is not known yet.
    config.validate(fake_source(16, 3))
    with pytest.raises(UserError, match="--rand_augment") as e:
        config.validate(fake_source(16, 1))
    assert "\n" not in str(e.value)


# --- Serialisation ---------------------------------------------------------------


def test_round_trip():
    config = Config(epochs=3, tau=0.1)
    assert Config.from_dict(dict(config.to_dict(), unknown_key=1)) == config
    assert Config.from_dict(json.loads(config.to_json())) == config


def test_differences_from_a_saved_run():
    stored = dict(Config().to_dict(), data={"image_shape": [28, 28, 1]}, num_replicas=1)
    assert Config().differences(stored) == []
    del stored["gamma_jitter"]  # A run older than the field used its default.
    assert Config().differences(stored) == []
    assert Config(verbose=0, eval_every=3).differences(stored) == []  # Operational only.
    assert Config(tau=0.1, epochs=2).differences(stored) == ["tau: 0.05 -> 0.1",
                                                             "epochs: 10 -> 2"]
    stored["gamma_jitter"] = 0.5
    assert Config().differences(stored) == ["gamma_jitter: 0.5 -> 0.0"]
    # A run's field this version no longer has (a deleted option) is not a difference.
    assert Config().differences(dict(stored, gamma_jitter=0.0, koleo_weight=0.1)) == []
