"""Raw datasets: images (in memory or as files), fine labels and the hierarchy.

NumPy only. `load(config)` picks the reader named by `config.dataset`, applies
`--coarse_map` and `--max_*_examples`, and returns a `Source`.
"""

import csv
import dataclasses
import os

import numpy as np

from grafit_tf.data import hierarchy as hierarchy_lib
from grafit_tf.data import image_check, tfds_sources
from grafit_tf.data.idx import read_idx
from grafit_tf.data.types import IMAGENET_STATS, Source, Split, Stream
from grafit_tf.errors import UserError

FASHION_MNIST_CLASSES = ("tshirt_top", "trouser", "pullover", "dress", "coat",
                         "sandal", "shirt", "sneaker", "bag", "ankle_boot")
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
# Per-channel mean / std in 0..255 units, baked into the model's input layer.
FASHION_MNIST_STATS = ((72.94,), (90.02,))


def load(config):
    """Loads the dataset named by `config.dataset`. Raises `UserError` if absent."""
    if config.dataset == "fashion_mnist":
        source = _fashion_mnist(config)
    elif config.dataset == "image_folder":
        source = _image_folder(config)
    else:
        source = tfds_sources.load(config)
    train, test = source.train, source.test
    if config.eval_split == "validation":  # The same images whatever --seed.
        train, test = hold_out(train, config.validation_split)
    train = train.take(config.max_train_examples)
    test = test.take(config.max_eval_examples)
    skipped = ()
    if train.paths is not None:  # Files: every one must decode before training starts.
        (train, test), skipped = _without_bad_images((train, test), config)
    # MaskCon's protocol evaluates resized whole images, no centre crop.
    eval_resize = "resize" if config.eval_protocol == "maskcon" else source.eval_resize
    return dataclasses.replace(source, train=train, test=test, eval_resize=eval_resize,
                               skipped=skipped)


def hold_out(split, n, seed=0):
    """Splits `split` into (train, validation), each in `split`'s order: n examples drawn
    once by a fixed `seed`, stratified by coarse label (each class's share within one)."""
    if n >= len(split):
        raise UserError(f"--validation_split={n} leaves no training image of the "
                        f"{len(split)}: use a smaller --validation_split.")
    classes, counts = np.unique(split.coarse, return_counts=True)
    share = counts * n / len(split)
    quota = np.floor(share).astype(int)
    quota[np.argsort(quota - share, kind="stable")[: n - quota.sum()]] += 1  # Largest remainders.
    rng = np.random.default_rng(seed)
    held = np.zeros(len(split), bool)
    for c, q in zip(classes, quota):
        held[rng.permutation(np.flatnonzero(split.coarse == c))[:q]] = True
    return tuple(split.subset(np.flatnonzero(mask), _filtered(split.stream, mask))
                 for mask in (~held, held))


def _filtered(stream, keep):
    """`stream` with only the elements where `keep` `[N]` bool is true (None: None)."""
    if stream is None:
        return None
    import tensorflow as tf  # Here only: serving imports this module (via png_folders).

    table = tf.constant(keep)
    return Stream(lambda: stream.dataset().enumerate().filter(
        lambda i, _: tf.gather(table, i)).map(lambda _, x: x))


def _without_bad_images(splits, config):
    """The splits without their files that do not decode, and those files; `UserError`
    if some do not decode and `--skip_bad_images` is off."""
    bad = image_check.bad_images([p for split in splits for p in split.paths])
    if not bad:
        return splits, ()
    if not config.skip_bad_images:
        listed = "; ".join(f"{p} ({reason})" for p, reason in bad[:5])
        more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
        raise UserError(f"{len(bad)} image file(s) cannot be decoded: {listed}{more}. Fix or "
                        "remove them, or pass --skip_bad_images to train without them.")
    drop = {p for p, _ in bad}
    kept = []
    for split in splits:
        keep = np.asarray([p not in drop for p in split.paths], bool)
        kept.append(Split(paths=split.paths[keep], fine=split.fine[keep],
                          coarse=split.coarse[keep]))
    print(f"Skipping {len(bad)} image file(s) that cannot be decoded (--skip_bad_images).",
          flush=True)
    return tuple(kept), tuple(bad)


def write_skipped(source, path):
    """Lists `source.skipped` as CSV: path, reason."""
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "reason"])
        writer.writerows(source.skipped)


def _fashion_mnist(config):
    data_dir = config.data_dir
    if not os.path.isdir(data_dir):
        raise UserError(
            f"Fashion-MNIST not found: --data_dir={data_dir} does not exist; install it with "
            "`sudo apt-get install -y dataset-fashion-mnist` or point --data_dir at the IDX files.")
    coarse_map = config.coarse_map or hierarchy_lib.builtin_map("fashion_mnist_coarse4")
    hier = hierarchy_lib.load_coarse_map(coarse_map, FASHION_MNIST_CLASSES)
    splits = {}
    for split, (images_file, labels_file) in FASHION_MNIST_FILES.items():
        paths = [os.path.join(data_dir, f) for f in (images_file, labels_file)]
        absent = [p for p in paths if not os.path.isfile(p)]
        if absent:
            raise UserError(
                f"Fashion-MNIST file missing: {absent[0]}; install `dataset-fashion-mnist` "
                "or point --data_dir at a folder with the four IDX .gz files.")
        try:
            images = read_idx(paths[0])[..., None]  # [N, 28, 28, 1]
            fine = read_idx(paths[1]).astype(np.int32)
        except ValueError as e:  # Truncated, not gzip, bad header.
            raise UserError(f"Fashion-MNIST file damaged: {e}; reinstall "
                            "`dataset-fashion-mnist`.") from None
        if images.shape[1:] != (28, 28, 1) or len(images) != len(fine) or fine.max() > 9:
            raise UserError(f"{paths[0]} and {paths[1]} do not match: {images.shape[0]} "
                            f"images {images.shape[1:3]}, {len(fine)} labels up to "
                            f"{fine.max()}; reinstall `dataset-fashion-mnist`.")
        splits[split] = Split(images=images, fine=fine, coarse=hier.coarse_of(fine))
    return Source(name="fashion_mnist", train=splits["train"], test=splits["test"],
                  hierarchy=hier, image_shape=(28, 28, 1), mean=FASHION_MNIST_STATS[0],
                  std=FASHION_MNIST_STATS[1])


