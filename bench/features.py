"""The retrieval features of a restored run that bench/retrieval_features.py compares.

No flags here, so tests can import it beside the entry points' flags. Feature names:
`trunk` (the pooled last stage, the exported embedding), `target_trunk` (the EMA target
trunk's), `trunk_flip` (mean with the mirror image's), `stage_<i>` (stage `i` alone,
0 the finest), `stages_<i>_<j>...` (a hypercolumn of those stages), and the heads on the
trunk feature, where the run has them: `knn_head` (grafit's NCA head), `projector` and
`predictor` (the instance branch's).
"""

import json
import os
import re

import numpy as np

from grafit_tf import embedding_transform

FEATURES = ("trunk", "target_trunk", "trunk_flip", "stage_0", "stage_1", "stages_1_2",
            "stages_0_1_2", "knn_head", "projector", "predictor")
HEADS = ("knn_head", "projector", "predictor")
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


def embed_outputs(model, splits, source, flip=False):
    """`model`'s outputs on each split, in order, by `trainer.embed` (evaluation
    preprocessing), traced once for all splits; with `flip`, on the mirror images.

    Returns:
        Per split, a list with one `[N, D_k]` float32 array per output of `model`.
    """
    import tensorflow as tf

    from grafit_tf import trainer

    spec = tf.TensorSpec([None, *source.image_shape], tf.float32)

    @tf.function(input_signature=[spec])
    def fn(x):  # [B, H, W, C] -> [B, sum D_k]: the outputs side by side.
        if flip:
            x = tf.reverse(x, axis=[2])  # Mirror the width.
        outs = tf.nest.flatten(model(x, training=False))
        return tf.concat([tf.cast(o, tf.float32) for o in outs], axis=1)

    cuts = np.cumsum([o.shape[-1] for o in model.outputs])[:-1]
    return [np.split(trainer.embed(fn, split, source), cuts, axis=1) for split in splits]


def restore_run(workdir):
    """The model of a finished run, restored from its last checkpoint (which holds the
    EMA target trunk, the exported embedder does not).

    Raises:
        SystemExit: the last checkpoint is not at the end of training.
    """
    from grafit_tf import transfer
    from grafit_tf.config import Config
    from grafit_tf.data import pipeline

    with open(os.path.join(workdir, "config.json"), encoding="utf-8") as f:
        saved = json.load(f)
    model, step = transfer.model_from_checkpoint(workdir, saved)
    config = Config.from_dict(saved)
    spe = pipeline.steps_per_epoch(saved["data"]["train_examples"], config.batch_size)
    end = spe * config.epochs
    if step != end:
        raise SystemExit(f"{workdir}: its last checkpoint is at step {step}, not the end of "
                         f"training ({end}).")
    return model


def plain_trunk_config(flagfile, overrides=()):
    """The `Config` that `flagfile` and then `overrides` resolve to, checked to
    retrieve with the plain pooled trunk feature (what these benches re-derive
    from the restored weights).

    Raises:
        SystemExit: another `--embedding` or an `--embedding_transform`.
    """
    from bench.runs import resolved_config

    config = resolved_config([f"--flagfile={flagfile}", *overrides])
    if config.embedding != "trunk" or config.embedding_transform != "none":
        raise SystemExit(f"{flagfile}: score runs whose embedding is the plain trunk feature.")
    return config


def restore_quality_run(flagfile, root, method, seed, overrides=()):
    """`(model, workdir)` of `bench/quality.py`'s finished run `<root>/<method>_seed<seed>`,
    checked to have been trained with `flagfile`'s settings and `overrides` (its
    `--override` flags), restored by `restore_run`."""
    from bench.runs import finished_quality_run

    workdir = finished_quality_run(flagfile, root, method, seed, overrides)
    return restore_run(workdir), workdir


def heads_model(model, names):
    """`keras.Model` `[N, H, W, C] -> [[N, D_1], ...]`: the online trunk, then each head
    of `names` (of `HEADS`, all of which `model` has) in order; the predictor on the
    projector's output, as in training."""
    import keras

    inputs = keras.Input(model.backbone.input_shape[1:])
    feats = model.backbone(inputs)
    outs = [model.predictor(model.projector(feats)) if name == "predictor"
            else getattr(model, name)(feats) for name in names]
    return keras.Model(inputs, outs, name="heads")


def features_of(model, source, names):
    """`{name: ([N, D] train, [Q, D] test)}` L2-normalised, for the `names` this model
    has (`target_trunk` only where there is an EMA target trunk, the heads only where
    the method trains them)."""
    target = getattr(model, "target_backbone", None)
    splits = (source.train, source.test)
    # Per split, a list per stage.
    online = embed_outputs(pooled_stages_model(model.backbone), splits, source)
    out = {}
    heads = [n for n in HEADS if n in names and getattr(model, n, None) is not None]
    if heads:  # One pass over the data for every head.
        per_split = embed_outputs(heads_model(model, heads), splits, source)
        for i, name in enumerate(heads):
            out[name] = tuple(combine([o[i]]) for o in per_split)
    for name in names:
        idx = feature_stages(name)
        if name == "trunk":
            out[name] = tuple(combine(o[-1:]) for o in online)
        elif idx is not None:
            out[name] = tuple(combine([o[i] for i in idx]) for o in online)
        elif name == "trunk_flip":
            flipped = embed_outputs(model.backbone, splits, source, flip=True)
            out[name] = tuple(combine([embedding_transform.normalise(o[-1])
                                       + embedding_transform.normalise(f[0])])
                              for o, f in zip(online, flipped))
        elif name == "target_trunk":
            if target is not None:
                out[name] = tuple(combine(t) for t in embed_outputs(target, splits, source))
        elif name in HEADS:
            pass  # Above, where the run has the head.
        else:
            raise SystemExit(f"--features: unknown feature {name!r} (see FEATURES).")
    return out
