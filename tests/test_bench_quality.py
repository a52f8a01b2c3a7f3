"""bench/quality.py: the equal-budget selection on the validation split."""

import json

import pytest
from absl import flags

from bench import quality


@pytest.fixture
def bench(monkeypatch, tmp_path):
    """Runs bench.quality's main with fake trainings: `calls` gets each run's flags."""
    calls, published = [], {}

    def fake_train(args, workdir, reuse=True):
        calls.append((args, workdir))
        opt = dict(a[2:].split("=", 1) for a in args if a.startswith("--") and "=" in a)
        lr, wd = float(opt.get("learning_rate", 2e-3)), float(opt.get("weight_decay", 0.2))
        # A score that peaks at a method's own point: grafit 2e-3 / 0.2, the others 4e-3 / 0.01.
        best = (2e-3, 0.2) if opt["method"] == "grafit" else (4e-3, 0.01)
        score = 0.9 - abs(lr - best[0]) - abs(wd - best[1]) / 10
        return {k: score for k, _ in quality.evaluation.METRIC_COLUMNS if k != "method"} | {
            "train_seconds": 60.0, "history": []}

    monkeypatch.setattr(quality, "train_or_reuse", fake_train)
    monkeypatch.setattr(quality, "publish", lambda name, rows, body, **kw: published.update(
        name=name, rows=rows, body=body))

    def run(*argv):
        fv = flags.FlagValues()  # Not absl's global flags: train.py's share their names.
        quality.define_flags(fv)
        fv(["quality", f"--workdir={tmp_path}", "--raw_pixels=false", *argv])
        monkeypatch.setattr(quality, "FLAGS", fv)
        calls.clear()
        quality.main([])
        return calls, published
    return run


def test_each_method_gets_the_same_grid_and_its_own_best_point(bench, tmp_path):
    calls, published = bench("--methods=grafit,coarse_ce", "--select_on=validation", "--seeds=2")
    selection = [args for args, workdir in calls if "/select/" in workdir]
    assert len(selection) == 2 * 9  # Same 3 x 3 points for both methods.
    assert all("--eval_split=validation" in a and "--epochs=4" in a for a in selection)
    final = [args for args, workdir in calls if "/select/" not in workdir]
    assert len(final) == 4 and not any("--eval_split=validation" in a for a in final)
    rows = {r["method"]: r for r in published["rows"]}
    assert rows["grafit"]["chosen"] == ["--learning_rate=2e-3", "--weight_decay=0.2"]
    assert rows["coarse_ce"]["chosen"] == ["--learning_rate=4e-3", "--weight_decay=0.01"]
    assert all(a[-3:-1] == rows[a[1][9:]]["chosen"] for a in final)  # After the config.
    assert "lr, wd (chosen)" in published["body"] and "4e-3 0.01" in published["body"]
    assert "grafit's lead" in published["body"]
    (tmp_path / "chosen.json").write_text(json.dumps({"rows": published["rows"]}))
    calls, again = bench("--methods=grafit,coarse_ce", f"--chosen={tmp_path}/chosen.json")
    assert not any("/select/" in w for _, w in calls)  # Not tuned again.
    assert [r["chosen"] for r in again["rows"]] == [r["chosen"] for r in published["rows"]]


def test_an_override_may_name_its_method(bench):
    calls, _ = bench("--methods=grafit,maskcon", "--override=--epochs=2",
                     "--override=maskcon:--lambda_inst=1",
                     "--override=--coarse_map=maps/a:b.json")
    flags_of = {args[1]: args for args, _ in calls}
    assert "--lambda_inst=1" in flags_of["--method=maskcon"]
    assert not any("lambda_inst" in a for a in flags_of["--method=grafit"])
    for args in flags_of.values():  # Shared ones, a colon in the value included.
        assert "--epochs=2" in args and "--coarse_map=maps/a:b.json" in args