def _images_of(folder):
    """The images of a class folder; an empty one is a mistake, not a class of none."""
    images = sorted(os.path.join(folder, f) for f in os.listdir(folder)
                    if f.lower().endswith(IMAGE_EXTENSIONS)
                    and os.path.isfile(os.path.join(folder, f)))
    if not images:
        raise UserError(f"{folder} has no images ({', '.join(IMAGE_EXTENSIONS)}): add some, "
                        "or remove the folder.")
    return images


def _subdirs(folder):
    """Class folders: hidden ones (`.ipynb_checkpoints`, ...) are not classes."""
    return sorted(d for d in os.listdir(folder)
                  if not d.startswith(".") and os.path.isdir(os.path.join(folder, d)))


def scan_image_folder(root):
    """Lists a split folder.

    Two layouts: `root/<coarse>/<fine>/<image>` (the hierarchy is the tree) and
    `root/<fine>/<image>` (the hierarchy must come from a coarse map).

    Returns:
        (paths, fine_names_per_image, tree_map) where `tree_map` is the
        fine -> coarse dict read off a 3-level tree, or None for 2 levels.
    """
    paths, fines, tree_map = [], [], {}
    for top in _subdirs(root):
        top_dir = os.path.join(root, top)
        inner = _subdirs(top_dir)
        if inner:
            for fine in inner:
                if tree_map.get(fine, top) != top:
                    raise UserError(
                        f"{root}: fine class {fine!r} appears under two coarse classes "
                        f"({tree_map[fine]!r} and {top!r}); fine names must be unique.")
                tree_map[fine] = top
                images = _images_of(os.path.join(top_dir, fine))
                paths += images
                fines += [fine] * len(images)
        else:
            images = _images_of(top_dir)
            paths += images
            fines += [top] * len(images)
    return paths, fines, (tree_map or None)


def _image_folder(config):
    root = config.data_dir
    split_dirs = {s: os.path.join(root, s) for s in ("train", "test")}
    for split, d in split_dirs.items():
        if not os.path.isdir(d):
            raise UserError(
                f"--dataset=image_folder needs {d}: put the {split} images in "
                f"{root}/{split}/<coarse>/<fine>/<image> or {root}/{split}/<fine>/<image>.")
    scanned = {s: scan_image_folder(d) for s, d in split_dirs.items()}
    fine_names = tuple(sorted(set(scanned["train"][1])))
    if not fine_names:
        raise UserError(f"{split_dirs['train']}: no images found ({', '.join(IMAGE_EXTENSIONS)}).")
    tree_map = scanned["train"][2]
    if config.coarse_map:
        hier = hierarchy_lib.load_coarse_map(config.coarse_map, fine_names)
    elif tree_map:
        hier = hierarchy_lib.from_mapping(fine_names, tree_map, source=f"the tree {root}/train")
    else:
        mapping_file = os.path.join(root, "coarse_map.json")
        if not os.path.isfile(mapping_file):
            raise UserError(
                f"{root}/train is a <fine>/<image> tree: give --coarse_map=FILE (JSON fine -> "
                f"coarse) or put it at {mapping_file}.")
        hier = hierarchy_lib.load_coarse_map(mapping_file, fine_names)
    index = {n: i for i, n in enumerate(fine_names)}
    splits = {}
    for split, (paths, fines, _) in scanned.items():
        unknown = sorted(set(fines) - set(index))
        if unknown:
            raise UserError(f"{split_dirs[split]}: classes absent from train: {unknown[:5]}.")
        fine = np.asarray([index[f] for f in fines], np.int32)
        splits[split] = Split(paths=np.asarray(paths), fine=fine, coarse=hier.coarse_of(fine))
    size = config.image_size or 224
    return Source(name="image_folder", train=splits["train"], test=splits["test"],
                  hierarchy=hier, image_shape=(size, size, 3), mean=IMAGENET_STATS[0],
                  std=IMAGENET_STATS[1], resize="resize_center_crop")


def describe(source):
    """A JSON-serialisable summary stored in the work directory."""
    hier = source.hierarchy
    return {
        "skipped_images": len(source.skipped), "name": source.name,
        "train_examples": len(source.train), "test_examples": len(source.test),
        "image_shape": list(source.image_shape), "mean": list(source.mean),
        "std": list(source.std), "resize": source.resize,
        "fine_names": list(hier.fine_names), "coarse_names": list(hier.coarse_names),
        "coarse_map": hier.to_dict(),
    }
