"""grafit_tf.serving.outputs: CSV cells, and a run published as a whole even when killed."""

import os
import shutil

import numpy as np
import pytest

from grafit_tf.errors import UserError
from grafit_tf.serving import job, outputs
from tests.image_files import png_bytes
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


class _Killed(BaseException):
    """Stands for SIGKILL: nothing runs after it (see the patched discard)."""


def _contents(folder):
    return {n: (folder / n).read_bytes() for n in os.listdir(folder) if not n.startswith(".")}


def test_a_kill_during_the_publish_never_mixes_two_runs(tmp_path, monkeypatch):
    s = synthetic(str(tmp_path / "data"))
    quiet = lambda *a: None  # noqa: E731
    earlier = tmp_path / "earlier"
    job.run(serve_options(model=s["model"], images=s["queries"], output=str(earlier),
                          gallery=s["gallery"]), log=quiet)
    old = _contents(earlier)
    assert len(old) == 6
    images = tmp_path / "second"  # Another run: other files, an error, no gallery.
    images.mkdir()
    shutil.copy(os.path.join(s["queries"], "0.png"), images / "0.png")
    (images / "notes.txt").write_text("not an image")
    second = serve_options(model=s["model"], images=str(images), output="replaced below")

    renames = 5 + 4  # 5 earlier outputs moved away (the marker is removed), 4 new moved in.
    for kill_at in range(renames + 1):  # The last one is not killed: it counts the renames.
        out = tmp_path / f"out{kill_at}"
        shutil.copytree(earlier, out)
        new, done = {}, []

        def rename(src, dst, kill_at=kill_at, new=new, done=done):
            if len(done) == kill_at:
                raise _Killed()
            if os.path.basename(os.path.dirname(src)).startswith(outputs.STAGING_PREFIX):
                new[os.path.basename(dst)] = open(src, "rb").read()
            done.append(dst)
            os.replace(src, dst)

        monkeypatch.setattr(outputs, "_rename", rename)
        # A killed process cleans nothing up; the kernel drops its lock.
        monkeypatch.setattr(outputs.OutputDir, "discard", lambda self: self._unlock())
        if kill_at == renames:
            job.run(dataclass_replace(second, output=str(out)), log=quiet)
            assert len(done) == renames and _contents(out) == new
            continue
        with pytest.raises(_Killed):
            job.run(dataclass_replace(second, output=str(out)), log=quiet)
        monkeypatch.undo()
        staging = [n for n in os.listdir(out) if n.startswith(outputs.STAGING_PREFIX)]
        for name in staging:  # The new files that were not published yet.
            new.update(_contents(out / name))
        assert set(new) == {"embeddings.npy", "index.csv", "errors.csv", "summary.json"}
        seen = _contents(out)
        from_old = {n for n, data in seen.items() if old.get(n) == data}
        from_new = {n for n, data in seen.items() if new.get(n) == data}
        assert from_old | from_new == set(seen), kill_at
        assert not (from_old and from_new), f"killed at rename {kill_at}: two runs mixed: {seen}"
        if "summary.json" in seen:  # The marker: a complete run.
            assert seen in (old, new), kill_at

        # The next run removes the killed run's temporaries and publishes completely.
        (out / ".index.csv.tmp.12345").write_bytes(b"older version's temporary")
        (out / ".keep").write_text("the user's own file")
        job.run(dataclass_replace(second, output=str(out)), log=quiet)
        assert sorted(os.listdir(out)) == [".keep", "embeddings.npy", "errors.csv", "index.csv",
                                           "summary.json"]
        assert {n: d for n, d in _contents(out).items() if n != "summary.json"} == \
            {n: d for n, d in new.items() if n != "summary.json"}


def dataclass_replace(options, **changes):
    import dataclasses

    return dataclasses.replace(options, **changes)


@pytest.mark.skipif(outputs.fcntl is None, reason="no flock on this platform")
def test_a_folder_another_run_writes_into_is_refused(tmp_path):
    s = synthetic(str(tmp_path / "data"))
    out = tmp_path / "out"
    out.mkdir()
    (out / "index.csv").write_text("path\nsomeone else's\n")
    fd = os.open(out, os.O_RDONLY)
    try:
        outputs.fcntl.flock(fd, outputs.fcntl.LOCK_EX)
        with pytest.raises(UserError, match="another serve.py run is writing into it"):
            job.run(serve_options(model=s["model"], images=s["queries"], output=str(out)),
                    log=lambda *a: None)
    finally:
        os.close(fd)
    assert os.listdir(out) == ["index.csv"]
    job.run(serve_options(model=s["model"], images=s["queries"], output=str(out)),
            log=lambda *a: None)
    assert len((out / "index.csv").read_text().splitlines()) == 6


def test_the_interrupted_run_publishes_nothing(tmp_path, monkeypatch):
    s = synthetic(str(tmp_path / "data"))
    out = tmp_path / "out"
    job.run(serve_options(model=s["model"], images=s["queries"], output=str(out)),
            log=lambda *a: None)
    before = _contents(out)
    (tmp_path / "more").mkdir()
    (tmp_path / "more" / "x.png").write_bytes(png_bytes(np.full((28, 28), 5, np.uint8)))

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt()

    monkeypatch.setattr(job.report, "accuracy", interrupted)
    with pytest.raises(KeyboardInterrupt):
        job.run(serve_options(model=s["model"], images=str(tmp_path / "more"),
                              output=str(out), gallery=s["gallery"], labels_from_dirs=True),
                log=lambda *a: None)
    assert _contents(out) == before and sorted(os.listdir(out)) == sorted(before)
