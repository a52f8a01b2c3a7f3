"""Losses against NumPy references on tiny batches (values and gradients)."""

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


def test_info_nce_matches_reference(rng):
    q = _unit(rng.normal(size=(4, 3)))
    k = _unit(rng.normal(size=(4, 3)))
    logits = q @ k.T / 0.2
    logp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    np.testing.assert_allclose(losses.info_nce_loss(q, k, 0.2).numpy(),
                               -np.mean(np.diag(logp)), rtol=1e-6)


def test_info_nce_with_queue_negatives_matches_reference(rng):
    q = _unit(rng.normal(size=(3, 4))).astype(np.float32)
    k = _unit(rng.normal(size=(3, 4))).astype(np.float32)
    queue = _unit(rng.normal(size=(5, 4))).astype(np.float32)
    want = []
    for i in range(3):  # Positive: k[i]; negatives: the other keys and the whole queue.
        logits = np.concatenate([k @ q[i], queue @ q[i]]) / 0.1
        want.append(-(logits[i] - np.log(np.exp(logits).sum())))
    got = losses.info_nce_loss(q, k, 0.1, negatives=queue).numpy()
    np.testing.assert_allclose(got, np.mean(want), rtol=1e-5)
    # More negatives can only raise the loss.
    assert got > losses.info_nce_loss(q, k, 0.1).numpy()


def test_info_nce_same_coarse_negatives_matches_reference(rng):
    q = _unit(rng.normal(size=(5, 4))).astype(np.float32)
    k = _unit(rng.normal(size=(5, 4))).astype(np.float32)
    labels = np.array([0, 1, 0, 0, 1])
    want = []
    for i in range(5):  # Positive: k[i]; negatives: keys of the same coarse label only.
        same = np.flatnonzero(labels == labels[i])
        logits = k[same] @ q[i] / 0.1
        want.append(-(logits[list(same).index(i)] - np.log(np.exp(logits).sum())))
    got = losses.info_nce_loss(q, k, 0.1, labels=labels).numpy()
    np.testing.assert_allclose(got, np.mean(want), rtol=1e-5)
    # Fewer negatives can only lower the loss; one label everywhere is plain InfoNCE.
    assert got < losses.info_nce_loss(q, k, 0.1).numpy()
    np.testing.assert_allclose(losses.info_nce_loss(q, k, 0.1, labels=np.zeros(5, int)).numpy(),
                               losses.info_nce_loss(q, k, 0.1).numpy(), rtol=1e-6)
    with pytest.raises(ValueError):
        losses.info_nce_loss(q, k, 0.1, negatives=k, labels=labels)


def test_decoupled_info_nce_matches_reference_values_and_gradients(rng):
    q = _unit(rng.normal(size=(5, 4)))
    k = _unit(rng.normal(size=(5, 4))).astype(np.float32)
    queue = _unit(rng.normal(size=(3, 4))).astype(np.float32)
    labels = np.array([0, 1, 0, 0, 2])  # Image 4 is alone in its class.

    def reference(q, negatives=None, labels=None):
        out = []
        for i in range(len(q)):  # -l_ii + log sum over the negatives only (no positive).
            others = [j for j in range(len(k)) if j != i
                      and (labels is None or labels[j] == labels[i])]
            logits = k[others] @ q[i] / 0.1
            if negatives is not None:
                logits = np.concatenate([logits, negatives @ q[i] / 0.1])
            if len(logits):
                out.append(np.log(np.exp(logits).sum()) - k[i] @ q[i] / 0.1)
            else:
                out.append(0.0)  # No negative at all: no loss.
        return np.mean(out)

    for kwargs in ({}, dict(negatives=queue), dict(labels=labels)):
        qt = tf.constant(q, tf.float32)
        with tf.GradientTape() as tape:
            tape.watch(qt)
            value = losses.info_nce_loss(qt, k, 0.1, decoupled=True, **kwargs)
        assert value.numpy() == pytest.approx(reference(q, **kwargs), rel=1e-5)
        np.testing.assert_allclose(
            tape.gradient(value, qt).numpy(),
            numeric_grad(lambda x: reference(x, **kwargs), q.astype(np.float64)), atol=1e-3)
    # Without the positive in the denominator the loss is lower than InfoNCE's.
    q = q.astype(np.float32)
    assert (losses.info_nce_loss(q, k, 0.1, decoupled=True).numpy()
            < losses.info_nce_loss(q, k, 0.1).numpy())
    with pytest.raises(ValueError):
        losses.info_nce_loss(q, k, 0.1, targets=np.eye(5), decoupled=True)


