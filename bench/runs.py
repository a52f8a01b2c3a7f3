"""What the benches share: training one `train.py` run (or reusing a finished one of the
same settings), the mean over seeds, and publishing a table (bench/results/<name>.json
and a marked section of BENCHMARKS.md).

The benches are modules of the `bench` package, run from the repository root as
`python -m bench.<name> ...` (e.g. `python -m bench.quality`), so that `bench` and
`grafit_tf` import without any `sys.path` edit.
"""

import json
import os
import shlex
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def interleaved(fns, rounds):
    """`{name: median of fn()}` with the fns taking turns `rounds` times (one warm-up):
    the 2 cores are shared, so only figures timed in turns compare. A fn returning a
    tuple gets the median of each of its values."""
    for fn in fns.values():
        fn()
    values = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            values[name].append(fn())
    return {name: tuple(map(statistics.median, zip(*v))) if isinstance(v[0], tuple)
            else statistics.median(v) for name, v in values.items()}


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
    from grafit_tf.config import Config  # Here: publish's callers need no grafit_tf.

    out = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *args,
                          "--workdir=unused", "--dry_run"],
                         check=True, cwd=ROOT, capture_output=True, text=True).stdout
    return Config.from_dict(json.loads(out))


def quality_run(flagfile, root, method, seed, overrides=()):
    """`(args, workdir)` of bench/quality.py's run of `method` with `seed`.

    Args:
        flagfile: the shared config (`--config` of the bench).
        root: the root of the runs' work directories (`--workdir`).
        method, seed: the run.
        overrides: extra `train.py` flags of every run (`--override`), last, so they win.

    Returns:
        `train.py` flags without `--workdir`, and `<root>/<method>_seed<seed>`.
    """
    args = [f"--flagfile={flagfile}", f"--method={method}", f"--seed={seed}", *overrides]
    return args, os.path.join(root, f"{method}_seed{seed}")


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


def update_section(path, name, body):
    """Replaces the text between `<!-- name:begin -->` and `<!-- name:end -->` of the
    Markdown file `path`, leaving the rest as it is.

    Appends the section when the markers are absent.
    """
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    text = open(path, encoding="utf-8").read() if os.path.isfile(path) else "# Benchmarks\n"
    block = f"{begin}\n{body}{end}"
    if begin in text and end in text:
        text = text[:text.index(begin)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip() + f"\n\n{block}\n"
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def invocation(argv=None):
    """The command line that ran this bench, as a reader would retype it from the
    repository root.

    Args:
        argv: the script path and its arguments; `sys.argv` when None (under
            `python -m bench.quality`, `sys.argv[0]` is the module's file path).

    Returns:
        `python -m <module> <shell-quoted arguments>` for a file in the repository
        (`bench/quality.py` -> `bench.quality`), else `python <path> <arguments>`.
    """
    argv = sys.argv if argv is None else argv
    script = os.path.relpath(os.path.abspath(argv[0]), ROOT)
    if script.endswith(".py") and not script.startswith(os.pardir):
        program = ["-m", script[:-len(".py")].replace(os.sep, ".")]
    else:
        program = [script]
    return " ".join(["python", *program, *(shlex.quote(a) for a in argv[1:])])


def publish(name, rows, body, update=True, extra=None, command=None):
    """A bench's result: `body` + command / date / machine footer, printed, saved as
    `bench/results/<name>.json` (command, date, the `extra` dict's keys and rows) and, if
    `update`, written into BENCHMARKS.md's `name` section. Returns the section text.

    `command`: the command line to credit; this process's own (`invocation()`) when None.
    """
    import datetime
    import platform

    command = invocation() if command is None else command
    section = (f"{body}\n\nCommand: `{command}`  \nDate: {datetime.date.today().isoformat()}. "
               f"Machine: {os.cpu_count()} CPU cores ({platform.machine()}), no GPU.\n")
    print(section)
    os.makedirs(os.path.join(ROOT, "bench", "results"), exist_ok=True)
    with open(os.path.join(ROOT, "bench", "results", f"{name}.json"), "w") as f:
        json.dump({"command": command, "date": datetime.date.today().isoformat(),
                   **(extra or {}), "rows": rows}, f, indent=2)
    if update:
        update_section(os.path.join(ROOT, "BENCHMARKS.md"), name, section)
    return section
