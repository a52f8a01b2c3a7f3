"""kNN classification of query embeddings against a labelled gallery.

The neighbours come from an `index.Searcher` over the gallery's embeddings: exact
(flat: NumPy or faiss `IndexFlatIP` by size, the same neighbours) unless the caller
prepared an approximate one (`index.prepare`). The vote is training evaluation's
`grafit_tf.knn.weighted_vote`.
"""

import dataclasses
import math

import numpy as np

from grafit_tf import knn
from grafit_tf.serving import index as index_lib


@dataclasses.dataclass
class Predictions:
    """The vote and the neighbours of Q queries."""

    labels: np.ndarray  # [Q] int, predicted label (index into the gallery's label names).
    scores: np.ndarray  # [Q] float32, vote share of the predicted label, in (0, 1].
    similarities: np.ndarray  # [Q, k] float32, neighbour similarities, best first.
    neighbours: np.ndarray  # [Q, k] int64, gallery rows of the neighbours.


def predict(queries, gallery, k=20, temperature=0.07, searcher=None):
    """`Predictions`: the similarity-weighted vote of the k neighbours of each query.

    Args:
        queries: `[Q, D]` float32, L2-normalised.
        gallery: a `gallery.Gallery`.
        k: neighbours per query (clipped to the gallery's size).
        temperature: T of the weights exp(sim / T).
        searcher: an `index.Searcher` over `gallery.embeddings` (`index.prepare`); None:
            exact search.

    Raises:
        ValueError: a temperature that is not a finite number > 0 (NaN votes).
    """
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"kNN temperature {temperature!r}: must be a finite number > 0")
    if searcher is None:
        searcher = index_lib.prepare(gallery.embeddings, "flat")
    sims, idx = searcher.search(queries, k)
    if len(queries) == 0:
        return Predictions(np.zeros(0, np.int64), np.zeros(0, np.float32), sims, idx)
    labels, scores = knn.weighted_vote(sims, gallery.labels[idx], len(gallery.label_names),
                                       temperature)
    return Predictions(labels, scores[np.arange(len(labels)), labels], sims, idx)
