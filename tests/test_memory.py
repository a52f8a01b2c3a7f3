"""The memory bank: per-image update, FIFO queue, fill."""

import numpy as np
import tensorflow as tf

from grafit_tf.memory import MemoryBank


def unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_full_memory_update_formula():
    labels = np.array([0, 1, 0, 1, 2], np.int32)
    bank = MemoryBank(labels, dim=3, kind="full", momentum=0.5, seed=1)
    before = bank.embeddings.numpy().copy()
    np.testing.assert_allclose(np.linalg.norm(before, axis=1), 1.0, rtol=1e-6)
    z = unit(np.random.default_rng(0).normal(size=(2, 3))).astype(np.float32)
    idx = np.array([3, 0], np.int32)
    bank.update(tf.constant(z), tf.constant(labels[idx]), tf.constant(idx))
    after = bank.embeddings.numpy()
    want = unit(0.5 * before[idx] + 0.5 * z)
    np.testing.assert_allclose(after[idx], want, rtol=1e-5, atol=1e-6)
    untouched = [1, 2, 4]
    np.testing.assert_array_equal(after[untouched], before[untouched])
    np.testing.assert_array_equal(bank.labels.numpy(), labels)  # Labels are fixed.
    np.testing.assert_array_equal(bank.exclusion(tf.constant(idx)).numpy(), idx)


def test_queue_is_fifo_and_wraps():
    bank = MemoryBank(np.zeros(0), dim=2, kind="queue", size=5)
    assert (bank.labels.numpy() == -1).all()  # Empty slots match no label.
    for step in range(3):
        z = np.full((2, 2), step + 1, np.float32)
        bank.update(tf.constant(z), tf.constant([step, step]), tf.constant([0, 1]))
    # Steps wrote slots 0-1, 2-3, then 4 and 0 (wrapped).
    np.testing.assert_array_equal(bank.labels.numpy(), [2, 0, 1, 1, 2])
    np.testing.assert_array_equal(bank.embeddings.numpy()[:, 0], [3, 1, 2, 2, 3])
    assert int(bank.pointer.numpy()) == 1
    np.testing.assert_array_equal(bank.exclusion(tf.constant([0, 1])).numpy(), [-1, -1])


def test_fill():
    z = unit(np.random.default_rng(1).normal(size=(4, 3))).astype(np.float32)
    full = MemoryBank(np.arange(4), dim=3, kind="full")
    full.fill(z)
    np.testing.assert_array_equal(full.embeddings.numpy(), z)
    queue = MemoryBank(np.zeros(0), dim=3, kind="queue", size=6)
    queue.fill(z, labels=np.array([1, 2, 3, 4]))
    np.testing.assert_array_equal(queue.labels.numpy(), [1, 2, 3, 4, -1, -1])
    assert int(queue.pointer.numpy()) == 4
