"""Fine kNN top-1 class by class: where one method's lead over another comes from.

    python bench/per_class.py --methods=grafit,coarse_ce

Restores the last checkpoint of each finished run of `bench/quality.py`
(`runs/quality/<method>_seed<S>`, checked to have the config's settings), embeds both
splits with the exported feature (the pooled trunk) and scores the protocol's fine kNN
top-1 (k=1, training split as gallery) separately for each fine class of the test split,
beside raw pixels. The last column is the first method's lead over the second. Nothing
is trained. Writes `bench/results/<name>.json` and a section of `BENCHMARKS.md`.
"""

import os
import sys

import numpy as np
from absl import app, flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench import raw_pixels, scoring_flags  # noqa: E402
from bench.features import features_of, plain_trunk_config, restore_quality_run  # noqa: E402
from grafit_tf import evaluation  # noqa: E402
from grafit_tf.data import sources  # noqa: E402

scoring_flags.define("per_class", ["grafit", "coarse_ce"], "Methods to score; the table's "
                     "last column is the first one's lead over the second.")
flags.adopt_module_key_flags(scoring_flags)  # --help lists them as this script's.
FLAGS = flags.FLAGS

RAW = "raw pixels"


def per_class_table(scores, hierarchy, lead=None):
    """The table of `scores`, one row per fine class, grouped by coarse class.

    Args:
        scores: `{column: [C] fractions}`, in column order.
        hierarchy: the source's `Hierarchy` (fine names and their coarse class).
        lead: `(a, b)`: add a column `a - b` with `scores[a] - scores[b]`.

    Returns:
        `(rows, markdown)`: the row dicts (percentages) and their table.
    """
    rows = []
    for c, fine in enumerate(hierarchy.fine_names):
        row = {"fine class": fine,
               "coarse class": hierarchy.coarse_names[hierarchy.fine_to_coarse[c]]}
        row.update({name: round(100 * float(v[c]), 2) for name, v in scores.items()})
        if lead:
            row[" - ".join(lead)] = round(100 * float(scores[lead[0]][c] - scores[lead[1]][c]), 2)
        rows.append(row)
    rows.sort(key=lambda r: r["coarse class"])  # Stable: fine label order within a class.
    gap = " - ".join(lead) if lead else None
    cells = [{k: f"{v:+.2f}" if k == gap else f"{v:.2f}" if isinstance(v, float) else v
              for k, v in r.items()} for r in rows]
    return rows, evaluation.format_table(cells, [(k, k) for k in rows[0]])


def main(argv):
    del argv
    source = sources.load(plain_trunk_config(FLAGS.config, FLAGS.override))
    num = source.hierarchy.num_fine
    scores = {}
    for method in FLAGS.methods:
        runs = []
        for seed in range(FLAGS.seeds):
            model, _ = restore_quality_run(FLAGS.config, FLAGS.workdir, method, seed,
                                           FLAGS.override)
            train, test = features_of(model, source, ["trunk"])["trunk"]
            runs.append(evaluation.per_class_knn_top1(train, source.train.fine, test,
                                                      source.test.fine, num))
        scores[method] = np.mean(runs, axis=0)
    train, test = raw_pixels.pixels(source)
    scores[RAW] = evaluation.per_class_knn_top1(train, source.train.fine, test,
                                                source.test.fine, num)
    lead = tuple(FLAGS.methods[:2]) if len(FLAGS.methods) > 1 else None
    rows, body = per_class_table(scores, source.hierarchy, lead)
    scoring_flags.publish_table(rows, body)


if __name__ == "__main__":
    app.run(main)