def maskcon_targets_reference(k, labels, tau, w):
    """MaskCon's soft labels (its models/model.py), with the batch's other keys as the queue."""
    out = np.zeros((len(k), len(k)))
    for i in range(len(k)):
        others = [j for j in range(len(k)) if j != i and labels[j] == labels[i]]
        z = np.zeros(len(k))
        z[i] = 1.0
        if others:
            logits = k[others] @ k[i] / tau
            soft = np.exp(logits - logits.max())
            soft /= soft.sum()
            z[others] = soft / soft.max()  # "rescale by maximum"
        z /= z.sum()
        out[i] = w * z + (1 - w) * np.eye(len(k))[i]
    return out


def test_coarse_soft_targets_match_maskcon_reference(rng):
    k = _unit(rng.normal(size=(6, 4))).astype(np.float32)
    labels = np.array([0, 1, 0, 0, 1, 2])  # Image 5 is alone in its class.
    got = losses.coarse_soft_targets(k, labels, 0.1, 0.5).numpy()
    np.testing.assert_allclose(got, maskcon_targets_reference(k, labels, 0.1, 0.5), atol=1e-6)
    np.testing.assert_allclose(got.sum(1), 1.0, rtol=1e-6)
    assert got[5, 5] == 1.0 and got[0, 1] == 0.0  # Alone: one-hot; other class: 0.
    # Weight 0 is the one-hot target: the loss is plain InfoNCE.
    q = _unit(rng.normal(size=(6, 4))).astype(np.float32)
    one_hot = losses.coarse_soft_targets(k, labels, 0.1, 0.0)
    np.testing.assert_allclose(one_hot.numpy(), np.eye(6), atol=1e-7)
    np.testing.assert_allclose(losses.info_nce_loss(q, k, 0.1, targets=one_hot).numpy(),
                               losses.info_nce_loss(q, k, 0.1).numpy(), rtol=1e-6)


def test_info_nce_with_soft_targets_matches_reference(rng):
    q = _unit(rng.normal(size=(5, 4))).astype(np.float32)
    k = _unit(rng.normal(size=(5, 4))).astype(np.float32)
    queue = _unit(rng.normal(size=(3, 4))).astype(np.float32)
    labels = np.array([0, 1, 0, 0, 1])
    targets = maskcon_targets_reference(k, labels, 0.1, 0.5)
    logits = np.concatenate([q @ k.T, q @ queue.T], axis=1) / 0.2
    logp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    want = -np.mean((targets * logp[:, :5]).sum(1))  # The queue's targets are 0.
    got = losses.info_nce_loss(q, k, 0.2, negatives=queue,
                               targets=losses.coarse_soft_targets(k, labels, 0.1, 0.5))
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5)
    # No gradient flows into the keys through the targets or the logits.
    kv = tf.constant(k)
    with tf.GradientTape() as tape:
        tape.watch(kv)
        loss = losses.info_nce_loss(q, kv, 0.2, targets=losses.coarse_soft_targets(
            kv, labels, 0.1, 0.5))
    assert tape.gradient(loss, kv) is None


def test_info_nce_soft_targets_with_same_coarse_negatives_matches_reference(rng):
    # Both options together: the soft targets sit on same-class keys only, so the
    # masked other-class logits carry a target of 0 and drop out of the sum.
    q = _unit(rng.normal(size=(6, 4))).astype(np.float32)
    k = _unit(rng.normal(size=(6, 4))).astype(np.float32)
    labels = np.array([0, 1, 0, 0, 1, 2])
    targets = maskcon_targets_reference(k, labels, 0.1, 0.5)
    want = []
    for i in range(6):
        same = np.flatnonzero(labels == labels[i])
        logits = k[same] @ q[i] / 0.2
        logp = logits - np.log(np.exp(logits).sum())
        want.append(-(targets[i, same] * logp).sum())
    got = losses.info_nce_loss(q, k, 0.2, labels=labels,
                               targets=losses.coarse_soft_targets(k, labels, 0.1, 0.5))
    np.testing.assert_allclose(got.numpy(), np.mean(want), rtol=1e-5)


