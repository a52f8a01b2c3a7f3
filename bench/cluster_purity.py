"""How well k-means inside each coarse class finds the fine classes (no training).

    python bench/cluster_purity.py --workdirs=runs/quality/grafit --per_coarse=4,8,16

For each finished run: embeds the training images with its saved `embedder.keras`,
splits every coarse class into K clusters with the spherical k-means of
`--subclusters_per_coarse` (`grafit_tf.subclusters.within_coarse_kmeans`), and reports
the clusters' purity at the fine level: the share of images whose cluster's most
common fine class is their own. That is the label noise the sub-cluster term trains
on. Fine labels are used for scoring only. Writes `bench/results/<name>.json` and a
section of `BENCHMARKS.md`.
"""

import json
import os
import sys

from absl import app, flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.sections import publish  # noqa: E402

flags.DEFINE_list("workdirs", None, "Finished train.py work directories to read.")
flags.DEFINE_list("per_coarse", ["4", "8", "16"], "Clusters per coarse class to try.")
flags.DEFINE_integer("seed", 1, "Seed of the k-means++ draws.")
flags.DEFINE_string("name", "cluster_purity", "Results name: bench/results/<name>.json and "
                    "the BENCHMARKS.md section markers.")
flags.DEFINE_bool("update_benchmarks", True, "Rewrite this table's section of BENCHMARKS.md.")
FLAGS = flags.FLAGS


def markdown(rows, coarse_names):
    """The table: one row per run and K, purity overall and per coarse class."""
    from grafit_tf import evaluation

    # Percentages as text: the purity keys are not evaluation's metric keys.
    shown = [{**r, "run": f"`{r['run']}`",
              **{key: f"{100 * r[key]:.2f}" for key in ("purity", *coarse_names)}}
             for r in rows]
    columns = [("run", "run"), ("per_coarse", "clusters per coarse class"),
               ("purity", "purity"), *((name, name) for name in coarse_names)]
    return evaluation.format_table(shown, columns)


def main(argv):
    del argv
    import keras

    from grafit_tf import subclusters, trainer
    from grafit_tf.config import Config
    from grafit_tf.data import sources

    rows, coarse_names = [], None
    for workdir in FLAGS.workdirs:
        with open(os.path.join(workdir, "config.json"), encoding="utf-8") as f:
            config = Config.from_dict(json.load(f))
        source = sources.load(config)
        coarse_names = source.hierarchy.coarse_names
        embedder = keras.saving.load_model(os.path.join(workdir, "embedder.keras"),
                                           compile=False)
        features = trainer.embed(trainer.embedding_fn(embedder, source), source.train, source)
        for k in (int(k) for k in FLAGS.per_coarse):
            assignments, _ = subclusters.within_coarse_kmeans(
                features, source.train.coarse, source.hierarchy.num_coarse, k, FLAGS.seed)
            overall, per_class = subclusters.purity(
                assignments, source.train.fine, source.train.coarse, source.hierarchy.num_coarse)
            rows.append(dict(run=workdir, per_coarse=k, purity=overall,
                             **{name: p for name, p in zip(coarse_names, per_class)}))
    publish(FLAGS.name, rows, markdown(rows, coarse_names),
            update=FLAGS.update_benchmarks)


if __name__ == "__main__":
    flags.mark_flag_as_required("workdirs")
    app.run(main)
