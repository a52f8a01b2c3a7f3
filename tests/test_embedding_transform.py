"""grafit_tf.embedding_transform against direct NumPy definitions, and as a Dense layer."""

import numpy as np
import pytest

from grafit_tf import embedding_transform as et


def embeddings(n=400, d=6, seed=0):
    """L2-normalised rows in one orthant, with very unequal variances (like pooled ReLU
    features): the case the transforms are for."""
    rng = np.random.default_rng(seed)
    x = np.abs(rng.normal(size=(n, d)) * np.array([3.0, 1.0, 0.5, 0.2, 0.1, 0.05])[:d] + 2.0)
    return et.normalise(x)


def test_center_subtracts_the_training_mean_then_normalises():
    train, test = embeddings(), embeddings(50, seed=1)
    mean, projection = et.fit(train, "center")
    np.testing.assert_allclose(mean, train.mean(0), atol=1e-6)
    np.testing.assert_array_equal(projection, np.eye(6, dtype=np.float32))
    a, b = et.fit_apply(train, test, "center")
    want = test - train.mean(0)
    np.testing.assert_allclose(b, want / np.linalg.norm(want, axis=1, keepdims=True), atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, atol=1e-5)


def test_whiten_without_shrinkage_gives_unit_covariance():
    train = embeddings()
    mean, projection = et.fit(train, "whiten", shrinkage=0.0)
    white = (train - mean) @ projection
    np.testing.assert_allclose(np.cov(white.T), np.eye(6), atol=1e-3)


def test_whiten_shrinkage_damps_the_small_directions():
    train = embeddings()
    mean, projection = et.fit(train, "whiten", shrinkage=0.5)
    eigval = np.linalg.eigvalsh(np.cov((train - mean).T))
    got = np.sort(np.linalg.eigvalsh(np.cov(((train - mean) @ projection).T)))
    # Variance along each principal direction: s / (s + a * mean(s)).
    np.testing.assert_allclose(got, np.sort(eigval / (eigval + 0.5 * eigval.mean())), atol=1e-4)


def test_none_leaves_embeddings_alone_and_unknown_kinds_fail():
    train, test = embeddings(), embeddings(10, seed=2)
    a, b = et.fit_apply(train, test, "none")
    assert a is train and b is test
    with pytest.raises(ValueError):
        et.fit(train, "pca")


def test_dense_weights_compute_the_map_in_keras():
    import keras

    train, test = embeddings(), embeddings(20, seed=3)
    mean, projection = et.fit(train, "whiten")
    layer = keras.layers.Dense(6)
    layer.build((None, 6))
    layer.set_weights(et.dense_weights(mean, projection))
    got = et.normalise(np.asarray(layer(test)))
    np.testing.assert_allclose(got, et.apply(test, mean, projection), atol=1e-5)
