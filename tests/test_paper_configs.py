"""Every config of the paper's datasets runs end to end on mock data.

Each `configs/*.cfg` that is not Fashion-MNIST is parsed exactly as `train.py`
parses it, then shrunk (32 px images, batches of 8, one epoch, narrow heads) and
trained and evaluated on `tfds.testing.mock_data`, with the config's own method,
trunk, optimizer, memory, augmentation and evaluation protocol. The transfer
configs start (`--init_from`) from the work directory of the mocked
`imagenet.cfg` run, as their headers say they do; `food101.cfg` is trained,
and the three others, which include it, are checked to differ from it only in their
data set and schedule (their data sets' pipelines are run by `test_tfds_sources`):
training each RegNetY-8GF again would cost the suite three minutes. In the same way
`sop.cfg` is `cars196_coarse.cfg` (both ResNet-50 Grafit under MaskCon's protocol)
on other data with another learning rate; `test_tfds_sources` trains on mocked SOP.
Without data each config stops with the one-line `tfds build` hint.
"""

import glob
import json
import os

import pytest
import tensorflow_datasets as tfds

from grafit_tf import trainer
from grafit_tf.errors import UserError
from tests.conftest import REPO
from tests.test_config import parse

PAPER_CONFIGS = sorted(os.path.basename(p) for p in glob.glob(os.path.join(REPO, "configs", "*.cfg"))
                       if not os.path.basename(p).startswith("fashion_mnist"))
TRANSFER = ("food101.cfg", "flowers102.cfg", "cars196.cfg", "cub200.cfg")
TRAINED_TRANSFER = "food101.cfg"
# Configs that are a trained one on other data: config -> the trained config.
SAME_BUT_DATA = {**{name: TRAINED_TRANSFER for name in TRANSFER if name != TRAINED_TRANSFER},
                 "sop.cfg": "cars196_coarse.cfg"}
# What such a config may change from its trained one (after SHRINK).
DATA_OWN = {"dataset", "sop_split", "learning_rate", "warmup_epochs"}
PRETRAIN = "imagenet.cfg"
# Only sizes change (and the warm-up, at most the one epoch); `init_from` is set per test.
SHRINK = dict(image_size=32, batch_size=8, epochs=1, proj_hidden=16, knn_dim=8, proj_dim=8,
              queue_size=16, shuffle_buffer=16, eval_every=0, verbose=0)


def load(name, monkeypatch, **changes):
    monkeypatch.chdir(REPO)  # Nested flagfiles are relative to the repo root.
    config = parse([f"--flagfile=configs/{name}", "--workdir=/tmp/x"]).replace(**SHRINK,
                                                                               **changes)
    # The warm-up is shortened with the training, which it may not outlast.
    return config.replace(warmup_epochs=min(config.warmup_epochs, config.epochs))


def mocked(num_examples=16):
    """TFDS mocked for the duration of a `with` (only there: see the no-data test)."""
    return tfds.testing.mock_data(num_examples=num_examples)


# The RegNetY-8GF runs (pre-training and transfer) take one batch: on the CPU each
# step of its grouped convolutions takes many seconds, and one step runs the path.
ONE_BATCH = SHRINK["batch_size"]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """The mocked `imagenet.cfg` run: the trunk the transfer configs start from."""
    monkeypatch = pytest.MonkeyPatch()
    try:
        config = load(PRETRAIN, monkeypatch, tfds_data_dir=str(tmp_path_factory.mktemp("tfds")))
    finally:
        monkeypatch.undo()
    workdir = str(tmp_path_factory.mktemp("inat"))
    with mocked(ONE_BATCH):
        return workdir, trainer.train_and_evaluate(config, workdir)


def test_the_list_covers_every_paper_config():
    assert set(TRANSFER) | {PRETRAIN} <= set(PAPER_CONFIGS)
    assert {"cifar100.cfg", "cifar100_maskcon.cfg", "cars196_coarse.cfg",
            "sop.cfg", "inaturalist2018.cfg"} <= set(PAPER_CONFIGS)


def test_pretraining_config_runs(pretrained):
    _, metrics = pretrained
    assert metrics["method"] == "grafit" and metrics["train_examples"] == ONE_BATCH
    assert 0.0 <= metrics["fine_recall_at_1"] <= 1.0


@pytest.mark.parametrize("name", [n for n in PAPER_CONFIGS
                                  if n not in TRANSFER + (PRETRAIN,) + tuple(SAME_BUT_DATA)])
def test_coarse_to_fine_config_runs(name, tmp_path, monkeypatch):
    config = load(name, monkeypatch, tfds_data_dir=str(tmp_path / "tfds"))
    assert config.method in ("grafit", "maskcon"), name
    # MaskCon's protocol where a MaskCon figure is cited (iNaturalist has none).
    assert config.eval_protocol == "maskcon" or name == "inaturalist2018.cfg", name
    with mocked(ONE_BATCH if config.backbone == "regnety8gf" else 16):
        metrics = trainer.train_and_evaluate(config, str(tmp_path / "run"))
    assert set(metrics) >= {"fine_recall_at_1", "fine_recall_at_10", "coarse_knn_top1"}
    saved = json.load(open(tmp_path / "run" / "config.json", encoding="utf-8"))
    assert saved["backbone"] == config.backbone and saved["dataset"] == config.dataset


def test_transfer_config_runs_from_the_pretrained_run(pretrained, tmp_path, monkeypatch):
    workdir, _ = pretrained
    config = load(TRAINED_TRANSFER, monkeypatch, tfds_data_dir=str(tmp_path / "tfds"),
                  init_from=workdir)
    assert config.method == "finetune" and config.backbone == "regnety8gf"
    with mocked(ONE_BATCH):
        metrics = trainer.train_and_evaluate(config, str(tmp_path / "run"))
    assert 0.0 <= metrics["fine_top1"] <= 1.0 and metrics["method"] == "finetune"


@pytest.mark.parametrize("name", sorted(SAME_BUT_DATA))
def test_untrained_configs_are_a_trained_one_on_other_data(name, monkeypatch):
    trained = load(SAME_BUT_DATA[name], monkeypatch).to_dict()
    config = load(name, monkeypatch).to_dict()
    changed = {k for k in config if config[k] != trained[k]}
    assert "dataset" in changed and changed <= DATA_OWN, (name, changed)


@pytest.mark.parametrize("name", PAPER_CONFIGS)
def test_every_paper_config_fails_cleanly_without_data(name, tmp_path, monkeypatch):
    config = load(name, monkeypatch, tfds_data_dir=str(tmp_path / "empty"))
    with pytest.raises(UserError, match=f"tfds build {config.dataset} --data_dir=") as e:
        trainer.train_and_evaluate(config, str(tmp_path / "run"))
    assert "\n" not in str(e.value)
