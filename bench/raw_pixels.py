"""Cosine kNN on raw pixels: the floor every learned embedding must beat."""

import numpy as np

from grafit_tf import evaluation
from grafit_tf.data import sources


def pixels(source):
    """Flattened, L2-normalised pixels of the training and test splits:
    `([N, H*W*C], [Q, H*W*C])` float32."""
    out = []
    for split in (source.train, source.test):
        x = split.images.reshape(len(split), -1).astype(np.float32)
        out.append(x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12))
    return tuple(out)


def raw_pixel_metrics(config):
    """The evaluation protocol on `pixels`, as the learned rows are scored on their
    L2-normalised embeddings.

    Args:
        config: a `Config`; only its data and evaluation settings are read.

    Returns:
        The metrics dict of `evaluation.knn_metrics`.
    """
    source = sources.load(config)
    train, test = pixels(source)
    return evaluation.knn_metrics(
        train, source.train.fine, source.train.coarse,
        test, source.test.fine, source.test.coarse,
        temperature=config.eval_temperature,
        num_fine=source.hierarchy.num_fine)
