"""Transfer learning: start a trunk from a Grafit work directory, score a classifier.

`--init_from=W` copies the trunk trained in work directory `W` into the new
model before training (any method; `--method=finetune` is the paper's transfer:
cross-entropy on the target's fine labels with a linear classifier on the
trunk). The trunk is read from `W/embedder.keras` (a finished run) or else from
W's latest checkpoint (an unfinished one), by rebuilding W's model from
`W/config.json`.

The trunk's input normalisation is a constant of the layer, not a weight: the
new trunk normalises with the target dataset's statistics.
"""

import json
import os

import keras
import numpy as np
import tensorflow as tf

from grafit_tf.errors import UserError


def _trunk_of(embedder):
    """The trunk `keras.Model` nested in an embedder (input -> trunk -> [head] -> L2)."""
    nested = [layer for layer in embedder.layers if isinstance(layer, keras.Model)]
    if not nested:
        raise UserError(f"{embedder.name}: no trunk inside the saved embedder.")
    return nested[0]


def _source_config(workdir):
    path = os.path.join(workdir, "config.json")
    if not os.path.isfile(path):
        raise UserError(f"--init_from={workdir}: no config.json; give a Grafit work directory "
                        "(train.py --workdir=...).")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _trunk_from_checkpoint(workdir, saved):
    """The trunk of W's model, rebuilt and restored from W's latest checkpoint."""
    from grafit_tf import checkpointing

    if checkpointing.latest(os.path.join(workdir, "checkpoints")) is None:
        raise UserError(f"--init_from={workdir}: neither embedder.keras nor a checkpoint there; "
                        "train that run first (train.py --workdir=...).")
    return model_from_checkpoint(workdir, saved)[0].backbone


def model_from_checkpoint(workdir, saved):
    """Rebuilds a run's whole model (EMA target and memory included) from its
    `config.json` dict `saved` and loads the latest checkpoint of its `workdir`.

    Reads no images: only the data shapes and statistics stored in `saved`.

    Returns:
        `(model, step)`: the model and the optimizer step it was restored at (0 when
        `workdir` has no checkpoint).
    """
    from grafit_tf import builders, checkpointing
    from grafit_tf.config import Config
    from grafit_tf.data import hierarchy, sources

    # The checkpoint holds every weight: no --init_from / --weights to load first.
    config = Config.from_dict(saved).replace(init_from="", weights="")
    data = saved["data"]
    fine = tuple(data["fine_names"])
    hier = hierarchy.from_mapping(fine, data["coarse_map"])
    # Only shapes matter here: the memory needs its length, not real labels.
    zeros = np.zeros([data["train_examples"]], np.int32)
    split = sources.Split(images=np.zeros([0], np.uint8), fine=zeros, coarse=zeros)
    stub = sources.Source(name=data["name"], train=split, test=split, hierarchy=hier,
                          image_shape=tuple(data["image_shape"]), mean=tuple(data["mean"]),
                          std=tuple(data["std"]))
    model = builders.build_model(config, stub, total_steps=1)
    model.compile(optimizer=builders.build_optimizer(config, 1, 1))
    return model, checkpointing.restore(model, os.path.join(workdir, "checkpoints"))


def load_trunk(workdir):
    """The trained trunk of work directory `workdir` (a `keras.Model`)."""
    if not os.path.isdir(workdir):
        raise UserError(f"--init_from={workdir}: no such directory; give a Grafit work directory.")
    saved = _source_config(workdir)
    path = os.path.join(workdir, "embedder.keras")
    if os.path.isfile(path):
        return _trunk_of(keras.saving.load_model(path, compile=False))
    return _trunk_from_checkpoint(workdir, saved)


def init_trunk(trunk, workdir):
    """Copies the trunk trained in `workdir` into `trunk` (same architecture).

    Raises:
        UserError: `workdir` is not a Grafit work directory, or its trunk has
            another architecture (backbone, width, or number of channels).
    """
    saved = _source_config(workdir)
    source = load_trunk(workdir)
    ours = [tuple(w.shape) for w in trunk.weights]
    theirs = [tuple(w.shape) for w in source.weights]
    if ours != theirs:
        raise UserError(
            f"--init_from={workdir}: its trunk (--backbone={saved.get('backbone')} "
            f"--width={saved.get('width')}, {saved.get('data', {}).get('image_shape')} images) "
            "does not match this one; use the same --backbone, --width and channels."
        )
    for target, value in zip(trunk.weights, source.weights):
        target.assign(value)


def classification_top1(model, source, batch_size=256):
    """Top-1 accuracy of `model.classifier(model.backbone(x))` on the test split.

    Args:
        model: a `GrafitModel` with a classifier over the fine classes.
        source: the `sources.Source` (test split and evaluation preprocessing).

    Returns:
        float in [0, 1].
    """
    # The same batched, in-order evaluation pass.
    from grafit_tf.trainer import embed, embedding_fn

    classify = keras.Sequential([model.backbone, model.classifier])
    logits = embed(embedding_fn(classify, source), source.test, source, batch_size)  # [N, K]
    return float(np.mean(logits.argmax(axis=1) == source.test.fine))
