"""kNN classification of query embeddings against a labelled gallery.

Exact inner-product search (cosine similarity of L2-normalised embeddings):
faiss-cpu's `IndexFlatIP` for large galleries, `grafit_tf.knn.search` (NumPy)
for small ones; both are exhaustive, so they agree. The vote is training
evaluation's `grafit_tf.knn.weighted_vote`.
"""

import dataclasses
import logging
import math

import numpy as np

from grafit_tf import knn

BACKENDS = ("auto", "faiss", "numpy")
# Below this many gallery rows NumPy's blocked matmul is as fast as faiss.
FAISS_MIN_GALLERY = 20_000


@dataclasses.dataclass
class Predictions:
    """The vote and the neighbours of Q queries."""

    labels: np.ndarray  # [Q] int, predicted label (index into the gallery's label names).
    scores: np.ndarray  # [Q] float32, vote share of the predicted label, in (0, 1].
    similarities: np.ndarray  # [Q, k] float32, neighbour similarities, best first.
    neighbours: np.ndarray  # [Q, k] int64, gallery rows of the neighbours.


def search(queries, gallery, k, backend="auto"):
    """Top-k inner-product neighbours of `[Q, D]` queries in a `[G, D]` gallery (k clipped to G).

    Args:
        backend: 'auto' (faiss from `FAISS_MIN_GALLERY` rows), 'faiss' or 'numpy'.

    Returns:
        `(similarities [Q, k] float32, indices [Q, k] int64)`, best first.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown kNN backend {backend!r}; choose one of {BACKENDS}")
    k = min(k, len(gallery))
    if len(queries) == 0:
        return np.zeros((0, k), np.float32), np.zeros((0, k), np.int64)
    queries = np.ascontiguousarray(queries, np.float32)
    if backend == "numpy" or (backend == "auto" and len(gallery) < FAISS_MIN_GALLERY):
        return knn.search(queries, gallery, k)
    # Its loader logs each SIMD variant it tries at INFO; only problems matter here.
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    import faiss  # Deferred: only large galleries need it.

    index = faiss.IndexFlatIP(gallery.shape[1])
    index.add(np.ascontiguousarray(gallery, np.float32))
    sims, idx = index.search(queries, k)
    return sims.astype(np.float32), idx.astype(np.int64)


def predict(queries, gallery, k=20, temperature=0.07, backend="auto"):
    """`Predictions`: the similarity-weighted vote of the k neighbours of each query.

    Args:
        queries: `[Q, D]` float32, L2-normalised.
        gallery: a `gallery.Gallery`.
        temperature: T of the weights exp(sim / T).
        backend: see `search`.

    Raises:
        ValueError: a temperature that is not a finite number > 0 (NaN votes).
    """
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"kNN temperature {temperature!r}: must be a finite number > 0")
    sims, idx = search(queries, gallery.embeddings, k, backend)
    if len(queries) == 0:
        return Predictions(np.zeros(0, np.int64), np.zeros(0, np.float32), sims, idx)
    labels, scores = knn.weighted_vote(sims, gallery.labels[idx], len(gallery.label_names),
                                       temperature)
    return Predictions(labels, scores[np.arange(len(labels)), labels], sims, idx)
