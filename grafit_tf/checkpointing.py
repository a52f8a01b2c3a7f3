"""Checkpoints every N steps and every epoch, and resume from the latest.

A checkpoint is the model's `.weights.h5` (every layer's variables, including
the memory and the EMA target, plus the optimizer's state and step counter)
and `state.json` naming it. Both are written to temporary names and renamed,
so a run killed at any instant leaves the previous checkpoint intact.
"""

import json
import os

import keras

STATE = "state.json"


def write_json(path, value):
    """Writes `value` as JSON to a temporary name, fsyncs, then renames it over `path`."""
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def latest(directory):
    """The saved state dict (`step`, `epoch`, `path`), or None."""
    state_path = os.path.join(directory, STATE)
    if not os.path.isfile(state_path):
        return None
    with open(state_path, encoding="utf-8") as f:
        state = json.load(f)
    if not os.path.isfile(os.path.join(directory, state["path"])):
        return None
    return state


def restore(model, directory):
    """Loads the latest checkpoint into `model` (built, compiled). Returns the step, or 0."""
    state = latest(directory)
    if state is None:
        return 0
    if not model.optimizer.built:
        model.optimizer.build(model.trainable_variables)
    model.load_weights(os.path.join(directory, state["path"]))
    return int(model.optimizer.iterations.numpy())


def save(model, directory, steps_per_epoch, keep_epochs=2):
    """Writes a checkpoint of `model` at its current optimizer step."""
    os.makedirs(directory, exist_ok=True)
    step = int(model.optimizer.iterations.numpy())
    epoch, in_epoch = divmod(step, steps_per_epoch)
    name = f"epoch-{epoch:04d}.weights.h5" if in_epoch == 0 else "latest.weights.h5"
    tmp = os.path.join(directory, "tmp.weights.h5")
    model.save_weights(tmp)
    os.replace(tmp, os.path.join(directory, name))
    write_json(os.path.join(directory, STATE), {"step": step, "epoch": epoch, "path": name})
    epochs = sorted(f for f in os.listdir(directory) if f.startswith("epoch-"))
    for old in epochs[:-keep_epochs]:
        if old != name:
            os.remove(os.path.join(directory, old))


class Checkpointer(keras.callbacks.Callback):
    """Saves every `every_steps` optimizer steps (0: never) and at each epoch end.

    Args:
        directory: where checkpoints go.
        steps_per_epoch: for naming epoch checkpoints.
        every_steps: step interval, or 0.
        enabled: False on non-chief workers, which must not write.
    """

    def __init__(self, directory, steps_per_epoch, every_steps=0, enabled=True):
        super().__init__()
        self.directory = directory
        self.steps_per_epoch = steps_per_epoch
        self.every_steps = every_steps
        self.enabled = enabled

    def on_train_batch_end(self, batch, logs=None):
        if not self.enabled or not self.every_steps:
            return
        step = int(self.model.optimizer.iterations.numpy())
        if step % self.every_steps == 0 and step % self.steps_per_epoch != 0:
            save(self.model, self.directory, self.steps_per_epoch)

    def on_epoch_end(self, epoch, logs=None):
        if self.enabled:
            save(self.model, self.directory, self.steps_per_epoch)
