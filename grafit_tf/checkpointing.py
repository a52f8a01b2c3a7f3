"""Checkpoints every N steps and every epoch, and resume from the latest good one.

A checkpoint is the model's `.weights.h5` (every variable, the memory and the EMA
target included, plus the optimizer's state and step). `state.json` lists the last
two, newest first. Both are written under temporary names and renamed, so a run
killed at any instant leaves the previous checkpoint intact; one that cannot be
read is named and the one before it used. Weights that are not finite (a NaN loss)
are never saved.
"""

import json
import os

import keras
import numpy as np

from grafit_tf.errors import UserError

STATE = "state.json"
KEEP = 2  # Checkpoints kept: the latest and the one before, to fall back on.


def write_json(path, value):
    """Writes `value` as JSON to a temporary name, fsyncs, then renames it over `path`."""
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def saved(directory):
    """The saved checkpoints whose files exist, newest first: dicts `step`, `epoch`, `path`."""
    state_path = os.path.join(directory, STATE)
    if not os.path.isfile(state_path):
        return []
    try:
        with open(state_path, encoding="utf-8") as f:
            state = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{state_path}: not valid JSON ({e}); delete it to start over.") from None
    # Older runs wrote one checkpoint at the top level.
    entries = state.get("checkpoints", [state]) if isinstance(state, dict) else []
    return [e for e in entries if isinstance(e, dict) and "path" in e
            and os.path.isfile(os.path.join(directory, e["path"]))]


def latest(directory):
    """The newest saved checkpoint (`step`, `epoch`, `path`), or None."""
    entries = saved(directory)
    return entries[0] if entries else None


def restore(model, directory):
    """Loads the newest readable checkpoint into `model` (built, compiled).

    Returns:
        The optimizer step it was saved at, or 0 without a checkpoint.

    Raises:
        UserError: no checkpoint listed in `state.json` can be read.
    """
    entries = saved(directory)
    if not entries:
        return 0
    if not model.optimizer.built:
        model.optimizer.build(model.trainable_variables)
    bad = []
    for entry in entries:
        path = os.path.join(directory, entry["path"])
        try:
            model.load_weights(path)
        except Exception as e:  # h5py and Keras raise many types for a damaged file.
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
            print(f"warning: checkpoint {path} cannot be read ({reason}); trying the one "
                  "before it.", flush=True)
            bad.append(path)
            continue
        return int(model.optimizer.iterations.numpy())
    raise UserError(f"no checkpoint of {directory} can be read ({', '.join(bad)}): delete "
                    "the work directory's checkpoints/ to start over.")


def save(model, directory, steps_per_epoch):
    """Writes a checkpoint of `model` at its current optimizer step, keeping `KEEP`.

    Returns:
        False (and writes nothing) when a weight is not finite, else True.
    """
    if not all(np.isfinite(w).all() for w in model.get_weights()):
        return False
    os.makedirs(directory, exist_ok=True)
    step = int(model.optimizer.iterations.numpy())
    epoch, in_epoch = divmod(step, steps_per_epoch)
    # Mid-epoch checkpoints alternate between two names, so that the one before
    # the newest is never overwritten.
    name = (f"epoch-{epoch:04d}.weights.h5" if in_epoch == 0
            else f"step-{step % 2}.weights.h5")
    tmp = os.path.join(directory, "tmp.weights.h5")
    model.save_weights(tmp)
    os.replace(tmp, os.path.join(directory, name))
    entry = {"step": step, "epoch": epoch, "path": name}
    kept = [entry] + [e for e in saved(directory) if e["path"] != name][:KEEP - 1]
    write_json(os.path.join(directory, STATE), {"checkpoints": kept})
    names = {e["path"] for e in kept}
    for old in os.listdir(directory):
        if old.endswith(".weights.h5") and old not in names and old != "tmp.weights.h5":
            os.remove(os.path.join(directory, old))
    return True


class Checkpointer(keras.callbacks.Callback):
    """Saves into `directory` every `every_steps` optimizer steps (0: never) and at each
    epoch end; `enabled` is False on non-chief workers, which must not write.

    Weights that are not finite are not saved (`skipped` counts them): the trainer
    then stops with one line, and a rerun resumes from the last good checkpoint.
    """

    def __init__(self, directory, steps_per_epoch, every_steps=0, enabled=True):
        super().__init__()
        self.directory, self.steps_per_epoch = directory, steps_per_epoch
        self.every_steps, self.enabled, self.skipped = every_steps, enabled, 0

    def _save(self):
        if not save(self.model, self.directory, self.steps_per_epoch):
            self.skipped += 1
            self.model.stop_training = True

    def on_train_batch_end(self, batch, logs=None):
        if not self.enabled or not self.every_steps:
            return
        step = int(self.model.optimizer.iterations.numpy())
        if step % self.every_steps == 0 and step % self.steps_per_epoch != 0:
            self._save()

    def on_epoch_end(self, epoch, logs=None):
        if self.enabled:
            self._save()
