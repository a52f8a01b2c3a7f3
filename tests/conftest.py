"""Shared fixtures. The Fashion-MNIST files are real (Debian's dataset-fashion-mnist)."""

import csv
import os
import sys

import numpy as np
import pytest

import grafit_tf  # noqa: F401  Before any test module imports TensorFlow: oneDNN on.

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

FASHION_DIR = os.environ.get("GRAFIT_FASHION_MNIST", "/usr/share/datasets/fashion-mnist")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def fashion_dir():
    """The real Fashion-MNIST folder; the suite fails (not skips) without it."""
    if not os.path.isfile(os.path.join(FASHION_DIR, "t10k-images-idx3-ubyte.gz")):
        pytest.fail(f"Fashion-MNIST missing at {FASHION_DIR}: apt-get install dataset-fashion-mnist")
    return FASHION_DIR


@pytest.fixture(scope="session")
def tiny_config(fashion_dir):
    """A Grafit config that trains in seconds on real Fashion-MNIST images."""
    from grafit_tf.config import Config

    return Config(data_dir=fashion_dir, epochs=1, max_train_examples=512,
                  max_eval_examples=256, batch_size=64, width=8, proj_hidden=64,
                  knn_dim=32, proj_dim=32, verbose=0)


@pytest.fixture(scope="session")
def tiny_workdir(tiny_config, tmp_path_factory):
    """A work directory written by a real (tiny) Grafit training run."""
    from grafit_tf import trainer

    workdir = str(tmp_path_factory.mktemp("tiny_run"))
    trainer.train_and_evaluate(tiny_config, workdir)
    return workdir


# --- Export and serving -------------------------------------------


def read_csv(path):
    """`(header, rows)` of a CSV file that serving wrote."""
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f))
    return rows[0], rows[1:]


def served_csv(out, name):
    """`(header, rows)` of CSV `name` of every shard of a serve.py output, in shard order."""
    shards = sorted(p for p in os.listdir(out) if p.startswith("shard-"))
    parts = [read_csv(os.path.join(out, s, name)) for s in shards]
    return parts[0][0], [r for _, rows in parts for r in rows]


def served_embeddings(out):
    """The embeddings of every shard of a serve.py output, in shard order."""
    shards = sorted(p for p in os.listdir(out) if p.startswith("shard-"))
    return np.concatenate([np.load(os.path.join(out, s, "embeddings.npy")) for s in shards])


@pytest.fixture(scope="session")
def fashion_pngs(fashion_dir, tmp_path_factory):
    """Real Fashion-MNIST PNG folders.

    A gallery (train, 6 per class), queries (test, 3 per class) and the first
    test images as arrays.
    """
    from grafit_tf.data import png_folders

    root = tmp_path_factory.mktemp("fashion_png")
    train_x, train_y = png_folders.read_fashion_mnist(fashion_dir, "train")
    test_x, test_y = png_folders.read_fashion_mnist(fashion_dir, "test")
    png_folders.write_png_folders(train_x, train_y, str(root / "gallery"),
                                  indices=png_folders.select(train_y, 6))
    png_folders.write_png_folders(test_x, test_y, str(root / "queries"),
                                  indices=png_folders.select(test_y, 3))
    return {"gallery": str(root / "gallery"), "queries": str(root / "queries"),
            "test_images": test_x[:40]}


@pytest.fixture(scope="session")
def tiny_export(tiny_workdir):
    """`tiny_workdir` exported once: the report of `grafit_tf.export.export`."""
    from grafit_tf import export

    return export.export(tiny_workdir, num_parity_images=64)


@pytest.fixture(scope="session")
def rgb_workdir(tmp_path_factory):
    """A work directory with an (untrained) RGB embedder, resize 'resize_center_crop'
    (`rgb_export` exports it with an embedding transform).

    Its data is a small image_folder dataset of smooth RGB pictures of varied
    sizes (64 training images, enough for the export's parity check), the training
    ones in varied tints: the embeddings the transform is fitted on then spread
    beyond the pixel rounding that serving adds (an untrained trunk maps similar
    pictures to nearly one point, which a whitening would blow up).
    """
    import json

    import keras
    import numpy as np
    from PIL import Image

    import grafit_tf
    from grafit_tf import backbones, heads
    from grafit_tf.config import Config
    from grafit_tf.data import sources
    from tests.image_files import rgb_picture

    root = tmp_path_factory.mktemp("rgb_run")
    data = root / "data"
    rng = np.random.default_rng(3)
    for split, count in (("train", 64), ("test", 8)):
        for i in range(count):
            folder = data / split / f"coarse{i % 2}" / f"fine{i % 4}"
            folder.mkdir(parents=True, exist_ok=True)
            h, w = (int(v) for v in rng.integers(24, 90, 2))
            picture = rgb_picture(rng, h, w)
            if split == "train":
                picture = (picture * rng.uniform(0.2, 1.0, 3)).astype(np.uint8)
            Image.fromarray(picture).save(folder / f"{i:03d}.png")
    config = Config(dataset="image_folder", data_dir=str(data), image_size=32, width=4)
    source = sources.load(config)
    keras.utils.set_random_seed(0)  # The same trunk in every session.
    trunk = backbones.small_resnet(source.image_shape, source.mean, source.std, width=4)
    # Non-trivial batch-norm statistics, so that the embedding depends on the input.
    for layer in trunk.layers:
        if layer.name.endswith("bn") or "_bn" in layer.name:
            mean, var = layer.moving_mean, layer.moving_variance
            mean.assign(rng.normal(0, 0.5, mean.shape).astype(np.float32))
            var.assign(rng.uniform(0.5, 2.0, var.shape).astype(np.float32))
    heads.embedder(trunk).save(str(root / "embedder.keras"))
    with open(root / "config.json", "w", encoding="utf-8") as f:
        json.dump(dict(config.to_dict(), version=grafit_tf.__version__,
                       data=sources.describe(source)), f)
    return str(root)


@pytest.fixture(scope="session")
def rgb_export(rgb_workdir):
    """`rgb_workdir` exported once, with `--embedding_transform=whiten` (fitted on its 64
    training images), so that the export and serving cover the transform layer."""
    from grafit_tf import export

    return export.export(rgb_workdir, num_parity_images=64, transform="whiten")


@pytest.fixture(autouse=True)
def float32_policy_after_each_test():
    """A run of a bf16 config sets Keras's *global* dtype policy; restore it so that
    no later test builds its model in bfloat16 by accident."""
    yield
    keras = sys.modules.get("keras")
    if keras is not None:  # Only where a test brought Keras in.
        keras.mixed_precision.set_global_policy("float32")


@pytest.fixture(scope="session", autouse=True)
def no_grappler():
    """Grappler off in the test process (subprocesses, `train.py` runs among them, keep it).

    Its graph optimisations pay off over thousands of steps; a test runs each new
    graph once or twice, and optimising the graphs of the paper's large trunks costs
    more than running them does (a fifth of the time of the tests that train in-process).
    """
    import tensorflow as tf

    tf.config.optimizer.set_experimental_options({"disable_meta_optimizer": True})