def test_cross_entropy_with_smoothing(rng):
    logits = rng.normal(size=(3, 4))
    labels = np.array([0, 3, 1])
    onehot = np.eye(4)[labels] * 0.9 + 0.1 / 4
    logp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    want = -np.mean(np.sum(onehot * logp, axis=1))
    np.testing.assert_allclose(losses.cross_entropy(logits, labels, 0.1).numpy(), want,
                               rtol=1e-5)


def test_queue_contrastive_matches_reference(rng):
    q = _unit(rng.normal(size=(3, 4))).astype(np.float32)
    k = _unit(rng.normal(size=(3, 4))).astype(np.float32)
    queue = _unit(rng.normal(size=(5, 4))).astype(np.float32)
    y, qy = np.array([0, 1, 2]), np.array([0, 1, 0, -1, 1])
    got = losses.queue_contrastive_loss(q, k, y, queue, qy, 0.1, weight=0.3).numpy()
    want = []
    for i in range(3):
        logits = np.concatenate([[q[i] @ k[i]], queue @ q[i]]) / 0.1
        logp = logits - np.log(np.exp(logits).sum())
        pos = [0] + [1 + j for j in range(5) if qy[j] == y[i]]
        want.append(0.3 * -np.mean(logp[pos]) + 0.7 * -logp[0])
    np.testing.assert_allclose(got, np.mean(want), rtol=1e-5)


def koleo_reference(x, eps=1e-8):
    """The formula, point by point: -mean_i log ||x_i - x_nn(i)||, nn by cosine."""
    out = []
    for i in range(len(x)):
        sims = [x[i] @ x[j] if j != i else -np.inf for j in range(len(x))]
        d = x[i] - x[int(np.argmax(sims))]
        out.append(-np.log(np.sqrt(d @ d + eps)))
    return np.mean(out)


def test_koleo_matches_reference_values_and_gradients(rng):
    x = _unit(rng.normal(size=(6, 5))).astype(np.float32)
    np.testing.assert_allclose(losses.koleo_loss(x).numpy(), koleo_reference(x), rtol=1e-5)
    xt = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(xt)
        value = losses.koleo_loss(xt)
    # Small steps do not change which point is whose neighbour, so the numeric
    # gradient of the reference (in float64) checks both ends of each pair.
    want = numeric_grad(lambda v: koleo_reference(v), x.astype(np.float64), eps=1e-4)
    np.testing.assert_allclose(tape.gradient(value, xt).numpy(), want, rtol=1e-3, atol=1e-4)


