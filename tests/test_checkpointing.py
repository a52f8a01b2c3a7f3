"""Checkpoints: the last two are kept, a damaged one falls back to the one before, and
weights that are not finite are never saved."""

import json
import os

import keras
import numpy as np
import pytest

from grafit_tf import checkpointing
from grafit_tf.errors import UserError


def _model(value=1.0):
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    model.optimizer.build(model.trainable_variables)
    model.set_weights([np.full((3, 2), value, np.float32), np.zeros(2, np.float32)])
    return model


def _at_step(model, step, value):
    model.optimizer.iterations.assign(step)
    model.layers[0].kernel.assign(np.full((3, 2), value, np.float32))


def _kernel(model):
    return float(model.layers[0].kernel.numpy()[0, 0])


def test_the_last_two_checkpoints_are_kept(tmp_path):
    model, directory = _model(), str(tmp_path)
    for step, value in ((10, 1.0), (15, 2.0), (20, 3.0), (25, 4.0)):
        _at_step(model, step, value)
        assert checkpointing.save(model, directory, steps_per_epoch=10)
    assert [e["step"] for e in checkpointing.saved(directory)] == [25, 20]
    assert sorted(f for f in os.listdir(directory) if f.endswith(".h5")) == [
        "epoch-0002.weights.h5", "step-1.weights.h5"]
    again = _model(0.0)
    assert checkpointing.restore(again, directory) == 25 and _kernel(again) == 4.0


def test_a_truncated_checkpoint_falls_back_to_the_one_before(tmp_path, capsys):
    model, directory = _model(), str(tmp_path)
    for step, value in ((10, 1.0), (20, 2.0)):
        _at_step(model, step, value)
        checkpointing.save(model, directory, steps_per_epoch=10)
    newest = os.path.join(directory, "epoch-0002.weights.h5")
    with open(newest, "r+b") as f:
        f.truncate(os.path.getsize(newest) // 2)
    again = _model(0.0)
    assert checkpointing.restore(again, directory) == 10 and _kernel(again) == 1.0
    assert newest in capsys.readouterr().out
    # Neither readable: one line naming them.
    older = os.path.join(directory, "epoch-0001.weights.h5")
    with open(older, "wb") as f:
        f.write(b"\0" * 10)
    with pytest.raises(UserError, match="no checkpoint") as e:
        checkpointing.restore(_model(0.0), directory)
    assert newest in str(e.value) and older in str(e.value) and "\n" not in str(e.value)


def test_weights_that_are_not_finite_are_never_saved(tmp_path):
    model, directory = _model(), str(tmp_path)
    _at_step(model, 10, 1.0)
    assert checkpointing.save(model, directory, steps_per_epoch=10)
    _at_step(model, 20, float("nan"))
    assert not checkpointing.save(model, directory, steps_per_epoch=10)
    assert [e["step"] for e in checkpointing.saved(directory)] == [10]
    assert not os.path.exists(os.path.join(directory, "epoch-0002.weights.h5"))


def test_a_state_file_of_an_older_run_still_resumes(tmp_path):
    """Runs before the last-two list wrote one checkpoint at the top level."""
    model, directory = _model(), str(tmp_path)
    _at_step(model, 10, 5.0)
    model.save_weights(os.path.join(directory, "epoch-0001.weights.h5"))
    with open(os.path.join(directory, checkpointing.STATE), "w") as f:
        json.dump({"step": 10, "epoch": 1, "path": "epoch-0001.weights.h5"}, f)
    again = _model(0.0)
    assert checkpointing.restore(again, directory) == 10 and _kernel(again) == 5.0
