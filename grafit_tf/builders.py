"""Assembles a `GrafitModel` and its optimizer from a `Config`, inside
`strategy.scope()` so that every variable is mirrored."""

import functools

import keras

from grafit_tf import augment, backbones, heads
from grafit_tf.memory import MemoryBank
from grafit_tf.model import GrafitModel, Objective


def objective(config, total_steps):
    """The `Objective` of `config`, with the schedule's length in optimizer steps."""
    return Objective(
        # finetune trains as the fine_ce objective: fine-label cross-entropy.
        method="fine_ce" if config.method == "finetune" else config.method,
        tau=config.tau,
        lambda_inst=config.lambda_inst,
        instance_loss=config.instance_loss,
        instance_tau=config.instance_tau,
        ema_decay=config.ema_decay,
        total_steps=max(1, total_steps),
        label_smoothing=config.label_smoothing,
    )


def build_model(config, source, total_steps, use_bn=True, sync_bn=False, init_trunk=None):
    """Builds the model for `config.method` on `source` (a `types.Source`).

    Args:
        config: the `Config`.
        source: gives the image shape, statistics, classes and training labels.
        total_steps: planned optimizer steps (EMA schedule).
        use_bn: batch norm in the trunk and heads (off for exact replica tests).
        sync_bn: synchronised batch norm across replicas.
        init_trunk: optional `fn(trunk)` that loads trained weights into the
            trunk before anything copies it (`--init_from`; `workdir.init_trunk`).
    """
    obj = objective(config, total_steps)
    shape, mean, std = source.image_shape, source.mean, source.std
    trunk = backbones.build(config, shape, mean, std, use_bn=use_bn, sync_bn=sync_bn)
    if init_trunk is not None:
        init_trunk(trunk)
    parts = {}
    if obj.nca:
        parts["knn_head"] = heads.mlp(config.proj_hidden, config.knn_dim, "knn_head",
                                      sync_bn, use_bn)
        parts["memory"] = MemoryBank(source.train.coarse, config.knn_dim, kind=config.memory,
                                     size=config.queue_size, momentum=config.memory_momentum,
                                     seed=config.seed, name="memory")
    if obj.ema_target:
        # A projection head and its EMA copy (on an EMA copy of the trunk): BYOL's
        # target network, or MoCo's key encoder for the maskcon methods, whose head is
        # MaskCon's Linear-ReLU-Linear with biases (no batch norm).
        head_bn = use_bn and not obj.maskcon
        parts["projector"] = heads.mlp(config.proj_hidden, config.proj_dim, "projector",
                                       sync_bn, head_bn)
        parts["target_projector"] = heads.mlp(config.proj_hidden, config.proj_dim,
                                              "target_projector", sync_bn, head_bn)
        parts["target_backbone"] = backbones.build(  # No --weights read: `_build` copies.
            config.replace(weights=""), shape, mean, std, use_bn=use_bn, sync_bn=sync_bn)
    if obj.instance:
        parts["predictor"] = heads.mlp(config.proj_hidden, config.proj_dim, "predictor",
                                       sync_bn, use_bn)
    if obj.maskcon:  # MoCo's FIFO queue of keys with their coarse labels.
        parts["memory"] = MemoryBank(source.train.coarse, config.proj_dim, kind="queue",
                                     size=config.queue_size, seed=config.seed, name="memory")
    if obj.cross_entropy:
        hier = source.hierarchy
        classes = hier.num_fine if config.label_level == "fine" else hier.num_coarse
        parts["classifier"] = heads.classifier(classes)
    if shape[-1] == 3:
        parts["colour"] = functools.partial(augment.colour, strength=config.jitter_strength,
                                            gamma=config.gamma_jitter)
    model = GrafitModel(trunk, obj, name="grafit", **parts)
    _build(model, shape)
    return model


def _build(model, shape):
    """Creates every variable now (needed before restoring a checkpoint)."""
    feature = model.backbone.output_shape
    for name in ("knn_head", "projector", "classifier"):
        part = getattr(model, name)
        if part is not None:
            part.build(feature)
    if model.predictor is not None:
        model.predictor.build((None, model.projector.layers[-1].units))
    if model.target_backbone is not None:
        model.target_projector.build(feature)
        # The target starts as an exact copy of the online network.
        model.target_backbone.set_weights(model.backbone.get_weights())
        model.target_projector.set_weights(model.projector.get_weights())
        model.target_backbone.trainable = False
        model.target_projector.trainable = False
    model.build((None,) + tuple(shape))


class CoupledL2SGD(keras.optimizers.SGD):
    """torch's `SGD(momentum=0.9, weight_decay=l2)`, as MaskCon trains: `l2 * w` added to
    every weight's gradient (norms and biases too), heavy-ball momentum, no Nesterov.

    Keras folds the learning rate into the velocity (`v <- 0.9 v - lr g`), torch applies
    it after (`b <- 0.9 b + g; w <- w - lr b`): the same steps at a constant rate, within
    a fraction of a step's change while the cosine schedule moves.
    """

    def __init__(self, learning_rate, l2, **kwargs):
        super().__init__(learning_rate, momentum=0.9, **kwargs)
        self.l2 = l2

    def update_step(self, gradient, variable, learning_rate):
        gradient = gradient + self.l2 * keras.ops.cast(variable, gradient.dtype)
        super().update_step(gradient, variable, learning_rate)

    def get_config(self):
        return dict(super().get_config(), l2=self.l2)


def build_optimizer(config, total_steps, steps_per_epoch):
    """AdamW or SGD (nesterov momentum 0.9) with decoupled weight decay, or torch's SGD
    with coupled L2 (`sgd_l2`); warm-up and cosine decay."""
    warmup = int(round(config.warmup_epochs * steps_per_epoch))
    warmup = min(warmup, max(0, total_steps - 1))
    schedule = keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=0.0 if warmup else config.learning_rate,
        decay_steps=max(1, total_steps - warmup),
        alpha=0.0,
        warmup_target=config.learning_rate if warmup else None,
        warmup_steps=warmup,
    )
    if config.optimizer == "sgd_l2":
        return CoupledL2SGD(schedule, config.weight_decay)
    if config.optimizer == "adamw":
        optimizer = keras.optimizers.AdamW(schedule, weight_decay=config.weight_decay)
    else:
        optimizer = keras.optimizers.SGD(schedule, momentum=0.9, nesterov=True,
                                         weight_decay=config.weight_decay)
    # No decay on normalisation parameters and biases (standard practice).
    optimizer.exclude_from_weight_decay(var_names=["bn", "bias", "gamma", "beta"])
    return optimizer
