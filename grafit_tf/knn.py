"""Exact k-nearest-neighbour search and voting, NumPy only (no TensorFlow).

As DINO's `eval_knn.knn_classifier`, queries go in chunks: memory is
`O(chunk * gallery)`, never an `N x N` matrix. Shared by training's evaluation and
`serve.py`. Large searches (iNaturalist, SOP) go to faiss-cpu's exact `IndexFlatIP`
when installed: the same neighbours, multi-threaded, a heap instead of a partition.
"""

import numpy as np

# Query x gallery products from which `search` uses faiss (backend "auto"): a
# 20k-image self-search, where NumPy's blocks of CHUNK_PRODUCTS (12 bytes each:
# float32 scores, int64 partition; smaller slow the product) reach twice faiss's
# memory (BENCHMARKS.md). Below it NumPy is as fast, and its results are the reference.
FAISS_MIN_PRODUCTS, CHUNK_PRODUCTS = 400_000_000, 2**24


def search(queries, gallery, k, chunk=1024, exclude_self=False, backend="auto"):
    """Top-k inner-product neighbours of each query.

    Args:
        queries: `[Q, D]` float32, L2-normalised.
        gallery: `[G, D]` float32, L2-normalised.
        k: neighbours per query (at most G, or G - 1 with `exclude_self`).
        chunk: queries per block (at most `CHUNK_PRODUCTS / G` with NumPy).
        exclude_self: queries *are* the gallery (same order): query i never gets item i
            (by index, not by dropping the top hit: see `evaluation.recall_at_k`).
        backend: "numpy", "faiss" (exact inner-product index), or "auto"
            (faiss for searches of at least `FAISS_MIN_PRODUCTS` products).

    Returns:
        `(similarities [Q, k] float32, indices [Q, k] int64)`, best first.
    """
    queries = np.asarray(queries, np.float32)
    gallery = np.asarray(gallery, np.float32)
    limit = len(gallery) - (1 if exclude_self else 0)
    k = min(k, limit)
    if k <= 0:
        raise ValueError("the gallery is too small for a neighbour search")
    if backend == "auto":
        big = len(queries) * len(gallery) >= FAISS_MIN_PRODUCTS
        backend = "faiss" if big and _faiss() is not None else "numpy"
    if backend == "faiss":
        return _faiss_search(queries, gallery, k, chunk * 16, exclude_self)
    sims = np.empty((len(queries), k), np.float32)
    idx = np.empty((len(queries), k), np.int64)
    chunk = max(1, min(chunk, CHUNK_PRODUCTS // len(gallery)))
    for start in range(0, len(queries), chunk):
        block = queries[start:start + chunk] @ gallery.T  # [c, G]
        if exclude_self:
            rows = np.arange(len(block))
            block[rows, start + rows] = -np.inf
        np.negative(block, out=block)  # In place; `top` copied, freeing the partition.
        top = np.argpartition(block, k - 1, axis=1)[:, :k].copy()
        top_sims = -np.take_along_axis(block, top, axis=1)
        order = np.argsort(-top_sims, axis=1, kind="stable")
        idx[start:start + len(block)] = np.take_along_axis(top, order, axis=1)
        sims[start:start + len(block)] = np.take_along_axis(top_sims, order, axis=1)
    return sims, idx


def weighted_vote(similarities, neighbour_labels, num_classes, temperature=0.07):
    """DINO's weighted kNN vote: each neighbour adds exp(sim / T) to its label.

    Args:
        similarities, neighbour_labels: `[Q, k]`, of the neighbours (labels int).
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


def _faiss():
    try:
        import faiss  # Optional: faiss-cpu.
    except ImportError:
        return None
    return faiss


def _faiss_search(queries, gallery, k, chunk, exclude_self):
    """`search` with faiss's exact `IndexFlatIP`; same outputs."""
    faiss = _faiss()
    if faiss is None:
        raise ValueError("backend='faiss' needs faiss-cpu (pip install faiss-cpu)")
    index = faiss.IndexFlatIP(gallery.shape[1])
    index.add(np.ascontiguousarray(gallery))
    extra = 1 if exclude_self else 0
    sims = np.empty((len(queries), k), np.float32)
    idx = np.empty((len(queries), k), np.int64)
    for start in range(0, len(queries), chunk):
        block = np.ascontiguousarray(queries[start:start + chunk])
        s, i = index.search(block, k + extra)
        if exclude_self:
            # Drop the query itself wherever it came; else the (k+1)-th neighbour.
            own = i == (start + np.arange(len(block)))[:, None]
            own[~own.any(axis=1), -1] = True
            keep = ~own
            s = s[keep].reshape(len(block), k)
            i = i[keep].reshape(len(block), k)
        sims[start:start + len(block)] = s
        idx[start:start + len(block)] = i
    return sims, idx
