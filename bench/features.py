"""The retrieval features of a restored run that bench/retrieval_features.py compares.

No flags here, so tests can import it beside the entry points' flags. Feature names:
`trunk` (the pooled last stage, the exported embedding), `target_trunk` (the EMA target
trunk's), `trunk_flip` (mean with the mirror image's), `stage_<i>` (stage `i` alone,
0 the finest), `stages_<i>_<j>...` (a hypercolumn of those stages).
"""

import json
import os
import re

import numpy as np

from grafit_tf import embedding_transform

FEATURES = ("trunk", "target_trunk", "trunk_flip", "stage_0", "stage_1", "stages_1_2",
            "stages_0_1_2")
_STAGES = re.compile(r"^stages?((?:_\d+)+)$")
_BLOCK_OUT = re.compile(r"^s(\d+)b(\d+)_out$")


def stage_outputs(trunk):
    """The output tensor of each stage's last block, finest stage first.

    Args:
        trunk: a `backbones` ResNet (`small_resnet`, `resnet18_small`), whose blocks are
            named `s<stage>b<block>_*`.

    Returns:
        A list of `[N, h, w, C_s]` symbolic tensors, one per stage.

    Raises:
        SystemExit: the trunk has no such blocks (another backbone).
    """
    last = {}
    for layer in trunk.layers:
        match = _BLOCK_OUT.match(layer.name)
        if match:
            stage, block = int(match.group(1)), int(match.group(2))
            if block >= last.get(stage, (-1, None))[0]:
                last[stage] = (block, layer.output)
    if not last:
        raise SystemExit(f"{trunk.name}: no `s<i>b<j>_out` blocks; the stage features need a "
                         "ResNet trunk of grafit_tf.backbones (small_resnet, resnet18_small).")
    return [last[s][1] for s in sorted(last)]


def feature_stages(name):
    """The stage indices of a `stage_<i>` / `stages_<i>_<j>...` feature, else None."""
    match = _STAGES.match(name)
    return [int(i) for i in match.group(1).split("_")[1:]] if match else None


def pooled_stages_model(trunk):
    """`keras.Model` `[N, H, W, C] -> [[N, C_0], [N, C_1], ...]`: every stage's pooled output."""
    import keras

    outs = [keras.layers.GlobalAveragePooling2D(name=f"pool_stage{i}")(t)
            for i, t in enumerate(stage_outputs(trunk))]
    return keras.Model(trunk.input, outs, name=f"{trunk.name}_stages")


def combine(parts):
    """`[N, D_1], [N, D_2], ... -> [N, sum D]`: each part L2-normalised, concatenated,
    normalised again, so that every stage weighs the same in the cosine similarity."""
    return embedding_transform.normalise(
        np.concatenate([embedding_transform.normalise(p) for p in parts], axis=1))


def embed_outputs(model, split, source, flip=False, batch_size=512):
    """`model`'s outputs (a list of `[N, D_k]` float32) on `split` in order, evaluation
    preprocessing; with `flip`, on the mirror images."""
    import tensorflow as tf

    from grafit_tf.data import pipeline

    spec = tf.TensorSpec([None, *source.image_shape], tf.float32)

    @tf.function(input_signature=[spec])
    def fn(x):
        if flip:
            x = tf.reverse(x, axis=[2])  # [N, H, W, C]: mirror the width.
        out = model(x, training=False)
        return [tf.cast(o, tf.float32) for o in (out if isinstance(out, list) else [out])]

    batches = [[o.numpy() for o in fn(b)] for b in pipeline.eval_dataset(split, source, batch_size)]
    return [np.concatenate([b[k] for b in batches]) for k in range(len(batches[0]))]


def restore_run(workdir, source):
    """The model of a finished run, built from its `config.json` and restored from its
    last checkpoint (which holds the EMA target trunk, the exported embedder does not)."""
    from grafit_tf import builders, checkpointing
    from grafit_tf.config import Config
    from grafit_tf.data import pipeline

    with open(os.path.join(workdir, "config.json"), encoding="utf-8") as f:
        stored = json.load(f)
    config = Config.from_dict({k: v for k, v in stored.items() if k in Config.__dataclass_fields__})
    spe = pipeline.steps_per_epoch(len(source.train), config.batch_size)
    model = builders.build_model(config, source, spe * config.epochs)
    model.compile(optimizer=builders.build_optimizer(config, spe * config.epochs, spe),
                  jit_compile=False)
    model.optimizer.build(model.trainable_variables)
    step = checkpointing.restore(model, os.path.join(workdir, "checkpoints"))
    if step != spe * config.epochs:
        raise SystemExit(f"{workdir}: its last checkpoint is at step {step}, not the end of "
                         f"training ({spe * config.epochs}).")
    return model


def features_of(model, source, names):
    """`{name: ([N, D] train, [Q, D] test)}` L2-normalised, for the `names` this model
    has (`target_trunk` only where there is an EMA target trunk)."""
    target = getattr(model, "target_backbone", None)
    stages = pooled_stages_model(model.backbone)
    splits = (source.train, source.test)
    online = [embed_outputs(stages, s, source) for s in splits]  # Per split: a list per stage.
    out = {}
    for name in names:
        idx = feature_stages(name)
        if name == "trunk":
            out[name] = tuple(combine(o[-1:]) for o in online)
        elif idx is not None:
            out[name] = tuple(combine([o[i] for i in idx]) for o in online)
        elif name == "trunk_flip":
            flipped = [embed_outputs(model.backbone, s, source, flip=True)[0] for s in splits]
            out[name] = tuple(combine([embedding_transform.normalise(o[-1])
                                       + embedding_transform.normalise(f)])
                              for o, f in zip(online, flipped))
        elif name == "target_trunk":
            if target is not None:
                out[name] = tuple(combine(embed_outputs(target, s, source)) for s in splits)
        else:
            raise SystemExit(f"--features: unknown feature {name!r} (see FEATURES).")
    return out
