"""Grafit's losses, as pure functions of tensors.

Each returns the mean over the local (per-replica) batch; under `tf.distribute` the
caller divides by `num_replicas_in_sync`, as the optimizer *sums* replicas' gradients.
`B` queries, `M` memory slots, `D` embedding width; embeddings are L2-normalised.
"""

import tensorflow as tf

_NEG_INF = -1e9  # Finite, so that masked rows never produce NaN gradients.


def nca_loss(queries, query_labels, memory, memory_labels, tau, exclude=None, count_mean=None):
    """Neighbourhood-components (soft kNN classifier) loss against a memory.

    For query i with label y_i:

        p_ij  = exp(q_i . m_j / tau) / sum_{k != self(i)} exp(q_i . m_k / tau)
        L_i   = -log sum_{j != self(i), y_j = y_i} p_ij

    The sum over positives is inside the log: the loss asks that a soft nearest
    neighbour classifier gets the coarse label right, and does not pull every
    same-class pair together (which would erase fine structure).

    Args:
        queries: `[B, D]` float32, L2-normalised embeddings.
        query_labels: `[B]` int, coarse labels of the queries.
        memory: `[M, D]` float32 memory embeddings (no gradient flows into it).
        memory_labels: `[M]` int, labels of the memory slots.
        tau: temperature.
        exclude: optional `[B]` int, the memory slot that holds each query's
            own image (removed from the candidates), or -1 for none.
        count_mean: optional `fn(count) -> its mean over replicas` for the count of queries
            with a positive: the replicas' losses then add up to the global batch's mean.

    Returns:
        Scalar: the mean of L_i over the queries that have at least one positive
        in the memory (0 when none has).
    """
    memory = tf.stop_gradient(memory)
    query_labels = tf.cast(query_labels, tf.int32)
    memory_labels = tf.cast(memory_labels, tf.int32)
    # 1/tau on the [B, D] queries, not on the [B, M] logits: one pass less over the big tensor.
    logits = tf.matmul(queries * (1.0 / tau), memory, transpose_b=True)  # [B, M]
    if exclude is not None:
        # Knock out each query's own slot: B scattered writes, no [B, M] mask.
        exclude = tf.cast(exclude, tf.int32)
        keep = exclude >= 0
        pairs = tf.stack([tf.boolean_mask(tf.range(tf.shape(exclude)[0]), keep),
                          tf.boolean_mask(exclude, keep)], axis=1)
        logits = tf.tensor_scatter_nd_update(
            logits, pairs, tf.fill(tf.shape(pairs)[:1], tf.constant(_NEG_INF, logits.dtype)))
    # Sums of exp(logit) per label via one [M, C] one-hot matmul: the value of two masked
    # log-sum-exps over [B, M] in far fewer passes (this loss dominates a small trunk's step).
    shift = tf.stop_gradient(tf.reduce_max(logits, axis=1, keepdims=True))
    weights = tf.exp(logits - shift)
    classes = tf.maximum(tf.reduce_max(memory_labels), tf.reduce_max(query_labels)) + 1
    per_class = tf.matmul(weights, tf.one_hot(memory_labels, classes, dtype=weights.dtype))
    total = tf.reduce_sum(per_class, axis=1)  # [B]
    positive = tf.gather(per_class, query_labels, batch_dims=1)  # [B]
    # Labels < 0 (empty queue slots) have a zero one-hot row: never positives.
    # A positive mass that underflows (no positive within ~87 tau) counts as none.
    has_positive = positive > 0
    # Both logs see 1 where a query has no positive: tf.where's gradient multiplies the
    # dropped branch by 0, and 0 * (1 / 0) is NaN (an empty queue: total is 0 too).
    safe = tf.where(has_positive, positive, tf.ones_like(positive))
    safe_total = tf.where(has_positive, total, tf.ones_like(total))
    per_query = tf.where(has_positive, tf.math.log(safe_total) - tf.math.log(safe),
                         tf.zeros_like(total))
    count = tf.reduce_sum(tf.cast(has_positive, per_query.dtype))
    return tf.math.divide_no_nan(tf.reduce_sum(per_query), (count_mean or tf.identity)(count))


def byol_loss(predictions, targets):
    """BYOL regression loss `2 - 2 cos(p, stopgrad(t))`, mean over the batch.

    Args:
        predictions: `[B, P]` online predictor outputs (any norm).
        targets: `[B, P]` target projector outputs for *another* view of the
            same images (any norm; no gradient flows into them).
    """
    p = tf.math.l2_normalize(predictions, axis=1)
    t = tf.math.l2_normalize(tf.stop_gradient(targets), axis=1)
    return tf.reduce_mean(2.0 - 2.0 * tf.reduce_sum(p * t, axis=1))


def info_nce_loss(queries, keys, tau, offset=0):
    """InfoNCE: query i's positive is key `offset + i`; every other key is a negative.

        L_i = -log exp(q_i . k_{offset+i} / tau) / sum_j exp(q_i . k_j / tau)

    Args:
        queries: `[B, D]` L2-normalised.
        keys: `[K, D]` L2-normalised embeddings of other views (no gradient), K >= offset + B.
        tau: temperature.
        offset: the row of query 0's positive (int or int32 scalar). Under `tf.distribute`:
            the global batch's keys and this replica's offset (`cross_replica_concat`).

    Returns:
        Scalar: the mean of L_i over the queries.
    """
    logits = tf.matmul(queries, tf.stop_gradient(keys), transpose_b=True) / tau  # [B, K]
    positive = tf.range(tf.shape(queries)[0]) + offset
    return tf.reduce_mean(
        tf.nn.sparse_softmax_cross_entropy_with_logits(labels=positive, logits=logits))


