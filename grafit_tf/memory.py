"""The memory of embeddings that the kNN (NCA) loss compares against.

- `full` (scalable NCA): a slot per training image, indexed by its position in the
  dataset, updated as m_i <- normalise(mu m_i + (1 - mu) z_i).
- `queue` (MoCo-style FIFO): the last `size` embeddings with their labels, for
  datasets too large for a slot per image.

The weights use `aggregation="only_first_replica"` and every replica applies the
update computed from `all_gather`ed embeddings, labels and indices, so the copies
stay identical (a per-replica update would silently diverge).
"""

import keras
import numpy as np
import tensorflow as tf

from grafit_tf.distribute import all_gather


class MemoryBank(keras.layers.Layer):
    """Embeddings `[size, dim]` and their labels `[size]`, non-trainable.

    Args:
        labels: for `kind="full"`, the `[N]` int labels of the training images
            (slot i holds image i); unused for a queue.
        dim: embedding width D.
        kind: `full` or `queue`.
        size: queue length (ignored for `full`, whose size is `len(labels)`).
        momentum: mu of the per-image update (`full` only).
    """

    def __init__(self, labels, dim, kind="full", size=0, momentum=0.5, seed=0, **kwargs):
        super().__init__(**kwargs)
        self.kind = kind
        self.dim = dim
        self.momentum = momentum
        self.size = len(labels) if kind == "full" else size
        rng = np.random.default_rng(seed)
        init = rng.normal(size=(self.size, dim)).astype("float32")
        init /= np.linalg.norm(init, axis=1, keepdims=True)
        init_labels = np.asarray(labels, "int32") if kind == "full" else -np.ones(size, "int32")
        weight = dict(trainable=False, aggregation="only_first_replica")
        self.embeddings = self.add_weight(
            shape=(self.size, dim), initializer=keras.initializers.Constant(init),
            name="embeddings", **weight)
        self.labels = self.add_weight(
            shape=(self.size,), dtype="int32",
            initializer=keras.initializers.Constant(init_labels), name="labels", **weight)
        self.pointer = self.add_weight(
            shape=(), dtype="int32", initializer="zeros", name="pointer", **weight)

    def exclusion(self, indices):
        """Slot of each query's own image `[B]` (-1: nothing to exclude)."""
        if self.kind == "full":
            return indices
        return -tf.ones_like(indices)

    def update(self, embeddings, labels, indices):
        """Writes this step's embeddings, gathered over all replicas.

        Args:
            embeddings: `[b, D]` float32, L2-normalised (this replica's share).
            labels: `[b]` int32 labels.
            indices: `[b]` int32 dataset indices of the images.
        """
        z = all_gather(tf.cast(tf.stop_gradient(embeddings), tf.float32))
        # Integers travel as int64: an int32 all_gather under
        # MultiWorkerMirroredStrategy fails ("destinations can not be empty").
        y = tf.cast(all_gather(tf.cast(labels, tf.int64)), tf.int32)
        i = tf.cast(all_gather(tf.cast(indices, tf.int64)), tf.int32)
        if self.kind == "full":
            old = tf.gather(self.embeddings, i)
            new = tf.math.l2_normalize(self.momentum * old + (1.0 - self.momentum) * z, axis=1)
            self.embeddings.value.scatter_update(tf.IndexedSlices(new, i))
        else:
            slots = (self.pointer + tf.range(tf.shape(z)[0])) % self.size
            self.embeddings.value.scatter_update(tf.IndexedSlices(z, slots))
            self.labels.value.scatter_update(tf.IndexedSlices(y, slots))
            self.pointer.assign((self.pointer + tf.shape(z)[0]) % self.size)

    def fill(self, embeddings, labels=None):
        """Overwrites the memory before training (from real embeddings).

        Args:
            embeddings: `[n, D]` with n = size for `full`, n <= size for `queue`.
            labels: `[n]` labels (queue only).
        """
        embeddings = np.asarray(embeddings, "float32")
        if self.kind == "full":
            self.embeddings.assign(embeddings)
            return
        n = min(len(embeddings), self.size)
        values = self.embeddings.numpy()
        values[:n] = embeddings[:n]
        stored = self.labels.numpy()
        stored[:n] = np.asarray(labels[:n], "int32")
        self.embeddings.assign(values)
        self.labels.assign(stored)
        self.pointer.assign(n % self.size)
