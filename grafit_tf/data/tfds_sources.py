"""TensorFlow Datasets with coarse/fine hierarchies, read into a `types.Source`.

Read with `tfds.load(..., data_dir=--tfds_data_dir, download=False)`: nothing is
downloaded, and an absent dataset stops the run at once with a `UserError` saying
how to prepare it.

Two ways to hold a split:
- CIFAR-100 (50,000 images of 32x32x3, 150 MB) is materialised as uint8 in
  memory: exact random access, like Fashion-MNIST.
- Every other dataset is a `types.Stream` of encoded images (TFDS's JPEG / PNG
  bytes, decoded by the pipeline). TFRecord files have no random access, so
  element i of the fixed read order *is* example i: the labels (read at load time,
  in that order) and the memory slots use that index; training shuffles with a buffer.

Hierarchies (fine label = the dataset's own class id):
- cifar100: the 20 superclasses (`coarse_label`) of the 100 classes (`label`),
  from `maps/cifar100_coarse20.json` (the official grouping; this TFDS version
  ships no class names offline, the map gives them).
- stanford_online_products: `super_class_id` (12) -> `class_id` (22,634); `--sop_split=
  maskcon1|2`: MaskCon's split (`maps/maskcon/`) of TFDS's train + test, its products renumbered.
- i_naturalist2018: `supercategory` (14) -> `label` (8,142).
  For these two the fine -> coarse map is read off the data (every class lies
  in one super class); a class absent from the data goes to coarse class 0.
- cars196: the 8 body types of `maps/cars196_body_type.json` (MaskCon's
  grouping) -> the 196 models.
- food101, oxford_flowers102, caltech_birds2011: fine labels only, for
  transfer (`--method=finetune`); the coarse level is a single class `all`,
  which makes `--method=grafit` on them unsupervised (the paper's special case).
- imagenet2012: the 1,000 classes at both levels; the validation split serves as test.
`--coarse_map=FILE` replaces any of these groupings, by fine class name.
"""

import dataclasses
import glob
import gzip
import hashlib
import json
import os

import numpy as np

from grafit_tf.data import hierarchy as hierarchy_lib
from grafit_tf.data.types import IMAGENET_STATS, Source, Split, Stream
from grafit_tf.errors import UserError

# Per-channel mean / std of CIFAR-100's training images, in 0..255 units.
CIFAR100_STATS = ((129.30, 124.07, 112.43), (68.17, 65.39, 70.42))


@dataclasses.dataclass(frozen=True)
class Spec:
    """How one TFDS dataset maps onto fine / coarse labels.

    Attributes:
        train, test: TFDS split strings.
        fine: feature holding the fine label.
        coarse: feature holding a per-example coarse label ('' : none).
        builtin_map: a `maps/<name>.json` grouping ('' : none).
        in_memory: materialise the images as uint8 (small, fixed-size images).
        size: default `--image_size`.
        manual: what `tfds build --manual_dir=DIR` needs in DIR ('' : none).
    """

    train: str
    test: str
    fine: str = "label"
    coarse: str = ""
    builtin_map: str = ""
    in_memory: bool = False
    size: int = 224
    manual: str = ""


SPECS = {
    "cifar100": Spec("train", "test", builtin_map="cifar100_coarse20", in_memory=True, size=32),
    "stanford_online_products": Spec("train", "test", fine="class_id", coarse="super_class_id"),
    # The test split of iNaturalist 2018 has no labels: evaluate on validation.
    "i_naturalist2018": Spec("train", "validation", coarse="supercategory"),
    "cars196": Spec("train", "test", builtin_map="cars196_body_type"),
    "food101": Spec("train", "validation"),
    # Flowers-102's standard protocol trains on train + validation (2 x 1,020 images).
    "oxford_flowers102": Spec("train+validation", "test"),
    "caltech_birds2011": Spec("train", "test"),
    "imagenet2012": Spec("train", "validation", coarse="label",
                         manual="ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar"),
}
DATASETS = tuple(SPECS)


