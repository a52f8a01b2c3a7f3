"""TFDS datasets on `tfds.testing.mock_data`: fake examples with each
builder's real feature structure, from the metadata shipped in the package. Nothing
is downloaded; the absent-dataset path is checked without the mock."""

import gzip
import json
import os
from unittest import mock as um

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


# --- ImageNet: the 1,000 classes at both levels ----------------------------------


def test_imagenet_trains_on_its_1000_classes(mock):
    source = sources.load(Config(dataset="imagenet2012", tfds_data_dir=mock))
    h = source.hierarchy
    assert h.num_fine == h.num_coarse == 1000 and h.fine_names == h.coarse_names
    assert h.fine_names[0] == "n01440764" and h.fine_to_coarse == tuple(range(1000))
    raw = raw_labels("imagenet2012", "validation", ["label"], mock)["label"]
    np.testing.assert_array_equal(source.test.fine, raw)  # Validation serves as test.
    np.testing.assert_array_equal(source.train.coarse, source.train.fine)


def test_absent_imagenet_says_how_to_build_it(tmp_path):
    with pytest.raises(UserError, match="tfds build imagenet2012 --data_dir=.* --manual_dir="
                                        "DIR` beforehand, DIR holding ILSVRC2012_img_train.tar"
                       ) as e:
        sources.load(Config(dataset="imagenet2012", tfds_data_dir=str(tmp_path)))
    assert "\n" not in str(e.value)


# --- Stanford Online Products: MaskCon's splits (--sop_split) --------------------

SUPER = ("bicycle", "cabinet", "chair", "coffee_maker", "fan", "kettle", "lamp", "mug", "sofa",
         "stapler", "table", "toaster")


def _products(paths):
    """`{product: [its paths]}` in path order."""
    out = {}
    for p in paths:
        out.setdefault(p.rsplit("_", 1)[0], []).append(p)
    return out


def test_shipped_maskcon_splits_are_as_documented():
    with gzip.open(f"{hierarchy.MAPS_DIR}/maskcon/sop_splits.json.gz") as f:
        lists = json.load(f)
    for split, (n_train, n_test) in (("sop_split1", (25368, 25278)),
                                     ("sop_split2", (14980, 2996))):
        get = lambda part, key: lists[f"{split}/{part}_{key}"]  # noqa: E731
        assert (len(get("train", "path")), len(get("test", "path"))) == (n_train, n_test)
        for part in ("train", "test"):
            paths = get(part, "path")
            assert len(set(paths)) == len(paths)
            # MaskCon's coarse label is the folder's super class, in TFDS's super_class_id
            # order; its fine label is the product, one per product.
            assert [SUPER.index(p.split("/")[0].removesuffix("_final")) for p in paths] == \
                get(part, "coarse_label")
            fine = {}
            for p, f in zip(paths, get(part, "fine_label")):
                fine.setdefault(p.rsplit("_", 1)[0], set()).add(f)
            assert all(len(v) == 1 for v in fine.values())
            assert len({f for v in fine.values() for f in v}) == len(fine)
        train, test = (_products(get(part, "path")) for part in ("train", "test"))
        if split == "sop_split1":
            assert (len(train), len(test)) == (2517, 2518) and not set(train) & set(test)
        else:  # The same 1,498 products, 10 training and 2 test images each.
            assert set(train) == set(test) and len(train) == 1498
            assert {len(v) for v in train.values()} == {10}
            assert {len(v) for v in test.values()} == {2}
    assert tfds_sources.maskcon_sop_split("maskcon2")["test"] == lists["sop_split2/test_path"]
    names = tfds.builder("stanford_online_products", data_dir="/nonexistent").info.features[
        "super_class_id"].names
    assert tuple(names) == SUPER


def _few_products(paths, k):
    """The `k` products of `paths` with the fewest images: `{product: paths}`."""
    return dict(sorted(_products(paths).items(), key=lambda kv: (len(kv[1]), kv[0]))[:k])


