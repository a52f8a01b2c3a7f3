"""Grafit's losses, as pure functions of tensors.

Each returns the mean over the local (per-replica) batch. Under
`tf.distribute` the caller divides by `num_replicas_in_sync` before taking
gradients, because the optimizer *sums* gradients across replicas.

Notation: `B` queries, `M` memory slots, `D` embedding width. Embeddings are
L2-normalised, so a dot product is a cosine similarity.
"""

import tensorflow as tf

_NEG_INF = -1e9  # Finite, so that masked rows never produce NaN gradients.


def nca_loss(queries, query_labels, memory, memory_labels, tau, exclude=None):
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
    # Sums of exp(logit) per label through one [M, C] one-hot matmul: the same
    # value as two masked log-sum-exps over [B, M], in far fewer passes over
    # the big tensor (this loss dominates a small trunk's step time).
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
    # branch it drops by 0, and 0 * (1 / 0) is NaN when a query sees no labelled slot at
    # all (an empty queue: total is 0 too).
    safe = tf.where(has_positive, positive, tf.ones_like(positive))
    safe_total = tf.where(has_positive, total, tf.ones_like(total))
    per_query = tf.where(has_positive, tf.math.log(safe_total) - tf.math.log(safe),
                         tf.zeros_like(total))
    count = tf.reduce_sum(tf.cast(has_positive, per_query.dtype))
    return tf.reduce_sum(per_query) / tf.maximum(count, 1.0)


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


def info_nce_loss(queries, keys, tau, negatives=None, labels=None, targets=None,
                  decoupled=False):
    """InfoNCE: query i's positive is key i; the other keys (and `negatives`) are negatives.

    Args:
        queries: `[B, D]` L2-normalised.
        keys: `[B, D]` L2-normalised embeddings of other views (no gradient).
        tau: temperature.
        negatives: optional `[K, D]` L2-normalised extra negatives (no gradient),
            e.g. MoCo's queue of past keys: more negatives than one batch gives.
        labels: optional `[B]` int coarse labels: only keys of the query's own
            coarse class are its negatives (`--instance_negatives=same_coarse`).
            The coarse loss already separates the classes; this spends the
            instance loss on telling apart images *within* a class, which is
            where the fine classes are. Not with `negatives`.
        targets: optional `[B, B]` target distribution over the keys (rows sum
            to 1; `coarse_soft_targets`) instead of the one-hot own key; the
            `negatives` get a target of 0.
        decoupled: drop the positive from the denominator (DCL, Yeh et al., ECCV
            2022): `-l_ii + logsumexp_{j != i} l_ij`. InfoNCE's gradient shrinks by
            (1 - p_ii) as the two views become easy to match, which weak
            augmentations make them early; without the positive in the
            denominator it does not. Not with `targets`.
    """
    logits = tf.matmul(queries, tf.stop_gradient(keys), transpose_b=True) / tau  # [B, B]
    if labels is not None:
        if negatives is not None:
            raise ValueError("info_nce_loss: labels and negatives cannot be combined.")
        labels = tf.cast(labels, tf.int32)
        same = tf.equal(labels[:, None], labels[None, :])  # The diagonal (positive) stays.
        logits = tf.where(same, logits, tf.constant(_NEG_INF, logits.dtype))
    if negatives is not None:
        extra = tf.matmul(queries, tf.stop_gradient(negatives), transpose_b=True) / tau
        logits = tf.concat([logits, extra], axis=1)  # [B, B + K]
    if decoupled:
        if targets is not None:
            raise ValueError("info_nce_loss: decoupled and targets cannot be combined.")
        b = tf.shape(queries)[0]
        positive = tf.linalg.diag_part(logits[:, :b])
        # The own key leaves the denominator: only the negatives remain.
        others = tf.concat([tf.linalg.set_diag(logits[:, :b], tf.fill([b], _NEG_INF)),
                            logits[:, b:]], axis=1)
        # A row without any negative (same_coarse, alone in its class) has no loss.
        has_negative = tf.reduce_max(others, axis=1) > _NEG_INF / 2
        per_query = tf.where(has_negative, tf.reduce_logsumexp(others, axis=1) - positive, 0.0)
        return tf.reduce_mean(per_query)
    if targets is not None:
        targets = tf.stop_gradient(tf.cast(targets, logits.dtype))
        targets = tf.pad(targets, [[0, 0], [0, tf.shape(logits)[1] - tf.shape(targets)[1]]])
        return tf.reduce_mean(
            tf.nn.softmax_cross_entropy_with_logits(labels=targets, logits=logits))
    own = tf.range(tf.shape(queries)[0])
    return tf.reduce_mean(
        tf.nn.sparse_softmax_cross_entropy_with_logits(labels=own, logits=logits)
    )


