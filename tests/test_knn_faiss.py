"""faiss's exact inner-product index gives the NumPy search's results."""

import numpy as np
import pytest

from grafit_tf import evaluation, knn


def unit(rng, n, d):
    x = rng.normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize("exclude_self", [False, True])
def test_faiss_matches_numpy(exclude_self):
    rng = np.random.default_rng(0)
    gallery = unit(rng, 3000, 32)
    queries = gallery if exclude_self else unit(rng, 500, 32)
    want_s, want_i = knn.search(queries, gallery, 20, chunk=128, exclude_self=exclude_self,
                                backend="numpy")
    got_s, got_i = knn.search(queries, gallery, 20, chunk=128, exclude_self=exclude_self,
                              backend="faiss")
    # Identical neighbours, up to the order of near-ties (float rounding differs).
    assert np.mean(got_i == want_i) > 0.999
    np.testing.assert_allclose(got_s, want_s, atol=1e-5)
    true_sims = np.einsum("qd,qkd->qk", queries, gallery[got_i])
    np.testing.assert_allclose(true_sims, want_s, atol=1e-5)
    if exclude_self:
        assert not (got_i == np.arange(len(queries))[:, None]).any()


def test_auto_uses_faiss_only_for_large_searches(monkeypatch):
    calls = []
    real = knn._faiss_search
    monkeypatch.setattr(knn, "_faiss_search", lambda *a: calls.append(1) or real(*a))
    rng = np.random.default_rng(1)
    x = unit(rng, 400, 16)
    knn.search(x, x, 5)
    assert not calls
    monkeypatch.setattr(knn, "FAISS_MIN_PRODUCTS", 1000)
    labels = rng.integers(0, 7, 400)
    recall = evaluation.recall_at_k(x, labels)
    assert calls
    monkeypatch.setattr(knn, "FAISS_MIN_PRODUCTS", 10**18)
    assert evaluation.recall_at_k(x, labels) == recall
