"""Open-set answers on Fashion-MNIST: two classes left out of the gallery.

    python -m bench.open_set --embeddings=W/fm_embeddings.npz

(from the repository root, as a module: see bench/runs.py). `--embeddings` is an
.npz of a trained model's embeddings (train_embeddings [60000, D] L2-normalised,
train_labels [60000], test_embeddings, test_labels; labels 0..9 in Fashion-MNIST's
order). For each of the 45 pairs of left-out classes, the gallery holds the
training embeddings of the 8 others; its unknown threshold is calibrated on the
gallery itself (`grafit_tf.serving.open_set.calibrate`, leave-one-out, 10,000
rows) for each target precision; the queries are scored with serving's vote
(k=20, T=0.07, exact NumPy search). Per row, over the 45 pairs (mean, min, max):

- left-out unknown: share of the left-out classes' queries answered `unknown`
  (higher is better);
- known unknown: share of the other queries answered `unknown` (lower is better);
- known accuracy: accuracy of the known-class queries that are answered (the
  gallery's classes; no rejection: the `none` row);
- answered precision: of every answer that is not `unknown` (a left-out image
  answered is wrong); the target holds for the known classes only (known accuracy);
- AUROC: how well the score ranks left-out below known queries, without a threshold.

Two splits: `validation` (gallery: 50,000 training images, queries: the other
10,000; this is where the score is chosen) and `test` (gallery: the whole
training split, queries: the test split; reported, nothing is chosen on it).
Writes bench/results/open_set.json.
"""

import itertools
import time

import numpy as np
from absl import app, flags

from bench.runs import publish
from grafit_tf import knn
from grafit_tf.serving import open_set

CLASSES = ("tshirt_top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker",
           "bag", "ankle_boot")
flags.DEFINE_string("embeddings", None, "An .npz of train/test embeddings and labels.")
flags.DEFINE_list("precisions", ["0.9", "0.95", "0.99"], "Target precisions to calibrate for.")
flags.DEFINE_list("splits", ["validation", "test"], "validation and/or test (see above).")
flags.DEFINE_integer("k", 20, "Neighbours of the vote (serving's default).")
flags.DEFINE_float("temperature", 0.07, "Temperature of the vote (serving's default).")
flags.DEFINE_integer("max_queries", open_set.MAX_QUERIES, "Gallery rows calibrated on.")
flags.mark_flag_as_required("embeddings")
FLAGS = flags.FLAGS
VALIDATION = 10_000  # Training images held out as queries of the validation split.


def splits(path):
    """`{split: (gallery [N, D], labels [N], queries [Q, D], labels [Q])}`."""
    with np.load(path, allow_pickle=False) as data:
        train, train_y = data["train_embeddings"], data["train_labels"]
        test, test_y = data["test_embeddings"], data["test_labels"]
    held = np.random.default_rng(0).permutation(len(train))
    gal, val = held[:-VALIDATION], held[-VALIDATION:]
    return {"validation": (train[gal], train_y[gal], train[val], train_y[val]),
            "test": (train, train_y, test, test_y)}


def auroc(known, novel):
    """P(a known query scores above a left-out one), ties counting half."""
    values = np.concatenate([known, novel])
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    ranks = (np.cumsum(counts) - (counts - 1) / 2.0)[inverse]  # Average ranks, from 1.
    known_ranks = ranks[:len(known)].sum() - len(known) * (len(known) + 1) / 2.0
    return float(known_ranks / (len(known) * len(novel)))


