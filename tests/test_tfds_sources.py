"""TFDS datasets on `tfds.testing.mock_data`: fake examples with each
builder's real feature structure, from the metadata shipped in the package. Nothing
is downloaded; the absent-dataset path is checked without the mock."""

import json

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from grafit_tf import trainer
from grafit_tf.config import Config
from grafit_tf.data import hierarchy, pipeline, sources, tfds_sources
from grafit_tf.errors import UserError

NUM = 16  # Mock examples per split.
TINY = dict(image_size=32, width=4, batch_size=8, epochs=1, proj_hidden=16, knn_dim=8,
            proj_dim=8, verbose=0, shuffle_buffer=16)


@pytest.fixture
def mock(tmp_path):
    """Mock TFDS; yields the `--tfds_data_dir` to use (empty: nothing is prepared)."""
    with tfds.testing.mock_data(num_examples=NUM):
        yield str(tmp_path / "tfds")


def raw_load(name, split, keys, data_dir):
    """TFDS's own decoded examples, in read order.

    The same feature subset as the reader's: the mock's random draws depend on it.
    """
    return tfds.load(name, split=split, data_dir=data_dir, shuffle_files=False,
                     decoders=tfds_sources._only(keys, encoded_image=False))


def raw_labels(name, split, keys, data_dir):
    """The label features as TFDS itself returns them, in read order."""
    ds = raw_load(name, split, keys, data_dir)
    return {k: np.asarray([int(ex[k]) for ex in ds], np.int32) for k in keys}


def test_every_dataset_is_mockable_offline_and_wired(mock):
    for name in tfds_sources.DATASETS:
        source = sources.load(Config(dataset=name, tfds_data_dir=mock))
        spec = tfds_sources.SPECS[name]
        keys = [spec.fine] + ([spec.coarse] if spec.coarse else [])
        raw = raw_labels(name, spec.train, keys, mock)
        np.testing.assert_array_equal(source.train.fine, raw[spec.fine], err_msg=name)
        np.testing.assert_array_equal(source.train.coarse,
                                      source.hierarchy.coarse_of(source.train.fine))
        assert len(source.test) == NUM
        assert source.image_shape == ((32, 32, 3) if name == "cifar100" else (224, 224, 3))
        assert (source.train.images is None) == (name != "cifar100"), name
        assert (source.train.stream is None) == (name == "cifar100"), name


def test_cifar100_superclasses(mock):
    source = sources.load(Config(dataset="cifar100", tfds_data_dir=mock))
    h = source.hierarchy
    assert source.train.images.shape == (NUM, 32, 32, 3)
    assert source.train.images.dtype == np.uint8
    assert h.num_fine == 100 and h.num_coarse == 20
    assert np.bincount(h.fine_to_coarse).tolist() == [5] * 20
    # Label order of CIFAR-100 (and TFDS) is the alphabetical order of the names.
    assert h.fine_names[:3] == ("apple", "aquarium_fish", "baby")
    assert h.coarse_names[0] == "aquatic_mammals" and h.coarse_names[-1] == "vehicles_2"
    d = h.to_dict()
    assert d["whale"] == "aquatic_mammals" and d["tractor"] == "vehicles_2"
    assert d["maple_tree"] == "trees" and d["trout"] == "fish"


@pytest.mark.parametrize("name,coarse_key,num_coarse", [
    ("stanford_online_products", "super_class_id", 12),
    ("i_naturalist2018", "supercategory", 14),
])
def test_coarse_read_off_the_data(mock, name, coarse_key, num_coarse):
    source = sources.load(Config(dataset=name, tfds_data_dir=mock))
    spec = tfds_sources.SPECS[name]
    raw = raw_labels(name, spec.train, [spec.fine, coarse_key], mock)
    h = source.hierarchy
    assert h.num_coarse == num_coarse
    # Mock labels are random, so a fine class may show two coarse classes; where it
    # shows one (always, in the real data), the hierarchy must give that one.
    for f, c in zip(raw[spec.fine], raw[coarse_key]):
        if len(set(raw[coarse_key][raw[spec.fine] == f])) == 1:
            assert h.fine_to_coarse[f] == c
    assert h.coarse_names == tuple(
        tfds.builder(name, data_dir=mock).info.features[coarse_key].names)


def test_from_pairs_majority_and_unseen():
    h = tfds_sources.from_pairs(("a", "b", "c"), ("x", "y"), np.array([0, 0, 0, 1]),
                                np.array([1, 1, 0, 0]))
    assert h.fine_to_coarse == (1, 0, 0)


