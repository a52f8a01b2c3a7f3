"""`GrafitModel`: a `keras.Model` assembled from parts (trunk, heads, target network,
memory) built by `grafit_tf.builders`, so the same class trains Grafit and its
baselines: which losses are active follows from `Objective.method`.
"""

import dataclasses
import math

import keras
import tensorflow as tf

from grafit_tf import losses
from grafit_tf.config import MOCO_METHODS
from grafit_tf.distribute import all_gather, cross_replica_concat, num_replicas


@dataclasses.dataclass(frozen=True)
class Objective:
    """What `train_step` optimises.

    Attributes:
        method: grafit | coarse_ce | instance | fine_ce | grafit_maskcon | maskcon.
        tau: NCA temperature; T2 of maskcon's soft relations.
        lambda_inst: weight of the instance loss in `grafit`; the maskcon methods'
            `w = 1 / (1 + lambda_inst)` (`maskcon_weight`).
        instance_loss: byol | infonce (the instance term of grafit and instance).
        instance_tau: temperature of infonce and of the maskcon methods (T1).
        ema_decay: base decay of the target network, cosine-raised to 1 over
            `total_steps` (BYOL); constant for the maskcon methods (MoCo).
        total_steps: planned optimizer steps, for the EMA schedule.
        label_smoothing: for the cross-entropy methods.
    """

    method: str = "grafit"
    tau: float = 0.05
    lambda_inst: float = 1.0
    instance_loss: str = "byol"
    instance_tau: float = 0.1
    ema_decay: float = 0.99
    total_steps: int = 1
    label_smoothing: float = 0.0

    @property
    def nca(self):
        return self.method == "grafit"

    @property
    def instance(self):
        return self.method == "instance" or (self.method == "grafit" and self.lambda_inst > 0)

    @property
    def instance_weight(self):
        return 1.0 if self.method == "instance" else self.lambda_inst

    @property
    def cross_entropy(self):
        return self.method in ("coarse_ce", "fine_ce")

    @property
    def maskcon(self):
        """MaskCon's MoCo recipe (a queue of coarse-labelled keys): both its losses."""
        return self.method in MOCO_METHODS

    @property
    def maskcon_weight(self):
        """MaskCon's w in `w * L_sup + (1 - w) * L_self` (grafit_maskcon) and in its target
        mix (maskcon): Grafit's `L_sup + lambda_inst * L_self`, scaled to sum to 1."""
        return 1.0 / (1.0 + self.lambda_inst)

    @property
    def ema_target(self):
        return self.instance or self.maskcon

    def terms(self):
        """Names of the active loss terms, in the order `loss_terms` adds them."""
        active = [("nca_loss", self.nca), ("instance_loss", self.instance),
                  ("ce_loss", self.cross_entropy), ("maskcon_loss", self.maskcon)]
        return [name for name, on in active if on]


