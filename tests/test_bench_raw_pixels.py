"""bench/raw_pixels.py: the raw-pixel floor, with and without the learned rows' map."""

import numpy as np

from bench.raw_pixels import raw_pixel_metrics
from grafit_tf import evaluation
from grafit_tf.config import Config
from grafit_tf.data import sources


def test_raw_pixels_get_the_same_map_as_learned_embeddings(fashion_dir):
    config = Config(data_dir=fashion_dir, max_train_examples=2000, max_eval_examples=300)
    source = sources.load(config)

    def unit(x):
        x = x.reshape(len(x), -1).astype(np.float64)
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    train, test = unit(source.train.images), unit(source.test.images)
    mean = train.mean(0)
    want = {}
    for name, (a, b) in {"none": (train, test),
                         "center": (unit(train - mean), unit(test - mean))}.items():
        want[name] = evaluation.knn_metrics(a, source.train.fine, source.train.coarse, b,
                                            source.test.fine, source.test.coarse, num_fine=10)
    assert raw_pixel_metrics(config) == want["none"]  # The config's transform: none.
    got = raw_pixel_metrics(config.replace(embedding_transform="center"))
    for key in ("fine_knn_top1", "fine_recall_at_1", "coarse_knn_top1"):
        assert abs(got[key] - want["center"][key]) <= 1 / 300, key
    assert got["fine_knn_top1"] > 0.6  # Real images: far above the 10% of chance.
