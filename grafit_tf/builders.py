"""Assembles a `GrafitModel` and its optimizer from a `Config`.

Call inside `strategy.scope()` so that every variable is mirrored.
"""

import dataclasses

import keras

from grafit_tf import augment, backbones, heads, subclusters
from grafit_tf.memory import MemoryBank
from grafit_tf.model import GrafitModel, Objective


def objective(config, total_steps):
    """The `Objective` of `config`: every field of the same name copied, then the few
    that `train_step` needs in another form (optimizer steps instead of epochs)."""
    same = {f.name: getattr(config, f.name) for f in dataclasses.fields(Objective)
            if hasattr(config, f.name)}
    # Labels reach the instance loss in grafit only (`instance` is self-supervised).
    labelled = config.method == "grafit"
    return dataclasses.replace(
        Objective(**same),
        # finetune (issue 6) trains as the fine_ce objective: fine-label cross-entropy.
        method="fine_ce" if config.method == "finetune" else config.method,
        total_steps=max(1, total_steps),
        instance_negatives=config.instance_negatives if labelled else "all",
        instance_targets=config.instance_targets if labelled else "own",
        instance_positives=config.instance_positives if labelled else "own",
        nn_start_step=int(round(config.nn_start_epochs * total_steps / config.epochs)),
    )


def build_model(config, source, total_steps, use_bn=True, sync_bn=False):
    """Builds the model for `config.method` on `source` (a `sources.Source`).

    Args:
        config: the `Config`.
        source: gives the image shape, statistics, classes and training labels.
        total_steps: planned optimizer steps (EMA schedule).
        use_bn: batch norm in the trunk and heads (off for exact replica tests).
        sync_bn: synchronised batch norm across replicas.
    """
    obj = objective(config, total_steps)
    shape, mean, std = source.image_shape, source.mean, source.std
    trunk = backbones.build(config, shape, mean, std, use_bn=use_bn, sync_bn=sync_bn)
    if config.init_from:  # Issue 6: start from a Grafit run's trunk (before the target copy).
        from grafit_tf import transfer

        transfer.init_trunk(trunk, config.init_from)
    parts = {}
    if obj.nca:
        parts["knn_head"] = heads.mlp(config.proj_hidden, config.knn_dim, "knn_head",
                                      sync_bn, use_bn, config.head_layers)
        parts["memory"] = MemoryBank(source.train.coarse, config.knn_dim, kind=config.memory,
                                     size=config.queue_size, momentum=config.memory_momentum,
                                     seed=config.seed, name="memory")
    if obj.ema_target:
        # A projection head and its EMA copy (on an EMA copy of the trunk): BYOL's
        # target network, or MoCo's key encoder for grafit_maskcon.
        head = lambda name: heads.mlp(config.proj_hidden, config.proj_dim, name, sync_bn, use_bn,
                                      config.head_layers)
        parts["projector"] = head("projector")
        parts["target_projector"] = head("target_projector")
        parts["target_backbone"] = backbones.build(config, shape, mean, std, use_bn=use_bn,
                                                   sync_bn=sync_bn)
    if obj.target_keys:  # MoCo-style keys for the NCA memory: an EMA copy of the kNN head.
        parts["target_knn_head"] = heads.mlp(config.proj_hidden, config.knn_dim,
                                             "target_knn_head", sync_bn, use_bn,
                                             config.head_layers)
    if obj.instance:
        parts["predictor"] = heads.mlp(config.proj_hidden, config.proj_dim, "predictor",
                                       sync_bn, use_bn)
        if config.instance_queue:  # MoCo's queue of past target keys (random unit vectors first).
            parts["instance_queue"] = MemoryBank([], config.proj_dim, kind="queue",
                                                 size=config.instance_queue, seed=config.seed + 1,
                                                 name="instance_queue")
        if obj.instance_positives == "coarse_nn":  # NNCLR's support set, with coarse labels.
            parts["support"] = MemoryBank([], config.proj_dim, kind="queue",
                                          size=config.support_size, seed=config.seed + 2,
                                          name="support")
    if obj.prototypes:  # SwAV's prototypes, class by class.
        parts["prototypes"] = heads.Prototypes(
            source.hierarchy.num_coarse * obj.prototypes_per_coarse, config.proj_dim,
            seed=config.seed + 3, name="prototypes")
    if obj.aug_prediction:  # AugSelf: two views' features in, their draws' difference out.
        parts["aug_head"] = heads.mlp(config.proj_hidden, len(augment.VIEW_PARAMS), "aug_head",
                                      sync_bn, use_bn, hidden_layers=2)
    if obj.subclusters:  # DeepCluster within each coarse class, on the trunk feature.
        parts["subclusters"] = subclusters.Subclusters(
            source.train.coarse, source.hierarchy.num_coarse, obj.subclusters_per_coarse,
            trunk.output_shape[-1], seed=config.seed + 4, name="subclusters")
    if obj.maskcon:  # MoCo's FIFO queue of keys with their coarse labels.
        parts["memory"] = MemoryBank(source.train.coarse, config.proj_dim, kind="queue",
                                     size=config.queue_size, seed=config.seed, name="memory")
    if obj.cross_entropy:
        hier = source.hierarchy
        classes = hier.num_fine if config.label_level == "fine" else hier.num_coarse
        parts["classifier"] = heads.classifier(classes)
    model = GrafitModel(trunk, obj, embed_with_head=config.embedding == "knn_head",
                        image_shape=shape, name="grafit", **parts)
    _build(model, shape, config.num_views)
    return model


