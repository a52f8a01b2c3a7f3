"""bench/scoring_flags.py: the scoring benches' shared flags and their table's footing."""

import json

from absl import flags

from bench import scoring_flags, sections


def _parsed(argv, **kwargs):
    fv = flags.FlagValues()
    scoring_flags.define("demo", ["grafit", "coarse_ce"], flag_values=fv, **kwargs)
    fv(["bench/demo.py", *argv])
    return fv


def test_define_names_the_runs_like_bench_quality():
    fv = _parsed(["--seeds=3", "--workdir=runs/q3", "--override=--num_views=3",
                  "--override=--epochs=8", "--methods=grafit"])
    assert (fv.config, fv.methods, fv.seeds, fv.workdir) == (
        "configs/fashion_mnist.cfg", ["grafit"], 3, "runs/q3")
    assert fv.override == ["--num_views=3", "--epochs=8"]  # In order: the last one wins.
    assert fv.name == "demo" and fv.update_benchmarks
    assert _parsed([], methods_help="Lead of the first.")["methods"].help == "Lead of the first."


def _published(monkeypatch, tmp_path, argv, spread=""):
    monkeypatch.setattr(sections, "ROOT", str(tmp_path))
    fv = _parsed(["--update_benchmarks=false", *argv])
    text = scoring_flags.publish_table([{"m": 1}], "| m |", spread, flag_values=fv)
    saved = json.loads((tmp_path / "bench" / "results" / "demo.json").read_text())
    return text, saved


def test_publish_table_notes_the_seeds_it_averages(monkeypatch, tmp_path):
    text, saved = _published(monkeypatch, tmp_path, ["--seeds=3", "--override=--num_views=3"],
                             spread="spread (std): grafit +/- 0.26")
    assert "| m |\n\nMean over seeds 0..2; spread (std): grafit +/- 0.26.\n" in text
    assert saved["overrides"] == ["--num_views=3"] and saved["rows"] == [{"m": 1}]
    assert saved["config"] == "configs/fashion_mnist.cfg"
    assert not (tmp_path / "BENCHMARKS.md").exists()


def test_publish_table_says_nothing_of_seeds_for_one(monkeypatch, tmp_path):
    text, _ = _published(monkeypatch, tmp_path, [], spread="spread (std): none")
    assert "Mean over seeds" not in text and "spread" not in text
    assert text.startswith("| m |\n\nCommand: ")
