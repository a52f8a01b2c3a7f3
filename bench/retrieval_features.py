"""Which feature of a trained run to retrieve with: the layer ablation (no training).

    python bench/retrieval_features.py --methods=grafit,coarse_ce

Restores the last checkpoint of each finished run of `bench/quality.py`
(`runs/quality/<method>_seed<S>`, checked to have the config's settings) and scores,
with the evaluation protocol, each of these features of the same weights:

- `trunk`: the pooled last stage of the online trunk, the exported embedding;
- `target_trunk`: the same feature of the EMA target trunk (methods that have one:
  BYOL's target, which some self-supervised methods evaluate instead of the online one);
- `stage_<i>`: the pooled output of stage `i` alone (0 is the first, finest stage);
- `stages_<i>_<j>...`: those stages' pooled outputs, each L2-normalised, concatenated
  and normalised again (a hypercolumn: earlier stages keep detail that the last one may
  have been trained to ignore);
- `trunk_flip`: the mean of the trunk features of the image and its mirror image
  (test-time augmentation; every method trained with random flips);
- `knn_head`, `projector`, `predictor`: the output of grafit's NCA head and of the
  instance branch's projector and predictor (on the projector) on the online trunk
  feature, for the methods that train them.

`--embedding=knn_head` exports the kNN head's output instead of the trunk feature; a run
trained with it is a row of the ablation tables (the head is trained the same either way).

The features are built by `bench/features.py`. Writes `bench/results/<name>.json` and a
section of `BENCHMARKS.md`.
"""

import os
import sys

from absl import app, flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.features import (  # noqa: E402
    FEATURES, feature_stages, features_of, plain_trunk_config, restore_quality_run)
from bench.runs import over_seeds  # noqa: E402
from bench import scoring_flags  # noqa: E402
from grafit_tf import evaluation  # noqa: E402
from grafit_tf.data import sources  # noqa: E402

scoring_flags.define("retrieval_features", ["grafit", "coarse_ce"])
flags.adopt_module_key_flags(scoring_flags)  # --help lists them as this script's.
flags.DEFINE_list("features", list(FEATURES), "Features to compare: trunk, target_trunk, "
                  "trunk_flip, stage_<i>, stages_<i>_<j>..., knn_head, projector, predictor "
                  "(see the module docstring).")
FLAGS = flags.FLAGS

METRICS = ("fine_knn_top1", "fine_knn_weighted_top1", "fine_recall_at_1", "coarse_knn_top1")
COLUMNS = (("method", "method"), ("feature", "feature"), ("dim", "dim"),
           ("fine_knn_top1", "fine kNN top-1"), ("fine_knn_weighted_top1", "fine kNN weighted (k=20)"),
           ("fine_recall_at_1", "R@1"), ("coarse_knn_top1", "coarse kNN top-1"))


def main(argv):
    del argv
    config = plain_trunk_config(FLAGS.config, FLAGS.override)
    for name in FLAGS.features:  # Fail before the first restore, not after.
        if name not in FEATURES and feature_stages(name) is None:
            raise SystemExit(f"--features: unknown feature {name!r}.")
    source = sources.load(config)
    rows = []
    for method in FLAGS.methods:
        runs = []
        for seed in range(FLAGS.seeds):
            model, workdir = restore_quality_run(FLAGS.config, FLAGS.workdir, method, seed,
                                                 FLAGS.override)
            feats = features_of(model, source, FLAGS.features)
            runs.append({name: dict(dim=int(tr.shape[1]), **evaluation.knn_metrics(
                tr, source.train.fine, source.train.coarse, te, source.test.fine,
                source.test.coarse, k=config.eval_k, temperature=config.eval_temperature,
                num_fine=source.hierarchy.num_fine)) for name, (tr, te) in feats.items()})
            print(f"scored {workdir}: " + ", ".join(
                f"{n} {100 * m['fine_knn_top1']:.2f}" for n, m in runs[-1].items()), flush=True)
        for name in FLAGS.features:
            if name not in runs[0]:
                continue
            rows.append({"method": method, "feature": name, "seeds": len(runs),
                         "dim": runs[0][name]["dim"],
                         **over_seeds([r[name] for r in runs], METRICS)})
    body = evaluation.format_table(rows, COLUMNS)
    scoring_flags.publish_table(rows, body)


if __name__ == "__main__":
    app.run(main)
