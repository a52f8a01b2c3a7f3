"""--engine=ray: the shards served by a local 2-worker Ray cluster equal serve.py's own."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from grafit_tf.errors import UserError
from grafit_tf.serving import engine, job, shards
from tests.conftest import REPO
from tests.image_files import png_bytes
from tests.test_serve import default_sigint, serve_options, synthetic

ray = pytest.importorskip("ray")  # Fallback only: `make test` installs requirements-scale.txt.


def _shard_files(out):
    """Every shard's outputs, shard.json without its timing."""
    found = {}
    for name in shards.published(out):
        folder = os.path.join(out, name)
        for kind in sorted(os.listdir(folder)):
            path = os.path.join(folder, kind)
            if kind == "embeddings.npy":
                found[name, kind] = np.load(path)
            elif kind == "shard.json":
                with open(path, encoding="utf-8") as f:
                    found[name, kind] = dict(json.load(f), seconds=None)
            else:
                with open(path, encoding="utf-8") as f:
                    found[name, kind] = f.read()
    return found


def _assert_same(local, served):
    assert local.keys() == served.keys()
    for key, value in local.items():
        if key[1] == "embeddings.npy":
            np.testing.assert_allclose(served[key], value, atol=1e-6, err_msg=str(key))
        else:
            assert served[key] == value, key


def test_ray_workers_serve_what_serve_py_serves(tmp_path):
    s = synthetic(str(tmp_path / "data"), queries=9)
    with open(os.path.join(s["queries"], "broken.png"), "wb") as f:
        f.write(png_bytes(np.zeros((28, 28), np.uint8))[:40])  # A truncated PNG.
    for i, label in enumerate("abc"):  # Labelled queries too: accuracy counts per shard.
        os.makedirs(os.path.join(s["queries"], label))
        os.rename(os.path.join(s["queries"], f"{i}.png"),
                  os.path.join(s["queries"], label, f"{i}.png"))
    common = dict(model=s["model"], images=s["queries"], gallery=s["gallery"], shard_size=3,
                  labels_from_dirs=True)

    # One onnxruntime thread, as in each Ray actor: the same arithmetic, to the last bit.
    local = job.run(serve_options(output=str(tmp_path / "local"), intra_op_threads=1, **common),
                    log=lambda m: None)
    lines = []
    served = job.run(serve_options(output=str(tmp_path / "ray"), engine="ray", engine_workers=2,
                                   **common), log=lines.append)

    assert any(l.startswith("ray: 4 shards on 2 workers, a local cluster") for l in lines)
    assert not ray.is_initialized()  # The cluster it started is stopped.
    for key in ("files", "embedded", "errors", "shards", "accuracy"):
        assert served[key] == local[key], key
    assert (served["embedded"], served["errors"], served["accuracy"]["images"]) == (9, 1, 3)
    _assert_same(_shard_files(tmp_path / "local"), _shard_files(tmp_path / "ray"))
    assert not [n for n in os.listdir(tmp_path / "ray") if n.startswith(".")]


