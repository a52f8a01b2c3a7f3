"""Data sources: IDX reader, hierarchies and coarse maps, image folders, real Fashion-MNIST."""

import gzip
import json
import os
import struct

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from grafit_tf.config import Config
from grafit_tf.data import hierarchy, idx, sources
from grafit_tf.data.types import Split, Stream
from grafit_tf.errors import UserError


def test_idx_round_trip(tmp_path):
    array = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    path = tmp_path / "x-idx3-ubyte.gz"
    with gzip.open(path, "wb") as f:
        f.write(bytes([0, 0, 0x08, 3]) + struct.pack(">3I", 2, 3, 4) + array.tobytes())
    np.testing.assert_array_equal(idx.read_idx(str(path)), array)


def test_idx_rejects_bad_files(tmp_path):
    bad = tmp_path / "bad"
    bad.write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(ValueError, match="magic"):
        idx.read_idx(str(bad))
    short = tmp_path / "short"
    short.write_bytes(bytes([0, 0, 8, 1]) + struct.pack(">I", 10) + b"abc")
    with pytest.raises(ValueError, match="bytes"):
        idx.read_idx(str(short))


def test_real_fashion_mnist(fashion_dir):
    source = sources.load(Config(data_dir=fashion_dir))
    assert source.train.images.shape == (60000, 28, 28, 1)
    assert source.test.images.shape == (10000, 28, 28, 1)
    assert np.bincount(source.test.fine).tolist() == [1000] * 10
    h = source.hierarchy
    assert h.coarse_names == ("bags", "bottoms_and_dresses", "footwear", "tops")
    names = lambda c: sorted(h.fine_names[i] for i in range(10) if h.fine_to_coarse[i] == c)
    assert names(h.coarse_names.index("tops")) == ["coat", "pullover", "shirt", "tshirt_top"]
    assert names(h.coarse_names.index("footwear")) == ["ankle_boot", "sandal", "sneaker"]
    np.testing.assert_array_equal(source.train.coarse, h.coarse_of(source.train.fine))
    small = sources.load(Config(data_dir=fashion_dir, max_train_examples=100,
                                max_eval_examples=50))
    assert len(small.train) == 100 and len(small.test) == 50


def test_coarse_map_override_and_errors(fashion_dir, tmp_path):
    path = tmp_path / "two.json"
    path.write_text(json.dumps(json.load(open(hierarchy.builtin_map("fashion_mnist_coarse2")))))
    source = sources.load(Config(data_dir=fashion_dir, coarse_map=str(path),
                                 max_train_examples=10, max_eval_examples=10))
    assert source.hierarchy.coarse_names == ("accessories", "clothing")
    partial = tmp_path / "partial.json"
    partial.write_text(json.dumps({"bag": "x"}))
    with pytest.raises(UserError, match="unmapped"):
        sources.load(Config(data_dir=fashion_dir, coarse_map=str(partial)))
    with pytest.raises(UserError, match="no such file"):
        sources.load(Config(data_dir=fashion_dir, coarse_map=str(tmp_path / "none.json")))


def test_missing_data_dir_is_a_clear_error(tmp_path):
    with pytest.raises(UserError, match="dataset-fashion-mnist"):
        sources.load(Config(data_dir=str(tmp_path / "absent")))


def _png(path, value, size=(20, 16), mode="RGB"):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new(mode, size, value).save(path)


def _tree(root):
    """A 3-level image folder: 2 coarse classes, 3 fine classes, 2 images each."""
    for split in ("train", "test"):
        for coarse, fines in {"birds": ["crow", "owl"], "cats": ["lion"]}.items():
            for fine in fines:
                for i in range(2):
                    _png(str(root / split / coarse / fine / f"{i}.png"), (i, 2, 3))


def test_image_folder_three_levels(tmp_path):
    _tree(tmp_path)
    source = sources.load(Config(dataset="image_folder", data_dir=str(tmp_path),
                                 image_size=32))
    assert source.hierarchy.fine_names == ("crow", "lion", "owl")
    assert source.hierarchy.to_dict() == {"crow": "birds", "owl": "birds", "lion": "cats"}
    assert len(source.train) == 6 and source.image_shape == (32, 32, 3)
    assert source.train.paths[0].endswith(os.path.join("birds", "crow", "0.png"))
    np.testing.assert_array_equal(source.train.coarse, [0, 0, 0, 0, 1, 1])


def test_image_folder_two_levels_needs_a_map(tmp_path):
    for split in ("train", "test"):
        for fine in ("crow", "lion"):
            _png(str(tmp_path / split / fine / "a.png"), (1, 2, 3))
    with pytest.raises(UserError, match="coarse_map"):
        sources.load(Config(dataset="image_folder", data_dir=str(tmp_path)))
    (tmp_path / "coarse_map.json").write_text(json.dumps({"crow": "bird", "lion": "cat"}))
    source = sources.load(Config(dataset="image_folder", data_dir=str(tmp_path)))
    assert source.hierarchy.coarse_names == ("bird", "cat")


def test_image_folder_missing_split(tmp_path):
    with pytest.raises(UserError, match="train"):
        sources.load(Config(dataset="image_folder", data_dir=str(tmp_path)))


