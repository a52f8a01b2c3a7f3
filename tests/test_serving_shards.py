"""Sharded output: whole shards only, resumed after SIGKILL, retried errors, other runs refused."""

import dataclasses
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest

from grafit_tf.errors import UserError
from grafit_tf.serving import job, shards
from tests.conftest import REPO
from tests.image_files import png_bytes
from tests.test_serve import serve_options, synthetic

QUIET = lambda *a: None  # noqa: E731

# Runs serve.py killed by SIGKILL just before its n-th rename (a publish step).
KILLED_AT = """
import os, signal, sys
from absl import app
import serve
from grafit_tf.serving import outputs
n, real = int(sys.argv[1]), outputs.rename
def rename(src, dst, count=[0]):
    if count[0] == n:
        os.kill(os.getpid(), signal.SIGKILL)
    count[0] += 1
    real(src, dst)
outputs.rename = rename
app.run(serve.main, argv=["serve.py"] + sys.argv[2:], flags_parser=serve.flags_parser("serve.py"))
"""


def assert_same_results(a, b):
    assert a.index == b.index and a.errors == b.errors and a.predictions == b.predictions
    np.testing.assert_allclose(a.embeddings, b.embeddings, atol=1e-6)


def tree(folder):
    """`{relative path: bytes}` of every file under `folder`."""
    return {os.path.relpath(os.path.join(d, n), folder): open(os.path.join(d, n), "rb").read()
            for d, _, names in os.walk(folder) for n in names}


@pytest.fixture
def data(tmp_path):
    s = synthetic(str(tmp_path / "data"), queries=7)
    (tmp_path / "data" / "queries" / "notes.txt").write_text("not an image")
    return s


def test_a_kill_at_any_publish_step_resumes_to_the_same_outputs(data, tmp_path):
    args = [f"--model={data['model']}", f"--images={data['queries']}",
            f"--gallery={data['gallery']}", "--k=3", "--shard_size=3", "--workers=0",
            "--progress=false"]
    reference = tmp_path / "reference"
    job.run(serve_options(model=data["model"], images=data["queries"], gallery=data["gallery"],
                          output=str(reference), shard_size=3), log=QUIET)
    want = shards.read(reference)
    assert want.summary["shards"] == 3 and len(want.index["path"]) == 7
    renames = 1 + 3 + 2  # manifest.json, 3 shards, gallery_errors.csv and summary.json.
    for n in range(renames):
        out = tmp_path / f"killed{n}"
        killed = subprocess.run([sys.executable, "-c", KILLED_AT, str(n), *args,
                                 f"--output={out}"], cwd=REPO, capture_output=True, text=True,
                                timeout=120)
        assert killed.returncode == -signal.SIGKILL, (n, killed.stderr)
        names = os.listdir(out)
        assert "summary.json" not in names
        published = shards.published(out)
        assert len(published) == max(0, min(n - 1, 3)), (n, names)
        for name in published:  # Only whole shards, equal to the reference's.
            assert sorted(os.listdir(out / name)) == sorted(os.listdir(reference / name))
            assert (out / name / "index.csv").read_bytes() == \
                (reference / name / "index.csv").read_bytes()
        with pytest.raises(ValueError, match="rerun the same command"):
            shards.read(out)
        rerun = subprocess.run([sys.executable, os.path.join(REPO, "serve.py"), *args,
                                f"--output={out}"], cwd=REPO, capture_output=True, text=True,
                               timeout=120)
        assert rerun.returncode == 0, rerun.stderr
        got = shards.read(out)
        assert_same_results(got, want)
        assert got.summary["served_now"] == 8 - [0, 3, 6, 8][len(published)]  # 3 + 3 + 2.
        assert not [n for n in os.listdir(out) if n.startswith(".")], "temporaries left"


def test_retry_errors_reads_only_the_failed_files_again(data, tmp_path):
    queries = data["queries"]
    path = os.path.join(queries, "3.png")
    good = open(path, "rb").read()
    stat = os.stat(path)
    reference = tmp_path / "reference"
    options = serve_options(model=data["model"], images=queries, output=str(reference),
                            gallery=data["gallery"], shard_size=3)
    job.run(options, log=QUIET)
    # A read that fails once (a storage hiccup): same size and time, bad bytes.
    with open(path, "wb") as f:
        f.write(bytes(len(good)))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    out = str(tmp_path / "out")
    first = job.run(dataclasses.replace(options, output=out), log=QUIET)
    assert first["errors"] == 2 and "3.png" in shards.read(out).errors["path"]
    with open(path, "wb") as f:
        f.write(good)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    again = job.run(dataclasses.replace(options, output=out), log=QUIET)
    assert again["served_now"] == 0 and again["errors"] == 2, "finished shards are kept"
    retried = job.run(dataclasses.replace(options, output=out, retry_errors=True), log=QUIET)
    # The two failed files only (notes.txt fails again), the rest kept.
    assert retried["served_now"] == 2 and retried["errors"] == 1
    assert_same_results(shards.read(out), shards.read(reference))


def test_changed_files_are_served_again_and_gone_ones_dropped(data, tmp_path):
    out = str(tmp_path / "out")
    options = serve_options(model=data["model"], images=data["queries"], output=out,
                            shard_size=3)
    job.run(options, log=QUIET)
    os.remove(os.path.join(data["queries"], "notes.txt"))  # The last shard: now empty.
    with open(os.path.join(data["queries"], "0.png"), "wb") as f:
        f.write(png_bytes(np.full((28, 28), 7, np.uint8)))
    summary = job.run(options, log=QUIET)
    assert summary["shards"] == 3 and summary["served_now"] == 3 + 1, summary
    assert summary["errors"] == 0
    fresh = str(tmp_path / "fresh")
    job.run(dataclasses.replace(options, output=fresh), log=QUIET)
    assert_same_results(shards.read(out), shards.read(fresh))
    os.remove(os.path.join(data["queries"], "6.png"))
    assert job.run(options, log=QUIET)["shards"] == 2
    assert shards.published(out) == ["shard-00000", "shard-00001"]


def test_a_run_with_other_settings_is_refused(data, tmp_path):
    out = tmp_path / "out"
    options = serve_options(model=data["model"], images=data["queries"], output=str(out),
                            gallery=data["gallery"], shard_size=3)
    job.run(options, log=QUIET)
    before = tree(out)
    for change in ({"k": 5}, {"shard_size": 4}, {"gallery": ""}):
        with pytest.raises(UserError, match="holds the results of another run"):
            job.run(dataclasses.replace(options, **change), log=QUIET)
    assert tree(out) == before
    old = tmp_path / "old"  # An earlier version's outputs: refused too.
    old.mkdir()
    (old / "embeddings.npy").write_bytes(b"")
    with pytest.raises(UserError, match="earlier version"):
        job.run(dataclasses.replace(options, output=str(old)), log=QUIET)
    shutil.rmtree(out)
    assert job.run(dataclasses.replace(options, k=5), log=QUIET)["k"] == 5
