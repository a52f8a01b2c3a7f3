"""Embedding a whole split with a Keras model, in order, outside any strategy."""

import numpy as np
import tensorflow as tf

from grafit_tf.data import pipeline


def embedding_fn(embedder, source):
    """`embedder` as a function `[B, H, W, C]` float32 -> `[B, D]` float32, traced once:
    the batch size is open, so one trace serves every batch of both splits (for a
    large trunk, tracing costs more than embedding a small split)."""
    spec = tf.TensorSpec([None, *source.image_shape], tf.float32)
    return tf.function(lambda x: tf.cast(embedder(x, training=False), tf.float32),
                       input_signature=[spec])


def embed(fn, split, source, batch_size=512):
    """Embeddings `[N, D]` float32 of a split, in order, evaluation preprocessing.

    `fn`: from `embedding_fn`. Runs outside any strategy on this process's copy of the
    weights, so every worker gets the same full result in dataset order (a distributed
    `predict` would shard the data across workers).
    """
    ds = pipeline.eval_dataset(split, source, batch_size)
    return np.concatenate([fn(batch).numpy() for batch in ds]).astype(np.float32)
