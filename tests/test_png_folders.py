"""Fashion-MNIST splits written as PNG folders `<fine label>/<index>.png`."""

import os
import subprocess
import sys

import numpy as np
from PIL import Image

from grafit_tf.data import png_folders
from grafit_tf.data.sources import FASHION_MNIST_CLASSES
from tests.conftest import REPO


def test_select_first_per_class():
    labels = np.array([0, 1, 0, 0, 2, 1, 0])
    np.testing.assert_array_equal(png_folders.select(labels, 2), [0, 1, 2, 4, 5])
    np.testing.assert_array_equal(png_folders.select(labels, 0), np.arange(7))
    np.testing.assert_array_equal(png_folders.select(labels, 1, indices=[6, 5, 4]), [4, 5, 6])


def test_pngs_hold_the_exact_pixels(fashion_dir, tmp_path):
    images, labels = png_folders.read_fashion_mnist(fashion_dir, "test")
    counts = png_folders.fashion_mnist_to_png(fashion_dir, "test", str(tmp_path), max_per_class=3)
    assert counts == {name: 3 for name in FASHION_MNIST_CLASSES}
    files = sorted(os.path.join(d, f) for d, _, fs in os.walk(tmp_path) for f in fs)
    assert len(files) == 30
    for path in files:
        index = int(os.path.splitext(os.path.basename(path))[0])
        assert os.path.basename(os.path.dirname(path)) == FASHION_MNIST_CLASSES[labels[index]]
        with Image.open(path) as image:
            assert image.mode == "L"
            np.testing.assert_array_equal(np.asarray(image), images[index])


def test_cli_writes_and_refuses_a_non_empty_output(fashion_dir, tmp_path):
    script = os.path.join(REPO, "export", "fashion_mnist_png.py")
    args = [sys.executable, script, f"--data_dir={fashion_dir}", "--split=train",
            "--max_per_class=1", f"--output={tmp_path / 'png'}"]
    first = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert first.returncode == 0, first.stderr
    assert "wrote 10 PNGs" in first.stdout
    again = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert again.returncode == 2 and "--overwrite" in again.stderr
    missing = subprocess.run(args[:2] + [f"--data_dir={tmp_path / 'nope'}",
                                         f"--output={tmp_path / 'other'}"],
                             capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2 and "Fashion-MNIST file missing" in missing.stderr