def cross_entropy(logits, labels, label_smoothing=0.0):
    """Softmax cross-entropy, mean over the batch.

    Args:
        logits: `[B, K]` (any float dtype; computed in float32).
        labels: `[B]` int class indices.
        label_smoothing: mass spread uniformly over the K classes.
    """
    logits = tf.cast(logits, tf.float32)
    num_classes = tf.shape(logits)[1]
    onehot = tf.one_hot(labels, num_classes)
    if label_smoothing:
        uniform = label_smoothing / tf.cast(num_classes, tf.float32)
        onehot = onehot * (1.0 - label_smoothing) + uniform
    return tf.reduce_mean(tf.nn.softmax_cross_entropy_with_logits(labels=onehot, logits=logits))


def _queue_logits(queries, keys, queue, tau):
    """MoCo's logits `[B, 1 + Q]`: `[q_i . k_i, q_i . queue_j] / tau`; no gradient to the
    keys or the queue (the key encoder's)."""
    keys, queue = tf.stop_gradient(keys), tf.stop_gradient(queue)
    own = tf.reduce_sum(queries * keys, axis=1, keepdims=True)
    return tf.concat([own, tf.matmul(queries, queue, transpose_b=True)], axis=1) / tau


def _same_label(labels, queue_labels):
    """`[B, Q]` bool: queue entry j has query i's label (an empty slot, -1, never does)."""
    return tf.equal(tf.cast(labels, tf.int32)[:, None], tf.cast(queue_labels, tf.int32)[None, :])


def queue_contrastive_loss(queries, keys, labels, queue, queue_labels, tau, weight=0.5):
    """MaskCon's "Grafit" baseline: MoCo logits with a coarse-label supervised term.

    logits_i = [q_i . k_i, q_i . queue_j for all j] / tau; with log-softmax l_i:

        L_self = -l_i[0]                                  (InfoNCE, own key)
        L_sup  = -mean_{j in P_i} l_i[j],  P_i = {own key} U {queue j: y_j = y_i}
        L      = weight * L_sup + (1 - weight) * L_self

    Args:
        queries: `[B, D]` L2-normalised online embeddings.
        keys: `[B, D]` L2-normalised key-encoder embeddings of another view.
        labels: `[B]` int coarse labels.
        queue: `[Q, D]` past keys (no gradient).
        queue_labels: `[Q]` int labels (-1: empty slot, never a positive).
        tau: temperature.
        weight: w of the supervised term.

    Returns:
        Scalar mean over the batch.
    """
    log_prob = tf.nn.log_softmax(_queue_logits(queries, keys, queue, tau), axis=1)
    same = _same_label(labels, queue_labels)
    positive = tf.concat([tf.ones_like(same[:, :1]), same], axis=1)
    mask = tf.cast(positive, log_prob.dtype)
    sup = -tf.reduce_sum(log_prob * mask, axis=1) / tf.reduce_sum(mask, axis=1)
    self_term = -log_prob[:, 0]
    return tf.reduce_mean(weight * sup + (1.0 - weight) * self_term)


def maskcon_loss(queries, keys, labels, queue, queue_labels, tau, soft_tau, weight=0.5):
    """MaskCon (Feng and Patras, CVPR 2023): soft targets over the queue from the key.

    logits_i = [q_i . k_i, q_i . queue_j for all j] / tau, and the target row of query i
    (no gradient) mixes one-hot on its own key with MaskCon's relations: queue entries of
    the same coarse label weighted by exp(k_i . queue_j / soft_tau) (the masked logits
    shifted by their row maximum, as MaskCon's code does), rescaled so the largest is 1,
    the own key 1, the row normalised:

        L = -mean_i sum_j [w * z_ij + (1 - w) * onehot_j] * log_softmax(logits_i)_j

    Args:
        queries: `[B, D]` L2-normalised online embeddings.
        keys: `[B, D]` L2-normalised key-encoder embeddings of another view.
        labels: `[B]` int coarse labels.
        queue: `[Q, D]` past keys (no gradient).
        queue_labels: `[Q]` int labels (-1: empty slot, never a relation).
        tau: T1, temperature of the logits.
        soft_tau: T2, temperature of the relations.
        weight: w of the relations' part of the target.

    Returns:
        Scalar mean over the batch.
    """
    same = tf.cast(_same_label(labels, queue_labels), queries.dtype)
    relation = tf.matmul(tf.stop_gradient(keys), tf.stop_gradient(queue),
                         transpose_b=True) / soft_tau * same
    relation = tf.exp(relation - tf.reduce_max(relation, axis=1, keepdims=True)) * same
    # divide_no_nan: a query with no same-label entry has only its own key (MaskCon: NaN).
    relation = tf.math.divide_no_nan(relation, tf.reduce_sum(relation, axis=1, keepdims=True))
    relation = tf.math.divide_no_nan(relation, tf.reduce_max(relation, axis=1, keepdims=True))
    soft = tf.concat([tf.ones_like(relation[:, :1]), relation], axis=1)
    soft = soft / tf.reduce_sum(soft, axis=1, keepdims=True)
    onehot = tf.one_hot(tf.zeros_like(labels, tf.int32), tf.shape(soft)[1], dtype=soft.dtype)
    target = tf.stop_gradient(weight * soft + (1.0 - weight) * onehot)
    log_prob = tf.nn.log_softmax(_queue_logits(queries, keys, queue, tau), axis=1)
    return -tf.reduce_mean(tf.reduce_sum(target * log_prob, axis=1))