def coarse_soft_targets(keys, labels, tau, weight):
    """MaskCon's soft instance targets (Feng and Patras, CVPR 2023), over a batch's keys.

    The one-hot InfoNCE target treats every other image as a negative, even one
    of the same fine class. MaskCon moves part of the target onto the keys of
    the query's own coarse class that are close to its own key: the nearest
    images within a coarse class are likely of the same fine class, and the
    coarse label keeps the target off every other class. MaskCon draws the keys
    from a MoCo queue; here they are the batch's.

    Row i: `(1 - weight) * onehot(i) + weight * r_i / sum(r_i)`, where `r_ii = 1`,
    `r_ij` for another key j of i's coarse class is the softmax over those keys
    of `k_i . k_j / tau`, rescaled so that its largest entry is 1, and 0 for
    keys of other coarse classes.

    Args:
        keys: `[B, D]` L2-normalised keys (target network; no gradient flows).
        labels: `[B]` int coarse labels.
        tau: temperature of the key-to-key similarities.
        weight: share of the target given to the soft part (MaskCon's w).

    Returns:
        `[B, B]` float32, rows summing to 1.
    """
    keys = tf.stop_gradient(tf.cast(keys, tf.float32))
    labels = tf.cast(labels, tf.int32)
    eye = tf.eye(tf.shape(keys)[0], dtype=tf.bool)
    others = tf.logical_and(tf.equal(labels[:, None], labels[None, :]), tf.logical_not(eye))
    logits = tf.where(others, tf.matmul(keys, keys, transpose_b=True) / tau, _NEG_INF)
    # A row without another key of its class gets no soft part: r_i = onehot(i).
    soft = tf.where(others, tf.nn.softmax(logits, axis=-1), 0.0)
    soft = tf.math.divide_no_nan(soft, tf.reduce_max(soft, axis=-1, keepdims=True))
    relations = soft + tf.cast(eye, tf.float32)
    relations /= tf.reduce_sum(relations, axis=-1, keepdims=True)
    return (1.0 - weight) * tf.cast(eye, tf.float32) + weight * relations


def coarse_nearest_keys(keys, labels, support, support_labels):
    """NNCLR's positives (Dwibedi et al., ICCV 2021), searched within the coarse class.

    Each key is replaced by its nearest neighbour (largest dot product) among the
    support set's keys of the same coarse label: InfoNCE then pulls a query
    towards *another* image that looks like it, which is most often one of its
    fine class, rather than only towards a second view of itself. The coarse
    label keeps the neighbour out of the other coarse classes. A key whose
    class has no entry in the support set yet stays itself.

    Args:
        keys: `[B, D]` L2-normalised keys (no gradient flows).
        labels: `[B]` int coarse labels.
        support: `[K, D]` L2-normalised past keys (no gradient flows).
        support_labels: `[K]` int labels (-1: empty slot, never chosen).

    Returns:
        `[B, D]` float32, the chosen keys.
    """
    keys = tf.stop_gradient(tf.cast(keys, tf.float32))
    support = tf.stop_gradient(tf.cast(support, tf.float32))
    same = tf.equal(tf.cast(labels, tf.int32)[:, None], tf.cast(support_labels, tf.int32)[None, :])
    similarity = tf.where(same, tf.matmul(keys, support, transpose_b=True), _NEG_INF)  # [B, K]
    nearest = tf.gather(support, tf.argmax(similarity, axis=1))
    return tf.where(tf.reduce_any(same, axis=1, keepdims=True), nearest, keys)


def coarse_sinkhorn(scores, labels, prototypes_per_class, epsilon, iterations=3):
    """SwAV's Sinkhorn-Knopp codes, each sample's restricted to its coarse class.

    Prototype k belongs to coarse class `k // prototypes_per_class`. Sample i
    may only be assigned to its own class's prototypes, and within each class c
    the `n_c` samples of the batch are spread evenly over its `K_c` prototypes
    (each gets `n_c / K_c` of the mass): the equipartition that keeps SwAV from
    putting every image into one cluster, applied per coarse class, so that the
    clusters split each coarse class into finer groups (over-clustering within
    the coarse class, SCGM / ANCOR-style; an extension, not in the Grafit paper).

    Args:
        scores: `[B, K]` prototype similarities in [-1, 1] (no gradient flows).
        labels: `[B]` int coarse labels in [0, K / prototypes_per_class).
        prototypes_per_class: `K_c`, the same for every class.
        epsilon: entropic regularisation (SwAV's 0.05): smaller, harder codes.
        iterations: Sinkhorn-Knopp iterations (SwAV's 3).

    Returns:
        `[B, K]` float32 codes: each row sums to 1 over its class's prototypes, 0
        elsewhere.
    """
    scores = tf.stop_gradient(tf.cast(scores, tf.float32))
    labels = tf.cast(labels, tf.int32)
    owner, own = _own_prototypes(labels, tf.shape(scores)[1], prototypes_per_class)
    allowed = tf.cast(own, tf.float32)
    # scores <= 1, so exp((s - 1) / eps) lies in (0, 1]: no overflow, no max to take.
    codes = tf.exp((scores - 1.0) / epsilon) * allowed
    # Mass each prototype should receive: n_c / K_c of its class c.
    counts = tf.math.unsorted_segment_sum(tf.ones_like(labels, tf.float32), labels,
                                          tf.reduce_max(owner) + 1)
    column_mass = tf.gather(counts, owner) / float(prototypes_per_class)
    for _ in range(iterations):
        codes *= tf.math.divide_no_nan(column_mass, tf.reduce_sum(codes, axis=0))[None, :]
        codes = tf.math.divide_no_nan(codes, tf.reduce_sum(codes, axis=1, keepdims=True))
    return codes


