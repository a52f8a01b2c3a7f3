"""`GrafitModel`: a `keras.Model` assembled from injected parts.

The parts (trunk, heads, target network, memory) are built elsewhere
(`grafit_tf.builders`) and passed in, so the same class trains Grafit and its
baselines: which losses are active follows from `Objective.method`.
"""

import dataclasses
import math

import keras
import tensorflow as tf

from grafit_tf import augment, losses
from grafit_tf.distribute import num_replicas


@dataclasses.dataclass(frozen=True)
class Objective:
    """What `train_step` optimises.

    Attributes:
        method: grafit | coarse_ce | instance | fine_ce.
        tau: NCA temperature.
        lambda_inst: weight of the instance loss in `grafit`.
        ema_decay: base decay of the target network, raised to 1 by a cosine
            schedule over `total_steps` (BYOL).
        ema_schedule: cosine (BYOL's) | constant (the base decay throughout, as
            MoCo keeps it; grafit_maskcon always does).
        total_steps: planned optimizer steps, for the EMA schedule.
        label_smoothing: for the cross-entropy baselines.
        instance_loss: byol | infonce (grafit's instance term).
        instance_tau: temperature of infonce and of grafit_maskcon.
        instance_decoupled: infonce without the positive in its denominator (DCL).
        instance_negatives: all | same_coarse (infonce negatives of the query's
            coarse class only).
        instance_targets: own | coarse_soft (infonce's target spread over the
            batch's keys of the query's coarse class, MaskCon-style).
        instance_positives: own | coarse_nn (infonce's keys replaced by their
            nearest same-coarse neighbour in a support queue, NNCLR-style).
        nn_start_step: optimizer step from which coarse_nn replaces the keys
            (before it, the own keys: early neighbours are mostly noise).
        soft_target_weight, soft_target_tau: w and temperature of coarse_soft.
        maskcon_weight: w of grafit_maskcon's supervised term.
        koleo_weight: weight of the KoLeo spreading term on the retrieval
            feature (any method; 0: off).
        prototypes_per_coarse: prototypes per coarse class of the SwAV-style
            term on the instance branch (grafit; 0: off).
        prototype_weight, prototype_tau, sinkhorn_epsilon: its weight, softmax
            temperature and Sinkhorn regularisation.
        aug_pred_weight: weight of the AugSelf term, which predicts how two views'
            augmentations differ from their trunk features (0: off).
        subclusters_per_coarse: sub-clusters per coarse class of the
            DeepCluster-style term on the trunk feature (grafit; 0: off).
        subcluster_weight, subcluster_tau: its weight and softmax temperature.
        nca_keys: online | target: what the NCA memory stores, the online kNN
            head's embeddings or an EMA copy's (trunk and kNN head, MoCo keys).
    """

    method: str = "grafit"
    tau: float = 0.05
    lambda_inst: float = 1.0
    ema_decay: float = 0.99
    ema_schedule: str = "cosine"
    total_steps: int = 1
    label_smoothing: float = 0.0
    instance_loss: str = "byol"
    instance_tau: float = 0.1
    instance_decoupled: bool = False
    instance_negatives: str = "all"
    instance_targets: str = "own"
    instance_positives: str = "own"
    nn_start_step: int = 0
    soft_target_weight: float = 0.5
    soft_target_tau: float = 0.05
    maskcon_weight: float = 0.5
    koleo_weight: float = 0.0
    prototypes_per_coarse: int = 0
    prototype_weight: float = 0.5
    prototype_tau: float = 0.1
    sinkhorn_epsilon: float = 0.05
    aug_pred_weight: float = 0.0
    subclusters_per_coarse: int = 0
    subcluster_weight: float = 0.5
    subcluster_tau: float = 0.1
    nca_keys: str = "online"

    @property
    def nca(self):
        return self.method == "grafit"

    @property
    def instance(self):
        return self.method == "instance" or (self.method == "grafit" and self.lambda_inst > 0)

    @property
    def cross_entropy(self):
        return self.method in ("coarse_ce", "fine_ce")

    @property
    def maskcon(self):
        return self.method == "grafit_maskcon"

    @property
    def koleo(self):
        return self.koleo_weight > 0

    @property
    def prototypes(self):
        return self.nca and self.instance and self.prototypes_per_coarse > 0

    @property
    def aug_prediction(self):
        return self.aug_pred_weight > 0

    @property
    def subclusters(self):
        return self.nca and self.subclusters_per_coarse > 0

    @property
    def ema_target(self):
        return self.instance or self.maskcon

    @property
    def target_keys(self):
        # The keys need the instance branch's EMA trunk (the config checks it is there).
        return self.nca and self.instance and self.nca_keys == "target"

    def terms(self):
        names = []
        if self.nca:
            names.append("nca_loss")
        if self.instance:
            names.append("instance_loss")
        if self.cross_entropy:
            names.append("ce_loss")
        if self.maskcon:
            names.append("maskcon_loss")
        if self.koleo:
            names.append("koleo_loss")
        if self.prototypes:
            names.append("prototype_loss")
        if self.aug_prediction:
            names.append("aug_loss")
        if self.subclusters:
            names.append("subcluster_loss")
        return names


