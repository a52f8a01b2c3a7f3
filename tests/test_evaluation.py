"""The evaluation protocol on hand-made embeddings with known answers."""

import numpy as np
import pytest

from grafit_tf import evaluation


def test_metrics_on_known_layout():
    # Gallery: two fine classes per coarse class, at four directions.
    dirs = np.eye(4, dtype=np.float32)
    train = np.repeat(dirs, 3, axis=0)
    train_fine = np.repeat(np.arange(4), 3)
    train_coarse = train_fine // 2
    # Queries near their own class direction, except the last, near class 1.
    test = dirs[[0, 1, 2, 3, 1]] + 0.01
    test /= np.linalg.norm(test, axis=1, keepdims=True)
    test_fine = np.array([0, 1, 2, 3, 0])
    m = evaluation.knn_metrics(train, train_fine, train_coarse, test, test_fine,
                               test_fine // 2, k=3)
    assert m["fine_knn_top1"] == 0.8
    assert m["fine_knn_weighted_top1"] == 0.8
    assert m["coarse_knn_top1"] == 1.0  # Classes 0 and 1 share a coarse class.
    # Recall@1 test-vs-test: query 1 and 4 are neighbours with different labels.
    assert 0.0 <= m["fine_recall_at_1"] <= m["fine_recall_at_2"] <= m["fine_recall_at_10"]


def test_recall_at_k_brute_force():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 6)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    labels = rng.integers(0, 5, 50)
    got = evaluation.recall_at_k(x, labels)
    sims = x @ x.T
    np.fill_diagonal(sims, -np.inf)
    order = np.argsort(-sims, axis=1)
    for k in (1, 2, 5, 10):
        want = np.mean([(labels[order[i, :k]] == labels[i]).any() for i in range(50)])
        assert abs(got[f"fine_recall_at_{k}"] - want) < 1e-9


def test_recall_at_k_excludes_the_query_by_index_not_its_first_neighbour():
    """Exact duplicates with other labels: the query itself never counts, where MaskCon's
    top-(K+1) minus the first can keep the query and drop its twin (up to R@1 = 1 here)."""
    x = np.asarray([[1, 0], [1, 0], [0, 1], [0, 1]], np.float32)
    for backend in ("numpy", "faiss") if evaluation.knn._faiss() else ("numpy",):
        _, idx = evaluation.knn.search(x, x, 1, exclude_self=True, backend=backend)
        np.testing.assert_array_equal(idx[:, 0], [1, 0, 3, 2])
    assert evaluation.recall_at_k(x, [0, 1, 2, 2], ks=(1,))["fine_recall_at_1"] == 0.5


def test_format_table():
    text = evaluation.format_table([{"method": "grafit", "fine_knn_top1": 0.9012}],
                                   evaluation.METRIC_COLUMNS[:2])
    assert "90.12" in text and text.startswith("| method")


def test_per_class_knn_top1_brute_force():
    rng = np.random.default_rng(3)
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)
    train, test = unit(rng.normal(size=(60, 5))), unit(rng.normal(size=(40, 5)))
    train_y, test_y = rng.integers(0, 4, 60), rng.integers(0, 3, 40)  # Class 3: no queries.
    got = evaluation.per_class_knn_top1(train, train_y, test, test_y, 4)
    nearest = train_y[np.argmax(test @ train.T, axis=1)]
    for c in range(3):
        assert got[c] == np.mean(nearest[test_y == c] == c)
    assert np.isnan(got[3])
    # Weighted by class sizes, it is the overall top-1 of knn_metrics.
    overall = evaluation.knn_metrics(train, train_y, train_y, test, test_y, test_y, k=3)
    sizes = np.bincount(test_y, minlength=4)
    assert np.nansum(got * sizes) / sizes.sum() == pytest.approx(overall["fine_knn_top1"])
