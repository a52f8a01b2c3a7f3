"""Ablations of Grafit: one setting changed at a time from the default config.

    python -m bench.ablation --epochs=3 --variants=default,tau_0.1,lambda_2

(from the repository root, as a module: see bench/runs.py).

Every variant runs `train.py --flagfile=CONFIG <--base flags> --epochs=E <its flags>
<--override flags>` in its own process with the same seed; the table (fine kNN top-1, weighted, R@1,
coarse top-1, minutes) goes to `bench/results/<name>.json` and into
BENCHMARKS.md between markers. Fine labels are used for scoring only: the
table reports test-split numbers and is not used to pick the defaults silently.
"""

import os

from absl import app, flags

from bench.runs import publish, train_or_reuse
from grafit_tf import evaluation

VARIANTS = {
    "default": [],
    "tau_0.1": ["--tau=0.1"],
    "tau_0.02": ["--tau=0.02"],
    "tau_0.03": ["--tau=0.03"],
    "tau_0.01": ["--tau=0.01"],
    "lambda_0": ["--lambda_inst=0"],
    "lambda_0.25": ["--lambda_inst=0.25"],
    "lambda_0.5": ["--lambda_inst=0.5"],
    "lambda_1": ["--lambda_inst=1"],
    "lambda_2": ["--lambda_inst=2"],
    "instance_tau_0.05": ["--instance_tau=0.05"],
    "instance_tau_0.2": ["--instance_tau=0.2"],
    "memory_queue_8192": ["--memory=queue", "--queue_size=8192"],
    "lambda_0.5_queue_8192": ["--lambda_inst=0.5", "--memory=queue", "--queue_size=8192"],
    "lambda_0.5_queue_8192_batch_128": ["--lambda_inst=0.5", "--memory=queue",
                                        "--queue_size=8192", "--batch_size=128"],
    "instance_infonce": ["--instance_loss=infonce"],
    "views_3": ["--num_views=3"],
    "crop_0.6": ["--crop_scale_min=0.6"],
    "crop_0.8": ["--crop_scale_min=0.8"],
    "crop_1.0": ["--crop_scale_min=1.0"],
    "jitter_0": ["--jitter_strength=0"],
    "jitter_0.6": ["--jitter_strength=0.6"],
    "jitter_0.8": ["--jitter_strength=0.8"],
    "learning_rate_4e-3": ["--learning_rate=4e-3"],
    "batch_128": ["--batch_size=128"],
    # The coarse classifier under the same base, to see whether a change widens the gap.
    "coarse_ce": ["--method=coarse_ce"],
    "coarse_ce_jitter_0": ["--method=coarse_ce", "--jitter_strength=0"],
    "coarse_ce_views_3": ["--method=coarse_ce", "--num_views=3"],
    "crop_0.8_tau_0.1": ["--crop_scale_min=0.8", "--tau=0.1"],
    "crop_0.8_infonce": ["--crop_scale_min=0.8", "--instance_loss=infonce"],
    # A random gamma after the jitter (an extension), and the coarse classifier with it.
    "gamma_0.5": ["--gamma_jitter=0.5"],
    "coarse_ce_gamma_0.5": ["--method=coarse_ce", "--gamma_jitter=0.5"],
    "crop_0.5": ["--crop_scale_min=0.5"],
    # A narrower kNN-loss head: the coarse NCA constrains a lower-dimensional image of the
    # trunk, leaving more of it to the instance loss.
    "knn_dim_32": ["--knn_dim=32"],
    # MaskCon's reading of Grafit (one head, a queue of coarse-labelled keys, w = 0.5) with
    # its SGD, on the default's data, trunk and epochs in their two-view form.
    "grafit_maskcon": ["--num_views=2", "--gamma_jitter=0", "--method=grafit_maskcon",
                       "--lambda_inst=1", "--proj_hidden=512", "--proj_dim=256",
                       "--queue_size=8192", "--instance_tau=0.1", "--ema_decay=0.99",
                       "--optimizer=sgd_l2", "--learning_rate=0.02", "--weight_decay=5e-4"],
}


def variant_flags(variant):
    """A variant's train.py flags (added to --base's)."""
    return VARIANTS[variant]


def define_flags():
    """The bench's flags, defined when it runs (not on import, so that a test may import
    `VARIANTS` next to train.py's flags, which share names such as --workdir)."""
    flags.DEFINE_string("config", "configs/fashion_mnist.cfg", "Flagfile of the default.")
    flags.DEFINE_list("variants", list(VARIANTS),
                      f"Variants to run, of: {', '.join(VARIANTS)}.")
    flags.DEFINE_integer("epochs", 3, "Epochs of every variant (shorter than the default); "
                         "it comes before the variant's own flags, so a variant may change it.")
    flags.DEFINE_multi_string("base", [], "train.py flag of the reference point, applied "
                              "after the config and before each variant's own flags (so a "
                              "variant may change it), e.g. --base=--crop_scale_min=0.35.")
    flags.DEFINE_multi_string("override", [],
                              "Extra train.py flag for every run (wins over all).")
    flags.DEFINE_string("workdir", "runs/ablation", "Root of the per-variant work directories.")
    flags.DEFINE_string("name", "ablation", "Results name and BENCHMARKS.md section.")
    flags.DEFINE_bool("reuse", True, "Reuse a variant whose work directory has metrics.json "
                      "(only if it has this command's settings).")


FLAGS = flags.FLAGS

COLUMNS = (("variant", "variant"), ("changed", "flags changed")) + tuple(
    c for c in evaluation.METRIC_COLUMNS if c[0] in (
        "fine_knn_top1", "fine_knn_weighted_top1", "fine_recall_at_1", "coarse_knn_top1")
) + (("train_minutes", "train minutes"),)


def run(variant):
    m = train_or_reuse([f"--flagfile={FLAGS.config}", *FLAGS.base, f"--epochs={FLAGS.epochs}",
                        *variant_flags(variant), "--verbose=2", *FLAGS.override],
                       os.path.join(FLAGS.workdir, variant), FLAGS.reuse)
    spec = VARIANTS[variant]
    changed = " ".join(spec) if isinstance(spec, list) else f"the preset {spec}"
    return dict(m, variant=variant, changed=changed or "(none)",
                train_minutes=m["train_seconds"] / 60)


def main(argv):
    del argv
    rows = [run(v) for v in FLAGS.variants]
    reference = " ".join([f"--flagfile={FLAGS.config}", *FLAGS.base, f"--epochs={FLAGS.epochs}"])
    body = (f"Reference point (`default`): `train.py {reference}`; each other row changes "
            "only the flags shown.\n\n" + evaluation.format_table(rows, COLUMNS))
    publish(FLAGS.name, [{k: v for k, v in r.items() if k != "history"} for r in rows],
            body)


if __name__ == "__main__":
    define_flags()
    app.run(main)
