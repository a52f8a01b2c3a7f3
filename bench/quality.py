"""Fine-grained quality of every method, trained side by side with one config.

    python -m bench.quality --methods=grafit,coarse_ce,instance,fine_ce --seeds=1

(from the repository root, as a module: see bench/runs.py).

Each method runs `train.py --flagfile=CONFIG --method=M --seed=S` in its own
process (same backbone, epochs, augmentation and seed), then the table of
`metrics.json` values (mean and spread over seeds) plus raw-pixel kNN goes to
`bench/results/<name>.json` and, between markers, into `BENCHMARKS.md`.
"""

import numpy as np
from absl import app, flags

from bench import raw_pixels
from bench.runs import over_seeds, publish, quality_run, resolved_config, train_or_reuse
from grafit_tf import evaluation

flags.DEFINE_string("config", "configs/fashion_mnist.cfg", "Flagfile shared by every method.")
flags.DEFINE_list("methods", ["grafit", "coarse_ce", "instance", "fine_ce"], "Methods to train.")
flags.DEFINE_integer("seeds", 1, "Seeds per method (0..N-1); mean and spread are reported.")
flags.DEFINE_string("workdir", "runs/quality", "Root of the per-run work directories.")
flags.DEFINE_string("name", "quality", "Results name: bench/results/<name>.json and the "
                    "BENCHMARKS.md section markers.")
flags.DEFINE_multi_string("override", [], "Extra train.py flag for every run, e.g. --epochs=2.")
flags.DEFINE_bool("reuse", True, "Reuse a run whose work directory already has metrics.json, "
                  "instead of training it again (only if it has this command's settings).")
flags.DEFINE_bool("raw_pixels", True, "Add the raw-pixel kNN row.")
flags.DEFINE_bool("update_benchmarks", True, "Rewrite this table's section of BENCHMARKS.md.")
FLAGS = flags.FLAGS

COLUMNS = evaluation.METRIC_COLUMNS + (("train_minutes", "train minutes"),)


def train(method, seed):
    args, workdir = quality_run(FLAGS.config, FLAGS.workdir, method, seed, FLAGS.override)
    return train_or_reuse([*args, "--verbose=2"], workdir, FLAGS.reuse)


def summarise(method, runs):
    row = {"method": method, "seeds": len(runs)}
    row.update(over_seeds(runs, [k for k, _ in evaluation.METRIC_COLUMNS if k != "method"]))
    row["train_minutes"] = float(np.mean([r["train_seconds"] for r in runs]) / 60)
    row["history"] = [r.get("history", []) for r in runs]
    return row


def markdown(rows):
    """The table, plus the spread over seeds when there are several."""
    table = evaluation.format_table(rows, COLUMNS)
    if any(r.get("seeds", 1) > 1 for r in rows):
        spread = "; ".join(f"{r['method']}: fine top-1 +/- {100 * r['fine_knn_top1_std']:.2f}"
                           for r in rows if "fine_knn_top1_std" in r)
        table += f"\n\nSpread (std over seeds): {spread}."
    return table


def main(argv):
    del argv
    rows = []
    for method in FLAGS.methods:
        runs = [train(method, seed) for seed in range(FLAGS.seeds)]
        rows.append(summarise(method, runs))
    if FLAGS.raw_pixels:
        # The shared config with the overrides (only its data and evaluation options matter).
        config = resolved_config([f"--flagfile={FLAGS.config}", *FLAGS.override])
        rows.append(dict(method="raw pixels", seeds=1, **raw_pixels.raw_pixel_metrics(config)))
    publish(FLAGS.name, rows, markdown(rows), update=FLAGS.update_benchmarks,
            extra={"config": FLAGS.config, "overrides": FLAGS.override})


if __name__ == "__main__":
    app.run(main)
