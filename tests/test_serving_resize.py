"""grafit_tf.serving.resize: NumPy resizing, against TensorFlow's (and training's crop)."""

import numpy as np

from grafit_tf.serving import resize


def _tf():
    import tensorflow as tf

    return tf


def test_bilinear_matches_tf_image_resize():
    tf = _tf()
    rng = np.random.default_rng(0)
    for _ in range(60):
        h, w, oh, ow = (int(v) for v in rng.integers(1, 70, 4))
        c = int(rng.choice([1, 3]))
        x = (rng.random((h, w, c)) * 255).astype(np.float32)
        want = tf.image.resize(x, (oh, ow), method="bilinear").numpy()
        np.testing.assert_allclose(resize.bilinear(x, oh, ow), want, rtol=0, atol=1e-4)
    # Strong down-scaling, as for a large photo brought to 28 x 28.
    x = rng.integers(0, 256, (900, 700, 1)).astype(np.float32)
    want = tf.image.resize(x, (28, 28), method="bilinear").numpy()
    np.testing.assert_allclose(resize.bilinear(x, 28, 28), want, rtol=0, atol=1e-4)


def test_resize_center_crop_matches_augment():
    tf = _tf()
    from grafit_tf import augment

    rng = np.random.default_rng(1)
    for _ in range(30):
        h, w = (int(v) for v in rng.integers(8, 300, 2))
        size = tuple(int(v) for v in rng.integers(8, 64, 2))
        x = rng.integers(0, 256, (h, w, 3)).astype(np.float32)
        want = augment.resize_center_crop(tf.constant(x), size).numpy()
        got = resize.to_model_size(x.astype(np.uint8), size, "resize_center_crop")
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)


def test_bilinear_crop_is_the_centre_of_the_whole_resize():
    tf = _tf()
    rng = np.random.default_rng(2)
    for _ in range(30):
        h, w, oh, ow = (int(v) for v in rng.integers(1, 90, 4))
        ch, cw = int(rng.integers(1, oh + 1)), int(rng.integers(1, ow + 1))
        x = rng.integers(0, 256, (h, w, 3)).astype(np.uint8)
        want = tf.image.resize_with_crop_or_pad(
            tf.image.resize(x, (oh, ow), method="bilinear"), ch, cw).numpy()
        np.testing.assert_allclose(resize.bilinear(x, oh, ow, crop=(ch, cw)), want, rtol=0,
                                   atol=1e-4)
