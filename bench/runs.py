"""Trains one `train.py` run for a bench, or reuses a finished one of the same settings."""

import json
import os
import shlex
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from grafit_tf.config import Config  # noqa: E402


def over_seeds(results, keys):
    """Mean and spread (population std) of each metric over a method's seeds.

    Args:
        results: one dict of metric values per seed.
        keys: the metrics to summarise; each must be in every dict.

    Returns:
        `{key: mean, f"{key}_std": std}` for each key, as Python floats.
    """
    import numpy as np  # Here, not at the top: train_or_reuse's callers need no NumPy.

    row = {}
    for key in keys:
        values = np.array([r[key] for r in results], dtype=np.float64)
        row[key], row[f"{key}_std"] = float(values.mean()), float(values.std())
    return row


def resolved_config(args):
    """The `Config` that `train.py <args>` trains with, resolved by train.py itself
    (`--dry_run`: flagfiles, nested ones included, then overrides)."""
    out = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *args,
                          "--workdir=unused", "--dry_run"],
                         check=True, cwd=ROOT, capture_output=True, text=True).stdout
    return Config.from_dict(json.loads(out))


def quality_run(flagfile, root, method, seed, overrides=()):
    """`(args, workdir)` of bench/quality.py's run of `method` with `seed`.

    The one place that names a quality run: the benches that score finished
    runs (postprocess, per_class, retrieval_features) check and find them with
    the same flags and directory that bench/quality.py trained them with.

    Args:
        flagfile: the shared config (`--config` of the benches).
        root: the root of the runs' work directories (`--workdir`).
        method, seed: the run.
        overrides: extra `train.py` flags of every run (`--override`), last, so they win.

    Returns:
        `train.py` flags without `--workdir`, and `<root>/<method>_seed<seed>`.
    """
    args = [f"--flagfile={flagfile}", f"--method={method}", f"--seed={seed}", *overrides]
    return args, os.path.join(root, f"{method}_seed{seed}")


def finished_quality_run(flagfile, root, method, seed, overrides=()):
    """The work directory of bench/quality.py's finished run (`quality_run`), checked
    by `check_reusable` to have been trained with these settings: what the benches
    that score finished runs read.

    Raises:
        SystemExit: no finished run there, or one trained with other settings.
    """
    args, workdir = quality_run(flagfile, root, method, seed, overrides)
    check_reusable(args, workdir)
    return workdir


def check_reusable(args, workdir):
    """Raises `SystemExit` unless `workdir`'s finished run has the settings `args`
    resolve to (`train.py --dry_run`).

    Returns:
        The run's `metrics.json` path.
    """
    metrics_path = os.path.join(workdir, "metrics.json")
    if not os.path.isfile(metrics_path):
        raise SystemExit(f"{workdir}: no finished run there (train it first: "
                         f"python train.py {' '.join(shlex.quote(a) for a in args)} "
                         f"--workdir={workdir}).")
    with open(os.path.join(workdir, "config.json"), encoding="utf-8") as f:
        changed = resolved_config(args).differences(json.load(f))
    if changed:
        raise SystemExit(f"{workdir} was trained with other settings than this command's ("
                         + "; ".join(changed) + "): delete it (or pass another workdir) "
                         "to train it again.")
    return metrics_path


def train_or_reuse(args, workdir, reuse=True):
    """Runs `train.py <args> --workdir=<workdir>` and returns its `metrics.json`.

    With `reuse`, a work directory that already holds `metrics.json` is not
    trained again, but only if its `config.json` has the settings these `args`
    resolve to (`check_reusable`): a run left over from an earlier default
    config must not slip into a table that claims the current one.

    Args:
        args: `train.py` flags, without `--workdir`.
        workdir: the run's work directory.
        reuse: reuse a finished run of the same settings.

    Raises:
        SystemExit: the finished run in `workdir` was trained with other settings.
    """
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), *args, f"--workdir={workdir}"]
    metrics_path = os.path.join(workdir, "metrics.json")
    if reuse and os.path.isfile(metrics_path):
        check_reusable(args, workdir)
        print(f"reusing {metrics_path}", flush=True)
    else:
        print("+", " ".join(shlex.quote(c) for c in cmd), flush=True)
        subprocess.run(cmd, check=True, cwd=ROOT)
    with open(metrics_path, encoding="utf-8") as f:
        return json.load(f)
