"""The training job: the work-directory contract, bad input, checkpoints and resume."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import keras
import numpy as np
import pytest
import tensorflow as tf

from grafit_tf import builders, checkpointing, trainer
from grafit_tf.config import Config
from grafit_tf.data import hierarchy, pipeline, types
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
    (["--max_train_examples=100", "--batch_size=128"], "fewer than one batch"),
    (["--rand_augment"], "RGB"),
    (["--workdir=FILE/w"], "cannot write"),
    (["--batch_size=abc"], "--batch_size=abc"),
    (["--epoch=3"], "Unknown command line flag 'epoch'"),
    (["--flagfile=/nonexistent.cfg"], "flagfile"),
    (["runs/x"], "unexpected arguments"),
    (["--data_dir=DAMAGED"], "damaged"),
    (["--init_from=/nonexistent/run"], "no such directory"),
    (["--method=finetune", "--num_views=1"], "--init_from"),
])
def test_bad_input_stops_with_one_line(args, needle, tmp_path, fashion_dir):
    bad_map = tmp_path / "map.json"
    bad_map.write_text(json.dumps({"bag": "bags"}))
    damaged = tmp_path / "damaged"  # Fashion-MNIST with a truncated .gz.
    damaged.mkdir()
    for name in os.listdir(fashion_dir):
        shutil.copy(os.path.join(fashion_dir, name), damaged / name)
    labels = damaged / "train-labels-idx1-ubyte.gz"
    labels.write_bytes(labels.read_bytes()[:1000])
    args = [a.replace("MAP", str(bad_map)).replace("FILE", str(bad_map))
            .replace("DAMAGED", str(damaged)) for a in args]
    proc = run_train(f"--data_dir={fashion_dir}", f"--workdir={tmp_path / 'w'}", *TINY, *args)
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
    assert len(errors) == 1 and needle in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert not os.path.exists(tmp_path / "w" / "config.json")  # Nothing written.


# What test_short_default_run_is_pinned's run scored before the redesign (Intel x86_64;
# an AMD EPYC host gives 0.7525 / 0.7485 / 0.721 / 0.829 / 0.911 / 0.963 / 0.948).
PINNED = dict(fine_knn_top1=0.7525, fine_knn_weighted_top1=0.744, fine_recall_at_1=0.7165,
              fine_recall_at_2=0.82, fine_recall_at_5=0.911, fine_recall_at_10=0.9615,
              coarse_knn_top1=0.949)


def test_short_default_run_is_pinned(tmp_path, fashion_dir):
    """`train.py --flagfile=configs/fashion_mnist.cfg --epochs=1 --max_train_examples=4000
    --max_eval_examples=2000` scores what it did before the redesign, within 1.5 points.

    Training is deterministic for a seed, the code and the CPU (stateless data order and
    augmentation, seeded initialisation), but oneDNN's kernels round differently from one
    CPU to another (and with TF_ENABLE_ONEDNN_OPTS=0 or another TF_NUM_INTRAOP_THREADS):
    this short run moved by up to 0.9 points between two hosts. A change of the default's
    random stream moves it by more: seeds 1 and 2 move Recall@1 by 2.5 points.
    """
    workdir = tmp_path / "w"
    proc = run_train("--flagfile=configs/fashion_mnist.cfg", f"--data_dir={fashion_dir}",
                     f"--workdir={workdir}", "--epochs=1", "--max_train_examples=4000",
                     "--max_eval_examples=2000", "--verbose=0", timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((workdir / "metrics.json").read_text())
    for name, value in PINNED.items():
        assert abs(metrics[name] - value) <= 0.015, (name, metrics[name], value)
    assert metrics["train_examples"] == 4000 and metrics["eval_examples"] == 2000


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
            if _newest_step(state_path) >= 6:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
                killed_at = _newest_step(state_path)
                break
        time.sleep(0.02)
    assert killed_at is not None, "the run ended before it could be killed"
    assert killed_at < 48
    done = run_train(*args)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"Resuming from step {killed_at} of 48" in done.stdout
    metrics = json.loads((workdir / "metrics.json").read_text())
    assert metrics["resumed_from_step"] == killed_at
    state = json.loads(state_path.read_text())["checkpoints"][0]
    assert state["step"] == 48 and state["epoch"] == 3


def _newest_step(state_path):
    return json.loads(state_path.read_text())["checkpoints"][0]["step"]


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


def test_classification_top1_scores_the_classifier_on_the_test_split():
    """`--method=finetune`'s score: top-1 of classifier(backbone(x)) against the fine labels."""
    import types

    from grafit_tf import trainer
    from tests.synthetic import synthetic_source

    source = synthetic_source(n=12)
    keras.utils.set_random_seed(1)
    backbone = keras.Sequential([keras.Input(source.image_shape), keras.layers.Flatten()])
    model = types.SimpleNamespace(backbone=backbone, classifier=keras.layers.Dense(4))
    got = trainer.classification_top1(model, source, batch_size=5)
    logits = model.classifier(backbone(source.test.images.astype(np.float32))).numpy()
    assert got == float(np.mean(logits.argmax(axis=1) == source.test.fine))
    assert 0.0 < got < 1.0  # Random weights: neither none nor all right (12 images, 4 classes).


