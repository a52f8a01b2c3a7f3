"""Cosine kNN on raw pixels: the floor every learned embedding must beat."""

from grafit_tf import embedding_transform, evaluation
from grafit_tf.data import sources


def raw_pixel_metrics(config, transform=None):
    """The evaluation protocol on flattened, L2-normalised pixels.

    Args:
        config: a `Config`; only its data and evaluation settings are read.
        transform: `--embedding_transform` to apply, fitted on the training
            pixels as the learned rows' map is on their embeddings (default:
            the config's).

    Returns:
        The metrics dict of `evaluation.knn_metrics`.
    """
    source = sources.load(config)

    def flat(split):
        return embedding_transform.normalise(split.images.reshape(len(split), -1))

    train, test = embedding_transform.fit_apply(
        flat(source.train), flat(source.test), transform or config.embedding_transform,
        config.whiten_shrinkage)
    return evaluation.knn_metrics(
        train, source.train.fine, source.train.coarse,
        test, source.test.fine, source.test.coarse,
        k=config.eval_k, temperature=config.eval_temperature,
        num_fine=source.hierarchy.num_fine)
