"""Each loss against a NumPy reference on tiny batches (values and gradients)."""

import numpy as np
import pytest
import tensorflow as tf

from grafit_tf import losses


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def nca_reference(q, y, m, my, tau, exclude):
    """Literal transcription of the method note's formula, one query at a time."""
    out = []
    for i in range(len(q)):
        logits = m @ q[i] / tau
        keep = np.arange(len(m)) != exclude[i]
        p = np.exp(logits[keep] - logits[keep].max())
        p /= p.sum()
        pos = (my[keep] == y[i])
        if pos.any():
            out.append(-np.log(p[pos].sum()))
    return np.mean(out) if out else 0.0


def numeric_grad(fn, x, eps=1e-3):
    grad = np.zeros_like(x)
    for idx in np.ndindex(x.shape):
        plus, minus = x.copy(), x.copy()
        plus[idx] += eps
        minus[idx] -= eps
        grad[idx] = (fn(plus) - fn(minus)) / (2 * eps)
    return grad


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def test_nca_matches_reference(rng):
    q = _unit(rng.normal(size=(5, 4))).astype(np.float32)
    m = _unit(rng.normal(size=(9, 4))).astype(np.float32)
    y = np.array([0, 1, 2, 0, 1])
    my = np.array([0, 1, 2, 0, 1, 2, 0, 1, 2])
    exclude = np.array([0, 4, -1, 3, 8])
    got = losses.nca_loss(q, y, m, my, 0.1, exclude=exclude).numpy()
    want = nca_reference(q, y, m, my, 0.1, exclude)
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_nca_sum_is_inside_the_log(rng):
    # One query, two positives: -log(p1 + p2), not the mean of -log p_j (SupCon).
    q = np.array([[1.0, 0.0]], np.float32)
    m = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]], np.float32)
    got = losses.nca_loss(q, np.array([0]), m, np.array([0, 0, 1]), 1.0).numpy()
    e = np.exp([1.0, 0.0, -1.0])
    np.testing.assert_allclose(got, -np.log((e[0] + e[1]) / e.sum()), rtol=1e-6)


def test_nca_skips_queries_without_positive(rng):
    q = _unit(rng.normal(size=(3, 4))).astype(np.float32)
    m = _unit(rng.normal(size=(6, 4))).astype(np.float32)
    y = np.array([0, 5, 1])  # Label 5 is absent from the memory.
    my = np.array([0, 1, 0, 1, 0, 1])
    got = losses.nca_loss(q, y, m, my, 0.2).numpy()
    want = nca_reference(q, y, m, my, 0.2, [-1, -1, -1])
    np.testing.assert_allclose(got, want, rtol=1e-5)
    assert np.isfinite(got)
    assert losses.nca_loss(q, np.array([7, 7, 7]), m, my, 0.2).numpy() == 0.0


def test_nca_count_mean_makes_replicas_add_up_to_the_global_mean(rng):
    # Two replicas whose queries with a positive number 1 and 3 (label 5 has none): with
    # their mean count, 2 (what GrafitModel gathers), as the divisor, the mean of their
    # losses is the loss of one device on all 6 queries.
    q = _unit(rng.normal(size=(6, 4))).astype(np.float32)
    m = _unit(rng.normal(size=(8, 4))).astype(np.float32)
    y, my = np.array([5, 0, 5, 1, 0, 1]), np.array([0, 1, 2, 0, 1, 2, 0, 1])
    halves = [losses.nca_loss(q[s], y[s], m, my, 0.2, count_mean=lambda c: tf.constant(2.0))
              for s in (slice(0, 3), slice(3, 6))]
    np.testing.assert_allclose(np.mean(halves), nca_reference(q, y, m, my, 0.2, [-1] * 6),
                               rtol=1e-5)
    # A replica without a positive adds 0, though others have some.
    assert losses.nca_loss(q[:1], y[:1], m, my, 0.2,
                           count_mean=lambda c: tf.constant(1.0)).numpy() == 0.0


def test_nca_gradient_is_zero_not_nan_when_no_slot_is_labelled(rng):
    # An empty queue (every slot labelled -1): the loss is 0 and so is its gradient.
    # Before the fix, 0 * d log(total) with total = 0 gave NaN and poisoned the trunk.
    x = tf.Variable(_unit(rng.normal(size=(3, 4))).astype(np.float32))
    m = _unit(rng.normal(size=(6, 4))).astype(np.float32)
    with tf.GradientTape() as tape:
        loss = losses.nca_loss(x, [0, 1, 0], m, np.full(6, -1), 0.05)
    grad = tape.gradient(loss, x).numpy()
    assert float(loss) == 0.0
    np.testing.assert_array_equal(grad, np.zeros_like(grad))


