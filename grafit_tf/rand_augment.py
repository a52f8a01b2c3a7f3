"""RandAugment (Cubuk et al., 2020) as torchvision runs it, in stateless TF ops.

Each image gets two ops drawn uniformly from `OPS`, at magnitude 9 of 31 bins, with a
random sign for the signed ones; geometric ops sample the nearest pixel and fill
with black. The draws are folds of the image's stateless seed, so views stay a
pure function of (seed, epoch, image), and `tf.switch_case` runs only the drawn
op: Keras's `RandAugment` layer runs all 11 of its ops for each of its 2 and keeps
one with a `where` (22 full-image transforms per image). The ops take batches
`[n, H, W, 3]`; per image (n = 1) in the `tf.data` map measured faster than
dispatching a whole batch by op (two copies of the batch per op).
"""

import math

import tensorflow as tf

from grafit_tf.augment import fold

OPS = ("identity", "shear_x", "shear_y", "translate_x", "translate_y", "rotate",
       "brightness", "color", "contrast", "sharpness", "posterize", "solarize",
       "autocontrast", "equalize")
NUM_OPS, MAGNITUDE, BINS = 2, 9, 31  # torchvision's RandAugment defaults.
LEVEL = MAGNITUDE / (BINS - 1)
_GRAY = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale.


def rand_augment(image, seed):
    """Applies `NUM_OPS` ops of `OPS`, each drawn with a sign from `seed`, in turn.

    Args:
        image: `[H, W, 3]` float32 in 0..255.
        seed: `[2]` int32 stateless seed.

    Returns:
        `[H, W, 3]` float32 in 0..255.
    """
    x = image[None]
    for i in range(NUM_OPS):
        slot = fold(seed, i)
        op = tf.random.stateless_uniform([], fold(slot, 0), 0, len(OPS), tf.int32)
        sign = tf.where(tf.random.stateless_uniform([1], fold(slot, 1)) < 0.5, -1.0, 1.0)
        x = tf.switch_case(op, [lambda fn=fn, x=x: fn(x, sign) for fn in FUNCTIONS])
    return tf.ensure_shape(x[0], image.shape)


def _per_image(x):
    return x[:, None, None, None]


def _affine(images, coefficients):
    """Output pixel (x, y) reads input `(a x + b y + c, d x + e y + f)`, nearest, black
    outside. `coefficients`: six `[n]` tensors. A gather: no per-channel arithmetic."""
    shape = tf.shape(images)
    n, height, width = shape[0], shape[1], shape[2]
    ys, xs = tf.meshgrid(tf.range(height, dtype=tf.float32), tf.range(width, dtype=tf.float32),
                         indexing="ij")
    xs, ys = tf.reshape(xs, [1, -1]), tf.reshape(ys, [1, -1])
    a, b, c, d, e, f = (t[:, None] for t in coefficients)
    src_x = tf.cast(tf.floor(a * xs + b * ys + c + 0.5), tf.int32)  # [n, H * W]
    src_y = tf.cast(tf.floor(d * xs + e * ys + f + 0.5), tf.int32)
    inside = (src_x >= 0) & (src_x < width) & (src_y >= 0) & (src_y < height)
    index = (tf.clip_by_value(src_y, 0, height - 1) * width + tf.clip_by_value(src_x, 0, width - 1)
             + tf.range(n)[:, None] * height * width)
    pixels = tf.gather(tf.reshape(images, [-1, 3]), index) * tf.cast(inside, tf.float32)[..., None]
    return tf.reshape(pixels, shape)


def _shear(images, signs, axis):
    shear, one, zero = signs * 0.3 * LEVEL, tf.ones_like(signs), tf.zeros_like(signs)
    if axis == 0:
        return _affine(images, (one, shear, zero, zero, one, zero))
    return _affine(images, (one, zero, zero, shear, one, zero))


def _translate(images, signs, axis):
    """A shift by 150 / 331 x LEVEL of the width (axis 0) or height (axis 1): a roll,
    with the pixels that came round blacked out (a quarter of a gather's cost)."""
    axis = 2 - axis
    size = tf.shape(images)[axis]
    shift = tf.cast(tf.round(signs[0] * 150.0 / 331.0 * LEVEL * tf.cast(size, tf.float32)),
                    tf.int32)
    positions = tf.range(size) - shift
    keep = tf.cast((positions >= 0) & (positions < size), tf.float32)
    keep = tf.reshape(keep, [1, -1, 1, 1] if axis == 1 else [1, 1, -1, 1])
    return tf.roll(images, shift, axis=axis) * keep


def _rotate(images, signs):
    """Rotation by up to 30 degrees x LEVEL about the image's centre."""
    height, width = tf.unstack(tf.cast(tf.shape(images)[1:3], tf.float32))
    angle = signs * math.radians(30.0) * LEVEL
    cx, cy, cos, sin = (width - 1) / 2, (height - 1) / 2, tf.cos(angle), tf.sin(angle)
    return _affine(images, (cos, sin, cx - cos * cx - sin * cy,
                            -sin, cos, cy + sin * cx - cos * cy))