class GrafitModel(keras.Model):
    """Trains a trunk with Grafit's losses or a baseline's.

    Args:
        backbone: trunk `[N, H, W, C] -> [N, F]`.
        objective: an `Objective`.
        knn_head: `[N, F] -> [N, D]`, the NCA embedding (grafit).
        memory: a `MemoryBank`: `D`-dim embeddings (grafit) or keys (grafit_maskcon).
        projector, predictor: online heads of the instance loss (grafit_maskcon:
            the projector only).
        target_backbone, target_projector: EMA copies of backbone and projector.
        classifier: `[N, F] -> [N, K]` (cross-entropy methods).
        colour: `(views [b, V, H, W, 3], draws [b, V, 8]) -> views`, the colour jitter
            of RGB views (`augment.colour`); None: the pipeline's views are final.
    """

    def __init__(self, backbone, objective, knn_head=None, memory=None, projector=None,
                 predictor=None, target_backbone=None, target_projector=None,
                 classifier=None, colour=None, **kwargs):
        super().__init__(**kwargs)
        # In this order: Keras tracks the parts, and so orders the weights, as assigned.
        self.backbone, self.objective, self.knn_head = backbone, objective, knn_head
        self.memory, self.projector, self.predictor = memory, projector, predictor
        self.target_backbone, self.target_projector = target_backbone, target_projector
        self.classifier, self.colour = classifier, colour
        self.image_shape = tuple(backbone.input_shape[1:])
        self.trackers = {
            name: keras.metrics.Mean(name=name) for name in ["loss"] + objective.terms()
        }

    def build(self, input_shape):
        # The parts are built by their builder; nothing to create here.
        self.backbone.build(input_shape)
        self.built = True

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        # Keras's default `strategy.reduce`s one batch to trace a symbolic build, which
        # MultiWorkerMirroredStrategy cannot do for a dict batch. Nothing needs building:
        # the builder built every part and the trainer builds the optimizer.
        del iterator, data_batch

    @property
    def metrics(self):
        return list(self.trackers.values())

    def call(self, images, training=False):
        """Retrieval embedding `[N, F]` (L2-normalised) of images `[N, H, W, C]`."""
        x = self.backbone(images, training=training)
        return tf.math.l2_normalize(tf.cast(x, tf.float32), axis=1)

    def train_step(self, data):
        labels, indices, views = data["label"], data["index"], self.views(data)
        with tf.GradientTape() as tape:
            out = self.forward(views, training=True)
            terms = self.loss_terms(out, labels, indices)
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

    def views(self, data):
        """A batch's training views `[b, V, H, W, C]`, colour-jittered here (on the
        accelerator) for RGB: the input pipeline's CPU time is the scarcer."""
        return data["views"] if self.colour is None else self.colour(data["views"],
                                                                     data["colour"])

    def forward(self, views, training=True):
        """Runs every active branch on all views at once (the maskcon methods: `moco`).

        Args:
            views: `[b, V, H, W, C]`.

        Returns:
            A dict of `[V, b, ...]` float32 tensors, for the active branches:
            `knn` (normalised), `pred` and `target` (instance loss), `logits`.
        """
        if self.objective.maskcon:
            return self.moco(views, training)
        b, v = tf.shape(views)[0], views.shape[1]
        x = _view_major(views)

        def per_view(t):
            t = tf.cast(t, tf.float32)  # Losses and similarities in float32.
            return tf.reshape(t, tf.concat([[v, b], tf.shape(t)[1:]], axis=0))

        feats = self.backbone(x, training=training)
        out = {}
        if self.objective.instance:
            # The target uses batch statistics too (training=True), as in BYOL; it gets
            # no gradient.
            target = self.target_projector(self.target_backbone(x, training=True),
                                           training=True)
        if self.objective.nca:
            out["knn"] = tf.math.l2_normalize(per_view(self.knn_head(feats, training=training)), -1)
        if self.objective.instance:
            out["pred"] = per_view(self.predictor(self.projector(feats, training=training),
                                                  training=training))
            out["target"] = tf.stop_gradient(per_view(target))
        if self.objective.cross_entropy:
            out["logits"] = per_view(self.classifier(feats, training=training))
        return out

    def moco(self, views, training=True):
        """MaskCon's MoCo branch: each encoder on its own view, as MaskCon (batch-norm
        statistics never mix the two).

        Args:
            views: `[b, V, H, W, C]`: view 0 is the query, view 1 the key.

        Returns:
            `{"query": [b, P], "key": [b, P]}`, float32, L2-normalised (`key`: `key`).
        """
        query = self.projector(self.backbone(views[:, 0], training=training), training=training)
        return {"query": tf.math.l2_normalize(tf.cast(query, tf.float32), -1),
                "key": self.key(views[:, 1])}

    def key(self, images):
        """MoCo keys `[N, P]` (float32, unit, no gradient) of images `[N, H, W, C]`."""
        key = self.target_projector(self.target_backbone(images, training=True), training=True)
        return tf.stop_gradient(tf.math.l2_normalize(tf.cast(key, tf.float32), -1))

    def loss_terms(self, out, labels, indices):
        """The active losses (each a scalar mean over the local batch), by name."""
        obj, terms = self.objective, {}
        if obj.nca:
            v = out["knn"].shape[0]
            queries = tf.reshape(out["knn"], [-1, out["knn"].shape[-1]])
            terms["nca_loss"] = losses.nca_loss(
                queries, tf.tile(labels, [v]), self.memory.embeddings, self.memory.labels,
                obj.tau, exclude=tf.tile(self.memory.exclusion(indices), [v]),
                # Over the mean count of every replica: the replicas add up to one device.
                count_mean=lambda count: tf.reduce_mean(all_gather(count[None])))
        if obj.instance:
            target, instance = out["target"], losses.byol_loss
            if obj.instance_loss == "infonce":
                # Negatives from every replica's targets, as on one device (no gradient).
                target, offset = cross_replica_concat(target, axis=1)

                def instance(p, t):
                    p, t = tf.math.l2_normalize(p, -1), tf.math.l2_normalize(t, -1)
                    return losses.info_nce_loss(p, t, obj.instance_tau, offset)
            terms["instance_loss"] = obj.instance_weight * _over_view_pairs(
                out["pred"], target, instance)
        if obj.cross_entropy:
            v = out["logits"].shape[0]
            terms["ce_loss"] = losses.cross_entropy(
                tf.reshape(out["logits"], [-1, out["logits"].shape[-1]]), tf.tile(labels, [v]),
                obj.label_smoothing)
        if obj.maskcon:
            # View 0 queries, view 1 gives the key (--key_view=weak: MaskCon's weak one).
            args = (out["query"], out["key"], labels, self.memory.embeddings,
                    self.memory.labels, obj.instance_tau)
            terms["maskcon_loss"] = (
                losses.maskcon_loss(*args, obj.tau, obj.maskcon_weight)
                if obj.method == "maskcon" else
                losses.queue_contrastive_loss(*args, obj.maskcon_weight))
        return terms

    def update_state(self, out, labels, indices):
        """After the optimizer step: the memory, then the EMA target."""
        if self.objective.nca:
            self.memory.update(_mean_view(out["knn"]), labels, indices)
        if self.objective.maskcon:
            self.memory.update(out["key"], labels, indices)
        if self.objective.ema_target:
            decay = self.ema_decay()
            for online, target in self._ema_pairs():
                target.assign(decay * target + (1.0 - decay) * online)

    def _ema_pairs(self):
        """(online weight, its EMA copy's weight) of the trunk and the projector."""
        parts = [(self.backbone, self.target_backbone), (self.projector, self.target_projector)]
        return [pair for online, target in parts for pair in zip(online.weights, target.weights)]

    def ema_decay(self):
        """BYOL's schedule: base decay at step 0, cosine up to 1 at the end. MoCo
        (grafit_maskcon) keeps the base decay: its key encoder follows to the last step."""
        base = self.objective.ema_decay
        if self.objective.maskcon:
            return tf.constant(base, tf.float32)
        progress = tf.minimum(
            tf.cast(self.optimizer.iterations, tf.float32) / float(self.objective.total_steps),
            1.0)
        return 1.0 - (1.0 - base) * (tf.cos(math.pi * progress) + 1.0) / 2.0


