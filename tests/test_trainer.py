"""The training job: the work-directory contract, bad input, checkpoints and resume."""

import json
import os
import signal
import subprocess
import sys
import time

import keras
import numpy as np
import pytest

from grafit_tf import checkpointing
from grafit_tf.trainer import fit_segments
from tests.conftest import REPO

CONTRACT = ["fine_knn_top1", "fine_knn_weighted_top1", "fine_recall_at_1", "fine_recall_at_2",
            "fine_recall_at_5", "fine_recall_at_10", "coarse_knn_top1", "method", "epochs",
            "train_seconds", "eval_seconds", "train_images_per_second"]


def test_workdir_contract(tiny_workdir, tiny_config, fashion_dir):
    for name in ("config.json", "metrics.json", "checkpoints", "embedder.keras", "logs"):
        assert os.path.exists(os.path.join(tiny_workdir, name)), name
    metrics = json.load(open(os.path.join(tiny_workdir, "metrics.json")))
    assert set(CONTRACT) <= set(metrics)
    assert metrics["method"] == "grafit" and metrics["eval_examples"] == 256
    # Real learning signal on real images, far above the 10% of chance.
    assert metrics["fine_knn_top1"] > 0.3 and metrics["coarse_knn_top1"] > 0.6
    assert metrics["fine_recall_at_1"] <= metrics["fine_recall_at_10"]
    config = json.load(open(os.path.join(tiny_workdir, "config.json")))
    assert config["method"] == "grafit" and config["num_replicas"] == 1
    assert config["data"]["image_shape"] == [28, 28, 1]
    assert os.path.getsize(os.path.join(tiny_workdir, "logs", "train.csv")) > 0
    embedder = keras.saving.load_model(os.path.join(tiny_workdir, "embedder.keras"))
    from grafit_tf.data import sources

    images = sources.load(tiny_config).test.images[:8].astype(np.float32)
    z = embedder.predict(images, verbose=0)
    assert z.shape == (8, 8 * 2 ** 3)
    np.testing.assert_allclose(np.linalg.norm(z, axis=1), 1.0, rtol=1e-5)


def run_train(*args, timeout=300):
    cmd = [sys.executable, os.path.join(REPO, "train.py"), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO)


TINY = ["--epochs=1", "--max_train_examples=256", "--max_eval_examples=128", "--batch_size=64",
        "--width=4", "--proj_hidden=16", "--knn_dim=8", "--proj_dim=8", "--verbose=0"]


@pytest.mark.parametrize("args,needle", [
    (["--dataset=imagenet_please"], "--dataset"),
    (["--data_dir=/nonexistent/fmnist"], "dataset-fashion-mnist"),
    (["--coarse_map=MAP"], "unmapped"),
    (["--distribute=mirrored", "--cpu_replicas=2", "--batch_size=63"], "divide"),
    (["--max_train_examples=100", "--batch_size=128"], "memory"),
])
def test_bad_input_stops_with_one_line(args, needle, tmp_path, fashion_dir):
    bad_map = tmp_path / "map.json"
    bad_map.write_text(json.dumps({"bag": "bags"}))
    args = [a.replace("MAP", str(bad_map)) for a in args]
    proc = run_train(f"--data_dir={fashion_dir}", f"--workdir={tmp_path / 'w'}", *TINY, *args)
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
    assert len(errors) == 1 and needle in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert not os.path.exists(tmp_path / "w" / "checkpoints")


def test_fit_segments():
    assert list(fit_segments(0, 10, 3)) == [(0, 0, 10)]
    assert list(fit_segments(10, 10, 3)) == [(10, 1, 10)]
    assert list(fit_segments(13, 10, 3)) == [(13, 1, 7), (20, 2, 10)]
    assert list(fit_segments(27, 10, 3)) == [(27, 2, 3)]
    assert list(fit_segments(30, 10, 3)) == []