def load(config):
    """The `types.Source` of `config.dataset`. Raises `UserError` if not prepared."""
    if config.dataset not in SPECS:
        raise UserError(
            f"--dataset={config.dataset!r} is not known; choose one of: "
            f"fashion_mnist, image_folder, {', '.join(DATASETS)}.")
    import tensorflow_datasets as tfds  # Heavy: only for these datasets.

    name, spec = config.dataset, SPECS[config.dataset]
    builder = tfds.builder(name, data_dir=config.tfds_data_dir or None)
    features = builder.info.features
    fine_names = tuple(features[spec.fine].names)
    if name == "stanford_online_products" and config.sop_split != "full":
        splits, fine_names = _sop_maskcon(config, builder)
    else:
        splits = {s: _read(name, split, spec, config)
                  for s, split in (("train", spec.train), ("test", spec.test))}
    hier = _hierarchy(config, name, spec, features, fine_names, splits)
    out = {s: Split(images=images, stream=stream, fine=fine, coarse=hier.coarse_of(fine))
           for s, (images, stream, fine, _) in splits.items()}
    size = config.image_size or spec.size
    stats = CIFAR100_STATS if name == "cifar100" else IMAGENET_STATS
    # CIFAR-100 at its own 32 px needs no resize; any other size uses the
    # resize + centre crop that serving knows too.
    native = spec.in_memory and tuple(out["train"].images.shape[1:3]) == (size, size)
    resize = "none" if native else "resize_center_crop"
    return Source(name=name, train=out["train"], test=out["test"], hierarchy=hier,
                  image_shape=(size, size, 3), mean=stats[0], std=stats[1], resize=resize)


def _tfds_root(config):
    return os.path.expanduser(config.tfds_data_dir or os.environ.get(
        "TFDS_DATA_DIR", "~/tensorflow_datasets"))


def _tfds_load(name, split, config, decoders=None, ids=False):
    """`tfds.load` of one split, always in the same (deterministic) order.

    With `shuffle_files=False` TFDS interleaves its files deterministically:
    every read gives the order the labels and the memory's slots were numbered in.
    `ids`: add each example's `tfds_id` ('<shard file>__<index in it>').
    """
    import tensorflow_datasets as tfds

    try:
        return tfds.load(name, split=split, data_dir=config.tfds_data_dir or None,
                         download=False, shuffle_files=False, decoders=decoders,
                         read_config=tfds.ReadConfig(add_tfds_id=ids))
    except AssertionError as e:  # TFDS's "could not find data in ..." when absent.
        if "could not find data" in str(e):
            where, manual = _tfds_root(config), SPECS[name].manual
            how = (f" --manual_dir=DIR` beforehand, DIR holding {manual}" if manual else
                   "` beforehand (some need a manual download, see the TFDS catalog)")
            raise UserError(f"TFDS dataset {name} is not prepared in {where}: run `tfds build "
                            f"{name} --data_dir={where}{how}; train.py never downloads.") from None
        raise


def _only(keys, encoded_image):
    """Decoders reading only `keys` (+ `image`), the image left encoded if asked.

    Other features (bounding boxes, masks, file names) are never parsed.
    """
    import tensorflow_datasets as tfds

    return tfds.decode.PartialDecoding(
        {k: True for k in ("image", *keys)},
        decoders={"image": tfds.decode.SkipDecoding()} if encoded_image else None)


def _columns(dataset, keys, batch_size):
    """The features `keys` of every element, concatenated: dict of `[N, ...]` arrays."""
    parts = {k: [] for k in keys}
    for batch in dataset.batch(batch_size).as_numpy_iterator():
        for k in keys:
            parts[k].append(batch[k])
    return {k: np.concatenate(v) if v else np.zeros([0], np.int32) for k, v in parts.items()}