def test_image_folder_with_a_corrupt_image_stops_at_once_naming_it(tmp_path):
    _tree(tmp_path)
    bad = tmp_path / "train" / "birds" / "owl" / "1.png"
    bad.write_bytes(bad.read_bytes()[:60])  # Truncated: the data ends early.
    with pytest.raises(UserError, match="1 image file") as e:
        sources.load(Config(dataset="image_folder", data_dir=str(tmp_path), image_size=32))
    assert str(bad) in str(e.value) and "--skip_bad_images" in str(e.value)
    assert "\n" not in str(e.value)


def test_skip_bad_images_trains_without_them_and_says_which(tmp_path):
    _tree(tmp_path)
    bad = tmp_path / "test" / "cats" / "lion" / "0.png"
    bad.write_bytes(b"not an image at all")
    source = sources.load(Config(dataset="image_folder", data_dir=str(tmp_path), image_size=32,
                                 skip_bad_images=True))
    assert len(source.train) == 6 and len(source.test) == 5
    assert str(bad) not in source.test.paths.tolist()
    assert [p for p, _ in source.skipped] == [str(bad)]
    assert sources.describe(source)["skipped_images"] == 1
    sources.write_skipped(source, str(tmp_path / "skipped.csv"))
    assert str(bad) in (tmp_path / "skipped.csv").read_text()


def test_an_empty_class_folder_is_named(tmp_path):
    _tree(tmp_path)
    (tmp_path / "train" / "birds" / "raven").mkdir()
    with pytest.raises(UserError, match="raven has no images"):
        sources.load(Config(dataset="image_folder", data_dir=str(tmp_path), image_size=32))


def test_hidden_folders_are_not_classes(tmp_path):
    _tree(tmp_path)
    (tmp_path / "train" / ".ipynb_checkpoints").mkdir()
    source = sources.load(Config(dataset="image_folder", data_dir=str(tmp_path), image_size=32))
    assert source.hierarchy.fine_names == ("crow", "lion", "owl")


def test_idx_files_that_are_truncated_or_not_gzip_name_the_file(tmp_path):
    array = np.zeros((4, 3, 3), np.uint8)
    whole = tmp_path / "whole-idx3-ubyte.gz"
    with gzip.open(whole, "wb") as f:
        f.write(bytes([0, 0, 0x08, 3]) + struct.pack(">3I", 4, 3, 3) + array.tobytes())
    cut = tmp_path / "cut-idx3-ubyte.gz"
    cut.write_bytes(whole.read_bytes()[:20])
    plain = tmp_path / "plain-idx3-ubyte.gz"
    plain.write_bytes(b"this is not gzip")
    for path in (cut, plain):
        with pytest.raises(ValueError, match=str(path)):
            idx.read_idx(str(path))


def test_fashion_mnist_images_and_labels_of_other_counts_are_refused(fashion_dir, tmp_path):
    for name in os.listdir(fashion_dir):
        os.symlink(os.path.join(fashion_dir, name), tmp_path / name)
    os.remove(tmp_path / "train-labels-idx1-ubyte.gz")
    os.symlink(os.path.join(fashion_dir, "t10k-labels-idx1-ubyte.gz"),
               tmp_path / "train-labels-idx1-ubyte.gz")
    with pytest.raises(UserError, match="train-labels-idx1-ubyte.gz do not match"):
        sources.load(Config(data_dir=str(tmp_path)))


def test_validation_split_is_a_fixed_stratified_hold_out(fashion_dir):
    """--eval_split=validation scores N training images that training never sees: the
    same ones whatever --seed, each coarse class in its share, test images untouched."""
    base = Config(data_dir=fashion_dir)
    full = sources.load(base)
    got = sources.load(base.replace(eval_split="validation", validation_split=10000))
    again = sources.load(base.replace(eval_split="validation", validation_split=10000, seed=5))
    assert len(got.train) == 50000 and len(got.test) == 10000
    np.testing.assert_array_equal(got.test.images, again.test.images)
    _, counts = np.unique(got.test.coarse, return_counts=True)
    _, all_counts = np.unique(full.train.coarse, return_counts=True)
    assert np.all(np.abs(counts - all_counts * 10000 / 60000) <= 1) and counts.sum() == 10000
    # Together they are the training split, each image once.
    seen = np.concatenate([got.train.images, got.test.images]).reshape(60000, -1)
    assert len(np.unique(seen, axis=0)) == len(np.unique(full.train.images.reshape(60000, -1),
                                                         axis=0))
    assert not np.array_equal(got.test.images[:100], full.test.images[:100])
    with pytest.raises(UserError, match="--validation_split"):
        sources.load(base.replace(eval_split="validation", validation_split=60000))


def test_hold_out_of_a_stream_filters_it_to_the_same_examples():
    coarse = np.array([0, 1] * 10, np.int32)
    split = Split(fine=np.arange(20, dtype=np.int32), coarse=coarse,
                  stream=Stream(lambda: tf.data.Dataset.range(20).map(tf.strings.as_string)))
    train, held = sources.hold_out(split, 6)
    assert sorted(np.concatenate([train.fine, held.fine])) == list(range(20))
    assert list(np.bincount(held.coarse)) == [3, 3]
    for part in (train, held):
        assert [int(x) for x in part.stream.dataset().as_numpy_iterator()] == list(part.fine)
