"""grafit_tf.serving.outputs: CSV cells, the folder lock, and an interrupted run unfinished."""

import os

import numpy as np
import pytest

from grafit_tf.errors import UserError
from grafit_tf.serving import job, outputs, shards
from tests.test_serve import serve_options, synthetic


def test_csv_cells_are_formula_safe_and_one_to_one():
    cell = outputs.csv_cell
    for text in ("=1+1", "+x", "-y", "@SUM(A1)", "\tx", "\rx", "'quoted"):
        assert cell(text) == "'" + text
        assert outputs.read_cell(cell(text)) == text
    assert cell("plain/=later.png") == "plain/=later.png"
    assert cell(-0.25) == "-0.250000" and cell(np.float32(0.5)) == "0.500000"
    assert cell(3) == "3" and cell(np.int64(-3)) == "-3"
    for bad in (float("nan"), np.float32("inf"), -np.inf):
        with pytest.raises(ValueError, match="non-finite"):
            cell(bad)


@pytest.mark.skipif(outputs.fcntl is None, reason="no flock on this platform")
def test_a_folder_another_run_writes_into_is_refused(tmp_path):
    s = synthetic(str(tmp_path / "data"))
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("the user's own file\n")
    fd = os.open(out, os.O_RDONLY)
    try:
        outputs.fcntl.flock(fd, outputs.fcntl.LOCK_EX)
        with pytest.raises(UserError, match="another serve.py run is writing into it"):
            job.run(serve_options(model=s["model"], images=s["queries"], output=str(out)),
                    log=lambda *a: None)
    finally:
        os.close(fd)
    assert os.listdir(out) == ["notes.txt"]
    job.run(serve_options(model=s["model"], images=s["queries"], output=str(out)),
            log=lambda *a: None)
    assert len(shards.read(out).index["path"]) == 5


def test_an_interrupted_run_keeps_its_shards_but_is_not_finished(tmp_path, monkeypatch):
    s = synthetic(str(tmp_path / "data"))
    out = tmp_path / "out"
    options = serve_options(model=s["model"], images=s["queries"], output=str(out),
                            gallery=s["gallery"], labels_from_dirs=True, shard_size=2)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt()

    with monkeypatch.context() as m:  # Once every shard is done: in the summary.
        m.setattr(job.report, "from_counts", interrupted)
        with pytest.raises(KeyboardInterrupt):
            job.run(options, log=lambda *a: None)
    assert sorted(os.listdir(out)) == ["manifest.json", "shard-00000", "shard-00001",
                                       "shard-00002"], "temporaries left or summary written"
    with pytest.raises(ValueError, match="no finished serve.py run"):
        shards.read(out)
    summary = job.run(options, log=lambda *a: None)
    assert summary["served_now"] == 0 and summary["embedded"] == 5