def one_pair(gallery, gallery_y, queries, queries_y, left_out, precisions):
    """Rows `{score, precision, ...}` of one pair of left-out classes."""
    known = ~np.isin(gallery_y, left_out)
    names = np.flatnonzero(~np.isin(np.arange(len(CLASSES)), left_out))  # New label -> old.
    emb, lab = gallery[known], np.searchsorted(names, gallery_y[known])
    novel = np.isin(queries_y, left_out)
    cache = {}

    def search(q, k):  # The calibration queries are the same rows for every target.
        if k not in cache:
            cache[k] = knn.search(q, emb, k, backend="numpy")
        return cache[k]

    sims, idx = knn.search(queries, emb, FLAGS.k, backend="numpy")
    predicted, shares = knn.weighted_vote(sims, lab[idx], len(names), FLAGS.temperature)
    right = names[predicted] == queries_y
    rows = []
    for score in open_set.SCORES:
        s = open_set.scores(sims, shares[np.arange(len(sims)), predicted], score)
        area = auroc(s[~novel], s[novel])
        for precision in [None] + precisions:
            searched, started = not cache, time.process_time()
            cal = (open_set.calibrate(emb, lab, len(names), precision, FLAGS.k, FLAGS.temperature,
                                      search, FLAGS.max_queries, score=score)
                   if precision else None)
            seconds = time.process_time() - started
            unknown = (open_set.unknown_mask(s, cal.threshold) if cal
                       else np.zeros(len(s), bool))
            answered = ~unknown
            rows.append({
                "score": score, "precision": precision or "none",
                "left_out_unknown": float(unknown[novel].mean()),
                "known_unknown": float(unknown[~novel].mean()),
                "known_accuracy": float(right[answered & ~novel].sum()
                                        / max(1, (answered & ~novel).sum())),
                "open_precision": float(right[answered].sum() / max(1, answered.sum())),
                "auroc": area, "threshold": (cal.threshold if cal.reached else "inf") if cal
                else None, "calibration_kept": cal.kept if cal else None,
                # CPU time of a whole calibration, search included: the pair's first one.
                "calibration_cpu_s": seconds if cal and searched else None,
                "per_class_unknown": {CLASSES[c]: float(unknown[queries_y == c].mean())
                                      for c in left_out}})
    return rows


def summary(rows, key):
    v = np.asarray([r[key] for r in rows], np.float64)
    return f"{v.mean():.3f} [{v.min():.3f}, {v.max():.3f}]"


def table(results):
    lines = ["| split | score | target | left-out unknown | known unknown | known accuracy "
             "| answered precision | AUROC |", "|---|---|---|---|---|---|---|---|"]
    groups = {}
    for r in results:
        groups.setdefault((r["split"], r["score"], str(r["precision"])), []).append(r)
    for (split, score, precision), rows in groups.items():
        cells = [summary(rows, k) for k in ("left_out_unknown", "known_unknown",
                                            "known_accuracy", "open_precision", "auroc")]
        lines.append(f"| {split} | {score} | {precision} | " + " | ".join(cells) + " |")
    # Which left-out classes are hard to tell: mean over the 9 pairs holding each.
    lines += ["", "| left-out class: unknown at target 0.95 (test, mean over its 9 pairs) | "
              + " | ".join(open_set.SCORES) + " |", "|---" * (1 + len(open_set.SCORES)) + "|"]
    for c in CLASSES:
        cells = []
        for score in open_set.SCORES:
            v = [r["per_class_unknown"][c] for r in results if r["split"] == "test"
                 and r["score"] == score and r["precision"] == 0.95
                 and c in r["per_class_unknown"]]
            cells.append(f"{np.mean(v):.3f}" if v else "")
        if any(cells):
            lines.append(f"| {c} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv):
    del argv
    precisions = [float(p) for p in FLAGS.precisions]
    data, results = splits(FLAGS.embeddings), []
    for split in FLAGS.splits:
        for pair in itertools.combinations(range(len(CLASSES)), 2):
            for row in one_pair(*data[split], list(pair), precisions):
                results.append({"split": split, "left_out": [CLASSES[c] for c in pair], **row})
        print(table(results), flush=True)
    publish("open_set", results, table(results), update=False,
            extra={"k": FLAGS.k, "temperature": FLAGS.temperature,
                   "max_queries": FLAGS.max_queries})


if __name__ == "__main__":
    app.run(main)