def test_killed_run_resumes_from_its_checkpoint(tmp_path, fashion_dir):
    """SIGKILL mid-epoch, rerun the same command: it resumes, not restarts."""
    workdir = tmp_path / "w"
    args = [f"--data_dir={fashion_dir}", f"--workdir={workdir}", "--epochs=3",
            "--max_train_examples=512", "--max_eval_examples=128", "--batch_size=32",
            "--width=4", "--proj_hidden=16", "--knn_dim=8", "--proj_dim=8", "--verbose=0",
            "--checkpoint_every=3"]
    proc = subprocess.Popen([sys.executable, os.path.join(REPO, "train.py"), *args], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state_path = workdir / "checkpoints" / "state.json"
    deadline = time.time() + 240
    killed_at = None
    while time.time() < deadline and proc.poll() is None:
        if state_path.exists():
            state = json.loads(state_path.read_text())
            if state["step"] >= 6:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
                killed_at = json.loads(state_path.read_text())["step"]
                break
        time.sleep(0.02)
    assert killed_at is not None, "the run ended before it could be killed"
    assert killed_at < 48
    done = run_train(*args)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"Resuming from step {killed_at} of 48" in done.stdout
    metrics = json.loads((workdir / "metrics.json").read_text())
    assert metrics["resumed_from_step"] == killed_at
    state = json.loads(state_path.read_text())
    assert state["step"] == 48 and state["epoch"] == 3


def test_checkpoint_restores_memory_and_optimizer(tiny_workdir, tiny_config):
    from grafit_tf import builders
    from grafit_tf.data import sources

    source = sources.load(tiny_config)
    steps = 512 // 64

    def fresh():
        keras.utils.set_random_seed(123)  # Different init from the trained run.
        model = builders.build_model(tiny_config, source, steps)
        model.compile(optimizer=builders.build_optimizer(tiny_config, steps, steps))
        return model

    model = fresh()
    before = model.memory.embeddings.numpy().copy()
    step = checkpointing.restore(model, os.path.join(tiny_workdir, "checkpoints"))
    assert step == steps
    assert int(model.optimizer.iterations.numpy()) == steps
    restored = model.memory.embeddings.numpy()
    assert not np.allclose(before, restored)
    # The saved optimizer moments came back (non-zero after training).
    assert any(np.abs(v.numpy()).sum() > 0 for v in model.optimizer.variables[1:])
    # Saving again and restoring into a fresh model gives identical state.
    directory = os.path.join(os.path.dirname(tiny_workdir), "resave")
    checkpointing.save(model, directory, steps)
    again = fresh()
    checkpointing.restore(again, directory)
    np.testing.assert_array_equal(again.memory.embeddings.numpy(), restored)
    for a, b in zip(model.optimizer.variables, again.optimizer.variables):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_resuming_with_other_settings_is_refused(tiny_workdir, tiny_config):
    from grafit_tf import trainer
    from grafit_tf.errors import UserError

    trainer.check_resumable(tiny_config, tiny_workdir)  # Same settings: resumes.
    # Settings that change neither what is learned nor how it is scored may differ.
    trainer.check_resumable(tiny_config.replace(verbose=2, eval_every=1, checkpoint_every=5),
                            tiny_workdir)
    with pytest.raises(UserError, match=r"lambda_inst: 1\.0 -> 0\.5"):
        trainer.check_resumable(tiny_config.replace(lambda_inst=0.5), tiny_workdir)


def test_embedding_transform_is_fitted_scored_and_saved(tiny_config, tmp_path):
    """--embedding_transform=whiten: the saved embedder applies the map that was fitted
    on the training embeddings, and metrics.json scores exactly that map."""
    from grafit_tf import embedding_transform, evaluation, heads, trainer
    from grafit_tf.data import sources

    config = tiny_config.replace(embedding_transform="whiten", max_train_examples=256,
                                 max_eval_examples=128)
    metrics = trainer.train_and_evaluate(config, str(tmp_path))
    source = sources.load(config)
    embedder = keras.saving.load_model(str(tmp_path / "embedder.keras"))
    train = trainer.embed(embedder, source.train, source)
    test = trainer.embed(embedder, source.test, source)
    layer = embedder.get_layer(heads.TRANSFORM_LAYER)
    assert np.abs(layer.get_weights()[1]).max() > 1e-3  # Fitted: not the identity.
    # The map in NumPy, fitted on the same embedder's un-mapped training embeddings.
    layer.set_weights([np.eye(layer.kernel.shape[0], dtype=np.float32),
                       np.zeros(layer.kernel.shape[0], np.float32)])
    features = trainer.embed(embedder, source.train, source)
    mapped = embedding_transform.apply(
        features, *embedding_transform.fit(features, "whiten", config.whiten_shrinkage))
    # Similarities do not depend on the eigenvectors' signs.
    np.testing.assert_allclose(mapped @ mapped.T, train @ train.T, atol=1e-4)
    want = evaluation.knn_metrics(train, source.train.fine, source.train.coarse, test,
                                  source.test.fine, source.test.coarse, num_fine=10)
    for key in ("fine_knn_top1", "fine_recall_at_1", "coarse_knn_top1"):
        assert metrics[key] == pytest.approx(want[key], abs=1.5 / 128), key


def test_one_trace_embeds_every_batch_of_both_splits():
    from grafit_tf import trainer
    from tests.synthetic import synthetic_source

    source = synthetic_source(n=10)
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input(source.image_shape), keras.layers.Flatten(),
                              keras.layers.Dense(3)])
    fn = trainer.embedding_fn(model, source)
    train = trainer.embed(fn, source.train, source, batch_size=4)  # Batches of 4, 4, 2.
    test = trainer.embed(fn, source.test, source, batch_size=3)  # 3, 3, 3, 1.
    assert fn.experimental_get_tracing_count() == 1
    assert train.shape == (10, 3) and train.dtype == np.float32
    # The model's own outputs on the raw pixels (this source has no resize).
    want = model.predict(source.train.images.astype(np.float32), verbose=0)
    np.testing.assert_allclose(train, want, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(test, train, rtol=1e-6)  # Here test is the training split.


def test_periodic_evaluation_is_timed_apart_and_leaves_training_alone(tiny_config, tmp_path):
    """`--eval_every` only observes: the same run without it ends with the same
    weights and scores, and the time its evaluations took is reported apart."""
    from grafit_tf import trainer

    config = tiny_config.replace(epochs=2, max_train_examples=256, max_eval_examples=128)
    watched = trainer.run(config.replace(eval_every=1), str(tmp_path / "watched"))
    plain = trainer.run(config, str(tmp_path / "plain"))
    assert [row["epoch"] for row in watched.metrics["history"]] == [1.0]
    assert plain.metrics["history"] == [] and plain.metrics["eval_seconds"] == 0.0
    assert 0 < watched.metrics["eval_seconds"] < watched.metrics["train_seconds"]
    weights = watched.model.backbone.get_weights(), plain.model.backbone.get_weights()
    assert len(weights[0]) == len(weights[1])
    for a, b in zip(*weights):
        np.testing.assert_array_equal(a, b)
    for key in ("fine_knn_top1", "fine_recall_at_1", "coarse_knn_top1"):
        assert watched.metrics[key] == plain.metrics[key], key
