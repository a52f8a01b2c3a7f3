"""Cosine kNN on raw pixels: the floor every learned embedding must beat."""

from grafit_tf import embedding_transform, evaluation
from grafit_tf.data import sources


def pixels(source):
    """Flattened, L2-normalised pixels of the training and test splits:
    `([N, H*W*C], [Q, H*W*C])` float32."""
    return tuple(embedding_transform.normalise(split.images.reshape(len(split), -1))
                 for split in (source.train, source.test))


def raw_pixel_metrics(config):
    """The evaluation protocol on `pixels`, with the config's `--embedding_transform`
    fitted on the training pixels, as the learned rows' map is on their embeddings.

    Args:
        config: a `Config`; only its data and evaluation settings are read.

    Returns:
        The metrics dict of `evaluation.knn_metrics`.
    """
    source = sources.load(config)
    train, test = embedding_transform.fit_apply(
        *pixels(source), config.embedding_transform, config.whiten_shrinkage)
    return evaluation.knn_metrics(
        train, source.train.fine, source.train.coarse,
        test, source.test.fine, source.test.coarse,
        k=config.eval_k, temperature=config.eval_temperature,
        num_fine=source.hierarchy.num_fine)