def test_cars196_body_types_match_the_dataset_label_order():
    # The builder's label names come with the package: no download, no mock.
    names = tfds.builder("cars196", data_dir="/nonexistent").info.features["label"].names
    table = json.load(open(hierarchy.builtin_map("cars196_body_type"), encoding="utf-8"))
    assert [e["index"] for e in table["fine"]] == list(range(196))
    assert [e["name"] for e in table["fine"]] == list(names)
    h = tfds_sources.cars196_hierarchy(tuple(names))
    assert h.num_coarse == 8 and set(h.coarse_names) >= {"sedan", "suv", "coupe"}
    assert h.to_dict()["AM General Hummer SUV 2000"] == "suv"
    with pytest.raises(UserError, match="coarse_map"):
        tfds_sources.cars196_hierarchy(tuple(reversed(names)))


@pytest.mark.parametrize("name", ["food101", "oxford_flowers102", "caltech_birds2011"])
def test_fine_only_datasets_have_one_coarse_class(mock, name):
    source = sources.load(Config(dataset=name, tfds_data_dir=mock))
    assert source.hierarchy.coarse_names == ("all",)
    assert not source.train.coarse.any()


def test_coarse_map_override(mock, tmp_path):
    names = tfds.builder("food101", data_dir=mock).info.features["label"].names
    path = tmp_path / "map.json"
    path.write_text(json.dumps({n: ("sweet" if i % 2 else "savoury") for i, n in enumerate(names)}))
    source = sources.load(Config(dataset="food101", tfds_data_dir=mock, coarse_map=str(path)))
    assert source.hierarchy.coarse_names == ("savoury", "sweet")
    np.testing.assert_array_equal(source.train.coarse, source.train.fine % 2)


def test_stream_order_matches_the_labels(mock):
    source = sources.load(Config(dataset="caltech_birds2011", tfds_data_dir=mock,
                                 max_train_examples=10))
    decoded = raw_load("caltech_birds2011", "train", ["label"], mock)
    want = [ex["image"].numpy() for ex in decoded.take(10)]
    got = [tf.io.decode_image(b, channels=3).numpy() for b in source.train.stream.dataset()]
    assert len(got) == 10
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a, b)


def test_absent_dataset_fails_at_once_with_the_command(tmp_path):
    for name in ("food101", "cifar100"):
        with pytest.raises(UserError, match=f"tfds build {name} --data_dir=") as e:
            sources.load(Config(dataset=name, tfds_data_dir=str(tmp_path)))
        assert "never downloads" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("name", tfds_sources.DATASETS)
def test_pipeline_batches_for_every_dataset(mock, name):
    """Training views and evaluation batches of every dataset, without a model."""
    config = Config(dataset=name, tfds_data_dir=mock, **TINY)
    source = sources.load(config)
    batch = next(iter(pipeline.train_dataset_fn(source, config)()))
    assert batch["views"].shape == (8, 2, 32, 32, 3)
    index = batch["index"].numpy()
    assert len(set(index)) == 8
    np.testing.assert_array_equal(batch["label"], source.train.coarse[index])
    images = next(iter(pipeline.eval_dataset(source.test, source, batch_size=4)))
    assert images.shape == (4, 32, 32, 3) and images.dtype == tf.float32


def test_cifar100_trains_and_evaluates(mock, tmp_path):
    config = Config(dataset="cifar100", tfds_data_dir=mock, **TINY)
    metrics = trainer.train_and_evaluate(config, str(tmp_path / "run"))
    assert 0.0 <= metrics["fine_recall_at_1"] <= 1.0
    assert metrics["train_examples"] == NUM


def test_streamed_sop_trains_and_evaluates_under_maskcon(mock, tmp_path):
    config = Config(dataset="stanford_online_products", tfds_data_dir=mock,
                    eval_protocol="maskcon", **TINY)
    source = sources.load(config)
    assert source.eval_resize == "resize" and source.resize == "resize_center_crop"
    metrics = trainer.train_and_evaluate(config, str(tmp_path / "run"))
    assert set(metrics) >= {"fine_recall_at_1", "fine_recall_at_10", "coarse_knn_top1"}
    saved = json.load(open(tmp_path / "run" / "config.json", encoding="utf-8"))
    assert saved["eval_protocol"] == "maskcon" and saved["data"]["name"] == source.name
