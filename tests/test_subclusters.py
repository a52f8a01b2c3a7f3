"""Sub-clusters within each coarse class: k-means, the state layer, the schedule."""

import numpy as np
import pytest

from grafit_tf import subclusters


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def planted(rng, centres, per_centre, noise=0.05):
    """Points around unit `centres`, with the index of each point's centre."""
    truth = np.repeat(np.arange(len(centres)), per_centre)
    x = _unit(centres[truth] + noise * rng.normal(size=(len(truth), centres.shape[1])))
    return x.astype(np.float32), truth


def same_partition(a, b):
    """Whether two labellings group the points identically (up to renaming)."""
    pairs = set(zip(a.tolist(), b.tolist()))
    return len(pairs) == len(set(a.tolist())) == len(set(b.tolist()))


def test_spherical_kmeans_recovers_planted_clusters_deterministically():
    rng = np.random.default_rng(0)
    x, truth = planted(rng, _unit(rng.normal(size=(3, 8))), 40)
    assign, centroids = subclusters.spherical_kmeans(x, 3, seed=5)
    assert assign.dtype == np.int32 and centroids.shape == (3, 8)
    assert same_partition(assign, truth)
    np.testing.assert_allclose(np.linalg.norm(centroids, axis=1), 1.0, rtol=1e-5)
    # Each centroid is the normalised mean of its points.
    for k in range(3):
        np.testing.assert_allclose(centroids[k], _unit(x[assign == k].mean(0)), atol=1e-5)
    again, _ = subclusters.spherical_kmeans(x, 3, seed=5)
    np.testing.assert_array_equal(assign, again)


def test_spherical_kmeans_leaves_no_cluster_empty():
    rng = np.random.default_rng(1)
    # 2 tight groups but 5 clusters asked: every cluster still gets points.
    x, _ = planted(rng, _unit(rng.normal(size=(2, 6))), 10, noise=0.01)
    assign, _ = subclusters.spherical_kmeans(x, 5, seed=0)
    assert set(assign.tolist()) == set(range(5))


def test_within_coarse_kmeans_splits_each_class_into_its_own_range():
    rng = np.random.default_rng(2)
    centres = _unit(rng.normal(size=(4, 8)))
    x, truth = planted(rng, centres, 30)
    coarse = truth // 2  # Coarse class c holds planted groups 2c and 2c + 1.
    scale = rng.uniform(0.5, 3.0, size=(len(x), 1))  # Normalised inside.
    assign, centroids = subclusters.within_coarse_kmeans(x * scale, coarse, 3, 2, seed=0)
    assert centroids.shape == (6, 8)
    for c in range(2):
        mine = assign[coarse == c]
        assert mine.min() >= 2 * c and mine.max() < 2 * c + 2
        assert same_partition(mine, truth[coarse == c])
    # Class 2 has no image: zero centroids, which nobody is assigned to.
    assert np.all(centroids[4:] == 0) and not np.any(assign >= 4)


def test_subclusters_layer_reclusters_its_bank_into_its_weights():
    rng = np.random.default_rng(3)
    x, truth = planted(rng, _unit(rng.normal(size=(4, 8))), 10)
    coarse = truth // 2
    state = subclusters.Subclusters(coarse, 2, 2, 8, seed=0)
    assert np.all(state.assignments.numpy() == -1)  # No term before the first clustering.
    assert len(state.non_trainable_weights) == 5 and not state.trainable_weights
    state.bank.fill(x)
    state.recluster(round_=0)
    want, centroids = subclusters.within_coarse_kmeans(x, coarse, 2, 2, seed=1000)
    np.testing.assert_array_equal(state.assignments.numpy(), want)
    np.testing.assert_allclose(state.centroids.numpy(), centroids)


@pytest.mark.parametrize("start,rounds", [(1, [0, 1, 2]), (2, [1, 2]), (3, [2])])
def test_reclustering_starts_at_the_end_of_its_start_epoch(start, rounds):
    calls = []

    class Recorder:
        def recluster(self, round_):
            calls.append(round_)

    callback = subclusters.Reclustering(Recorder(), start)
    for epoch in range(3):
        callback.on_epoch_end(epoch)
    assert calls == rounds


def test_purity_counts_images_of_their_clusters_majority_fine_class():
    fine = np.array([0, 0, 1, 2, 2, 3, 3, 3])
    coarse = np.array([0, 0, 0, 1, 1, 1, 1, 1])
    # Cluster 0: fine 0, 0, 1 (majority 0: 2 hits); cluster 1: fine 2, 2 (2 hits);
    # cluster 2: fine 3, 3, 3 (3 hits).
    assignments = np.array([0, 0, 0, 1, 1, 2, 2, 2])
    overall, per_class = subclusters.purity(assignments, fine, coarse, 3)
    assert overall == pytest.approx(7 / 8)
    assert per_class[:2] == pytest.approx([2 / 3, 1.0]) and np.isnan(per_class[2])
    # One cluster per fine class: pure; one cluster for everything: the largest class.
    assert subclusters.purity(fine, fine, coarse, 3)[0] == 1.0
    assert subclusters.purity(np.zeros(8, int), fine, coarse, 3)[0] == pytest.approx(3 / 8)
