"""bench/runs.py: a finished run is reused only if it has the command's settings; a bench
rewrites only its own section of BENCHMARKS.md and records its command."""

import json
import os
import subprocess
import sys

import pytest

from bench import runs
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

    # coarse2.cfg includes the default, then changes the coarse map; --epochs comes last.
    default = resolved_config(["--flagfile=configs/fashion_mnist.cfg"])
    coarse2 = resolved_config(["--flagfile=configs/fashion_mnist_coarse2.cfg"])
    assert coarse2.coarse_map.endswith("fashion_mnist_coarse2.json")
    assert coarse2.differences(default.to_dict()) == [
        f"coarse_map: {default.coarse_map!r} -> {coarse2.coarse_map!r}"]
    assert resolved_config(["--flagfile=configs/fashion_mnist_coarse2.cfg",
                            "--epochs=3"]).replace(epochs=default.epochs) == coarse2


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
    """bench/quality.py names its runs with its flags, overrides last."""
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


def test_update_section_replaces_only_its_block(tmp_path):
    path = tmp_path / "B.md"
    path.write_text("# B\n\nbefore\n<!-- t:begin -->\nold\n<!-- t:end -->\nafter\n")
    runs.update_section(str(path), "t", "new\n")
    assert path.read_text() == "# B\n\nbefore\n<!-- t:begin -->\nnew\n<!-- t:end -->\nafter\n"
    runs.update_section(str(path), "u", "other\n")  # No markers yet: appended.
    assert path.read_text().endswith("after\n\n<!-- u:begin -->\nother\n<!-- u:end -->\n")
    assert "new\n" in path.read_text()


def test_invocation_names_the_module_and_shell_quotes():
    # `python -m bench.quality ...` puts the module's file path in sys.argv[0].
    argv = [os.path.join(REPO, "bench", "quality.py"), "--seeds=3", "--override=--tau=0.1 x"]
    assert runs.invocation(argv) == "python -m bench.quality --seeds=3 '--override=--tau=0.1 x'"
    outside = os.path.join(os.path.dirname(REPO), "elsewhere.py")
    assert runs.invocation([outside, "--a"]) == f"python {os.path.relpath(outside, REPO)} --a"


def test_publish_writes_results_json_without_touching_benchmarks(monkeypatch, tmp_path):
    fake_root = tmp_path / "repo"  # publish writes under the repository root.
    monkeypatch.setattr(runs, "ROOT", str(fake_root))
    text = runs.publish("demo", [{"m": 1}], "| m |", update=False,
                        extra={"config": "c.cfg"}, command="python -m bench.x")
    saved = json.loads((fake_root / "bench" / "results" / "demo.json").read_text())
    assert saved["command"] == "python -m bench.x" and saved["rows"] == [{"m": 1}]
    assert saved["config"] == "c.cfg"
    assert text.startswith("| m |") and "Command: `python -m bench.x`" in text
    assert not (fake_root / "BENCHMARKS.md").exists()
