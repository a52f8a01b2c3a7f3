"""Reading a finished (or unfinished) work directory: its config, embedder, trunk and
checkpoint, for resume, `--init_from` (transfer) and `--method=finetune`."""

import json
import os
import shutil

import keras
import numpy as np
import pytest
import tensorflow_datasets as tfds

from grafit_tf import builders, trainer, workdir
from grafit_tf.data import sources
from grafit_tf.errors import UserError


def saved_trunk_weights(path):
    embedder = keras.saving.load_model(os.path.join(path, "embedder.keras"), compile=False)
    return [w.numpy() for w in workdir.trunk_of(embedder).weights]


def test_read_config_and_load_embedder(tiny_workdir, tmp_path):
    saved = workdir.read_config(tiny_workdir)
    assert saved["method"] == "grafit" and saved["data"]["image_shape"] == [28, 28, 1]
    embedder = workdir.load_embedder(tiny_workdir)
    assert tuple(embedder.input_shape[1:]) == (28, 28, 1)
    trunk = workdir.trunk_of(embedder)
    assert isinstance(trunk, keras.Model) and trunk.output_shape[-1] == embedder.output_shape[-1]
    # Not a Grafit work directory: one line saying what is wrong.
    with pytest.raises(UserError, match="--workdir=.*no such directory"):
        workdir.read_config(str(tmp_path / "absent"))
    with pytest.raises(UserError, match="--init_from=.*no config.json"):
        workdir.read_config(str(tmp_path), "--init_from")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        workdir.read_config(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"method": "grafit"}))
    with pytest.raises(UserError, match="image_shape"):
        workdir.read_config(str(tmp_path))
    with pytest.raises(UserError, match="embedder.keras not found"):
        workdir.load_embedder(str(tmp_path))
    (tmp_path / "embedder.keras").write_bytes(b"not a zip archive")
    with pytest.raises(UserError, match="cannot load the Keras model"):
        workdir.load_embedder(str(tmp_path))
    with pytest.raises(UserError, match="no trunk"):
        workdir.trunk_of(keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)]))


def test_model_from_checkpoint_restores_the_run(tiny_workdir):
    saved = workdir.read_config(tiny_workdir)
    model, step = workdir.model_from_checkpoint(tiny_workdir, saved)
    assert step == saved["data"]["train_examples"] // saved["batch_size"]
    assert model.memory is not None and model.target_backbone is not None
    # The checkpoint's trunk is the one the finished run saved.
    want = saved_trunk_weights(tiny_workdir)
    got = [w.numpy() for w in model.backbone.weights]
    assert len(got) == len(want)
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a, b)


def test_resuming_with_other_settings_is_refused(tiny_workdir, tiny_config, tmp_path):
    workdir.check_resumable(tiny_config, tiny_workdir)  # Same settings: resumes.
    # Settings that change neither what is learned nor how it is scored may differ.
    workdir.check_resumable(tiny_config.replace(verbose=2, eval_every=1, checkpoint_every=5),
                            tiny_workdir)
    with pytest.raises(UserError, match=r"lambda_inst: 1\.0 -> 0\.5"):
        workdir.check_resumable(tiny_config.replace(lambda_inst=0.5), tiny_workdir)
    # Nothing to resume (no checkpoint): any settings start afresh.
    shutil.copy(os.path.join(tiny_workdir, "config.json"), tmp_path / "config.json")
    workdir.check_resumable(tiny_config.replace(lambda_inst=0.5), str(tmp_path))


def test_init_from_copies_the_trained_trunk(tiny_config, tiny_workdir):
    config = tiny_config.replace(method="finetune", init_from=tiny_workdir, num_views=1)
    source = sources.load(config.replace(max_train_examples=64, max_eval_examples=8))
    model = builders.build_model(config, source, total_steps=1,
                                 init_trunk=lambda t: workdir.init_trunk(t, tiny_workdir))
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
    trunk = workdir.load_trunk(str(partial))
    for a, b in zip([w.numpy() for w in trunk.weights], saved_trunk_weights(tiny_workdir)):
        np.testing.assert_array_equal(a, b)


def test_init_from_errors(tiny_config, tiny_workdir, tmp_path):
    source = sources.load(tiny_config.replace(max_train_examples=64, max_eval_examples=8))
    other = tiny_config.replace(width=4)
    with pytest.raises(UserError, match="--width"):
        builders.build_model(other, source, 1,
                             init_trunk=lambda t: workdir.init_trunk(t, tiny_workdir))
    with pytest.raises(UserError, match="no such directory"):
        workdir.load_trunk(str(tmp_path / "absent"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="config.json"):
        workdir.load_trunk(str(tmp_path / "empty"))
    shutil.copy(os.path.join(tiny_workdir, "config.json"), tmp_path / "empty")
    with pytest.raises(UserError, match="train that run first"):
        workdir.load_trunk(str(tmp_path / "empty"))


def test_init_from_is_checked_before_the_new_run_writes_anything(tiny_config, tiny_workdir,
                                                                 tmp_path):
    from grafit_tf import trainer

    new = str(tmp_path / "new")
    for config, needle in ((tiny_config.replace(init_from=str(tmp_path / "absent")),
                            "no such directory"),
                           (tiny_config.replace(init_from=tiny_workdir, width=4), "--width")):
        with pytest.raises(UserError, match=needle):
            trainer.run(config, new)
        assert not os.path.exists(os.path.join(new, "config.json"))


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