def _build(model, shape, num_views):
    """Creates every variable now (needed before restoring a checkpoint)."""
    feature = model.backbone.output_shape
    for name in ("knn_head", "projector", "classifier"):
        part = getattr(model, name)
        if part is not None:
            part.build(feature)
    if model.aug_head is not None:
        model.aug_head.build((None, 2 * feature[-1]))
    if model.predictor is not None:
        model.predictor.build((None, model.projector.layers[-1].units))
    if model.target_backbone is not None:
        model.target_projector.build(feature)
        # The target starts as an exact copy of the online network.
        model.target_backbone.set_weights(model.backbone.get_weights())
        model.target_projector.set_weights(model.projector.get_weights())
        model.target_backbone.trainable = False
        model.target_projector.trainable = False
    if model.target_knn_head is not None:
        model.target_knn_head.build(feature)
        model.target_knn_head.set_weights(model.knn_head.get_weights())
        model.target_knn_head.trainable = False
    model.build((None,) + tuple(shape))


def build_optimizer(config, total_steps, steps_per_epoch):
    """AdamW or SGD (momentum, decoupled weight decay) with warm-up + cosine."""
    warmup = int(round(config.warmup_epochs * steps_per_epoch))
    warmup = min(warmup, max(0, total_steps - 1))
    schedule = keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=0.0 if warmup else config.learning_rate,
        decay_steps=max(1, total_steps - warmup),
        alpha=0.0,
        warmup_target=config.learning_rate if warmup else None,
        warmup_steps=warmup,
    )
    if config.optimizer == "adamw":
        optimizer = keras.optimizers.AdamW(schedule, weight_decay=config.weight_decay)
    else:
        optimizer = keras.optimizers.SGD(schedule, momentum=config.momentum, nesterov=True,
                                         weight_decay=config.weight_decay)
    # No decay on normalisation parameters and biases (standard practice).
    optimizer.exclude_from_weight_decay(var_names=["bn", "bias", "gamma", "beta"])
    return optimizer


def build_embedder(model, transform="none"):
    """Trunk (+ kNN head) + L2 normalisation (+ `--embedding_transform`'s map): the model
    that is exported."""
    head = model.knn_head if model.embed_with_head else None
    return heads.embedder(model.backbone, head, model.image_shape, transform=transform != "none")
