"""Transfer (issue 6): --init_from a Grafit work directory, and --method=finetune."""

import json
import os
import shutil

import keras
import numpy as np
import pytest
import tensorflow_datasets as tfds

from grafit_tf import builders, trainer, transfer
from grafit_tf.data import sources
from grafit_tf.errors import UserError


def saved_trunk_weights(workdir):
    embedder = keras.saving.load_model(os.path.join(workdir, "embedder.keras"), compile=False)
    return [w.numpy() for w in transfer._trunk_of(embedder).weights]


def test_init_from_copies_the_trained_trunk(tiny_config, tiny_workdir):
    config = tiny_config.replace(method="finetune", init_from=tiny_workdir, num_views=1)
    source = sources.load(config.replace(max_train_examples=64, max_eval_examples=8))
    model = builders.build_model(config, source, total_steps=1)
    assert model.classifier is not None and model.memory is None
    want = saved_trunk_weights(tiny_workdir)
    got = [w.numpy() for w in model.backbone.weights]
    assert len(got) == len(want)
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a, b)


def test_init_from_an_unfinished_run_reads_its_checkpoint(tiny_workdir, tmp_path):
    partial = tmp_path / "partial"
    shutil.copytree(tiny_workdir, partial)
    os.remove(partial / "embedder.keras")  # As if the run had stopped after its checkpoint.
    trunk = transfer.load_trunk(str(partial))
    for a, b in zip([w.numpy() for w in trunk.weights], saved_trunk_weights(tiny_workdir)):
        np.testing.assert_array_equal(a, b)


def test_init_from_errors(tiny_config, tiny_workdir, tmp_path):
    source = sources.load(tiny_config.replace(max_train_examples=64, max_eval_examples=8))
    with pytest.raises(UserError, match="--width"):
        builders.build_model(tiny_config.replace(init_from=tiny_workdir, width=4), source, 1)
    with pytest.raises(UserError, match="no such directory"):
        transfer.load_trunk(str(tmp_path / "absent"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="config.json"):
        transfer.load_trunk(str(tmp_path / "empty"))
    shutil.copy(os.path.join(tiny_workdir, "config.json"), tmp_path / "empty")
    with pytest.raises(UserError, match="train that run first"):
        transfer.load_trunk(str(tmp_path / "empty"))


def test_finetune_from_a_grafit_run(tiny_config, tiny_workdir, tmp_path):
    config = tiny_config.replace(method="finetune", init_from=tiny_workdir, num_views=1,
                                 max_train_examples=256, max_eval_examples=128)
    config.validate()
    metrics = trainer.train_and_evaluate(config, str(tmp_path / "ft"))
    assert 0.0 <= metrics["fine_top1"] <= 1.0
    saved = json.load(open(tmp_path / "ft" / "metrics.json", encoding="utf-8"))
    assert saved["fine_top1"] == metrics["fine_top1"] and saved["method"] == "finetune"


def test_finetune_on_mocked_food101_from_an_rgb_run(rgb_workdir, tmp_path):
    from grafit_tf.config import Config

    config = Config(dataset="food101", tfds_data_dir=str(tmp_path / "tfds"), method="finetune",
                    init_from=rgb_workdir, num_views=1, image_size=32, width=4, batch_size=8,
                    epochs=1, verbose=0, rand_augment=True, shuffle_buffer=16)
    with tfds.testing.mock_data(num_examples=16):
        metrics = trainer.train_and_evaluate(config, str(tmp_path / "ft"))
    assert 0.0 <= metrics["fine_top1"] <= 1.0 and metrics["train_examples"] == 16
