"""Checks image files before training: every one must decode.

A corrupt file found by the input pipeline would stop the run hours in, with no
file name. `bad_images` opens every file with Pillow, checks its format, verifies
and decodes it (a JPEG at 1/8 scale, still reading all its data), in threads, with
a progress bar on large trees.
"""

import concurrent.futures
import os

from PIL import Image
from tqdm import tqdm

# What `tf.io.decode_image` reads: anything else would fail in the pipeline.
DECODABLE = ("PNG", "JPEG", "GIF", "BMP")
PROGRESS_FROM = 20000  # Files; smaller trees are checked silently.


def problem(path):
    """Why `path` cannot be trained on, or None when it decodes."""
    try:
        with Image.open(path) as image:
            if image.format not in DECODABLE:
                return f"{image.format} is not one of {', '.join(DECODABLE)}"
            image.verify()  # Structure and checksums (a PNG's every chunk).
        with Image.open(path) as image:
            if image.format == "JPEG":  # At 1/8 scale: all of the data, an 8th of the work.
                image.draft("RGB", (max(1, image.width // 8), max(1, image.height // 8)))
            image.load()  # Data that ends early or does not inflate fails here.
    except Exception as e:  # Pillow raises many types for a damaged file.
        return (str(e).strip().splitlines() or [type(e).__name__])[0]
    return None


def bad_images(paths, workers=None):
    """`[(path, reason), ...]`: the files of `paths` that do not decode, in order."""
    workers = workers or min(16, (os.cpu_count() or 1) * 2)
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        reasons = pool.map(problem, paths, chunksize=64)
        if len(paths) >= PROGRESS_FROM:
            reasons = tqdm(reasons, total=len(paths), desc="checking images", unit="img")
        return [(p, r) for p, r in zip(paths, reasons) if r is not None]