def test_koleo_is_lower_for_spread_points_and_finite_for_duplicates():
    spread = np.eye(4, dtype=np.float32)  # Every neighbour at distance sqrt(2).
    bunched = _unit(np.array([[1, 0.1, 0, 0], [1, 0, 0.1, 0], [1, 0, 0, 0.1],
                              [1, 0.1, 0.1, 0]], np.float32))
    assert losses.koleo_loss(spread).numpy() == pytest.approx(-np.log(np.sqrt(2.0)), rel=1e-6)
    assert losses.koleo_loss(bunched).numpy() > losses.koleo_loss(spread).numpy() + 1.0
    twins = tf.constant([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    with tf.GradientTape() as tape:
        tape.watch(twins)
        value = losses.koleo_loss(twins)
    assert np.isfinite(value.numpy())
    assert np.all(np.isfinite(tape.gradient(value, twins).numpy()))


def test_coarse_nearest_keys_match_reference(rng):
    keys = _unit(rng.normal(size=(5, 4))).astype(np.float32)
    support = _unit(rng.normal(size=(7, 4))).astype(np.float32)
    labels = np.array([0, 1, 2, 0, 3])
    support_labels = np.array([0, 1, 1, -1, 0, 2, 1])  # Class 3 has no entry: own key.
    got = losses.coarse_nearest_keys(keys, labels, support, support_labels).numpy()
    for i in range(5):
        same = np.flatnonzero(support_labels == labels[i])
        want = support[same[np.argmax(support[same] @ keys[i])]] if len(same) else keys[i]
        np.testing.assert_allclose(got[i], want, rtol=1e-6)
    # The coarse restriction changes the choice (the overall nearest neighbours differ).
    support_labels_free = np.zeros(7, int)
    free = losses.coarse_nearest_keys(keys, np.zeros(5, int), support, support_labels_free)
    np.testing.assert_allclose(free.numpy(), support[np.argmax(keys @ support.T, axis=1)])
    assert not np.allclose(got, free.numpy())


def sinkhorn_reference(scores, labels, per_class, eps, iterations):
    """Sinkhorn-Knopp class by class, on each class's own [n_c, K_c] block."""
    codes = np.zeros_like(scores, dtype=np.float64)
    for c in np.unique(labels):
        rows = np.flatnonzero(labels == c)
        cols = np.arange(c * per_class, (c + 1) * per_class)
        q = np.exp(scores[np.ix_(rows, cols)] / eps)
        for _ in range(iterations):
            q *= (len(rows) / per_class) / q.sum(axis=0, keepdims=True)
            q /= q.sum(axis=1, keepdims=True)
        codes[np.ix_(rows, cols)] = q
    return codes


def test_coarse_sinkhorn_matches_blockwise_reference(rng):
    labels = np.array([0, 2, 0, 0, 2, 0, 2])  # Class 1 is absent from this batch.
    scores = _unit(rng.normal(size=(7, 4))) @ _unit(rng.normal(size=(9, 4))).T
    got = losses.coarse_sinkhorn(scores.astype(np.float32), labels, 3, 0.2, 3).numpy()
    np.testing.assert_allclose(got, sinkhorn_reference(scores, labels, 3, 0.2, 3), atol=1e-5)
    np.testing.assert_allclose(got.sum(axis=1), 1.0, rtol=1e-5)
    assert np.all(got[:, 3:6] == 0) and np.all(got[labels == 0, 6:] == 0)
    # Many iterations: every prototype of class c gets n_c / K_c (equipartition).
    balanced = losses.coarse_sinkhorn(scores.astype(np.float32), labels, 3, 0.2, 200).numpy()
    np.testing.assert_allclose(balanced[:, :3].sum(axis=0), 4 / 3, rtol=1e-3)
    np.testing.assert_allclose(balanced[:, 6:].sum(axis=0), 1.0, rtol=1e-3)


def test_coarse_prototype_loss_matches_reference_values_and_gradients(rng):
    labels = np.array([1, 0, 1, 1, 0])
    q = _unit(rng.normal(size=(5, 4))).astype(np.float32)
    k = _unit(rng.normal(size=(5, 4))).astype(np.float32)
    p = _unit(rng.normal(size=(4, 4))).astype(np.float32)  # 2 prototypes per class.

    def reference(q, p):
        codes = sinkhorn_reference(k @ p.T, labels, 2, 0.05, 3)
        out = []
        for i, c in enumerate(labels):
            logits = q[i] @ p[2 * c:2 * c + 2].T / 0.1  # Own class's prototypes only.
            log_p = logits - np.log(np.exp(logits - logits.max()).sum()) - logits.max()
            out.append(-(codes[i, 2 * c:2 * c + 2] * log_p).sum())
        return np.mean(out)

    qt, pt = tf.constant(q), tf.constant(p)
    with tf.GradientTape() as tape:
        tape.watch([qt, pt])
        value = losses.coarse_prototype_loss(qt, k, labels, pt, 2, 0.1, 0.05)
    assert value.numpy() == pytest.approx(reference(q, p), rel=1e-5)
    grad_q, grad_p = tape.gradient(value, [qt, pt])
    # The codes carry no gradient: the reference's p-gradient holds them fixed.
    codes = sinkhorn_reference(k @ p.T, labels, 2, 0.05, 3)

    def fixed_codes(q, p):
        logits = np.where(np.repeat(np.arange(2), 2)[None, :] == labels[:, None],
                          q @ p.T / 0.1, -1e9)  # Other classes' codes are 0.
        log_p = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
        return -np.mean((codes * log_p).sum(axis=1))

    np.testing.assert_allclose(
        grad_q.numpy(), numeric_grad(lambda v: fixed_codes(v, p.astype(np.float64)),
                                     q.astype(np.float64), eps=1e-5), rtol=1e-3, atol=1e-5)
    np.testing.assert_allclose(
        grad_p.numpy(), numeric_grad(lambda v: fixed_codes(q.astype(np.float64), v),
                                     p.astype(np.float64), eps=1e-5), rtol=1e-3, atol=1e-5)


def augmentation_prediction_reference(p, a, b, crop=4):
    """Pair by pair: the crop's and the jitter's mean squared errors, added."""
    out = []
    for i in range(len(p)):
        err = (np.tanh(p[i]) - (a[i] - b[i])) ** 2
        out.append(err[:crop].mean() + (err[crop:].mean() if len(err) > crop else 0.0))
    return np.mean(out)


def test_augmentation_prediction_matches_reference_values_and_gradients(rng):
    p = rng.normal(size=(5, 6)).astype(np.float32)
    a, b = (rng.uniform(-1, 1, size=(5, 6)).astype(np.float32) for _ in range(2))
    np.testing.assert_allclose(losses.augmentation_prediction_loss(p, a, b).numpy(),
                               augmentation_prediction_reference(p, a, b), rtol=1e-5)
    # Crop only (no jitter entries), and a perfect prediction costs nothing.
    np.testing.assert_allclose(losses.augmentation_prediction_loss(p[:, :4], a[:, :4], b[:, :4]),
                               augmentation_prediction_reference(p[:, :4], a[:, :4], b[:, :4]),
                               rtol=1e-5)
    near, half = a / 2, np.full((5, 6), 0.3, np.float32)  # Differences inside (-1, 1).
    assert float(losses.augmentation_prediction_loss(np.arctanh(near - half), near, half)) < 1e-10
    pt, at = tf.constant(p), tf.constant(a)
    with tf.GradientTape() as tape:
        tape.watch([pt, at])
        value = losses.augmentation_prediction_loss(pt, at, b)
    grad_p, grad_a = tape.gradient(value, [pt, at])
    want = numeric_grad(lambda v: augmentation_prediction_reference(v, a, b),
                        p.astype(np.float64), eps=1e-4)
    np.testing.assert_allclose(grad_p.numpy(), want, rtol=1e-3, atol=1e-5)
    assert grad_a is None  # The draws are targets, not something to learn.


def test_subcluster_loss_matches_reference_values_and_gradients(rng):
    labels = np.array([1, 0, 1, 0, 1])
    assigned = np.array([3, 0, 2, -1, 3])  # Image 3: not clustered yet, no loss.
    f = _unit(rng.normal(size=(5, 4))).astype(np.float32)
    c = _unit(rng.normal(size=(4, 4))).astype(np.float32)  # 2 sub-clusters per class.

    def reference(f):
        out = []
        for i, y in enumerate(labels):
            if assigned[i] < 0:
                continue
            logits = f[i] @ c[2 * y:2 * y + 2].T / 0.1  # Own class's centroids only.
            log_p = logits - logits.max() - np.log(np.exp(logits - logits.max()).sum())
            out.append(-log_p[assigned[i] - 2 * y])
        return np.mean(out)

    ft = tf.constant(f)
    with tf.GradientTape() as tape:
        tape.watch(ft)
        value = losses.subcluster_loss(ft, labels, assigned, c, 2, 0.1)
    assert value.numpy() == pytest.approx(reference(f), rel=1e-5)
    np.testing.assert_allclose(tape.gradient(value, ft).numpy(),
                               numeric_grad(reference, f.astype(np.float64)), atol=1e-3)
    # Nobody clustered yet: no loss.
    none = losses.subcluster_loss(ft, labels, -np.ones(5, np.int32), c, 2, 0.1)
    assert float(none) == 0.0