def _read(name, split, spec, config):
    """`(images, stream, fine [N], per-example coarse [N] or None)`, labels int32.

    `spec.in_memory`: `images` `[N, H, W, 3]` uint8, no stream. Else `images` is None
    and `stream` a `Stream` of the encoded images; the labels are read now.
    """
    keys = list(dict.fromkeys(filter(None, (spec.fine, spec.coarse))))
    open_dataset = lambda: _tfds_load(name, split, config, _only(keys, not spec.in_memory))
    if spec.in_memory:
        columns = _columns(open_dataset(), ["image", *keys], 4096)
        images, stream = columns.pop("image").astype(np.uint8), None
    else:
        columns = _columns(open_dataset().map(lambda ex: {k: ex[k] for k in keys}), keys, 8192)
        images, stream = None, Stream(open_fn=lambda: open_dataset().map(lambda ex: ex["image"]))
    labels = {k: v.astype(np.int32) for k, v in columns.items()}
    return images, stream, labels[spec.fine], labels.get(spec.coarse)


def _hierarchy(config, name, spec, features, fine_names, splits):
    if config.coarse_map:
        return hierarchy_lib.load_coarse_map(config.coarse_map, fine_names)
    if spec.builtin_map == "cars196_body_type":
        return cars196_hierarchy(fine_names)
    if spec.builtin_map:
        with open(hierarchy_lib.builtin_map(spec.builtin_map), encoding="utf-8") as f:
            mapping = json.load(f)
        # TFDS's CIFAR-100 has no class names offline ('0'..'99'); the official
        # order is the alphabetical order of the names, which the map gives.
        names = tuple(sorted(mapping)) if fine_names[0] == "0" else fine_names
        return hierarchy_lib.from_mapping(names, mapping, source=f"maps/{spec.builtin_map}.json")
    if spec.coarse == spec.fine:  # Each class its own coarse class.
        return hierarchy_lib.Hierarchy(fine_names, fine_names, tuple(range(len(fine_names))))
    if spec.coarse:
        fine = np.concatenate([splits[s][2] for s in ("train", "test")])
        coarse = np.concatenate([splits[s][3] for s in ("train", "test")])
        return from_pairs(fine_names, tuple(features[spec.coarse].names), fine, coarse)
    return hierarchy_lib.Hierarchy(fine_names, ("all",), (0,) * len(fine_names))


def maskcon_sop_split(sop_split):
    """`{"train": paths, "test": paths}` of MaskCon's SOP split 1 or 2 (`maps/maskcon/`)."""
    with gzip.open(os.path.join(hierarchy_lib.MAPS_DIR, "maskcon", "sop_splits.json.gz")) as f:
        lists = json.load(f)
    return {p: lists[f"sop_split{sop_split[-1]}/{p}_path"] for p in ("train", "test")}


def _ebay_paths(config, info, tfds_ids, class_ids):
    """The official path of each example of the TFDS split `info`, from its `tfds_id`: TFDS
    writes the rows 0, 1, ... of `Ebay_<split>.txt` sorted by md5(split name + row number),
    so record r is the row of the r-th smallest hash (checked against `class_ids`)."""
    root, txt = _tfds_root(config), f"Ebay_{info.name}.txt"
    # `tfds build` leaves it in downloads/extracted/*/Stanford_Online_Products/.
    found = sorted(p for n in (1, 2, 3)
                   for p in glob.glob(os.path.join(root, "downloads", *["*"] * n, txt)))
    if not found:
        raise UserError(f"--sop_split={config.sop_split} finds MaskCon's images in TFDS's data "
                        f"by the official Ebay_train.txt and Ebay_test.txt: {txt} is not under "
                        f"{root}/downloads; copy both from Stanford_Online_Products.zip into "
                        f"{root}/downloads/manual/.")
    with open(found[0], encoding="utf-8") as f:
        rows = np.asarray([line.split()[1:] for line in f.read().split("\n")[1:] if line])
    start = dict(zip(info.filenames, np.cumsum([0, *info.shard_lengths]).tolist()))
    record = [start[f] + int(i) for f, i in (t.decode().rsplit("__", 1) for t in tfds_ids)]
    row = np.argsort([int(hashlib.md5(f"{info.name}{i}".encode()).hexdigest(), 16)
                      for i in range(len(rows))])[record] if len(rows) == len(record) else []
    if len(row) != len(record) or (rows[row, 0].astype(int) - 1 != class_ids).any():
        raise UserError(f"The prepared stanford_online_products in {root} does not follow the "
                        f"order of {found[0]}: rebuild it with `tfds build "
                        "stanford_online_products`.")
    return rows[row, 2]