class GrafitModel(keras.Model):
    """Trains a trunk with Grafit's losses or a baseline's.

    Args:
        backbone: trunk `[N, H, W, C] -> [N, F]`.
        objective: an `Objective`.
        knn_head: `[N, F] -> [N, D]`, the NCA embedding (grafit).
        memory: a `MemoryBank` of `D`-dim embeddings (grafit).
        projector, predictor: BYOL online heads (instance loss).
        target_backbone, target_projector: EMA copies of backbone and projector.
        target_knn_head: EMA copy of `knn_head`, whose output on the target
            trunk is what the NCA memory stores with `nca_keys="target"` (None: the
            online kNN head's output is stored).
        classifier: `[N, F] -> [N, K]` (cross-entropy baselines).
        instance_queue: a queue `MemoryBank` of past target keys, extra negatives
            of the InfoNCE instance loss (None: in-batch negatives only).
        support: a queue `MemoryBank` of past target keys with their coarse
            labels, where `--instance_positives=coarse_nn` finds each key's
            nearest neighbour (None: off).
        prototypes: a `heads.Prototypes`, `prototypes_per_coarse` per coarse
            class, for the SwAV-style term (None: off).
        aug_head: `[N, 2F] -> [N, P]`, AugSelf's head on two views' trunk features
            (None: off).
        subclusters: a `subclusters.Subclusters`, the feature bank, assignments and
            centroids of the sub-cluster term (None: off).
        embed_with_head: `call()` returns the normalised kNN-head output instead
            of the normalised trunk feature.
        image_shape: `(H, W, C)` of the data (None: the trunk's input shape; the
            trunk takes any size when the run has local crops).
    """

    def __init__(self, backbone, objective, knn_head=None, memory=None, projector=None,
                 predictor=None, target_backbone=None, target_projector=None,
                 target_knn_head=None, classifier=None, instance_queue=None, support=None,
                 prototypes=None, aug_head=None, subclusters=None, embed_with_head=False,
                 image_shape=None, **kwargs):
        super().__init__(**kwargs)
        self.backbone = backbone
        self.objective = objective
        self.knn_head = knn_head
        self.memory = memory
        self.projector = projector
        self.predictor = predictor
        self.target_backbone = target_backbone
        self.target_projector = target_projector
        self.target_knn_head = target_knn_head
        self.classifier = classifier
        self.instance_queue = instance_queue
        self.support = support
        self.prototypes = prototypes
        self.aug_head = aug_head
        self.subclusters = subclusters
        self.embed_with_head = embed_with_head
        self.image_shape = tuple(image_shape or backbone.input_shape[1:])
        self.trackers = {
            name: keras.metrics.Mean(name=name) for name in ["loss"] + objective.terms()
        }

    def build(self, input_shape):
        # The parts are built by their builder; nothing to create here.
        self.backbone.build(input_shape)
        self.built = True

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        # Keras's default pulls one batch and `strategy.reduce`s it to trace a
        # symbolic build; MultiWorkerMirroredStrategy cannot reduce a dict
        # batch. Nothing needs building: the builder built every part and the
        # trainer builds the optimizer.
        del iterator, data_batch

    @property
    def metrics(self):
        return list(self.trackers.values())

    def call(self, images, training=False):
        """Retrieval embedding `[N, D]` (L2-normalised) of images `[N, H, W, C]`."""
        x = self.backbone(images, training=training)
        if self.embed_with_head:
            x = self.knn_head(x, training=training)
        return tf.math.l2_normalize(tf.cast(x, tf.float32), axis=1)

    def forward(self, views, training=True, local_views=None):
        """Runs every active branch on all views at once.

        Args:
            views: `[b, V, H, W, C]`.
            local_views: optional `[b, L, s, s, C]` smaller crops (`--local_crops`):
                only the online trunk, projector and predictor see them.

        Returns:
            A dict of `[V, b, ...]` float32 tensors: `knn` (normalised), `knn_key`
            (the EMA copy's, normalised; with `target_knn_head`), `pred`,
            `target`, `logits`, `feature` (the normalised trunk feature, for
            KoLeo), `trunk` (the raw trunk feature, for AugSelf), for the active
            branches, and `local_pred` `[L, b, P]` with local views.
        """
        b, v = tf.shape(views)[0], views.shape[1]
        x = _view_major(views)

        def per_view(t, views=v):
            t = tf.cast(t, tf.float32)  # Losses and similarities in float32.
            return tf.reshape(t, tf.concat([[views, b], tf.shape(t)[1:]], axis=0))

        feats = self.backbone(x, training=training)
        out = {}
        if self.objective.koleo or self.objective.subclusters:
            # Per view: the retrieval embedding with --embedding=trunk.
            out["feature"] = tf.math.l2_normalize(per_view(feats), -1)
        if self.objective.aug_prediction:
            out["trunk"] = per_view(feats)
        if self.objective.nca:
            out["knn"] = tf.math.l2_normalize(per_view(self.knn_head(feats, training=training)), -1)
        if self.objective.instance:
            out["pred"] = per_view(self.predictor(self.projector(feats, training=training),
                                                  training=training))
            # The target uses batch statistics too (training=True), as in BYOL;
            # it gets no gradient.
            target_feats = self.target_backbone(x, training=True)
            target = self.target_projector(target_feats, training=True)
            out["target"] = tf.stop_gradient(per_view(target))
            if self.target_knn_head is not None:  # The memory's keys, from the same EMA trunk.
                key = self.target_knn_head(target_feats, training=True)
                out["knn_key"] = tf.stop_gradient(tf.math.l2_normalize(per_view(key), -1))
            if local_views is not None:
                # A separate trunk call: another input size (and its own batch statistics).
                local = self.backbone(_view_major(local_views), training=training)
                local = self.predictor(self.projector(local, training=training), training=training)
                out["local_pred"] = per_view(local, views=local_views.shape[1])
        if self.objective.cross_entropy:
            out["logits"] = per_view(self.classifier(feats, training=training))
        if self.objective.maskcon:
            out["query"] = tf.math.l2_normalize(
                per_view(self.projector(feats, training=training)), -1)
            key = self.target_projector(self.target_backbone(x, training=True), training=True)
            out["key"] = tf.stop_gradient(tf.math.l2_normalize(per_view(key), -1))
        return out

    def loss_terms(self, out, labels, indices, aug_params=None):
        """The active losses (each a scalar mean over the local batch).

        `aug_params`: `[b, V, P]` the views' augmentation draws (AugSelf only).
        """
        terms = {}
        if self.objective.nca:
            v = out["knn"].shape[0]
            queries = tf.reshape(out["knn"], [-1, out["knn"].shape[-1]])
            terms["nca_loss"] = losses.nca_loss(
                queries, tf.tile(labels, [v]), self.memory.embeddings, self.memory.labels,
                self.objective.tau, exclude=tf.tile(self.memory.exclusion(indices), [v]))
        if self.objective.instance:
            terms["instance_loss"] = self.objective_weight() * _over_view_pairs(
                out["pred"], out["target"], self._instance_fn(labels), out.get("local_pred"))
        if self.objective.cross_entropy:
            v = out["logits"].shape[0]
            terms["ce_loss"] = losses.cross_entropy(
                tf.reshape(out["logits"], [-1, out["logits"].shape[-1]]), tf.tile(labels, [v]),
                self.objective.label_smoothing)
        if self.objective.maskcon:
            # View 0 queries, view 1 is the key (MaskCon's strong / weak pair).
            terms["maskcon_loss"] = losses.queue_contrastive_loss(
                out["query"][0], out["key"][1], labels, self.memory.embeddings,
                self.memory.labels, self.objective.instance_tau, self.objective.maskcon_weight)
        if self.objective.prototypes:
            obj, prototypes = self.objective, self.prototypes.unit()

            def swapped(p, t):  # View a predicts view b's codes (SwAV's swapped prediction).
                return losses.coarse_prototype_loss(
                    tf.math.l2_normalize(p, -1), tf.math.l2_normalize(t, -1), labels,
                    prototypes, obj.prototypes_per_coarse, obj.prototype_tau,
                    obj.sinkhorn_epsilon)
            # Under a strategy the codes are balanced within each replica's batch.
            terms["prototype_loss"] = obj.prototype_weight * _over_view_pairs(
                out["pred"], out["target"], swapped)
        if self.objective.koleo:
            # Within each view: two views of one image would be each other's neighbours.
            # Under a strategy the neighbour is searched in the replica's batch, as DINOv2 does.
            terms["koleo_loss"] = self.objective.koleo_weight * _over_views(
                out["feature"], losses.koleo_loss)
        if self.objective.aug_prediction:
            params = tf.transpose(aug_params, [1, 0, 2])  # [V, b, P], as the views.
            trunk = out["trunk"]

            def difference(a, b):  # The head sees (a, b) and must say how a differs from b.
                pred = self.aug_head(tf.concat([trunk[a], trunk[b]], -1), training=True)
                return losses.augmentation_prediction_loss(pred, params[a], params[b],
                                                           augment.CROP_PARAMS)
            v = trunk.shape[0]
            pairs = [(a, b) for a in range(v) for b in range(v) if a != b]
            terms["aug_loss"] = self.objective.aug_pred_weight * tf.add_n(
                [difference(a, b) for a, b in pairs]) / len(pairs)
        if self.objective.subclusters:
            obj, state = self.objective, self.subclusters
            assigned = tf.gather(state.assignments, indices)
            terms["subcluster_loss"] = obj.subcluster_weight * _over_views(
                out["feature"], lambda f: losses.subcluster_loss(
                    f, labels, assigned, state.centroids, obj.subclusters_per_coarse,
                    obj.subcluster_tau))
        return terms

    def _instance_fn(self, labels):
        if self.objective.instance_loss == "infonce":
            obj = self.objective
            queue = None if self.instance_queue is None else self.instance_queue.embeddings
            same = labels if obj.instance_negatives == "same_coarse" else None

            def loss(p, t):
                t = tf.math.l2_normalize(t, -1)
                if self.support is not None:
                    own = t

                    def nearest():
                        return losses.coarse_nearest_keys(own, labels, self.support.embeddings,
                                                          self.support.labels)
                    if obj.nn_start_step:
                        # Before the start step, skip the [B, support] search, not just its result.
                        t = tf.cond(self.optimizer.iterations >= obj.nn_start_step, nearest,
                                    lambda: own)
                    else:
                        t = nearest()
                soft = None
                if obj.instance_targets == "coarse_soft":
                    soft = losses.coarse_soft_targets(t, labels, obj.soft_target_tau,
                                                      obj.soft_target_weight)
                return losses.info_nce_loss(tf.math.l2_normalize(p, -1), t, obj.instance_tau,
                                            negatives=queue, labels=same, targets=soft,
                                            decoupled=obj.instance_decoupled)
            return loss
        return losses.byol_loss

    def objective_weight(self):
        return 1.0 if self.objective.method == "instance" else self.objective.lambda_inst

    def train_step(self, data):
        labels, indices = data["label"], data["index"]
        with tf.GradientTape() as tape:
            out = self.forward(data["views"], training=True, local_views=data.get("local_views"))
            terms = self.loss_terms(out, labels, indices, data.get("aug_params"))
            loss = tf.add_n(list(terms.values()))
            # The optimizer sums gradients over replicas: scale to a global mean.
            # scale_loss: the loss scale of mixed_float16 (identity otherwise).
            scaled = self.optimizer.scale_loss(loss / num_replicas())
        grads = tape.gradient(scaled, self.trainable_variables)
        self.optimizer.apply(grads, self.trainable_variables)
        self.update_state(out, labels, indices)
        for name, value in dict(terms, loss=loss).items():
            self.trackers[name].update_state(value)
        return {name: _log_value(t.result()) for name, t in self.trackers.items()}

    def update_state(self, out, labels, indices):
        """After the optimizer step: the memory, then the EMA target."""
        if self.objective.nca:
            self.memory.update(_mean_view(out.get("knn_key", out["knn"])), labels, indices)
        if self.objective.maskcon:
            self.memory.update(out["key"][1], labels, indices)
        if self.subclusters is not None:  # The views' mean trunk feature, re-clustered later.
            self.subclusters.bank.update(_mean_view(out["feature"]), labels, indices)
        if self.support is not None:
            # One view's keys, as NNCLR: one entry per image.
            self.support.update(tf.math.l2_normalize(out["target"][0], -1), labels, indices)
        if self.instance_queue is not None:
            # Every view's target key joins the queue (after this step's loss used it).
            v, width = out["target"].shape[0], out["target"].shape[-1]
            keys = tf.math.l2_normalize(tf.reshape(out["target"], [-1, width]), -1)
            self.instance_queue.update(keys, tf.tile(labels, [v]), tf.tile(indices, [v]))
        if self.objective.ema_target:
            decay = self.ema_decay()
            for online, target in self._ema_pairs():
                target.assign(decay * target + (1.0 - decay) * online)

    def _ema_pairs(self):
        """(online weight, its EMA copy's weight) of the trunk, the projector and, with
        `target_knn_head`, the kNN head."""
        parts = [(self.backbone, self.target_backbone), (self.projector, self.target_projector)]
        if self.target_knn_head is not None:
            parts.append((self.knn_head, self.target_knn_head))
        return [pair for online, target in parts for pair in zip(online.weights, target.weights)]

    def ema_decay(self):
        """BYOL's schedule: base decay at step 0, cosine up to 1 at the end.

        MoCo (grafit_maskcon) and `ema_schedule="constant"` keep the base decay:
        the target then keeps following the online network to the last step,
        where the cosine schedule all but freezes it.
        """
        base = self.objective.ema_decay
        if self.objective.maskcon or self.objective.ema_schedule == "constant":
            return tf.constant(base, tf.float32)
        progress = tf.minimum(
            tf.cast(self.optimizer.iterations, tf.float32) / float(self.objective.total_steps),
            1.0)
        return 1.0 - (1.0 - base) * (tf.cos(math.pi * progress) + 1.0) / 2.0