def test_nca_gradient_matches_numeric(rng):
    q = rng.normal(size=(4, 3))
    m = _unit(rng.normal(size=(7, 3))).astype(np.float32)
    y, my, ex = np.array([0, 1, 0, 1]), np.array([0, 1, 0, 1, 0, 1, 0]), np.array([1, -1, 2, 5])

    def value(x):
        return nca_reference(_unit(x), y, m, my, 0.5, ex)

    x = tf.Variable(q.astype(np.float64))
    with tf.GradientTape() as tape:
        z = tf.math.l2_normalize(x, axis=1)
        loss = losses.nca_loss(z, y, tf.constant(m, tf.float64), my, 0.5, exclude=ex)
    grad = tape.gradient(loss, x).numpy()
    np.testing.assert_allclose(grad, numeric_grad(value, q), atol=1e-5)


def test_nca_no_gradient_into_memory(rng):
    m = tf.Variable(_unit(rng.normal(size=(5, 3))).astype(np.float32))
    q = tf.constant(_unit(rng.normal(size=(2, 3))).astype(np.float32))
    with tf.GradientTape() as tape:
        loss = losses.nca_loss(q, [0, 1], m, [0, 1, 0, 1, 0], 0.1)
    assert tape.gradient(loss, m) is None


def byol_reference(p, t):
    p, t = _unit(p), _unit(t)
    return np.mean(2 - 2 * np.sum(p * t, axis=1))


def test_byol_matches_reference_and_gradient(rng):
    p, t = rng.normal(size=(6, 5)), rng.normal(size=(6, 5))
    np.testing.assert_allclose(losses.byol_loss(p, t).numpy(), byol_reference(p, t), rtol=1e-6)
    x = tf.Variable(p)
    tv = tf.Variable(t)
    with tf.GradientTape() as tape:
        loss = losses.byol_loss(x, tv)
    gp, gt = tape.gradient(loss, [x, tv])
    assert gt is None  # Stop-gradient on the target.
    np.testing.assert_allclose(gp.numpy(), numeric_grad(lambda a: byol_reference(a, t), p),
                               atol=1e-6)


def test_byol_is_zero_for_aligned_views(rng):
    p = rng.normal(size=(4, 3))
    assert abs(losses.byol_loss(p, 3.0 * p).numpy()) < 1e-6


def info_nce_reference(q, k, tau, offset=0):
    """Query by query: -log exp(q_i . k_{offset+i} / tau) / sum_j exp(q_i . k_j / tau)."""
    out = []
    for i in range(len(q)):
        logits = k @ q[i] / tau
        out.append(-(logits[offset + i] - np.log(np.exp(logits).sum())))
    return np.mean(out)


def test_info_nce_matches_reference_and_gradient(rng):
    q = _unit(rng.normal(size=(4, 3)))
    k = _unit(rng.normal(size=(4, 3)))
    np.testing.assert_allclose(losses.info_nce_loss(q, k, 0.2).numpy(),
                               info_nce_reference(q, k, 0.2), rtol=1e-6)
    qv, kv = tf.Variable(q), tf.Variable(k)
    with tf.GradientTape() as tape:
        loss = losses.info_nce_loss(qv, kv, 0.2)
    gq, gk = tape.gradient(loss, [qv, kv])
    assert gk is None  # The keys are the EMA target's: no gradient.
    np.testing.assert_allclose(gq.numpy(), numeric_grad(lambda a: info_nce_reference(a, k, 0.2),
                                                        q, eps=1e-6), atol=1e-6)


