"""Reads a work directory written by `train.py`, for resume (`check_resumable`),
`--init_from` (`init_trunk`) and the export (`read_config`, `load_embedder`).

It holds `config.json` (the run's `Config` plus `data`: what the data looked like),
`checkpoints/` and, once finished, `embedder.keras` and `metrics.json`.
"""

import json
import os

import keras
import numpy as np

from grafit_tf import builders, checkpointing
from grafit_tf.config import Config
from grafit_tf.data import hierarchy
from grafit_tf.data.types import Source, Split
from grafit_tf.errors import UserError


def read_config(workdir, flag="--workdir"):
    """The `config.json` dict of `workdir`.

    Raises:
        UserError: no such directory or file, or not JSON written by `train.py`.
    """
    path = os.path.join(workdir, "config.json")
    if not os.path.isfile(path):
        what = "no config.json" if os.path.isdir(workdir) else "no such directory"
        raise UserError(f"{flag}={workdir}: {what}; give a Grafit work directory "
                        "(train.py --workdir=...).")
    try:
        with open(path, encoding="utf-8") as f:
            saved = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e}).") from None
    if not isinstance(saved, dict) or "image_shape" not in saved.get("data", {}):
        raise UserError(f"{path}: no data.image_shape; was it written by train.py?")
    return saved


def load_embedder(workdir):
    """The finished run's `embedder.keras` (trunk + L2 normalisation).

    Raises:
        UserError: the run has not finished, or the file does not load.
    """
    path = os.path.join(workdir, "embedder.keras")
    if not os.path.isfile(path):
        raise UserError(f"{path} not found: --workdir must be a finished training run "
                        "(python train.py ... --workdir=W writes embedder.keras and config.json).")
    try:
        return keras.saving.load_model(path, compile=False)
    except Exception as e:  # Keras raises many types for a damaged archive.
        text = str(e).strip().splitlines()
        raise UserError(f"{path}: cannot load the Keras model "
                        f"({text[0] if text else type(e).__name__}).") from None


def trunk_of(embedder):
    """The trunk `keras.Model` nested in an embedder (input -> trunk -> L2)."""
    nested = [layer for layer in embedder.layers if isinstance(layer, keras.Model)]
    if not nested:
        raise UserError(f"{embedder.name}: no trunk inside the saved embedder.")
    return nested[0]


def check_resumable(config, workdir):
    """Refuses to resume a checkpointed run with other settings than it started with:
    that would mix two configurations in one model (and overwrite `config.json`)."""
    path = os.path.join(workdir, "config.json")
    has_checkpoint = checkpointing.latest(os.path.join(workdir, "checkpoints")) is not None
    if not has_checkpoint or not os.path.isfile(path):
        return
    with open(path, encoding="utf-8") as f:
        changed = config.differences(json.load(f))
    if changed:
        raise UserError(
            f"--workdir={workdir} holds a run started with other settings ("
            + "; ".join(changed) + "): use another --workdir, or delete this one to start over.")


def model_from_checkpoint(workdir, saved):
    """Rebuilds a run's whole model (EMA target and memory included) from its
    `config.json` dict `saved` (no images: only the data shapes and statistics) and
    loads the latest checkpoint of its `workdir`.

    Returns:
        `(model, step)`: the model and the step it was restored at (0: no checkpoint).
    """
    # The checkpoint holds every weight: no --init_from / --weights to load first.
    config = Config.from_dict(saved).replace(init_from="", weights="")
    data = saved["data"]
    hier = hierarchy.from_mapping(tuple(data["fine_names"]), data["coarse_map"])
    # Only shapes matter here: the memory needs its length, not real labels.
    zeros = np.zeros([data["train_examples"]], np.int32)
    split = Split(images=np.zeros([0], np.uint8), fine=zeros, coarse=zeros)
    stub = Source(name=data["name"], train=split, test=split, hierarchy=hier,
                  image_shape=tuple(data["image_shape"]), mean=tuple(data["mean"]),
                  std=tuple(data["std"]))
    model = builders.build_model(config, stub, total_steps=1)
    model.compile(optimizer=builders.build_optimizer(config, 1, 1))
    return model, checkpointing.restore(model, os.path.join(workdir, "checkpoints"))


def load_trunk(workdir, flag="--init_from"):
    """The trained trunk of `workdir`: from its `embedder.keras`, else (an unfinished
    run) from its latest checkpoint."""
    saved = read_config(workdir, flag)
    if os.path.isfile(os.path.join(workdir, "embedder.keras")):
        return trunk_of(load_embedder(workdir))
    if checkpointing.latest(os.path.join(workdir, "checkpoints")) is None:
        raise UserError(f"{flag}={workdir}: neither embedder.keras nor a checkpoint there; "
                        "train that run first (train.py --workdir=...).")
    return model_from_checkpoint(workdir, saved)[0].backbone


def check_init_from(config, channels):
    """Refuses `--init_from` early (before the new run writes anything) when it is not
    a work directory or its trunk cannot fit this run's: `init_trunk` checks again,
    weight by weight."""
    saved = read_config(config.init_from, "--init_from")
    theirs = (saved.get("backbone"), saved["data"]["image_shape"][-1])
    if theirs != (config.backbone, channels) or (
            config.backbone == "small_resnet" and saved.get("width") != config.width):
        raise UserError(
            f"--init_from={config.init_from}: its trunk (--backbone={theirs[0]} --width="
            f"{saved.get('width')}, {theirs[1]} channels) does not match this one; use the "
            "same --backbone, --width and channels.")


def init_trunk(trunk, workdir):
    """Copies the trunk trained in `workdir` into `trunk` (same architecture).

    Raises:
        UserError: `workdir` is not a Grafit work directory, or its trunk has
            another architecture (backbone, width, or number of channels).
    """
    saved = read_config(workdir, "--init_from")
    source = load_trunk(workdir)
    ours = [tuple(w.shape) for w in trunk.weights]
    theirs = [tuple(w.shape) for w in source.weights]
    if ours != theirs:
        raise UserError(
            f"--init_from={workdir}: its trunk (--backbone={saved.get('backbone')} "
            f"--width={saved.get('width')}, {saved.get('data', {}).get('image_shape')} images) "
            "does not match this one; use the same --backbone, --width and channels.")
    for target, value in zip(trunk.weights, source.weights):
        target.assign(value)