def _log_value(value):
    """A metric for Keras's logs.

    Under MultiWorkerMirroredStrategy Keras reduces each logged value with
    `strategy.reduce("MEAN", v, axis=0)`, which needs a batch axis: give
    scalars one there (Keras 3.15).
    """
    if isinstance(tf.distribute.get_strategy(), tf.distribute.MultiWorkerMirroredStrategy):
        return tf.reshape(value, [1])
    return value


def _view_major(views):
    """`[b, V, H, W, C]` -> `[V * b, H, W, C]`, view-major: a reshape to `[V, b, ...]`
    recovers the views."""
    shape = tf.shape(views)
    return tf.reshape(tf.transpose(views, [1, 0, 2, 3, 4]),
                      tf.concat([[views.shape[1] * shape[0]], shape[2:]], axis=0))


def _over_views(x, loss_fn):
    """A loss averaged over the views of `x` `[V, b, F]`, each `loss_fn([b, F]) -> scalar`."""
    return tf.add_n([loss_fn(x[i]) for i in range(x.shape[0])]) / x.shape[0]


def _mean_view(x):
    """`[V, b, F] -> [b, F]`: each image's views averaged, L2-normalised (a memory entry)."""
    return tf.math.l2_normalize(tf.reduce_mean(x, axis=0), axis=1)


def _over_view_pairs(pred, target, loss_fn, local_pred=None):
    """An instance loss averaged over every ordered pair of distinct views.

    With local crops (multi-crop, as in SwAV / DINO), each local view's prediction
    is also paired with every global view's target; targets are global views only.

    Args:
        pred: `[V, b, P]` online predictions.
        target: `[V, b, P]` target projections.
        loss_fn: `(pred [b, P], target [b, P]) -> scalar`.
        local_pred: optional `[L, b, P]` online predictions of the local views.
    """
    v = pred.shape[0]
    pairs = [(pred[i], target[j]) for i in range(v) for j in range(v) if i != j]
    if local_pred is not None:
        pairs += [(local_pred[k], target[j]) for k in range(local_pred.shape[0])
                  for j in range(v)]
    return tf.add_n([loss_fn(p, t) for p, t in pairs]) / len(pairs)