def test_info_nce_with_the_keys_of_the_global_batch(rng):
    # Two replicas of 3 queries, each against all 6 keys (cross_replica_concat), the
    # positive of replica r's query i at 3 r + i: the mean of their losses is the loss
    # of one device on the 6.
    q = _unit(rng.normal(size=(6, 4)))
    k = _unit(rng.normal(size=(6, 4)))
    second = losses.info_nce_loss(q[3:], k, 0.2, offset=tf.constant(3)).numpy()
    np.testing.assert_allclose(second, info_nce_reference(q[3:], k, 0.2, offset=3), rtol=1e-6)
    first = losses.info_nce_loss(q[:3], k, 0.2).numpy()
    np.testing.assert_allclose((first + second) / 2, info_nce_reference(q, k, 0.2), rtol=1e-6)
    qv = tf.Variable(q[3:])
    with tf.GradientTape() as tape:
        loss = losses.info_nce_loss(qv, k, 0.2, offset=3)
    np.testing.assert_allclose(
        tape.gradient(loss, qv).numpy(),
        numeric_grad(lambda a: info_nce_reference(a, k, 0.2, offset=3), q[3:], eps=1e-6),
        atol=1e-6)


def test_info_nce_is_low_for_matching_keys(rng):
    k = _unit(rng.normal(size=(6, 8)))
    assert losses.info_nce_loss(k, k, 0.05).numpy() < 0.1 * losses.info_nce_loss(
        k, k[::-1], 0.05).numpy()


def cross_entropy_reference(logits, labels, smoothing):
    out = []
    for row, y in zip(logits, labels):
        target = np.full(len(row), smoothing / len(row))
        target[y] += 1.0 - smoothing
        logp = row - row.max() - np.log(np.exp(row - row.max()).sum())
        out.append(-(target * logp).sum())
    return np.mean(out)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_cross_entropy_matches_reference_and_gradient(rng, smoothing):
    logits = rng.normal(size=(3, 4))
    labels = np.array([0, 3, 1])
    np.testing.assert_allclose(losses.cross_entropy(logits, labels, smoothing).numpy(),
                               cross_entropy_reference(logits, labels, smoothing), rtol=1e-5)
    x = tf.Variable(logits.astype(np.float32))
    with tf.GradientTape() as tape:
        loss = losses.cross_entropy(x, labels, smoothing)
    np.testing.assert_allclose(
        tape.gradient(loss, x).numpy(),
        numeric_grad(lambda a: cross_entropy_reference(a, labels, smoothing), logits, eps=1e-6),
        atol=1e-5)


def test_cross_entropy_computes_low_precision_logits_in_float32(rng):
    logits = rng.normal(size=(3, 4))
    labels = np.array([2, 0, 1])
    got = losses.cross_entropy(tf.constant(logits, tf.bfloat16), labels)
    assert got.dtype == tf.float32
    low = tf.cast(tf.constant(logits, tf.bfloat16), tf.float32).numpy().astype(np.float64)
    np.testing.assert_allclose(got.numpy(), cross_entropy_reference(low, labels, 0.0), rtol=1e-5)


def queue_contrastive_reference(q, k, y, queue, qy, tau, weight):
    """MaskCon's baseline query by query: own key first, then the queue."""
    out = []
    for i in range(len(q)):
        logits = np.concatenate([[q[i] @ k[i]], queue @ q[i]]) / tau
        logp = logits - np.log(np.exp(logits).sum())
        pos = [0] + [1 + j for j in range(len(queue)) if qy[j] == y[i]]
        out.append(weight * -np.mean(logp[pos]) + (1 - weight) * -logp[0])
    return np.mean(out)


def test_queue_contrastive_matches_reference_and_gradient(rng):
    q = _unit(rng.normal(size=(3, 4)))
    k = _unit(rng.normal(size=(3, 4)))
    queue = _unit(rng.normal(size=(5, 4)))
    y, qy = np.array([0, 1, 2]), np.array([0, 1, 0, -1, 1])  # -1: an empty slot.
    got = losses.queue_contrastive_loss(q, k, y, queue, qy, 0.1, weight=0.3).numpy()
    np.testing.assert_allclose(got, queue_contrastive_reference(q, k, y, queue, qy, 0.1, 0.3),
                               rtol=1e-5)
    qv, kv, queue_v = tf.Variable(q), tf.Variable(k), tf.Variable(queue)
    with tf.GradientTape() as tape:
        loss = losses.queue_contrastive_loss(qv, kv, y, queue_v, qy, 0.1, weight=0.3)
    gq, gk, g_queue = tape.gradient(loss, [qv, kv, queue_v])
    assert gk is None and g_queue is None  # Keys and queue are the key encoder's.
    np.testing.assert_allclose(
        gq.numpy(),
        numeric_grad(lambda a: queue_contrastive_reference(a, k, y, queue, qy, 0.1, 0.3), q,
                     eps=1e-6), atol=1e-5)


