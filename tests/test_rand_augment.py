"""RandAugment: each op against PIL's (which torchvision's follow) or TensorFlow's
projective transform, and the draws as a pure function of the image's seed."""

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image, ImageEnhance, ImageOps

from grafit_tf import rand_augment as ra

PIXELS = np.clip(np.random.default_rng(0).normal(120, 50, (20, 24, 3)), 0, 255).astype(np.uint8)
FACTOR = 1 + 0.9 * ra.LEVEL  # Of the enhancement ops, sign +1.


def op(name, sign=1.0, image=PIXELS):
    """Op `name` of `ra.OPS` on `image` (as float32), as `[H, W, 3]`."""
    fn = ra.FUNCTIONS[ra.OPS.index(name)]
    return fn(tf.constant(image, tf.float32)[None], tf.constant([sign])).numpy()[0]


@pytest.mark.parametrize("name, reference, tolerance", [
    ("equalize", ImageOps.equalize, 0),
    ("autocontrast", ImageOps.autocontrast, 0),
    ("posterize", lambda im: ImageOps.posterize(im, 7), 0),
    ("solarize", lambda im: ImageOps.solarize(im, 255 * (1 - ra.LEVEL)), 0),
    # PIL rounds the enhancements to uint8; these stay in float32.
    ("brightness", lambda im: ImageEnhance.Brightness(im).enhance(FACTOR), 1.0),
    ("color", lambda im: ImageEnhance.Color(im).enhance(FACTOR), 1.2),
    ("contrast", lambda im: ImageEnhance.Contrast(im).enhance(FACTOR), 1.0),
    ("sharpness", lambda im: ImageEnhance.Sharpness(im).enhance(FACTOR), 1.2),
])
def test_pixel_ops_match_pil(name, reference, tolerance):
    want = np.asarray(reference(Image.fromarray(PIXELS)), np.float32)
    np.testing.assert_allclose(op(name), want, atol=tolerance)


@pytest.mark.parametrize("name, sign, coefficients", [
    ("shear_x", 1.0, [1.0, 0.3 * ra.LEVEL, 0.0, 0.0, 1.0, 0.0]),
    ("shear_y", -1.0, [1.0, 0.0, 0.0, -0.3 * ra.LEVEL, 1.0, 0.0]),
    ("translate_x", 1.0, [1.0, 0.0, -3.0, 0.0, 1.0, 0.0]),  # round(0.136 x 24) pixels.
    ("translate_y", -1.0, [1.0, 0.0, 0.0, 0.0, 1.0, 3.0]),  # round(0.136 x 20).
])
def test_geometric_ops_match_tensorflows_projective_transform(name, sign, coefficients):
    want = tf.raw_ops.ImageProjectiveTransformV3(
        images=tf.constant(PIXELS, tf.float32)[None],
        transforms=tf.constant([coefficients + [0.0, 0.0]]), output_shape=[20, 24],
        fill_value=0.0, interpolation="NEAREST", fill_mode="CONSTANT")[0]
    np.testing.assert_array_equal(op(name, sign), want)


def test_rotation_turns_about_the_centre():
    square = np.zeros((21, 21, 3), np.uint8)
    square[10, 2:19] = 255  # A horizontal bar through the centre.
    out = ra.FUNCTIONS[ra.OPS.index("rotate")](tf.constant(square, tf.float32)[None],
                                                tf.constant([1.0])).numpy()[0]
    rows, cols = np.nonzero(out[..., 0])
    assert out[10, 10, 0] == 255 and len(set(rows)) > 1  # Centre kept, bar tilted.
    slope = np.polyfit(cols, rows, 1)[0]
    assert abs(abs(slope) - np.tan(np.radians(30 * ra.LEVEL))) < 0.05


