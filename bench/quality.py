"""Fine-grained quality of every method, trained side by side with one config.

    python -m bench.quality --methods=grafit,coarse_ce,instance,fine_ce --seeds=1

(from the repository root, as a module: see bench/runs.py).

Each method runs `train.py --flagfile=CONFIG --method=M --seed=S` in its own
process (same backbone, epochs, augmentation and seed), then the table of
`metrics.json` values (mean and spread over seeds) plus raw-pixel kNN goes to
`bench/results/<name>.json` and, between markers, into `BENCHMARKS.md`.

`--select_on=validation` first gives every method the same budget: each point of the
`--grid_lr` x `--grid_weight_decay` grid trained for `--select_epochs` on the training
split minus a held-out validation split (`--eval_split=validation`), the best fine
kNN top-1 there chosen per method; only then are the chosen settings trained at full
length over `--seeds` and the test split scored. `--chosen=RESULTS.json` reuses the
settings an earlier selection chose (another grouping, not tuned again).
"""

import json
import os


import numpy as np
from absl import app, flags

from bench import raw_pixels
from bench.runs import over_seeds, publish, quality_run, resolved_config, train_or_reuse
from grafit_tf import evaluation
from grafit_tf.config import METHODS

def define_flags(fv=flags.FLAGS):
    """The bench's flags, defined when it runs (a test defines them in its own
    `FlagValues`: train.py's flags share names such as --workdir)."""
    f = dict(flag_values=fv)
    flags.DEFINE_string("config", "configs/fashion_mnist.cfg", "Flagfile shared by every "
                        "method.", **f)
    flags.DEFINE_list("methods", ["grafit", "coarse_ce", "instance", "fine_ce"],
                      "Methods to train.", **f)
    flags.DEFINE_integer("seeds", 1, "Seeds per method (0..N-1); mean and spread are "
                         "reported.", **f)
    flags.DEFINE_string("workdir", "runs/quality", "Root of the per-run work directories.", **f)
    flags.DEFINE_string("name", "quality", "Results name: bench/results/<name>.json and the "
                        "BENCHMARKS.md section markers.", **f)
    flags.DEFINE_multi_string("override", [], "Extra train.py flag for every run, e.g. "
                              "--epochs=2; M:--flag=v for method M only.", **f)
    flags.DEFINE_bool("reuse", True, "Reuse a run whose work directory already has "
                      "metrics.json, instead of training it again (only if it has this "
                      "command's settings).", **f)
    flags.DEFINE_bool("raw_pixels", True, "Add the raw-pixel kNN row.", **f)
    flags.DEFINE_bool("update_benchmarks", True, "Rewrite this table's section of "
                      "BENCHMARKS.md.", **f)
    flags.DEFINE_enum("select_on", "none", ["none", "validation"], "Choose each method's "
                      "learning rate and weight decay on the validation split first (equal "
                      "budgets).", **f)
    flags.DEFINE_list("grid_lr", ["1e-3", "2e-3", "4e-3"], "Learning rates of the grid.", **f)
    flags.DEFINE_list("grid_weight_decay", ["0.01", "0.05", "0.2"], "Weight decays of the "
                      "grid.", **f)
    flags.DEFINE_integer("select_epochs", 4, "Epochs of each selection run.", **f)
    flags.DEFINE_string("chosen", "", "bench/results JSON of an earlier selection: its "
                        "chosen settings, not selected again.", **f)


FLAGS = flags.FLAGS

COLUMNS = evaluation.METRIC_COLUMNS + (("train_minutes", "train minutes"),)


def overrides(method=None):
    """`--override` values for `method`: `M:--flag=v` is method M's alone (None: shared)."""
    picked = []
    for value in FLAGS.override:
        owner, sep, flag = value.partition(":")
        if not (sep and owner in METHODS):
            picked.append(value)
        elif owner == method:
            picked.append(flag)
    return picked


def train(method, seed, extra=(), name=None):
    args, workdir = quality_run(FLAGS.config, FLAGS.workdir, method, seed,
                                [*overrides(method), *extra])
    workdir = workdir if name is None else os.path.join(FLAGS.workdir, name)
    return train_or_reuse([*args, "--verbose=2"], workdir, FLAGS.reuse)


