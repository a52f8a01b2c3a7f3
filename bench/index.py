"""The gallery index (`grafit_tf.serving.index`): each kind against exact search.

    python -m bench.index --embeddings=W/fm_embeddings.npz   # ~5 minutes on 2 idle cores
    python -m bench.index --parts=synthetic

(from the repository root, as a module: see bench/runs.py). Two galleries:

- synthetic: `--size` (1,000,000) 128-d unit vectors and `--queries` (2,000) more from
  the same mixture: 4,096 Gaussian clusters, centres uniform on the sphere, each
  vector a centre (equally likely) + N(0, 0.05^2 I), then L2-normalised (seed 0). The
  noise is isotropic in all 128 dims, so a query's neighbours are nearly equidistant
  (its nearest ~0.83, its 20th ~0.79): a hard case for approximate search.
- fashion_mnist: `--embeddings`, an .npz of a trained model's embeddings
  (train_embeddings [60000, D] L2-normalised, train_labels, test_embeddings,
  test_labels, as for bench/open_set.py): the training split is the gallery, the test
  split the queries.

Per kind (flat, hnsw, ivf; `--memory` is the budget, and the table says what auto
picks): build seconds; seconds to reuse the saved index (its file read, the gallery's
fingerprint checked); queries/s of the index and of flat, timed in turns (flat, hnsw,
ivf, flat, ...; wall clock, the median over `--rounds` after a warm-up, on the first
`--timed_queries`) and their ratio, the median of each round's; the serialised
index's size; the build's peak memory (VmHWM reset before it); 1-recall@20, the share
of queries whose exact nearest neighbour is among the index's 20; on fashion_mnist,
the kNN top-1 accuracy of serving's vote (`classify.predict`, k=20, T=0.07).
Writes bench/results/index.json.
"""

import ctypes
import os
import statistics
import tempfile
import time

import numpy as np
from absl import app, flags

from bench.runs import publish
from grafit_tf.errors import UserError
from grafit_tf.serving import classify, gallery as gallery_lib, index

flags.DEFINE_list("parts", ["synthetic", "fashion_mnist"], "Galleries to measure (see above).")
flags.DEFINE_string("embeddings", None, "fashion_mnist: an .npz of train/test embeddings "
                    "and labels (required for that part).")
flags.DEFINE_integer("size", 1_000_000, "synthetic: gallery vectors.")
flags.DEFINE_integer("queries", 2_000, "synthetic: queries.")
flags.DEFINE_integer("timed_queries", 500, "Queries of each timed search.")
flags.DEFINE_integer("rounds", 3, "Turns of flat and the indexes for the query rates.")
flags.DEFINE_string("memory", index.DEFAULT_MEMORY, "The index memory budget.")
FLAGS = flags.FLAGS
KINDS = ("flat", "hnsw", "ivf")


def clustered(n, d=128, clusters=4096, sigma=0.05, seed=0):
    """`[n, d]` float32 unit vectors of the synthetic mixture (see above)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, d), dtype=np.float32)
    x = (centres / np.linalg.norm(centres, axis=1, keepdims=True))[rng.integers(0, clusters, n)]
    x += sigma * rng.standard_normal((n, d), dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _rss(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field))


def build(embeddings, kind, scratch):
    """`(searcher, row)`: the index prepared as serving does (built, fingerprinted and
    saved; timed, with its peak memory), then prepared again from its file (timed)."""
    path = os.path.join(scratch, f"{kind}.index.npz")
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # Freed memory given back: the peak is the build's.
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # Resets the peak (VmHWM) to the present size.
    base, started = _rss("VmRSS"), time.perf_counter()
    searcher = index.prepare(embeddings, kind, FLAGS.memory, path=path, log=print)
    row = {"build_s": time.perf_counter() - started, "build_peak_mb": (_rss("VmHWM") - base) / 1e6,
           "index_mb": embeddings.nbytes / 1e6}  # Flat: the vectors (never saved).
    if kind != "flat":
        row["index_mb"] = os.path.getsize(path) / 1e6
        started = time.perf_counter()
        searcher = index.prepare(embeddings, kind, FLAGS.memory, path=path, log=print)
        row["load_s"] = time.perf_counter() - started
        os.remove(path)
    return searcher, row


def rates(searchers, queries, rounds):
    """`{kind: (queries/s, ratio to flat)}`: the searchers timed in turns, medians."""
    def rate(searcher):
        calls, started = 0, time.perf_counter()
        while calls == 0 or time.perf_counter() - started < 1.0:  # Fast ones: repeated.
            searcher.search(queries, 20)
            calls += 1
        return calls * len(queries) / (time.perf_counter() - started)

    for searcher in searchers.values():
        rate(searcher)  # Warm-up.
    runs = {kind: [] for kind in searchers}
    for _ in range(rounds):
        for kind, searcher in searchers.items():
            runs[kind].append(rate(searcher))
    return {kind: (statistics.median(r),
                   statistics.median(a / f for a, f in zip(r, runs["flat"])))
            for kind, r in runs.items()}


def measure(name, gallery, queries, labels=None):
    """Rows of one gallery: each kind's figures (see above)."""
    auto = index.plan(len(gallery.embeddings), gallery.dim, "auto", FLAGS.memory)
    searchers, rows = {}, []
    with tempfile.TemporaryDirectory() as scratch:
        for kind in KINDS:
            searchers[kind], row = build(gallery.embeddings, kind, scratch)
            rows.append(dict(part=name, vectors=len(gallery.embeddings), dim=gallery.dim,
                             auto=auto.kind == kind,
                             **searchers[kind].describe(), **row))
    exact = None
    for kind, row in zip(KINDS, rows):
        if labels is None:
            found = searchers[kind].search(queries, 20)[1]
        else:
            predicted = classify.predict(queries, gallery, 20, 0.07, searchers[kind])
            found = predicted.neighbours
            row["top1"] = float((predicted.labels == labels).mean())
        exact = found if exact is None else exact
        row["recall"] = float((found == exact[:, :1]).any(axis=1).mean())
    timed = rates(searchers, queries[:FLAGS.timed_queries], FLAGS.rounds)
    for row in rows:
        row["qps"], row["vs_flat"] = timed[row["kind"]]
    return rows


