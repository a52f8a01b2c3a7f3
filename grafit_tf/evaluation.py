"""The evaluation protocol (NumPy only; README.md, "Training", says what each figure is).

- fine kNN top-1 (k=1) and weighted kNN top-1 (k=20, weights exp(sim/0.07)) of
  the test split against the training split as gallery;
- fine Recall@K (K = 1, 2, 5, 10) of the test split against itself, query excluded;
- coarse kNN top-1 (k=1) against the training split.
Fine labels are used for scoring only.
"""

import numpy as np

from grafit_tf import knn

RECALL_KS = (1, 2, 5, 10)


def knn_metrics(train_emb, train_fine, train_coarse, test_emb, test_fine, test_coarse,
                k=20, temperature=0.07, num_fine=None):
    """All metrics of the protocol.

    Args:
        train_emb: `[N, D]` L2-normalised gallery embeddings.
        train_fine, train_coarse: `[N]` int labels.
        test_emb: `[Q, D]` L2-normalised query embeddings.
        test_fine, test_coarse: `[Q]` int labels.
        k, temperature: of the weighted vote.
        num_fine: number of fine classes (default: inferred).

    Returns:
        dict of floats in [0, 1].
    """
    train_fine, train_coarse = np.asarray(train_fine), np.asarray(train_coarse)
    test_fine, test_coarse = np.asarray(test_fine), np.asarray(test_coarse)
    num_fine = num_fine or int(max(train_fine.max(), test_fine.max())) + 1
    sims, idx = knn.search(test_emb, train_emb, k)
    fine_pred, _ = knn.weighted_vote(sims, train_fine[idx], num_fine, temperature)
    metrics = {
        "fine_knn_top1": float(np.mean(train_fine[idx[:, 0]] == test_fine)),
        "fine_knn_weighted_top1": float(np.mean(fine_pred == test_fine)),
        "coarse_knn_top1": float(np.mean(train_coarse[idx[:, 0]] == test_coarse)),
    }
    metrics.update(recall_at_k(test_emb, test_fine))
    return metrics


def per_class_knn_top1(train_emb, train_labels, test_emb, test_labels, num_classes):
    """kNN top-1 (k=1) of each class's test images: where a method's accuracy comes from.

    Args:
        train_emb, test_emb: `[N, D]` gallery, `[Q, D]` query embeddings (L2-normalised).
        train_labels, test_labels: `[N]`, `[Q]` int labels.
        num_classes: number of classes `C`.

    Returns:
        `[C]` float64: the fraction of each class's queries whose nearest gallery image
        has their label (NaN for a class without queries); weighted by the class sizes,
        its mean is `knn_metrics`' top-1.
    """
    train_labels, test_labels = np.asarray(train_labels), np.asarray(test_labels)
    _, idx = knn.search(test_emb, train_emb, 1)
    hit = (train_labels[idx[:, 0]] == test_labels).astype(np.float64)
    count = np.bincount(test_labels, minlength=num_classes).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.bincount(test_labels, weights=hit, minlength=num_classes) / count


def recall_at_k(embeddings, labels, ks=RECALL_KS, prefix="fine_"):
    """Recall@K with the set as its own gallery (query excluded): a query scores 1 if
    any of its K nearest neighbours shares its label (the figure of MaskCon's protocol).
    The query is excluded by index; MaskCon's `retrieval` drops each query's first
    neighbour (top-(K+1) minus the first), which differs when an exact duplicate ties with
    it. MaskCon scores before training epochs 0, 10, ..., 190; this project after the last."""
    labels = np.asarray(labels)
    _, idx = knn.search(embeddings, embeddings, max(ks), exclude_self=True)
    hits = labels[idx] == labels[:, None]  # [Q, K]
    return {f"{prefix}recall_at_{k}": float(np.mean(hits[:, :k].any(axis=1))) for k in ks}


def format_table(rows, columns):
    """A Markdown table.

    Args:
        rows: list of dicts.
        columns: `(key, header)` pairs; values of keys in `PERCENT_KEYS` are
            fractions shown as percentages, other floats with one decimal.
    """
    headers = [h for _, h in columns]
    cells = [[_cell(r.get(key), key in PERCENT_KEYS) for key, _ in columns] for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(headers)]
    line = lambda values: "| " + " | ".join(v.ljust(w) for v, w in zip(values, widths)) + " |"
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(headers), sep] + [line(c) for c in cells])


def _cell(value, percent):
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{100 * value:.2f}" if percent else f"{value:.1f}"
    return str(value)


PERCENT_KEYS = frozenset(("fine_knn_top1", "fine_knn_weighted_top1", "coarse_knn_top1",
                          *(f"fine_recall_at_{k}" for k in RECALL_KS)))

METRIC_COLUMNS = (
    ("method", "method"), ("fine_knn_top1", "fine kNN top-1"),
    ("fine_knn_weighted_top1", "fine kNN weighted (k=20)"),
    *((f"fine_recall_at_{k}", f"R@{k}") for k in RECALL_KS),
    ("coarse_knn_top1", "coarse kNN top-1"),
)