def select(method):
    """`(chosen flags, {point: validation fine top-1})`: the grid point whose
    `--select_epochs` run scores best on the validation split (seed 0)."""
    scores = {}
    for lr in FLAGS.grid_lr:
        for wd in FLAGS.grid_weight_decay:
            point = (f"--learning_rate={lr}", f"--weight_decay={wd}")
            run = train(method, 0, [*point, f"--epochs={FLAGS.select_epochs}",
                                    "--eval_split=validation", "--eval_every=0"],
                        name=f"select/{method}_lr{lr}_wd{wd}")
            scores[" ".join(point)] = run["fine_knn_top1"]
    return max(scores, key=scores.get).split(), scores


def chosen_settings(methods):
    """`{method: (flags, scores)}` from `--chosen`, or selected now (`--select_on`)."""
    if FLAGS.chosen:
        with open(FLAGS.chosen, encoding="utf-8") as f:
            rows = {r["method"]: r for r in json.load(f)["rows"]}
        missing = [m for m in methods if "chosen" not in rows.get(m, {})]
        if missing:
            raise app.UsageError(f"--chosen={FLAGS.chosen} chose nothing for {missing}")
        return {m: (rows[m]["chosen"], rows[m].get("selection", {})) for m in methods}
    if FLAGS.select_on == "validation":
        return {m: select(m) for m in methods}
    return {m: ([], {}) for m in methods}


def summarise(method, runs):
    row = {"method": method, "seeds": len(runs)}
    row.update(over_seeds(runs, [k for k, _ in evaluation.METRIC_COLUMNS if k != "method"]))
    row["train_minutes"] = float(np.mean([r["train_seconds"] for r in runs]) / 60)
    row["history"] = [r.get("history", []) for r in runs]
    return row


def leads(rows):
    """grafit's lead in points over `coarse_ce` and `maskcon`, when in the table."""
    by = {r["method"]: r for r in rows}
    gap = lambda m, k: f"{100 * (by['grafit'][k] - by[m][k]):+.2f}"  # noqa: E731
    parts = [f"over {m} {gap(m, 'fine_knn_top1')} top-1 / {gap(m, 'fine_recall_at_1')} Recall@1"
             for m in ("coarse_ce", "maskcon") if "grafit" in by and m in by]
    return f"\n\ngrafit's lead: {'; '.join(parts)}." if parts else ""


def markdown(rows):
    """The table (with the chosen settings, if any), plus the spread over seeds."""
    columns = COLUMNS
    if any(r.get("chosen") for r in rows):
        for r in rows:
            r["settings"] = " ".join(f.split("=")[1] for f in r.get("chosen", [])) or "-"
        columns = (("method", "method"), ("settings", "lr, wd (chosen)")) + COLUMNS[1:]
    table = evaluation.format_table(rows, columns)
    table += leads(rows)
    if any(r.get("seeds", 1) > 1 for r in rows):
        spread = "; ".join(f"{r['method']}: fine top-1 +/- {100 * r['fine_knn_top1_std']:.2f}"
                           for r in rows if "fine_knn_top1_std" in r)
        table += f"\n\nSpread (std over seeds): {spread}."
    return table


def main(argv):
    del argv
    rows = []
    for method, (chosen, scores) in chosen_settings(FLAGS.methods).items():
        runs = [train(method, seed, chosen) for seed in range(FLAGS.seeds)]
        rows.append(dict(summarise(method, runs), chosen=chosen, selection=scores))
    if FLAGS.raw_pixels:
        # The shared config with the overrides (only its data and evaluation options matter).
        config = resolved_config([f"--flagfile={FLAGS.config}", *overrides()])
        rows.append(dict(method="raw pixels", seeds=1, **raw_pixels.raw_pixel_metrics(config)))
    publish(FLAGS.name, rows, markdown(rows), update=FLAGS.update_benchmarks,
            extra={"config": FLAGS.config, "overrides": FLAGS.override})


if __name__ == "__main__":
    define_flags()
    app.run(main)