def _log_value(value):
    """A metric for Keras's logs. Under MultiWorkerMirroredStrategy Keras reduces each
    with `strategy.reduce("MEAN", v, axis=0)`, which needs a batch axis (Keras 3.15)."""
    if isinstance(tf.distribute.get_strategy(), tf.distribute.MultiWorkerMirroredStrategy):
        return tf.reshape(value, [1])
    return value


def _view_major(views):
    """`[b, V, H, W, C]` -> `[V * b, H, W, C]`, view-major (`[V, b, ...]` recovers them)."""
    shape = tf.shape(views)
    return tf.reshape(tf.transpose(views, [1, 0, 2, 3, 4]),
                      tf.concat([[views.shape[1] * shape[0]], shape[2:]], axis=0))


def _mean_view(x):
    """`[V, b, F] -> [b, F]`: each image's views averaged, L2-normalised (a memory entry)."""
    return tf.math.l2_normalize(tf.reduce_mean(x, axis=0), axis=1)


def _over_view_pairs(pred, target, loss_fn):
    """An instance loss averaged over every ordered pair of distinct views.

    Args:
        pred: `[V, b, P]` online predictions.
        target: `[V, K, P]` target projections (K = b, or the global batch's).
        loss_fn: `(pred [b, P], target [K, P]) -> scalar`.
    """
    v = pred.shape[0]
    pairs = [(pred[i], target[j]) for i in range(v) for j in range(v) if i != j]
    return tf.add_n([loss_fn(p, t) for p, t in pairs]) / len(pairs)
