"""grafit_tf.serving.resize: Pillow's resizing, against TensorFlow's (and training's crop).

Measured on 300-400 random shapes of 1..300 px with crops: float images within 0.0064
of TensorFlow (Pillow's double weights; atol 1e-2), uint8 ones within 1.0009 (Pillow's
8-bit mode rounds after each pass; atol 1.01)."""

import numpy as np
from PIL import Image

from grafit_tf.serving import resize


def _tf():
    import tensorflow as tf

    return tf


def test_bilinear_matches_tf_image_resize():
    """Against `tf.image.resize(antialias=True)`, up- and down-scaling."""
    tf = _tf()
    rng = np.random.default_rng(0)
    for _ in range(60):
        h, w, oh, ow = (int(v) for v in rng.integers(1, 70, 4))
        c = int(rng.choice([1, 3]))
        x = (rng.random((h, w, c)) * 255).astype(np.float32)
        want = tf.image.resize(x, (oh, ow), method="bilinear", antialias=True).numpy()
        np.testing.assert_allclose(resize.bilinear(x, oh, ow), want, rtol=0, atol=1e-2)
    # Strong down-scaling, as for a large photo brought to 28 x 28, and a 500 x 375 photo
    # (gradient + noise) to 256 / 224, where antialiasing changes pixels by tens of levels.
    photo = np.clip(np.mgrid[0:375, 0:500, 0:3].sum(0) * 0.3 + rng.normal(0, 20, (375, 500, 3)),
                    0, 255).astype(np.uint8)
    for x, (oh, ow) in ((rng.integers(0, 256, (900, 700, 1)).astype(np.float32), (28, 28)),
                        (photo, (256, 341)), (photo, (224, 224))):
        want = tf.image.resize(x, (oh, ow), method="bilinear", antialias=True).numpy()
        atol = 1e-2 if x.dtype == np.float32 else 1.01
        np.testing.assert_allclose(resize.bilinear(x, oh, ow), want, rtol=0, atol=atol)


def test_bilinear_is_pils_reducing_filter_and_keeps_same_size_exact():
    """The filter is PIL's BILINEAR (torchvision's `Resize` of PIL images, MaskCon's
    evaluation), in float (its uint8 mode rounds between passes, about 1 level).
    Same size: unchanged."""
    rng = np.random.default_rng(3)
    x = rng.integers(0, 256, (375, 500)).astype(np.float32)
    for oh, ow in ((224, 224), (256, 341), (40, 600)):
        pil = np.asarray(Image.fromarray(x, "F").resize((ow, oh), Image.Resampling.BILINEAR))
        np.testing.assert_allclose(resize.bilinear(x[..., None], oh, ow)[..., 0], pil, atol=1e-2)
    # A 1-pixel checkerboard shrunk 4x is grey (within 1 at the corners), not aliased.
    board = (np.indices((64, 64)).sum(0) % 2 * 255).astype(np.uint8)[..., None]
    np.testing.assert_allclose(resize.bilinear(board, 16, 16), 127.5, atol=1)
    np.testing.assert_array_equal(resize.bilinear(board, 64, 64), board)


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
        np.testing.assert_allclose(got, want, rtol=0, atol=1.01)


def test_bilinear_crop_is_the_centre_of_the_whole_resize():
    tf = _tf()
    rng = np.random.default_rng(2)
    for _ in range(30):
        h, w, oh, ow = (int(v) for v in rng.integers(1, 90, 4))
        ch, cw = int(rng.integers(1, oh + 1)), int(rng.integers(1, ow + 1))
        x = rng.integers(0, 256, (h, w, 3)).astype(np.uint8)
        want = tf.image.resize_with_crop_or_pad(
            tf.image.resize(x, (oh, ow), method="bilinear", antialias=True), ch, cw).numpy()
        np.testing.assert_allclose(resize.bilinear(x, oh, ow, crop=(ch, cw)), want, rtol=0,
                                   atol=1.01)
