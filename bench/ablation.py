"""Ablations of Grafit: one setting changed at a time from the default config.

    python bench/ablation.py --epochs=3 --variants=default,tau_0.1,lambda_2

Every variant runs `train.py --flagfile=CONFIG <--base flags> --epochs=E <its flags>
<--override flags>` in its own process with the same seed; the table (fine kNN top-1, weighted, R@1,
coarse top-1, minutes) goes to `bench/results/<name>.json` and into
BENCHMARKS.md between markers. Fine labels are used for scoring only: the
table reports test-split numbers and is not used to pick the defaults silently.
"""

import os
import sys

from absl import app, flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.runs import train_or_reuse  # noqa: E402
from bench.sections import publish  # noqa: E402
from grafit_tf import evaluation  # noqa: E402

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
    "negatives_same_coarse": ["--instance_negatives=same_coarse"],
    "soft_targets": ["--instance_targets=coarse_soft"],
    "same_coarse_soft": ["--instance_negatives=same_coarse", "--instance_targets=coarse_soft"],
    "head_layers_2": ["--head_layers=2"],
    "ema_constant": ["--ema_schedule=constant"],
    "instance_queue_4096": ["--instance_queue=4096"],
    "instance_queue_16384": ["--instance_queue=16384"],
    "memory_queue_8192": ["--memory=queue", "--queue_size=8192"],
    "lambda_0.5_queue_8192": ["--lambda_inst=0.5", "--memory=queue", "--queue_size=8192"],
    "lambda_0.5_queue_8192_batch_128": ["--lambda_inst=0.5", "--memory=queue",
                                        "--queue_size=8192", "--batch_size=128"],
    "instance_infonce": ["--instance_loss=infonce"],
    "views_3": ["--num_views=3"],
    "local_crops_2": ["--local_crops=2"],
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
    "embedding_knn_head": ["--embedding=knn_head"],
    # KoLeo on the trunk feature (an extension).
    "koleo_0.1": ["--koleo_weight=0.1"],
    "koleo_0.5": ["--koleo_weight=0.5"],
    # NNCLR's nearest-neighbour positives within the coarse class (an extension).
    "nn_positives": ["--instance_positives=coarse_nn"],
    "nn_positives_from_4": ["--instance_positives=coarse_nn", "--nn_start_epochs=4"],
    # SwAV-style prototypes within each coarse class (an extension).
    "prototypes_8": ["--prototypes_per_coarse=8"],
    "aug_pred_1": ["--aug_pred_weight=1"],
    # Random erasing on every view (an extension), and the coarse classifier with it.
    "erase_0.5": ["--erase_prob=0.5"],
    "coarse_ce_erase_0.5": ["--method=coarse_ce", "--erase_prob=0.5"],
    # A random gamma after the jitter (an extension), and the coarse classifier with it.
    "gamma_0.5": ["--gamma_jitter=0.5"],
    "coarse_ce_gamma_0.5": ["--method=coarse_ce", "--gamma_jitter=0.5"],
    # DeepCluster-style sub-clusters within each coarse class (an extension).
    "subclusters_8": ["--subclusters_per_coarse=8"],
    # Decoupled InfoNCE (DCL, an extension).
    "decoupled": ["--instance_decoupled"],
    "crop_0.5": ["--crop_scale_min=0.5"],
    # The three options with the best seed-0 runs, together.
    "erase_ema_constant_tau_0.03": ["--erase_prob=0.5", "--ema_schedule=constant", "--tau=0.03"],
    # A narrower kNN-loss head: the coarse NCA constrains a lower-dimensional image of the
    # trunk, leaving more of it to the instance loss.
    "knn_dim_32": ["--knn_dim=32"],
    "grafit_maskcon": "configs/fashion_mnist_grafit_maskcon.cfg",
}


def variant_flags(variant):
    """A variant's flags; a preset file's own lines minus its nested default flagfile
    (which would undo --base)."""
    spec = VARIANTS[variant]
    if isinstance(spec, list):
        return spec
    lines = open(os.path.join(ROOT, spec), encoding="utf-8").read().splitlines()
    return [l.strip() for l in lines
            if l.strip().startswith("--") and not l.strip().startswith("--flagfile=")]

flags.DEFINE_string("config", "configs/fashion_mnist.cfg", "Flagfile of the default.")
flags.DEFINE_list("variants", list(VARIANTS), f"Variants to run, of: {', '.join(VARIANTS)}.")
flags.DEFINE_integer("epochs", 3, "Epochs of every variant (shorter than the default); "
                     "it comes before the variant's own flags, so a variant may change it.")
flags.DEFINE_multi_string("base", [], "train.py flag of the reference point, applied after "
                          "the config and before each variant's own flags (so a variant "
                          "may change it), e.g. --base=--crop_scale_min=0.35.")
flags.DEFINE_multi_string("override", [], "Extra train.py flag for every run (wins over all).")
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
    app.run(main)