def _blend(degenerate, images, signs):
    """PIL's `ImageEnhance` at factor 1 +- 0.9 LEVEL: `degenerate + factor (image -
    degenerate)`, clipped."""
    factor = _per_image(1.0 + signs * 0.9 * LEVEL)
    return tf.clip_by_value(degenerate + factor * (images - degenerate), 0.0, 255.0)


def _gray(images):
    """`[n, H, W, 1]` luma (a matmul: slices or a size-3 inner reduction are slower)."""
    return tf.matmul(images, tf.constant(_GRAY)[:, None])


def _color(images, signs):
    """`_blend` with the luma as one channel matmul: `(f I + (1 - f) 1 g^T) x`."""
    factor = _per_image(1.0 + signs * 0.9 * LEVEL)
    mix = factor * tf.eye(3) + (1.0 - factor) * tf.constant([_GRAY] * 3)  # [n, 1, 3, 3]
    shape = tf.shape(images)
    flat = tf.matmul(tf.reshape(images, [shape[0], -1, 3]), mix[:, 0], transpose_b=True)
    return tf.clip_by_value(tf.reshape(flat, shape), 0.0, 255.0)


def _smooth(images):
    """PIL's SMOOTH filter (3x3, centre weight 5 of 13); the border pixels are kept."""
    kernel = tf.constant([[1.0, 1.0, 1.0], [1.0, 5.0, 1.0], [1.0, 1.0, 1.0]]) / 13.0
    kernel = tf.tile(kernel[:, :, None, None], [1, 1, 3, 1])
    inner = tf.nn.depthwise_conv2d(images, kernel, [1, 1, 1, 1], "VALID")
    return images + tf.pad(inner - images[:, 1:-1, 1:-1], [[0, 0], [1, 1], [1, 1], [0, 0]])


def _autocontrast(images):
    """Each channel stretched to 0..255 (a constant channel is kept)."""
    pixels = tf.reshape(images, [tf.shape(images)[0], 1, -1, 3])
    low = tf.reduce_min(pixels, axis=2, keepdims=True)
    high = tf.reduce_max(pixels, axis=2, keepdims=True)
    flat = high <= low
    scale = tf.where(flat, 1.0, 255.0 / tf.where(flat, 1.0, high - low))
    return tf.clip_by_value((images - tf.where(flat, 0.0, low)) * scale, 0.0, 255.0)


def _equalize(images):
    """PIL's `ImageOps.equalize` per image and channel, on the images rounded down to uint8."""
    values = tf.cast(tf.clip_by_value(images, 0.0, 255.0), tf.int32)  # [n, H, W, 3]
    n = tf.shape(images)[0]
    offsets = (tf.range(n)[:, None, None, None] * 3 + tf.range(3)) * 256
    hist = tf.reshape(tf.math.bincount(tf.reshape(values + offsets, [-1]), minlength=n * 768,
                                       maxlength=n * 768), [n * 3, 256])
    # PIL: step = (pixels - count of the last non-empty bin) // 255, per channel.
    last = tf.reduce_max(tf.where(hist > 0, tf.range(256), 0), axis=1)
    step = (tf.reduce_sum(hist, 1) - tf.gather(hist, last, batch_dims=1)) // 255
    safe = tf.maximum(step, 1)[:, None]
    lut = tf.minimum((tf.cumsum(hist, axis=1, exclusive=True) + safe // 2) // safe, 255)
    lut = tf.where(step[:, None] > 0, lut, tf.range(256)[None])  # One value: unchanged.
    return tf.cast(tf.gather(tf.reshape(lut, [-1]), values + offsets), tf.float32)


def _solarize(images):
    """Values from 255 (1 - LEVEL) up are inverted (arithmetic: a select is slower)."""
    above = tf.cast(images >= 255.0 * (1.0 - LEVEL), tf.float32)
    return images + above * (255.0 - 2.0 * images)


_POSTERIZE = 2.0 ** round(MAGNITUDE / ((BINS - 1) / 4))  # torchvision: 8 - m / 7.5 bits kept.

# In the order of OPS: `fn(images [n, H, W, 3], signs [n] +-1.0) -> [n, H, W, 3]`.
FUNCTIONS = (
    lambda x, s: x,
    lambda x, s: _shear(x, s, 0),
    lambda x, s: _shear(x, s, 1),
    lambda x, s: _translate(x, s, 0),
    lambda x, s: _translate(x, s, 1),
    _rotate,
    lambda x, s: _blend(tf.zeros_like(x), x, s),
    _color,
    lambda x, s: _blend(tf.reduce_mean(_gray(x), axis=[1, 2, 3], keepdims=True), x, s),
    lambda x, s: _blend(_smooth(x), x, s),
    lambda x, s: tf.floor(x / _POSTERIZE) * _POSTERIZE,
    lambda x, s: _solarize(x),
    lambda x, s: _autocontrast(x),
    lambda x, s: _equalize(x),
)