def _own_prototypes(labels, num_prototypes, prototypes_per_class):
    """`[K]` coarse class of each prototype (class by class) and the `[B, K]` mask
    of each sample's own class's prototypes."""
    owner = tf.range(num_prototypes) // prototypes_per_class
    return owner, tf.equal(tf.cast(labels, tf.int32)[:, None], owner[None, :])


def coarse_prototype_loss(queries, keys, labels, prototypes, prototypes_per_class, tau,
                          epsilon, iterations=3):
    """SwAV's swapped prediction over prototypes, within the coarse class.

    The key's codes (`coarse_sinkhorn` of its prototype similarities) are the
    target of a softmax over the query's similarities to its own class's
    prototypes: two views of one image must fall into the same sub-cluster of
    their coarse class. Unlike InfoNCE, images of one sub-cluster are pulled
    together rather than pushed apart, which is what a fine class needs.

    Args:
        queries: `[B, D]` L2-normalised online predictions.
        keys: `[B, D]` L2-normalised target projections (no gradient flows).
        labels: `[B]` int coarse labels.
        prototypes: `[K, D]` L2-normalised prototypes, `prototypes_per_class` per
            coarse class, class by class.
        prototypes_per_class: `K_c`.
        tau: temperature of the query's softmax (SwAV's 0.1).
        epsilon, iterations: of `coarse_sinkhorn`.

    Returns:
        Scalar: the mean cross-entropy over the B queries.
    """
    keys = tf.stop_gradient(tf.cast(keys, tf.float32))
    codes = coarse_sinkhorn(tf.matmul(keys, prototypes, transpose_b=True), labels,
                            prototypes_per_class, epsilon, iterations)
    _, own = _own_prototypes(labels, tf.shape(prototypes)[0], prototypes_per_class)
    logits = tf.where(own, tf.matmul(queries, prototypes, transpose_b=True) / tau, _NEG_INF)
    return tf.reduce_mean(tf.nn.softmax_cross_entropy_with_logits(labels=codes, logits=logits))


def subcluster_loss(features, labels, assignments, centroids, per_coarse, tau):
    """Cross-entropy of each feature's sub-cluster among its coarse class's centroids.

    DeepCluster-v2's loss (Caron et al., 2020), the k-means centroids as a fixed
    classifier, restricted to the coarse class: it pulls each image towards the
    centroid of its sub-cluster and away from the other sub-clusters of its own
    coarse class (`grafit_tf.subclusters`; an extension, not in the Grafit paper).

        L_i = -log softmax_{k in own(y_i)}(f_i . c_k / tau)[a_i]

    Args:
        features: `[B, F]` L2-normalised trunk features.
        labels: `[B]` int coarse labels y.
        assignments: `[B]` int sub-cluster a_i of each image, in
            [y_i K, (y_i + 1) K), or -1 (not clustered yet: no loss).
        centroids: `[C K, F]` unit centroids, class by class (no gradient flows).
        per_coarse: K.
        tau: temperature.

    Returns:
        Scalar: the mean over the images with an assignment (0 when none has).
    """
    centroids = tf.stop_gradient(tf.cast(centroids, tf.float32))
    assignments = tf.cast(assignments, tf.int32)
    _, own = _own_prototypes(labels, tf.shape(centroids)[0], per_coarse)
    logits = tf.where(own, tf.matmul(tf.cast(features, tf.float32), centroids,
                                     transpose_b=True) / tau, _NEG_INF)
    known = assignments >= 0
    per_image = tf.nn.sparse_softmax_cross_entropy_with_logits(
        labels=tf.maximum(assignments, 0), logits=logits)
    per_image = tf.where(known, per_image, tf.zeros_like(per_image))
    return tf.reduce_sum(per_image) / tf.maximum(tf.reduce_sum(tf.cast(known, tf.float32)), 1.0)


