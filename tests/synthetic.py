"""A tiny in-memory dataset with a 2-level hierarchy, for fast model tests."""

import numpy as np

from grafit_tf.data import hierarchy, types


def synthetic_source(n=64):
    """64 random 12x12 gray images, 4 fine classes in 2 coarse classes."""
    rng = np.random.default_rng(0)
    fine = np.arange(n, dtype=np.int32) % 4
    hier = hierarchy.from_mapping(["a", "b", "c", "d"], {"a": "x", "b": "x", "c": "y", "d": "y"})
    split = types.Split(images=rng.integers(0, 256, (n, 12, 12, 1), dtype=np.uint8),
                        fine=fine, coarse=hier.coarse_of(fine))
    return types.Source("synthetic", split, split, hier, (12, 12, 1), (127.0,), (70.0,))
