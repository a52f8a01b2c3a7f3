"""bench/runs.py: a finished run is reused only if it has the command's settings."""

import json
import subprocess
import sys

import pytest

from bench.runs import check_reusable, train_or_reuse
from tests.conftest import REPO

ARGS = ["--flagfile=configs/fashion_mnist.cfg", "--epochs=2", "--tau=0.03"]


@pytest.fixture
def finished_run(tmp_path):
    """A work directory as train.py leaves it, with a sentinel metrics.json."""
    resolved = subprocess.run([sys.executable, "train.py", *ARGS, "--workdir=x", "--dry_run"],
                              cwd=REPO, check=True, capture_output=True, text=True).stdout
    config = dict(json.loads(resolved), num_replicas=1, data={"image_shape": [28, 28, 1]})
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "metrics.json").write_text(json.dumps({"sentinel": 1}))
    return tmp_path


def test_reuses_a_run_of_the_same_settings(finished_run):
    # No training happens (it would take minutes and rewrite metrics.json).
    assert train_or_reuse(ARGS + ["--verbose=2"], str(finished_run)) == {"sentinel": 1}


def test_refuses_a_run_of_other_settings(finished_run):
    with pytest.raises(SystemExit, match=r"tau: 0\.03 -> 0\.05"):
        train_or_reuse(ARGS[:-1], str(finished_run))
    with pytest.raises(SystemExit, match="trained with other settings"):
        train_or_reuse(ARGS + ["--batch_size=64"], str(finished_run))


def test_resolved_config_follows_nested_flagfiles_and_overrides():
    from bench.runs import resolved_config

    # Two levels: coarse2_lambda1.cfg includes two_views.cfg, then changes three settings.
    config = resolved_config(["--flagfile=configs/fashion_mnist_coarse2_lambda1.cfg",
                              "--epochs=3"])
    assert config.coarse_map.endswith("fashion_mnist_coarse2.json")
    assert (config.batch_size, config.memory, config.crop_scale_min) == (256, "full", 0.8)
    assert (config.num_views, config.weight_decay, config.epochs) == (2, 0.05, 3)
    # coarse2.cfg is the default with only the coarse map changed.
    default = resolved_config(["--flagfile=configs/fashion_mnist.cfg"])
    coarse2 = resolved_config(["--flagfile=configs/fashion_mnist_coarse2.cfg"])
    assert coarse2.differences(default.to_dict()) == [
        f"coarse_map: {default.coarse_map!r} -> {coarse2.coarse_map!r}"]


def test_check_reusable_needs_a_finished_run(finished_run, tmp_path):
    assert check_reusable(ARGS, str(finished_run)).endswith("metrics.json")
    with pytest.raises(SystemExit, match="no finished run there"):
        check_reusable(ARGS, str(tmp_path / "absent"))


def test_over_seeds_gives_mean_and_population_std():
    from bench.runs import over_seeds
    row = over_seeds([{"a": 0.8, "b": 1.0, "c": "ignored"}, {"a": 0.9, "b": 3.0}], ["a", "b"])
    assert row == pytest.approx({"a": 0.85, "a_std": 0.05, "b": 2.0, "b_std": 1.0})
    assert all(type(v) is float for v in row.values())  # JSON-serialisable, not NumPy.
    with pytest.raises(KeyError):
        over_seeds([{"a": 1.0}, {}], ["a"])


def test_quality_run_names_the_run_and_checks_its_overrides(tmp_path):
    """The scoring benches find bench/quality.py's runs with its flags, overrides last."""
    from bench.runs import quality_run

    args, workdir = quality_run("configs/fashion_mnist.cfg", str(tmp_path), "grafit", 2,
                                ["--num_views=4"])
    assert args == ["--flagfile=configs/fashion_mnist.cfg", "--method=grafit", "--seed=2",
                    "--num_views=4"]
    assert workdir == str(tmp_path / "grafit_seed2")
    # A run trained with the override is accepted with it and refused without it.
    resolved = subprocess.run([sys.executable, "train.py", *args, "--workdir=x", "--dry_run"],
                              cwd=REPO, check=True, capture_output=True, text=True).stdout
    run = tmp_path / "grafit_seed2"
    run.mkdir()
    (run / "config.json").write_text(json.dumps(dict(json.loads(resolved), num_replicas=1)))
    (run / "metrics.json").write_text("{}")
    assert check_reusable(args, workdir).endswith("metrics.json")
    plain, _ = quality_run("configs/fashion_mnist.cfg", str(tmp_path), "grafit", 2)
    with pytest.raises(SystemExit, match="num_views: 4 -> 3"):
        check_reusable(plain, workdir)
    # What the scoring benches call: the same lookup and check in one.
    from bench.runs import finished_quality_run

    assert finished_quality_run("configs/fashion_mnist.cfg", str(tmp_path), "grafit", 2,
                                ["--num_views=4"]) == workdir
    with pytest.raises(SystemExit, match="num_views: 4 -> 3"):
        finished_quality_run("configs/fashion_mnist.cfg", str(tmp_path), "grafit", 2)
