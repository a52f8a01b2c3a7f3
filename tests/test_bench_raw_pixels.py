"""bench/raw_pixels.py: the raw-pixel floor, scored like a learned embedding."""

import numpy as np

from bench.raw_pixels import raw_pixel_metrics
from grafit_tf import evaluation
from grafit_tf.config import Config
from grafit_tf.data import sources


def test_raw_pixels_are_scored_as_unit_vectors(fashion_dir):
    config = Config(data_dir=fashion_dir, max_train_examples=2000, max_eval_examples=300)
    source = sources.load(config)

    def unit(x):
        x = x.reshape(len(x), -1).astype(np.float64)
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    want = evaluation.knn_metrics(unit(source.train.images), source.train.fine,
                                  source.train.coarse, unit(source.test.images),
                                  source.test.fine, source.test.coarse,
                                  temperature=config.eval_temperature,
                                  num_fine=10)
    got = raw_pixel_metrics(config)
    assert got == want
    assert got["fine_knn_top1"] > 0.6  # Real images: far above the 10% of chance.
