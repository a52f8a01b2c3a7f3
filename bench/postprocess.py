"""The same trained runs scored under each `--embedding_transform` (no training).

    python bench/postprocess.py --methods=grafit,coarse_ce,instance,fine_ce --seeds=3

Reads the finished runs of `bench/quality.py` (`runs/quality/<method>_seed<S>`,
checked to have the config's settings, as the quality bench checks them), embeds
the training and test splits once with each saved `embedder.keras`, then fits
and applies each transform (on the training embeddings, no labels) and scores it
with the evaluation protocol; raw pixels get the same maps. Writes
`bench/results/<name>.json` and a section of `BENCHMARKS.md`.
"""

import os
import sys

from absl import app, flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench import raw_pixels, scoring_flags  # noqa: E402
from bench.runs import finished_quality_run, over_seeds, resolved_config  # noqa: E402
from grafit_tf import embedding_transform, evaluation  # noqa: E402
from grafit_tf.data import sources  # noqa: E402

scoring_flags.define("postprocess", ["grafit", "coarse_ce", "instance", "fine_ce"])
flags.adopt_module_key_flags(scoring_flags)  # --help lists them as this script's.
flags.DEFINE_list("transforms", list(embedding_transform.TRANSFORMS), "Transforms to compare.")
flags.DEFINE_bool("raw_pixels", True, "Add raw-pixel rows.")
FLAGS = flags.FLAGS

METRICS = ("fine_knn_top1", "fine_knn_weighted_top1", "fine_recall_at_1", "coarse_knn_top1")
COLUMNS = (("method", "method"), ("transform", "transform"),
           ("fine_knn_top1", "fine kNN top-1"), ("fine_knn_weighted_top1", "fine kNN weighted (k=20)"),
           ("fine_recall_at_1", "R@1"), ("coarse_knn_top1", "coarse kNN top-1"))


def score(train, test, source, config):
    """`{transform: metrics}` of one pair of L2-normalised embeddings `[N, D]`, `[Q, D]`."""
    out = {}
    for kind in FLAGS.transforms:
        a, b = embedding_transform.fit_apply(train, test, kind, config.whiten_shrinkage)
        out[kind] = evaluation.knn_metrics(
            a, source.train.fine, source.train.coarse, b, source.test.fine,
            source.test.coarse, k=config.eval_k, temperature=config.eval_temperature,
            num_fine=source.hierarchy.num_fine)
    return out


def run_scores(method, seed, source, config):
    """Scores of one finished run of bench/quality.py under every transform."""
    import keras

    from grafit_tf import trainer

    workdir = finished_quality_run(FLAGS.config, FLAGS.workdir, method, seed, FLAGS.override)
    embedder = keras.saving.load_model(os.path.join(workdir, "embedder.keras"), compile=False)
    train = trainer.embed(embedder, source.train, source)
    test = trainer.embed(embedder, source.test, source)
    print(f"embedded {workdir}", flush=True)
    return score(train, test, source, config)


def rows_of(method, runs):
    """One row per transform: the mean over seeds, with the top-1's spread."""
    rows = []
    for kind in FLAGS.transforms:
        rows.append({"method": method, "transform": kind, "seeds": len(runs),
                     **over_seeds([r[kind] for r in runs], METRICS)})
    return rows


def main(argv):
    del argv
    config = resolved_config([f"--flagfile={FLAGS.config}", *FLAGS.override])
    if config.embedding_transform != "none":
        raise SystemExit(f"{FLAGS.config} sets --embedding_transform: its runs' embedders "
                         "already apply a map; score runs trained with none.")
    source = sources.load(config)
    rows = []
    for method in FLAGS.methods:
        rows += rows_of(method, [run_scores(method, s, source, config)
                                 for s in range(FLAGS.seeds)])
    if FLAGS.raw_pixels:  # Through the same maps, on the source already loaded.
        scores = score(*raw_pixels.pixels(source), source, config)
        rows += [dict(method="raw pixels", transform=kind, seeds=1, **scores[kind])
                 for kind in FLAGS.transforms]
    body = evaluation.format_table(rows, COLUMNS)
    spread = "spread (std) of fine top-1: " + "; ".join(
        f"{r['method']} {r['transform']} +/- {100 * r['fine_knn_top1_std']:.2f}"
        for r in rows if r["seeds"] > 1)
    scoring_flags.publish_table(rows, body, spread)


if __name__ == "__main__":
    app.run(main)