@pytest.fixture(scope="module")
def sop(tmp_path_factory):
    """A real TFDS `stanford_online_products`, built by TFDS's own builder from a fake
    official folder: a few products of MaskCon's split 1 and 2 among others, each image
    a flat colour that names it. Returns `(tfds_data_dir, MaskCon subset, colour of each path)`."""
    root = str(tmp_path_factory.mktemp("sop_tfds"))
    folder = f"{root}/downloads/extracted/ZIP.fake/Stanford_Online_Products"
    want, products = {"maskcon1": {}, "maskcon2": {}}, {}
    for name in want:
        full = tfds_sources.maskcon_sop_split(name)
        for part in ("train", "test"):
            few = _few_products(full[part], 2)
            want[name][part] = [p for v in few.values() for p in v]
            for product in few:
                products[product] = [p for q in full.values() for p in q
                                     if p.startswith(product + "_")]
    for n in range(3):  # Products MaskCon leaves out.
        products[f"{SUPER[n]}_final/99{n}"] = [f"{SUPER[n]}_final/99{n}_{k}.JPG" for k in range(3)]
    ebay = {"train": [], "test": []}  # Some of each kind in each TFDS split.
    for i, product in enumerate(sorted(products)):
        ebay[("train", "test")[i % 2]].append(products[product])
    grey, class_id = {}, 0
    for split, products in ebay.items():
        lines = ["image_id class_id super_class_id path"]
        for paths in sorted(products):
            class_id += 1
            for p in sorted(paths):
                grey[p] = (len(grey) % 60 * 4 + 2, len(grey) // 60 * 4 + 2, 0)
                lines.append(f"{len(lines)} {class_id} "
                             f"{SUPER.index(p.split('/')[0][:-6]) + 1} {p}")
                tf.io.write_file(f"{folder}/{p}", tf.io.encode_png(
                    np.full([6, 6, 3], grey[p], np.uint8)))
        tf.io.write_file(f"{folder}/Ebay_{split}.txt", "\n".join(lines) + "\n")
    manager = um.MagicMock()
    manager.download_and_extract.return_value = os.path.dirname(folder)
    with um.patch.object(tfds.core.DatasetBuilder, "_make_download_manager",
                         return_value=manager):
        tfds.builder("stanford_online_products", data_dir=root).download_and_prepare(
            download_config=tfds.download.DownloadConfig(
                compute_stats=tfds.download.ComputeStatsMode.SKIP))
    return root, want, grey


def _greys(split):
    return [tuple(int(round(v)) for v in tf.io.decode_image(b, channels=3).numpy().mean((0, 1)))
            for b in split.stream.dataset()]


@pytest.mark.parametrize("name", ["maskcon1", "maskcon2"])
def test_maskcon_split_selects_exactly_its_images(sop, monkeypatch, name):
    root, want, grey = sop
    monkeypatch.setattr(tfds_sources, "maskcon_sop_split", lambda s: want[s])
    source = sources.load(Config(dataset="stanford_online_products", sop_split=name,
                                 tfds_data_dir=root))
    h, by_grey = source.hierarchy, {g: p for p, g in grey.items()}
    assert h.coarse_names == SUPER
    assert h.fine_names == tuple(sorted(_products(want[name]["train"] + want[name]["test"])))
    for part, split in (("train", source.train), ("test", source.test)):
        paths = [by_grey[g] for g in _greys(split)]
        assert sorted(paths) == sorted(want[name][part]) and len(split) == len(paths)
        # Labels in the stream's order: the product, and the super class of its folder.
        assert [h.fine_names[f] for f in split.fine] == [p.rsplit("_", 1)[0] for p in paths]
        assert [SUPER[c] + "_final" for c in split.coarse] == [p.split("/")[0] for p in paths]


def test_sop_full_split_is_unchanged(sop):
    root, _, grey = sop
    source = sources.load(Config(dataset="stanford_online_products", tfds_data_dir=root))
    assert len(source.train) + len(source.test) == len(grey)
    assert source.hierarchy.num_fine == 22634
    raw = raw_labels("stanford_online_products", "train", ["class_id"], root)["class_id"]
    np.testing.assert_array_equal(source.train.fine, raw)


def test_maskcon_image_missing_from_the_data_is_one_line(sop, monkeypatch):
    root, want, _ = sop
    gone = {**want["maskcon1"], "test": want["maskcon1"]["test"] + ["mug_final/1_0.JPG"]}
    monkeypatch.setattr(tfds_sources, "maskcon_sop_split", lambda s: gone)
    with pytest.raises(UserError, match=r"^1 images of --sop_split=maskcon1 are not in the "
                                        r"prepared stanford_online_products .*tfds build") as e:
        sources.load(Config(dataset="stanford_online_products", sop_split="maskcon1",
                            tfds_data_dir=root))
    assert "\n" not in str(e.value)


def test_maskcon_split_needs_the_official_lists_in_order(sop, monkeypatch):
    root, want, _ = sop
    monkeypatch.setattr(tfds_sources, "maskcon_sop_split", lambda s: want[s])
    config = Config(dataset="stanford_online_products", sop_split="maskcon2", tfds_data_dir=root)
    monkeypatch.setattr(tfds_sources.hashlib, "md5", tfds_sources.hashlib.sha1)
    with pytest.raises(UserError, match="does not follow the order of .*Ebay_train.txt"):
        sources.load(config)
    monkeypatch.setattr(tfds_sources.glob, "glob", lambda pattern: [])
    with pytest.raises(UserError, match="Ebay_train.txt is not under .*/downloads; copy") as e:
        sources.load(config)
    assert "\n" not in str(e.value)


def test_ebay_rows_follow_the_hash_order_across_shards(tmp_path):
    """Record r of a split is its row with the r-th smallest md5(split name + row), over
    the shards in order, whatever order they are read in."""
    import hashlib
    import types
    rows = [(c, f"chair_final/{c}_{k}.JPG") for c in range(4) for k in range(2)]
    manual = tmp_path / "downloads" / "manual"
    manual.mkdir(parents=True)
    (manual / "Ebay_test.txt").write_text("image_id class_id super_class_id path\n" + "".join(
        f"{i + 1} {c + 1} 3 {p}\n" for i, (c, p) in enumerate(rows)))
    by_hash = sorted(range(8), key=lambda i: hashlib.md5(f"test{i}".encode()).hexdigest())
    info = types.SimpleNamespace(name="test", filenames=["s-00000-of-00002", "s-00001-of-00002"],
                                 shard_lengths=[5, 3])
    read = [(1, 2), (0, 0), (1, 0), (0, 4), (1, 1), (0, 1), (0, 2), (0, 3)]  # (shard, index)
    records = [5 * shard + i for shard, i in read]
    paths = tfds_sources._ebay_paths(
        Config(dataset="stanford_online_products", sop_split="maskcon1",
               tfds_data_dir=str(tmp_path)), info,
        [f"{info.filenames[s]}__{i}".encode() for s, i in read],
        np.asarray([rows[by_hash[r]][0] for r in records]))
    assert list(paths) == [rows[by_hash[r]][1] for r in records]


def test_maskcon_split_feeds_the_pipeline(sop, monkeypatch):
    root, want, _ = sop
    monkeypatch.setattr(tfds_sources, "maskcon_sop_split", lambda s: want[s])
    config = Config(dataset="stanford_online_products", sop_split="maskcon1", tfds_data_dir=root,
                    **TINY)
    source = sources.load(config)
    batch = next(iter(pipeline.train_dataset_fn(source, config)()))
    assert batch["views"].shape == (8, 2, 32, 32, 3)
    np.testing.assert_array_equal(batch["label"], source.train.coarse[batch["index"].numpy()])
    images = next(iter(pipeline.eval_dataset(source.test, source, batch_size=4)))
    assert images.shape == (4, 32, 32, 3)
