"""grafit_tf.serving.classify: the exact kNN search and vote, faiss against NumPy."""

import numpy as np
import pytest

from grafit_tf.serving import classify, gallery as gallery_lib


def test_knn_backends_agree():
    rng = np.random.default_rng(0)
    gallery = rng.normal(size=(3000, 32)).astype(np.float32)
    gallery /= np.linalg.norm(gallery, axis=1, keepdims=True)
    queries = rng.normal(size=(200, 32)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    sims_np, idx_np = classify.search(queries, gallery, 20, backend="numpy")
    sims_fa, idx_fa = classify.search(queries, gallery, 20, backend="faiss")
    np.testing.assert_array_equal(idx_np, idx_fa)
    np.testing.assert_allclose(sims_np, sims_fa, atol=1e-5)
    g = gallery_lib.Gallery(gallery, rng.integers(0, 7, 3000).astype(np.int32),
                            tuple(f"c{i}" for i in range(7)), tuple(map(str, range(3000))))
    a = classify.predict(queries, g, 20, 0.07, backend="numpy")
    b = classify.predict(queries, g, 20, 0.07, backend="faiss")
    np.testing.assert_array_equal(a.labels, b.labels)


def test_the_vote_refuses_a_temperature_that_is_not_positive_and_finite():
    g = gallery_lib.Gallery(np.eye(3, dtype=np.float32), np.arange(3, dtype=np.int32),
                            ("a", "b", "c"), ("a/0", "b/1", "c/2"))
    for bad in (0.0, -0.07, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="finite number > 0"):
            classify.predict(np.eye(3, dtype=np.float32), g, 2, bad, backend="numpy")
    assert list(classify.predict(np.eye(3, dtype=np.float32), g, 2, 0.07, "numpy").labels) == \
        [0, 1, 2]