def koleo_loss(embeddings, eps=1e-8):
    """KoLeo: the Kozachenko-Leonenko differential-entropy estimator, as a loss.

    From "Spreading vectors for similarity search" (Sablayrolles, Douze, Schmid,
    Jegou, ICLR 2019), the regulariser DINOv2 puts on its retrieval feature:

        L = -mean_i log d_i,   d_i = || x_i - x_nn(i) ||,   nn(i) = argmax_{j != i} x_i . x_j

    Maximising the log distance of each point to its nearest neighbour spreads
    the batch over the sphere: it pushes the embedding away from one shared
    direction and into more of its dimensions, which a cosine nearest-neighbour
    search then uses (an extension, not in the Grafit paper).

    Args:
        embeddings: `[B, D]` L2-normalised, B >= 2 (the images of one view: two views
            of one image would be each other's nearest neighbours).
        eps: inside the square root, so that two identical points give a finite
            loss and a zero (not NaN) gradient.

    Returns:
        Scalar: the mean over the B points.
    """
    x = tf.cast(embeddings, tf.float32)
    similarity = tf.matmul(x, x, transpose_b=True)  # [B, B]
    # -3 < any cosine: a point is never its own neighbour.
    similarity = tf.linalg.set_diag(similarity, tf.fill(tf.shape(x)[:1], -3.0))
    nearest = tf.gather(x, tf.argmax(similarity, axis=1))  # The index carries no gradient.
    distance = tf.sqrt(tf.reduce_sum(tf.square(x - nearest), axis=1) + eps)
    return -tf.reduce_mean(tf.math.log(distance))


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
        onehot = onehot * (1.0 - label_smoothing) + label_smoothing / tf.cast(
            num_classes, tf.float32
        )
    return tf.reduce_mean(
        tf.nn.softmax_cross_entropy_with_logits(labels=onehot, logits=logits)
    )


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
    keys = tf.stop_gradient(keys)
    queue = tf.stop_gradient(queue)
    labels = tf.cast(labels, tf.int32)
    own = tf.reduce_sum(queries * keys, axis=1, keepdims=True)  # [B, 1]
    logits = tf.concat([own, tf.matmul(queries, queue, transpose_b=True)], axis=1) / tau
    log_prob = tf.nn.log_softmax(logits, axis=1)  # [B, 1 + Q]
    same = tf.equal(labels[:, None], tf.cast(queue_labels, tf.int32)[None, :])
    positive = tf.concat([tf.ones_like(own, tf.bool), same], axis=1)
    mask = tf.cast(positive, log_prob.dtype)
    sup = -tf.reduce_sum(log_prob * mask, axis=1) / tf.reduce_sum(mask, axis=1)
    self_term = -log_prob[:, 0]
    return tf.reduce_mean(weight * sup + (1.0 - weight) * self_term)


def augmentation_prediction_loss(predictions, params_a, params_b, crop_params=4):
    """AugSelf: regress how two views' augmentations differ from their features.

    From "Improving Transferability of Representations via Augmentation-Aware
    Self-Supervision" (Lee et al., NeurIPS 2021), an extension, not in the Grafit
    paper. An instance loss makes the trunk invariant to the augmentations; a head
    that must tell, from the features of views a and b, how a's crop and jitter
    differ from b's makes the trunk keep what those augmentations change:

        t = params_a - params_b
        L = mean_i [ mean_{k < c} (tanh p_ik - t_ik)^2 + mean_{k >= c} (tanh p_ik - t_ik)^2 ]

    the crop's and the jitter's errors averaged separately and added, as AugSelf
    weighs its crop and colour terms (c = `crop_params`).

    Args:
        predictions: `[B, P]` the head's raw outputs for (a, b) (any float dtype).
        params_a, params_b: `[B, P]` the views' draws, scaled so that their
            differences are in tanh's range [-1, 1]
            (`augment.grayscale_small_with_params`).
        crop_params: how many of the P leading entries describe the crop.

    Returns:
        Scalar: the mean over the B pairs.
    """
    target = tf.stop_gradient(tf.cast(params_a, tf.float32) - tf.cast(params_b, tf.float32))
    error = tf.square(tf.tanh(tf.cast(predictions, tf.float32)) - target)
    per_pair = tf.reduce_mean(error[:, :crop_params], axis=1)
    if error.shape[-1] > crop_params:
        per_pair += tf.reduce_mean(error[:, crop_params:], axis=1)
    return tf.reduce_mean(per_pair)
