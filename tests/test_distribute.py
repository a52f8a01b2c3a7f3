"""Replica correctness: N logical CPU devices under MirroredStrategy vs one device.

Each N runs in its own process (logical devices must be set before TF starts).
"""

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO

# The default recipe (InfoNCE over 3 views against the global batch's keys, a queue
# memory whose counts of queries with a positive differ between replicas, lambda_inst
# 0.5, synchronised batch norm) and every other method, without batch norm: grafit
# (BYOL, full memory), the cross-entropy heads, the instance loss alone, and
# grafit_maskcon and maskcon (queue and key encoder).
VARIANTS = ["default", "grafit", "coarse_ce", "instance", "fine_ce", "grafit_maskcon", "maskcon"]
REPLICAS = [2, 4]


@pytest.fixture(scope="module")
def results():
    """`{replicas: the worker's JSON}`. The workers run side by side (each is mostly one
    thread of tracing): about 110 s of CPU between them."""
    procs = {n: subprocess.Popen(
        [sys.executable, os.path.join(REPO, "tests", "replicas_worker.py"), str(n), *VARIANTS],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO) for n in REPLICAS}
    out = {}
    try:
        for n, proc in procs.items():
            stdout, stderr = proc.communicate(timeout=600)
            assert proc.returncode == 0, stderr[-3000:]
            out[n] = json.loads(stdout.strip().splitlines()[-1])
    finally:
        for proc in procs.values():
            proc.kill()
    return out


# Two replicas and four: the gathering order over more than two shards is the harder case.
@pytest.mark.parametrize("replicas", REPLICAS)
def test_one_step_matches_single_device(results, replicas):
    for variant in VARIANTS:
        r = results[replicas][variant]
        assert r["weights_changed"] > 1e-3, (variant, r)  # The step did something.
        assert abs(r["loss_one"] - r["loss_mirrored"]) <= 1e-5 * max(1.0, r["loss_one"]), (
            variant, r)
        assert r["weight_diff"] <= 1e-5, (variant, r)
        if variant.startswith("grafit") or variant in ("default", "maskcon"):  # Memory, queue.
            # Every replica holds the same, complete memory as the single device.
            assert r["memory_copies"] == replicas, (variant, r)
            assert r["memory_diff"] <= 1e-5, (variant, r)
