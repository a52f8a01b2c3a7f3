"""Chunked kNN search and voting against brute force."""

import numpy as np
import pytest

from grafit_tf import knn


def unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.mark.parametrize("chunk", [1, 7, 1000])
def test_search_matches_brute_force(chunk):
    rng = np.random.default_rng(0)
    q, g = unit(rng.normal(size=(23, 5))), unit(rng.normal(size=(40, 5)))
    sims, idx = knn.search(q, g, 6, chunk=chunk)
    full = q @ g.T
    want = np.argsort(-full, axis=1)[:, :6]
    np.testing.assert_array_equal(idx, want)
    np.testing.assert_allclose(sims, np.take_along_axis(full, want, 1), rtol=1e-6)


def test_search_excludes_self():
    g = unit(np.random.default_rng(1).normal(size=(30, 4)))
    _, idx = knn.search(g, g, 5, chunk=8, exclude_self=True)
    assert not (idx == np.arange(30)[:, None]).any()
    full = g @ g.T
    np.fill_diagonal(full, -np.inf)
    np.testing.assert_array_equal(idx, np.argsort(-full, axis=1)[:, :5])


def test_weighted_vote():
    sims = np.array([[0.9, 0.8, 0.1], [0.5, 0.5, 0.5]], np.float32)
    labels = np.array([[0, 1, 1], [2, 2, 0]])
    pred, scores = knn.weighted_vote(sims, labels, 3, temperature=0.07)
    w = np.exp(np.array([0.9, 0.8, 0.1]) / 0.07)
    np.testing.assert_allclose(scores[0], np.array([w[0], w[1] + w[2], 0]) / w.sum(), rtol=1e-5)
    np.testing.assert_array_equal(pred, [0, 2])
    np.testing.assert_allclose(scores.sum(1), 1.0, rtol=1e-6)


def test_numpy_search_holds_one_block_of_temporaries(monkeypatch):
    """At most `CHUNK_PRODUCTS` scores (float32) and partition indices (int64) at a time:
    12 bytes a product, the block's partition freed before the next block."""
    import tracemalloc

    monkeypatch.setattr(knn, "CHUNK_PRODUCTS", 200_000)
    g = unit(np.random.default_rng(2).normal(size=(20_000, 8)))
    tracemalloc.start()
    try:
        sims, idx = knn.search(g[:400], g, 5, backend="numpy")  # Blocks of 10 queries.
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak <= 14 * knn.CHUNK_PRODUCTS, peak
    np.testing.assert_array_equal(idx, np.argsort(-(g[:400] @ g.T), axis=1)[:, :5])