def synthetic_part():
    data = clustered(FLAGS.size + FLAGS.queries)
    embeddings, queries = data[:FLAGS.size], data[FLAGS.size:]
    g = gallery_lib.Gallery(embeddings, np.zeros(len(embeddings), np.int32), ("x",), ())
    return measure(f"synthetic {FLAGS.size:,} x 128, {FLAGS.queries:,} queries", g, queries)


def fashion_mnist_part():
    with np.load(FLAGS.embeddings, allow_pickle=False) as data:
        train, train_y = data["train_embeddings"].astype(np.float32), data["train_labels"]
        test, test_y = data["test_embeddings"].astype(np.float32), data["test_labels"]
    g = gallery_lib.Gallery(train, train_y.astype(np.int32),
                            tuple(map(str, range(int(train_y.max()) + 1))), ())
    return measure(f"Fashion-MNIST {len(train):,} x {train.shape[1]}, {len(test):,} queries",
                   g, test, test_y)


def table(rows):
    lines = ["| gallery | kind | index (search parameters) | build s | reuse s | queries/s "
             "| x flat | index MB | build peak MB | 1-recall@20 | top-1 (vs flat) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    flat = {r["part"]: r for r in rows if r["kind"] == "flat"}
    for r in rows:
        kind = r["kind"] + (" (auto)" if r["auto"] else "")
        params = ", ".join(f"{k}={v}" for k, v in r["params"].items())
        factory = f"{r['factory']} ({params})" if params else r["factory"]
        reuse = f"{r['load_s']:.1f}" if "load_s" in r else ""
        top1 = (f"{100 * r['top1']:.2f}% ({100 * (r['top1'] - flat[r['part']]['top1']):+.2f})"
                if "top1" in r else "")
        lines.append(f"| {r['part']} | {kind} | {factory} | {r['build_s']:.1f} | {reuse} | "
                     f"{r['qps']:.0f} | {r['vs_flat']:.1f} | {r['index_mb']:.0f} | "
                     f"{r['build_peak_mb']:.0f} | {r['recall']:.4f} | {top1} |")
    return "\n".join(lines)


def auto_picks(rows):
    """A line: what auto picks for each gallery at a few memory budgets."""
    picks = []
    for part, (n, d) in {r["part"]: (r["vectors"], r["dim"]) for r in rows}.items():
        budgets = sorted({FLAGS.memory, "4G", "1G", "512M", "32M"}, key=index.parse_memory)
        chosen = []
        for memory in reversed(budgets):
            try:
                chosen.append(f"{memory}: {index.plan(n, d, 'auto', memory).factory}")
            except UserError as e:
                chosen.append(f"{memory}: refused ({e})")
        picks.append(f"{part}: {'; '.join(chosen)}")
    return f"(auto): what auto picks within --memory={FLAGS.memory}. Auto at other budgets: " \
        + ". ".join(picks) + "."


def main(argv):
    del argv
    if "fashion_mnist" in FLAGS.parts and FLAGS.embeddings is None:
        raise app.UsageError("--embeddings=PATH.npz is required for the fashion_mnist part "
                             "(or --parts=synthetic).")
    parts = {"synthetic": synthetic_part, "fashion_mnist": fashion_mnist_part}
    rows = []
    try:
        for part in FLAGS.parts:
            rows += parts[part]()
            print(table(rows), flush=True)
    except UserError as e:  # A --memory too small for a kind.
        raise SystemExit(f"error: {e}") from None
    publish("index", rows, table(rows) + "\n\n" + auto_picks(rows), update=False)


if __name__ == "__main__":
    app.run(main)
