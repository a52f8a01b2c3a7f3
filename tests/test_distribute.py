"""Replica correctness: N logical CPU devices under MirroredStrategy vs one device.

Each N runs in its own process (logical devices must be set before TF starts).
"""

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO

# One method per mechanism that replicas must agree on: the kNN memory and the instance
# loss (grafit), the cross-entropy head (coarse_ce; fine_ce is it with other labels),
# the queue and key encoder (grafit_maskcon), synchronised batch norm (grafit+bn).
# `instance` is grafit's instance loss alone; each method costs the suite 15-20 s.
METHODS = ["grafit", "coarse_ce", "grafit_maskcon", "grafit+bn"]


# Four replicas, not also two: the gathering order over more than two shards is the
# harder case, and each replica count costs the suite about a minute.
@pytest.mark.parametrize("replicas", [4])
def test_one_step_matches_single_device(replicas):
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "tests", "replicas_worker.py"), str(replicas),
         *METHODS],
        capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    for method in METHODS:
        r = results[method]
        assert r["weights_changed"] > 1e-3, (method, r)  # The step did something.
        assert abs(r["loss_one"] - r["loss_mirrored"]) <= 1e-5 * max(1.0, r["loss_one"]), r
        assert r["weight_diff"] <= 1e-5, (method, r)
        if method.startswith("grafit"):  # Memory (grafit) or queue (grafit_maskcon).
            # Every replica holds the same, complete memory as the single device.
            assert r["memory_copies"] == replicas, r
            assert r["memory_diff"] <= 1e-5, r