def _sop_maskcon(config, builder):
    """MaskCon's split (`--sop_split`) of TFDS's train + test: `_read`'s splits (images
    encoded) and the names of its products (the fine classes), in path order."""
    import tensorflow as tf

    name, want = "stanford_online_products", maskcon_sop_split(config.sop_split)
    keys, found = ("tfds_id", "class_id", "super_class_id"), {}
    for s in ("train", "test"):
        ds = _tfds_load(name, s, config, _only(keys[1:], True), ids=True)
        cols = _columns(ds.map(lambda ex: {k: ex[k] for k in keys}), keys, 8192)
        found[s] = (_ebay_paths(config, builder.info.splits[s], cols["tfds_id"], cols["class_id"]),
                    cols["super_class_id"].astype(np.int32))
    keep = {p: {s: np.isin(found[s][0], want[p]) for s in found} for p in want}
    missing = sum(len(want[p]) - sum(m.sum() for m in keep[p].values()) for p in want)
    if missing:
        raise UserError(f"{missing} images of --sop_split={config.sop_split} are not in the "
                        f"prepared {name} in {_tfds_root(config)}: rebuild it from the whole "
                        f"Stanford_Online_Products.zip with `tfds build {name}`.")
    products = sorted({q.rsplit("_", 1)[0] for part in want.values() for q in part})
    index = {q: i for i, q in enumerate(products)}

    def images(mask):  # Both TFDS splits' images where `mask`, in the labels' order.
        a, b = (tf.data.Dataset.zip(_tfds_load(name, s, config, _only([], True)),
                                    tf.data.Dataset.from_tensor_slices(mask[s]))
                .filter(lambda ex, k: k).map(lambda ex, k: ex["image"]) for s in found)
        return a.concatenate(b)

    splits = {}
    for p, mask in keep.items():
        paths, coarse = (np.concatenate([found[s][i][mask[s]] for s in found]) for i in (0, 1))
        fine = np.asarray([index[q.rsplit("_", 1)[0]] for q in paths], np.int32)
        splits[p] = (None, Stream(open_fn=lambda mask=mask: images(mask)), fine, coarse)
    return splits, tuple(products)


def from_pairs(fine_names, coarse_names, fine, coarse):
    """The hierarchy read off `(fine, coarse)` label pairs `[N]`.

    Each fine class takes its most frequent coarse class (in the real data
    there is exactly one); a fine class with no example takes coarse class 0.
    """
    counts = np.zeros([len(fine_names), len(coarse_names)], np.int64)
    np.add.at(counts, (fine, coarse), 1)
    return hierarchy_lib.Hierarchy(tuple(fine_names), tuple(coarse_names),
                                   tuple(int(c) for c in counts.argmax(axis=1)))


def cars196_hierarchy(fine_names):
    """The 8 body types of `maps/cars196_body_type.json` over the 196 models; `UserError`
    if the map's class order differs from the dataset's."""
    with open(hierarchy_lib.builtin_map("cars196_body_type"), encoding="utf-8") as f:
        table = json.load(f)
    entries = sorted(table["fine"], key=lambda e: e["index"])
    if tuple(e["name"] for e in entries) != tuple(fine_names):
        raise UserError(
            "maps/cars196_body_type.json does not list the 196 classes in the dataset's "
            "order; give --coarse_map=FILE (JSON model name -> body type) instead.")
    index = {c: i for i, c in enumerate(table["coarse_names"])}
    return hierarchy_lib.Hierarchy(tuple(fine_names), tuple(table["coarse_names"]),
                                   tuple(index[e["coarse"]] for e in entries))