def test_a_nan_loss_saves_nothing_and_a_rerun_is_not_refused(tmp_path, fashion_dir, tiny_config,
                                                             monkeypatch):
    """A loss that turns NaN stops the run with one line (RunFailed); no checkpoint holds
    NaN weights, so a rerun with a sane setting in the same work directory starts over."""
    from grafit_tf import losses, trainer
    from grafit_tf.errors import RunFailed

    nca = losses.nca_loss
    monkeypatch.setattr(losses, "nca_loss", lambda *a, **k: nca(*a, **k) * float("nan"))
    workdir = str(tmp_path / "w")
    with pytest.raises(RunFailed, match="NaN") as e:
        trainer.run(tiny_config.replace(max_train_examples=128), workdir)
    assert "\n" not in str(e.value)
    assert checkpointing.latest(os.path.join(workdir, "checkpoints")) is None
    monkeypatch.setattr(losses, "nca_loss", nca)
    result = trainer.run(tiny_config.replace(max_train_examples=128, learning_rate=1e-3), workdir)
    assert np.isfinite(result.metrics["fine_knn_top1"])


def test_a_disk_that_fills_during_the_run_is_one_line(tmp_path):
    """An OSError during training (ENOSPC) ends train.py with exit 1 and one line naming
    the path, not a traceback."""
    code = (
        "import errno, sys\n"
        "from absl import app\n"
        "import train\n"
        "from grafit_tf import trainer\n"
        "def full(config, workdir):\n"
        "    raise OSError(errno.ENOSPC, 'No space left on device', workdir + '/logs/train.csv')\n"
        "trainer.train_and_evaluate = full\n"
        "train.define_flags()\n"
        f"sys.argv = ['train.py', '--workdir={tmp_path}/w']\n"
        "app.run(train.main)\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-2000:]
    errors = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
    assert len(errors) == 1 and "No space left" in errors[0] and "train.csv" in errors[0]
    assert "Traceback" not in proc.stderr


def test_maskcon_queue_starts_with_augmented_keys_of_shuffled_images():
    """As MaskCon's initiate_memorybank: the key encoder's keys of key views (view 1) from
    another shuffled, augmented pass, not the first images in order, un-augmented: on
    class-sorted data those would fill the queue with one class."""
    rng = np.random.default_rng(0)
    fine = np.repeat(np.arange(4, dtype=np.int32), 16)  # Sorted by class, as image folders.
    hier = hierarchy.from_mapping(["a", "b", "c", "d"], {"a": "x", "b": "x", "c": "y", "d": "y"})
    split = types.Split(images=rng.integers(0, 256, (64, 12, 12, 1), dtype=np.uint8),
                        fine=fine, coarse=hier.coarse_of(fine))
    source = types.Source("sorted", split, split, hier, (12, 12, 1), (127.0,), (70.0,))
    config = Config(method="maskcon", batch_size=8, width=4, proj_hidden=16, proj_dim=8,
                    queue_size=16, epochs=1, warmup_epochs=0)
    model = builders.build_model(config, source, total_steps=8)
    keys, labels = trainer.augmented_keys(model, source, config)
    assert keys.shape == (16, 8) and set(labels) == {0, 1}  # Both coarse classes.
    first = next(iter(pipeline.train_dataset_fn(source, config.replace(seed=1))()))
    np.testing.assert_array_equal(labels[:8], first["label"])
    want = model.target_projector(model.target_backbone(first["views"][:, 1], training=True),
                                  training=True)
    np.testing.assert_allclose(keys[:8], tf.math.l2_normalize(want, -1), atol=1e-5)
