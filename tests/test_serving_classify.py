"""grafit_tf.serving.classify: the kNN vote over an exact or an approximate searcher."""

import numpy as np
import pytest

from grafit_tf import knn
from grafit_tf.serving import classify, gallery as gallery_lib, index


def unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_the_vote_is_over_the_searchers_neighbours():
    rng = np.random.default_rng(0)
    centres = unit(rng.normal(size=(7, 32)))
    labels = rng.integers(0, 7, 3000).astype(np.int32)
    embeddings = unit(centres[labels] + 0.1 * rng.normal(size=(3000, 32)))
    queries = unit(centres[rng.integers(0, 7, 200)] + 0.1 * rng.normal(size=(200, 32)))
    g = gallery_lib.Gallery(embeddings, labels, tuple(f"c{i}" for i in range(7)),
                            tuple(map(str, range(3000))))
    sims, idx = knn.search(queries, embeddings, 20)
    expected = knn.weighted_vote(sims, labels[idx], 7, 0.07)[0]
    exact = classify.predict(queries, g, 20, 0.07)  # No searcher: exact.
    np.testing.assert_array_equal(exact.labels, expected)
    np.testing.assert_array_equal(exact.neighbours, idx)
    approximate = index.prepare(embeddings, "hnsw", log=lambda _: None)
    hnsw = classify.predict(queries, g, 20, 0.07, approximate)
    assert (hnsw.labels == expected).mean() >= 0.99
    assert hnsw.similarities.shape == hnsw.neighbours.shape == (200, 20)
    empty = classify.predict(np.zeros((0, 32), np.float32), g, 20, 0.07)
    assert empty.labels.shape == (0,) and empty.neighbours.shape == (0, 20)


def test_the_vote_refuses_a_temperature_that_is_not_positive_and_finite():
    g = gallery_lib.Gallery(np.eye(3, dtype=np.float32), np.arange(3, dtype=np.int32),
                            ("a", "b", "c"), ("a/0", "b/1", "c/2"))
    for bad in (0.0, -0.07, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="finite number > 0"):
            classify.predict(np.eye(3, dtype=np.float32), g, 2, bad)
    assert list(classify.predict(np.eye(3, dtype=np.float32), g, 2, 0.07).labels) == [0, 1, 2]