def test_ops_match_their_reference_formulas_on_a_random_float_image():
    """The rewritten ops (a padded `gather_nd`, per-channel rows, sums of shifted rows)
    against the formulas they replaced: exact where those were, else to float rounding."""
    x = np.random.default_rng(1).uniform(0, 255, (33, 47, 3)).astype(np.float32)
    x[..., 2] = 77.0  # A constant channel, which autocontrast keeps.
    f32, (h, w) = np.float32, x.shape[:2]

    def run(name):
        return op(name, -1.0, x)

    # Rotation: output (x, y) reads floor(a x + b y + c + 0.5), black outside.
    angle = f32(-1.0) * f32(np.radians(30.0)) * f32(ra.LEVEL)
    cos, sin = (float(t(tf.constant([angle]))[0]) for t in (tf.cos, tf.sin))
    cos, sin, cx, cy = f32(cos), f32(sin), f32((w - 1) / 2), f32((h - 1) / 2)
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    src_x = np.floor(cos * xs + sin * ys + (cx - cos * cx - sin * cy) + f32(0.5)).astype(int)
    src_y = np.floor(-sin * xs + cos * ys + (cy + sin * cx - cos * cy) + f32(0.5)).astype(int)
    inside = (src_x >= 0) & (src_x < w) & (src_y >= 0) & (src_y < h)
    want = np.where(inside[..., None], x[src_y.clip(0, h - 1), src_x.clip(0, w - 1)], 0.0)
    np.testing.assert_array_equal(run("rotate"), want)
    low, high = x.min((0, 1)), x.max((0, 1))
    scale = np.where(high > low, f32(255.0) / np.maximum(high - low, 1.0), f32(1.0))
    want = np.clip((x - np.where(high > low, low, 0.0)) * scale, 0.0, 255.0)
    np.testing.assert_array_equal(run("autocontrast"), want)
    factor = 1 - 0.9 * ra.LEVEL
    mean = (x.astype(np.float64) @ np.array([0.2989, 0.587, 0.114])).mean()
    np.testing.assert_allclose(run("contrast"), np.clip(mean + factor * (x - mean), 0, 255),
                               atol=1e-3)
    smooth = x.astype(np.float64).copy()
    nine = sum(x[i:h - 2 + i, j:w - 2 + j].astype(np.float64) for i in range(3) for j in range(3))
    smooth[1:-1, 1:-1] = (nine + 4.0 * x[1:-1, 1:-1]) / 13.0
    np.testing.assert_allclose(run("sharpness"), np.clip(smooth + factor * (x - smooth), 0, 255),
                               atol=1e-3)


def test_rand_augment_follows_the_image_seed_only():
    fn = tf.function(ra.rand_augment)
    x = tf.constant(PIXELS, tf.float32)
    seeds = [tf.constant([7, i]) for i in range(12)]
    first = [fn(x, s).numpy() for s in seeds]
    again = [fn(x, s).numpy() for s in reversed(seeds)][::-1]
    for a, b in zip(first, again):  # Same seed, same picture, whatever the call order.
        np.testing.assert_array_equal(a, b)
    assert len({a.tobytes() for a in first}) >= 10
    for a in first:
        assert a.shape == PIXELS.shape and a.min() >= 0 and a.max() <= 255


def test_every_op_is_drawn_about_equally(monkeypatch):
    """Two ops per image, uniform over `OPS`: each op replaced by one that writes its
    number, so one pixel tells the pair `rand_augment` ran, over 280 seeds."""
    marks = [lambda x, s, k=k: x * 16.0 + float(k) for k in range(len(ra.OPS))]
    monkeypatch.setattr(ra, "FUNCTIONS", tuple(marks))
    fn = tf.function(ra.rand_augment)
    counts = np.zeros(len(ra.OPS))
    for i in range(280):
        value = int(fn(tf.zeros([1, 1, 3]), tf.constant([3, i]))[0, 0, 0])
        counts[value // 16] += 1
        counts[value % 16] += 1
    assert counts.min() >= 20 and counts.max() <= 60, counts  # Expected 40 each.


def test_rand_augment_in_a_parallel_map_is_reproducible():
    def views(parallel):
        ds = tf.data.Dataset.range(24).map(
            lambda i: ra.rand_augment(tf.fill([32, 32, 3], tf.cast(i, tf.float32) * 10.0),
                                      tf.stack([3, tf.cast(i, tf.int32)])),
            num_parallel_calls=parallel, deterministic=True)
        return np.stack([v.numpy() for v in ds])

    np.testing.assert_array_equal(views(tf.data.AUTOTUNE), views(tf.data.AUTOTUNE))
    np.testing.assert_array_equal(views(tf.data.AUTOTUNE), views(None))