def test_queue_contrastive_weight_0_is_infonce_against_own_key_and_queue(rng):
    q = _unit(rng.normal(size=(3, 4)))
    k = _unit(rng.normal(size=(3, 4)))
    queue = _unit(rng.normal(size=(5, 4)))
    y, qy = np.array([0, 1, 0]), np.array([0, 1, 0, 1, 0])
    logits = np.concatenate([np.sum(q * k, 1, keepdims=True), q @ queue.T], axis=1) / 0.2
    want = -np.mean(logits[:, 0] - np.log(np.exp(logits).sum(1)))
    np.testing.assert_allclose(
        losses.queue_contrastive_loss(q, k, y, queue, qy, 0.2, weight=0.0).numpy(), want,
        rtol=1e-6)


def maskcon_reference(q, k, y, queue, qy, t1, t2, w):
    """`MaskCon.forward` (MaskCon_CVPR2023, models/model.py) transcribed line by line in
    NumPy: the queue is `[Q, D]` here, `[D, K]` there."""
    n, big_k = len(q), len(queue)
    coarse_z = np.ones((n, big_k)) * (y.reshape(-1, 1) == qy.reshape(1, -1))
    logits_pd = k @ queue.T / t2
    logits_pd = logits_pd * coarse_z
    logits_pd = logits_pd - logits_pd.max(axis=1, keepdims=True)
    pseudo_soft_z = np.exp(logits_pd) * coarse_z
    pseudo_sum = pseudo_soft_z.sum(axis=1, keepdims=True)
    maskcon_z = np.zeros((n, big_k + 1))
    maskcon_z[:, 0] = 1
    tmp = pseudo_soft_z / pseudo_sum
    tmp = tmp / tmp.max(axis=1, keepdims=True)
    maskcon_z[:, 1:] = tmp
    maskcon_z = maskcon_z / maskcon_z.sum(axis=1, keepdims=True)
    self_z = np.zeros((n, big_k + 1))
    self_z[:, 0] = 1.0
    labels = w * maskcon_z + (1 - w) * self_z
    logits_all = np.concatenate([np.sum(q * k, 1)[:, None], q @ queue.T], axis=1) / t1
    log_softmax = logits_all - np.log(np.exp(logits_all).sum(axis=1, keepdims=True))
    return -np.mean(np.sum(log_softmax * labels, axis=1))


@pytest.mark.parametrize("args", [(0.1, 0.05, 0.5), (0.2, 1.0, 0.3)],
                         ids=["maskcon_cifar", "spread_relations"])
def test_maskcon_matches_its_code_and_gradient(rng, args):
    q = _unit(rng.normal(size=(4, 6)))
    k = _unit(rng.normal(size=(4, 6)))
    queue = _unit(rng.normal(size=(7, 6)))
    y, qy = np.array([0, 1, 2, 0]), np.array([0, 1, 0, 2, 1, 0, 2])
    got = losses.maskcon_loss(q, k, y, queue, qy, *args).numpy()
    np.testing.assert_allclose(got, maskcon_reference(q, k, y, queue, qy, *args), rtol=1e-5)
    qv, kv, queue_v = tf.Variable(q), tf.Variable(k), tf.Variable(queue)
    with tf.GradientTape() as tape:
        loss = losses.maskcon_loss(qv, kv, y, queue_v, qy, *args)
    gq, gk, g_queue = tape.gradient(loss, [qv, kv, queue_v])
    assert gk is None and g_queue is None  # Keys, queue and targets carry no gradient.
    np.testing.assert_allclose(
        gq.numpy(), numeric_grad(lambda a: maskcon_reference(a, k, y, queue, qy, *args), q,
                                 eps=1e-6), atol=1e-5)


def test_maskcon_without_same_label_entries_is_infonce_on_the_own_key(rng):
    q = _unit(rng.normal(size=(2, 4)))
    k = _unit(rng.normal(size=(2, 4)))
    queue = _unit(rng.normal(size=(3, 4)))
    y, qy = np.array([5, 6]), np.array([0, 1, -1])  # MaskCon's code gives NaN here.
    logits = np.concatenate([np.sum(q * k, 1, keepdims=True), q @ queue.T], axis=1) / 0.1
    want = -np.mean(logits[:, 0] - np.log(np.exp(logits).sum(1)))
    np.testing.assert_allclose(losses.maskcon_loss(q, k, y, queue, qy, 0.1, 0.05).numpy(),
                               want, rtol=1e-6)
