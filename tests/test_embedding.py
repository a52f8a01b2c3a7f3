"""Embedding a split in order with one trace of the model (`grafit_tf.embedding`)."""

import keras
import numpy as np

from grafit_tf.embedding import embed, embedding_fn
from tests.synthetic import synthetic_source


def test_one_trace_embeds_every_batch_of_both_splits():
    source = synthetic_source(n=10)
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input(source.image_shape), keras.layers.Flatten(),
                              keras.layers.Dense(3)])
    fn = embedding_fn(model, source)
    train = embed(fn, source.train, source, batch_size=4)  # Batches of 4, 4, 2.
    test = embed(fn, source.test, source, batch_size=3)  # 3, 3, 3, 1.
    assert fn.experimental_get_tracing_count() == 1
    assert train.shape == (10, 3) and train.dtype == np.float32
    # The model's own outputs on the raw pixels (this source has no resize).
    want = model.predict(source.train.images.astype(np.float32), verbose=0)
    np.testing.assert_allclose(train, want, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(test, train, rtol=1e-6)  # Here test is the training split.


def test_float16_outputs_come_back_as_float32():
    """Under mixed precision the embedder computes in float16; the embeddings the
    evaluation and the export's transform fit read are float32."""
    source = synthetic_source(n=6)
    model = keras.Sequential([keras.Input(source.image_shape), keras.layers.Flatten(),
                              keras.layers.Dense(3, dtype="float16")])
    out = embed(embedding_fn(model, source), source.train, source)
    assert out.dtype == np.float32 and out.shape == (6, 3)
    want = model.predict(source.train.images.astype(np.float32), verbose=0)
    np.testing.assert_allclose(out, want.astype(np.float32), rtol=1e-3)
