"""Pictures of a `bench/quality.py` run.

    python -m bench.plots --workdir=runs/quality --name=quality

(from the repository root, as a module: see bench/runs.py).

- `bench/results/<name>_fine_top1_per_epoch.png`: fine kNN top-1 per evaluated
  epoch for every method (from each run's metrics.json history + final value).
- `bench/results/<name>_tsne.png`: 2-D t-SNE maps of test embeddings coloured by
  fine class, `coarse_ce` next to `grafit`.
"""

import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

import grafit_tf  # noqa: E402,F401  Before plot_tsne's keras: TensorFlow's oneDNN setting.
from bench.runs import ROOT  # noqa: E402

flags.DEFINE_string("workdir", "runs/quality", "Root of bench/quality.py's work directories.")
flags.DEFINE_string("name", "quality", "Prefix of the PNG files under bench/results/.")
flags.DEFINE_list("tsne_methods", ["coarse_ce", "grafit"], "Methods shown side by side.")
flags.DEFINE_integer("tsne_points", 3000, "Test images in the t-SNE maps.")
flags.DEFINE_integer("seed", 0, "Which seed's runs to draw.")
FLAGS = flags.FLAGS


def run_dirs():
    out = {}
    for name in sorted(os.listdir(FLAGS.workdir)):
        path = os.path.join(FLAGS.workdir, name)
        if name.endswith(f"_seed{FLAGS.seed}") and os.path.isfile(
                os.path.join(path, "metrics.json")):
            out[name[: -len(f"_seed{FLAGS.seed}")]] = path
    return out


def plot_curves(runs, path):
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for method, workdir in runs.items():
        m = json.load(open(os.path.join(workdir, "metrics.json")))
        points = [(h["epoch"], h["fine_knn_top1"]) for h in m.get("history", [])]
        points.append((m["epochs"], m["fine_knn_top1"]))
        epochs, top1 = zip(*sorted(set(points)))
        ax.plot(epochs, 100 * np.array(top1), marker="o", label=method)
    ax.set_xlabel("epoch")
    ax.set_ylabel("fine kNN top-1 (%)")
    ax.set_title("Fashion-MNIST test split, fine labels (train split as gallery)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def plot_tsne(runs, path):
    import keras
    from sklearn.manifold import TSNE

    from grafit_tf.config import Config
    from grafit_tf.data import sources

    any_run = runs[FLAGS.tsne_methods[0]]
    config = Config.from_dict(json.load(open(os.path.join(any_run, "config.json"))))
    source = sources.load(config)
    rng = np.random.default_rng(0)
    pick = rng.choice(len(source.test), FLAGS.tsne_points, replace=False)
    images = source.test.images[pick].astype(np.float32)
    fine = source.test.fine[pick]
    names = source.hierarchy.fine_names
    fig, axes = plt.subplots(1, len(FLAGS.tsne_methods), figsize=(6 * len(FLAGS.tsne_methods), 5.5))
    for ax, method in zip(np.atleast_1d(axes), FLAGS.tsne_methods):
        embedder = keras.saving.load_model(os.path.join(runs[method], "embedder.keras"))
        z = embedder.predict(images, batch_size=500, verbose=0)
        xy = TSNE(n_components=2, init="pca", random_state=0, perplexity=30).fit_transform(z)
        for c in range(len(names)):
            sel = fine == c
            ax.scatter(xy[sel, 0], xy[sel, 1], s=3, label=names[c], color=f"C{c}")
        top1 = json.load(open(os.path.join(runs[method], "metrics.json")))["fine_knn_top1"]
        ax.set_title(f"{method}: fine kNN top-1 {100 * top1:.1f}%")
        ax.set_xticks([])
        ax.set_yticks([])
    np.atleast_1d(axes)[-1].legend(markerscale=4, fontsize=8, loc="center left",
                                   bbox_to_anchor=(1, 0.5))
    fig.suptitle("t-SNE of test embeddings, coloured by FINE class (trained on coarse labels)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv):
    del argv
    runs = run_dirs()
    results = os.path.join(ROOT, "bench", "results")
    os.makedirs(results, exist_ok=True)
    curves = os.path.join(results, f"{FLAGS.name}_fine_top1_per_epoch.png")
    plot_curves(runs, curves)
    print("wrote", curves)
    if all(m in runs for m in FLAGS.tsne_methods):
        tsne = os.path.join(results, f"{FLAGS.name}_tsne.png")
        plot_tsne(runs, tsne)
        print("wrote", tsne)


if __name__ == "__main__":
    app.run(main)
