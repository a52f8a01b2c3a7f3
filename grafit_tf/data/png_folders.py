"""Writes Fashion-MNIST splits as PNG folders `<fine label>/<index>.png`.

NumPy and Pillow only (no TensorFlow), so the demo and the tests can serve real
image files. `<index>` is the image's position in the split, zero-padded to 5
digits, so a file maps back to its IDX row.
"""

import os

import numpy as np
from PIL import Image

from grafit_tf.data.idx import read_idx
from grafit_tf.data.sources import FASHION_MNIST_CLASSES, FASHION_MNIST_FILES
from grafit_tf.errors import UserError


def read_fashion_mnist(data_dir, split):
    """One split of the IDX files: `(images [N, 28, 28] uint8, labels [N] int64)`.

    Raises:
        UserError: unknown split or missing files.
    """
    if split not in FASHION_MNIST_FILES:
        raise UserError(f"--split={split!r}: choose one of {', '.join(FASHION_MNIST_FILES)}.")
    paths = [os.path.join(data_dir, name) for name in FASHION_MNIST_FILES[split]]
    for path in paths:
        if not os.path.isfile(path):
            raise UserError(f"Fashion-MNIST file missing: {path}; install dataset-fashion-mnist "
                            "or point --data_dir at the folder of the IDX .gz files.")
    return read_idx(paths[0]), read_idx(paths[1]).astype(np.int64)


def select(labels, max_per_class=0, indices=None):
    """`[M]` int64 sorted indices to write: of `indices` (None: all) into `labels` `[N]`,
    the first `max_per_class` of each class (0: all)."""
    candidates = np.arange(len(labels)) if indices is None else np.sort(np.asarray(indices))
    if max_per_class <= 0:
        return candidates.astype(np.int64)
    kept, counts = [], {}
    for i in candidates:
        label = int(labels[i])
        if counts.get(label, 0) < max_per_class:
            counts[label] = counts.get(label, 0) + 1
            kept.append(i)
    return np.asarray(kept, np.int64)


def write_png_folders(images, labels, output, class_names=FASHION_MNIST_CLASSES, indices=None):
    """Writes `output/<class name>/<index:05d>.png` for each selected image, each under
    a temporary name then renamed: an interrupted run leaves no truncated PNG.

    Args:
        images: `[N, H, W]` or `[N, H, W, C]` uint8 (C in 1, 3).
        labels: `[N]` int, indices into `class_names`.
        output: the folder (created).
        class_names: folder name of each label.
        indices: which images to write (default: all).

    Returns:
        dict class name -> number of files written.
    """
    indices = np.arange(len(images)) if indices is None else np.asarray(indices)
    counts = {}
    for name in class_names:
        os.makedirs(os.path.join(output, name), exist_ok=True)
    for i in indices:
        name = class_names[int(labels[i])]
        pixels = images[i]
        if pixels.ndim == 3 and pixels.shape[-1] == 1:
            pixels = pixels[..., 0]
        path = os.path.join(output, name, f"{int(i):05d}.png")
        tmp = path + ".tmp"
        Image.fromarray(np.ascontiguousarray(pixels, np.uint8)).save(tmp, format="PNG")
        os.replace(tmp, path)
        counts[name] = counts.get(name, 0) + 1
    return {name: counts.get(name, 0) for name in class_names}


def fashion_mnist_to_png(data_dir, split, output, max_per_class=0):
    """Writes a Fashion-MNIST split as PNG folders. Returns the per-class counts."""
    images, labels = read_fashion_mnist(data_dir, split)
    return write_png_folders(images, labels, output, FASHION_MNIST_CLASSES,
                             select(labels, max_per_class))