def _first_two_rows(path):
    """The synthetic model, but returning only the first two rows of a batch: it passes the
    load-time probe (two images) and fails on any larger batch."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(path)
    graph = model.graph
    graph.node[-1].input[0], last = "sliced", graph.node[-1].input[0]
    graph.node.insert(len(graph.node) - 1, helper.make_node(
        "Slice", [last, "starts", "ends", "axis0"], ["sliced"]))
    graph.initializer.extend(numpy_helper.from_array(np.asarray([v], np.int64), n)
                             for n, v in (("starts", 0), ("ends", 2), ("axis0", 0)))
    onnx.save(model, path)
    return path


def test_a_failed_shard_names_itself_and_the_finished_ones_stay(tmp_path):
    s = synthetic(str(tmp_path / "data"), queries=7)
    model = _first_two_rows(s["model"])
    for name in ("0_bad", "1_bad"):  # Shards 0 and 1 give the model 2 images, shard 2 three.
        with open(os.path.join(s["queries"], f"{name}.png"), "wb") as f:
            f.write(b"not an image")
    out = str(tmp_path / "out")
    options = serve_options(model=model, images=s["queries"], output=out, shard_size=3,
                            batch_size=3, engine="ray", engine_workers=1)

    with pytest.raises(job.RunError) as failed:
        job.run(options, log=lambda m: None)

    message = str(failed.value)
    assert "\n" not in message and "shard-00002: the model failed: the model returned shape " \
        "[2, 16] for 3 images" in message, message
    assert sorted(os.listdir(out)) == ["manifest.json", "shard-00000", "shard-00001"]
    # Batches of two: the rerun (here in this process) serves only the failed shard.
    job.run(serve_options(model=model, images=s["queries"], output=out, shard_size=3,
                          batch_size=2), log=lambda m: None)
    reference = str(tmp_path / "reference")
    job.run(serve_options(model=model, images=s["queries"], output=reference, shard_size=3,
                          batch_size=2), log=lambda m: None)
    _assert_same(_shard_files(reference), _shard_files(out))


def test_a_dead_worker_names_its_shard(tmp_path):
    os.mkdir(tmp_path / f"{engine.MARK.format(pid=4242, shard='shard-00007')}")
    died = RuntimeError("The actor died unexpectedly before finishing this task.\n"
                        "\tclass_name: MapWorker(MapBatches(ShardServer))\n\tpid: 4242\n")
    assert engine._cause(died, str(tmp_path)).startswith(
        "shard-00007: its Ray worker process died serving it")
    assert engine._cause(RuntimeError("lost\nmore"), str(tmp_path)) == "RuntimeError: lost"


def test_without_ray_installed_the_engine_says_how_to_get_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError.
    with pytest.raises(UserError, match=r"^--engine=ray needs Ray: pip install -r "
                                        r"requirements-scale.txt$"):
        engine.serve_shards([], "m.onnx", "", None, None, "out", "", 2, print)


def test_an_address_that_does_not_answer_is_a_user_error(tmp_path):
    with socket.socket() as free:  # A port nothing listens on once closed.
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    with pytest.raises(UserError, match=f"cannot reach Ray at --ray_address=127.0.0.1:{port}"):
        engine.serve_shards([], "m.onnx", "", None, None, str(tmp_path), f"127.0.0.1:{port}", 2,
                            print)


def _descendants(pid):
    """Live (not zombie) processes under `pid`, itself included."""
    children = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat", encoding="utf-8") as f:
                state, ppid = f.read().rsplit(")", 1)[1].split()[:2]
        except (OSError, ValueError):
            continue
        if state != "Z":
            children.setdefault(int(ppid), []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        found.append(todo.pop())
        todo += children.get(found[-1], [])
    return found


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="lists processes from /proc")
def test_ctrl_c_stops_the_cluster_serve_py_started(tmp_path):
    s = synthetic(str(tmp_path / "data"), queries=20)
    proc = subprocess.Popen(
        [sys.executable, os.path.join(REPO, "serve.py"), f"--model={s['model']}",
         f"--images={s['queries']}", f"--output={tmp_path / 'out'}", "--engine=ray",
         "--shard_size=1", "--progress=false"], cwd=REPO, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, process_group=0, preexec_fn=default_sigint,
        env=dict(os.environ, PYTHONUNBUFFERED="1"))
    try:
        for line in proc.stdout:  # The cluster is up; its actors take seconds to start.
            if line.startswith("ray: "):
                break
        ray_processes = _descendants(proc.pid)[1:]
        os.killpg(proc.pid, signal.SIGINT)  # As a terminal's Ctrl-C: the whole group.
        assert proc.wait(timeout=60) == 130
    finally:
        proc.kill()
    assert [l for l in proc.stderr.read().splitlines() if l.strip()] == [
        f"interrupted: finished shards are kept in {tmp_path / 'out'}; rerun the same command "
        "to serve the rest."]
    assert len(ray_processes) >= 2  # The cluster's own (gcs, raylet, ...), all stopped.
    deadline = time.monotonic() + 20
    while (left := set(ray_processes) & set(_descendants(1))) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not left
