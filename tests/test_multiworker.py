"""MultiWorkerMirroredStrategy with two local worker processes on 127.0.0.1."""

import json
import os
import socket
import subprocess
import sys

import numpy as np

from tests.conftest import REPO


def free_ports(n):
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def start_worker(index, workers, workdir, out, data_dir):
    env = dict(os.environ, TF_CONFIG=json.dumps(
        {"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}}))
    return subprocess.Popen(
        [sys.executable, os.path.join(REPO, "tests", "multiworker_worker.py"), str(workdir),
         str(out), data_dir], env=env, cwd=REPO, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True)


def test_two_workers_agree_and_only_the_chief_writes(tmp_path, fashion_dir):
    workers = [f"127.0.0.1:{p}" for p in free_ports(2)]
    procs = [start_worker(i, workers, tmp_path / f"w{i}", tmp_path / f"out{i}.npz", fashion_dir)
             for i in range(2)]
    try:
        outputs = [p.communicate(timeout=400)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, text in zip(procs, outputs):
        assert p.returncode == 0, text[-3000:]
    a, b = (np.load(tmp_path / f"out{i}.npz") for i in range(2))
    assert set(a.files) == set(b.files)
    for key in a.files:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    chief = tmp_path / "w0"
    for name in ("embedder.keras", "metrics.json", "config.json", "checkpoints"):
        assert (chief / name).exists(), name
    assert json.loads((chief / "config.json").read_text())["num_replicas"] == 2
    assert not (tmp_path / "w1").exists() or not any((tmp_path / "w1").iterdir())


def test_unreachable_worker_is_one_clear_line(tmp_path, fashion_dir):
    port = free_ports(2)
    workers = [f"127.0.0.1:{port[0]}", f"127.0.0.1:{port[1]}"]  # Worker 1 never starts.
    env = dict(os.environ, TF_CONFIG=json.dumps(
        {"cluster": {"worker": workers}, "task": {"type": "worker", "index": 0}}))
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "train.py"), f"--data_dir={fashion_dir}",
         f"--workdir={tmp_path / 'w'}", "--distribute=multi_worker", "--worker_timeout=5",
         "--max_train_examples=256", "--batch_size=32", "--width=4", "--epochs=1"],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=200)
    assert proc.returncode != 0
    errors = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
    assert len(errors) == 1, proc.stderr[-2000:]
    assert "answered within 5 s" in errors[0] and workers[1] in errors[0]
    assert not (tmp_path / "w" / "checkpoints").exists()


def test_bad_tf_config_host(tmp_path, fashion_dir):
    env = dict(os.environ, TF_CONFIG=json.dumps(
        {"cluster": {"worker": ["no-such-host.invalid:2222"]},
         "task": {"type": "worker", "index": 0}}))
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "train.py"), f"--data_dir={fashion_dir}",
         f"--workdir={tmp_path / 'w'}", "--distribute=multi_worker"],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=200)
    assert proc.returncode == 2
    assert "does not resolve" in proc.stderr
