"""Exact k-nearest-neighbour search and voting, NumPy only (no TensorFlow).

In the spirit of DINO's `eval_knn.knn_classifier`: queries are processed in
chunks, so memory is `O(chunk * gallery)` and an `N x N` similarity matrix is
never held. Shared by training's evaluation and by `serve.py`.
"""

import numpy as np


def search(queries, gallery, k, chunk=1024, exclude_self=False):
    """Top-k inner-product neighbours of each query.

    Args:
        queries: `[Q, D]` float32, L2-normalised.
        gallery: `[G, D]` float32, L2-normalised.
        k: neighbours per query (at most G, or G - 1 with `exclude_self`).
        chunk: queries per block.
        exclude_self: queries *are* the gallery (same order); query i never
            returns gallery item i.

    Returns:
        `(similarities [Q, k] float32, indices [Q, k] int64)`, best first.
    """
    queries = np.asarray(queries, np.float32)
    gallery = np.asarray(gallery, np.float32)
    limit = len(gallery) - (1 if exclude_self else 0)
    k = min(k, limit)
    if k <= 0:
        raise ValueError("the gallery is too small for a neighbour search")
    sims = np.empty((len(queries), k), np.float32)
    idx = np.empty((len(queries), k), np.int64)
    for start in range(0, len(queries), chunk):
        block = queries[start:start + chunk] @ gallery.T  # [c, G]
        if exclude_self:
            rows = np.arange(len(block))
            block[rows, start + rows] = -np.inf
        top = np.argpartition(-block, k - 1, axis=1)[:, :k]
        top_sims = np.take_along_axis(block, top, axis=1)
        order = np.argsort(-top_sims, axis=1, kind="stable")
        idx[start:start + len(block)] = np.take_along_axis(top, order, axis=1)
        sims[start:start + len(block)] = np.take_along_axis(top_sims, order, axis=1)
    return sims, idx


def weighted_vote(similarities, neighbour_labels, num_classes, temperature=0.07):
    """DINO's weighted kNN vote: each neighbour adds exp(sim / T) to its label.

    Args:
        similarities: `[Q, k]`.
        neighbour_labels: `[Q, k]` int labels of the neighbours.
        num_classes: number of labels.
        temperature: T.

    Returns:
        `(predicted [Q] int64, scores [Q, num_classes] float32)`, scores
        normalised to sum to 1 per query.
    """
    weights = np.exp((similarities - similarities[:, :1]) / temperature)  # Stable.
    scores = np.zeros((len(similarities), num_classes), np.float64)
    np.add.at(scores, (np.arange(len(similarities))[:, None], neighbour_labels), weights)
    scores /= scores.sum(axis=1, keepdims=True)
    return scores.argmax(axis=1), scores.astype(np.float32)
