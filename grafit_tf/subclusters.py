"""Sub-clusters of each coarse class: pseudo fine labels, re-clustered every epoch.

An extension, not in the Grafit paper (DeepCluster-v2, Caron et al. 2020, run
inside each coarse class, as the coarse-to-fine over-clustering methods ANCOR
and SCGM do). The fine-label oracle gets its edge from a classifier that pulls
each fine class together; grafit's instance loss only pushes images apart. Here
the training images of every coarse class are split by spherical k-means on
their trunk features into `K` sub-clusters, and `losses.subcluster_loss` asks
each view's trunk feature to fall into its image's sub-cluster, among the
centroids of its own coarse class.

Three parts:
- `within_coarse_kmeans`: the clustering, pure NumPy on `[N, F]` features.
- `Subclusters`: the state the train step reads, a feature bank (the latest
  trunk feature of every training image, written by each step), the `[N]`
  assignments and the centroids, as non-trainable weights that checkpoint and
  distribute like the NCA memory.
- `Reclustering`: the Keras callback that re-clusters the bank at epoch ends.

And `purity`, how well a clustering finds the fine classes, for
`bench/cluster_purity.py` (fine labels score, never train).
"""

import keras
import numpy as np

from grafit_tf.memory import MemoryBank


def spherical_kmeans(x, k, seed, iterations=20):
    """k-means under cosine similarity (unit centroids), k-means++ seeded.

    Args:
        x: `[n, F]` L2-normalised rows, n >= 1.
        k: clusters; at most n are non-empty.
        seed: seeds the k-means++ draws (same seed, same result).
        iterations: Lloyd iterations.

    Returns:
        `(assignments [n] int32, centroids [k, F] float32 unit rows)`. A cluster
        that empties is re-seeded on the point its centroid fits worst, so every
        cluster ends non-empty when n >= k.
    """
    x = np.asarray(x, np.float32)
    n = len(x)
    rng = np.random.default_rng(seed)
    # k-means++ with 1 - cos as the squared-distance proxy.
    chosen = [int(rng.integers(n))]
    gap = 1.0 - x @ x[chosen[0]]
    for _ in range(1, k):
        weights = np.maximum(gap, 0.0)
        total = weights.sum()
        pick = int(rng.choice(n, p=weights / total)) if total > 0 else int(rng.integers(n))
        chosen.append(pick)
        gap = np.minimum(gap, 1.0 - x @ x[pick])
    centroids = x[chosen].copy()
    for _ in range(iterations):
        similarity = x @ centroids.T  # [n, k]
        assign = similarity.argmax(1)
        fit = similarity[np.arange(n), assign]
        sums = np.zeros_like(centroids)
        np.add.at(sums, assign, x)
        counts = np.bincount(assign, minlength=k)
        for empty in np.flatnonzero(counts == 0):
            worst = int(fit.argmin())  # Re-seed on the worst-fitted point.
            sums[empty], fit[worst] = x[worst], np.inf
        centroids = sums / np.maximum(np.linalg.norm(sums, axis=1, keepdims=True), 1e-12)
    assign = (x @ centroids.T).argmax(1)
    return assign.astype(np.int32), centroids.astype(np.float32)


def within_coarse_kmeans(features, coarse, num_coarse, per_coarse, seed, iterations=20):
    """Spherical k-means inside each coarse class.

    Args:
        features: `[N, F]` trunk features (normalised here).
        coarse: `[N]` int coarse labels in [0, num_coarse).
        num_coarse: number of coarse classes C.
        per_coarse: sub-clusters K per coarse class.
        seed: base seed (class c uses seed + c).

    Returns:
        `(assignments [N] int32 in [c K, (c + 1) K) for an image of class c,
        centroids [C K, F] float32)`; a class with no image keeps zero centroids,
        which no image is assigned to.
    """
    x = np.asarray(features, np.float32)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    coarse = np.asarray(coarse)
    assignments = np.full(len(x), -1, np.int32)
    centroids = np.zeros((num_coarse * per_coarse, x.shape[1]), np.float32)
    for c in range(num_coarse):
        members = np.flatnonzero(coarse == c)
        if not len(members):
            continue
        assign, cent = spherical_kmeans(x[members], per_coarse, seed + c, iterations)
        assignments[members] = c * per_coarse + assign
        centroids[c * per_coarse:(c + 1) * per_coarse] = cent
    return assignments, centroids


def purity(assignments, fine, coarse, num_coarse):
    """Fine-level purity of a clustering, overall and per coarse class.

    Args:
        assignments: `[N]` int cluster of each image.
        fine, coarse: `[N]` int labels.
        num_coarse: C.

    Returns:
        `(overall, [C] per-class)`: the share of images (of all, of class c) whose
        cluster's most common fine label is theirs; nan for a class with no image.
    """
    assignments, fine, coarse = (np.asarray(a) for a in (assignments, fine, coarse))
    hits = np.zeros(len(fine), bool)
    for cluster in np.unique(assignments):
        members = assignments == cluster
        hits[members] = fine[members] == np.bincount(fine[members]).argmax()
    per_class = [hits[coarse == c].mean() if np.any(coarse == c) else float("nan")
                 for c in range(num_coarse)]
    return float(hits.mean()), per_class


class Subclusters(keras.layers.Layer):
    """The state of the sub-cluster term (never called on a tensor).

    Args:
        coarse: `[N]` int coarse labels of the training images.
        num_coarse: C.
        per_coarse: K sub-clusters per coarse class.
        dim: trunk feature width F.
        seed: seeds the bank's initial vectors and every clustering.

    Weights (non-trainable, `aggregation="only_first_replica"`: every replica
    writes the same values, as the NCA memory does):
        `bank.embeddings` `[N, F]`, `assignments` `[N]` int32 (-1: not clustered
        yet, no loss), `centroids` `[C K, F]`.
    """

    def __init__(self, coarse, num_coarse, per_coarse, dim, seed=0, **kwargs):
        super().__init__(**kwargs)
        self.coarse = np.asarray(coarse, np.int32)
        self.num_coarse, self.per_coarse, self.seed = num_coarse, per_coarse, seed
        # Slot i holds image i's latest feature (momentum 0: no blending with the past).
        self.bank = MemoryBank(self.coarse, dim, kind="full", momentum=0.0, seed=seed,
                               name="feature_bank")
        weight = dict(trainable=False, aggregation="only_first_replica")
        self.assignments = self.add_weight(
            shape=(len(self.coarse),), dtype="int32", initializer=keras.initializers.Constant(-1),
            name="assignments", **weight)
        self.centroids = self.add_weight(
            shape=(num_coarse * per_coarse, dim), initializer="zeros", name="centroids",
            **weight)
        self.built = True

    def recluster(self, round_):
        """Clusters the bank's features (round `round_` seeds the k-means++ draws)."""
        assignments, centroids = within_coarse_kmeans(
            self.bank.embeddings.numpy(), self.coarse, self.num_coarse, self.per_coarse,
            seed=self.seed + 1000 * (round_ + 1))
        self.assignments.assign(assignments)
        self.centroids.assign(centroids)


class Reclustering(keras.callbacks.Callback):
    """Re-clusters at the end of every epoch from `start_epochs` on.

    The term is off (every assignment -1) until the end of epoch `start_epochs`:
    the features of the first epochs are too unlike the final ones to be worth
    pulling together.
    """

    def __init__(self, subclusters, start_epochs):
        super().__init__()
        self.subclusters, self.start_epochs = subclusters, start_epochs

    def on_epoch_end(self, epoch, logs=None):
        if epoch + 1 >= self.start_epochs:
            self.subclusters.recluster(epoch)
