"""RandAugment (Cubuk et al., 2020) as torchvision runs it, in stateless TF ops.

Each image gets two ops drawn uniformly from `OPS`, at magnitude 9 of 31 bins, with a
random sign for the signed ones; geometric ops sample the nearest pixel and fill
with black. The draws are folds of the image's stateless seed, so views stay a
pure function of (seed, epoch, image), and `tf.switch_case` runs only the drawn
op: Keras's `RandAugment` layer runs all 11 of its ops for each of its 2 and keeps
one with a `where` (22 full-image transforms per image). The ops take one image,
`[1, H, W, 3]`: per image in the `tf.data` map measured faster than dispatching a
whole batch by op (two copies of the batch per op). On CPU, `[3]` operands broadcast
over pixels, reductions over the pixels of `[H W, 3]`, `where`, `gather` and depthwise
convolutions cost several image passes each: per-channel work runs on rows `[H, W 3]`.
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


def _dims(images):
    """`[H, W]` of `[1, H, W, 3]`, Python ints where static."""
    shape = tf.shape(images)
    return [d if d is not None else shape[i + 1] for i, d in enumerate(images.shape[1:3])]


def _rows(images):
    """`[H, W * 3]`, along whose rows a per-channel `[W * 3]` operand broadcasts cheaply."""
    height, width = _dims(images)
    return tf.reshape(images, [height, width * 3])


def _factor(signs):
    """PIL's `ImageEnhance` factor, 1 +- 0.9 LEVEL."""
    return 1.0 + signs * 0.9 * LEVEL


def _affine(images, row_x=None, row_y=None):
    """Output pixel (x, y) reads input `(a x + b y + c, d x + e y + f)`, nearest, black
    outside; rows `(a, b, c)`, `(d, e, f)` of `[1]` tensors, `None`: x or y itself. A
    `gather_nd` from the image padded with black, the source clipped onto that border.
    Grappler reorders sums by their operands' shapes: these keep the old ones' pixels."""
    height, width = _dims(images)
    h, w = tf.cast(height, tf.float32), tf.cast(width, tf.float32)
    ys, xs = tf.meshgrid(tf.range(h), tf.range(w), indexing="ij")
    x, y = [own if row is None else tf.clip_by_value(tf.floor(
        row[0][:, None, None] * xs + row[1][:, None, None] * ys + row[2][:, None, None] + 0.5),
        -1.0, size) for row, own, size in ((row_x, xs, w), (row_y, ys, h))]
    index = tf.cast(y * (w + 2.0) + x + (w + 3.0), tf.int32)
    padded = tf.reshape(tf.pad(images, [[0, 0], [1, 1], [1, 1], [0, 0]]), [-1, 3])
    return tf.gather_nd(padded, index[..., None])


def _translate(images, signs, axis):
    """A shift by 150 / 331 x LEVEL of the width (axis 0) or height (axis 1): the kept
    part sliced out and padded with black (half the time of a roll and a mask)."""
    size = _dims(images)[1 - axis]
    shift = tf.cast(tf.round(signs[0] * 150.0 / 331.0 * LEVEL * tf.cast(size, tf.float32)),
                    tf.int32)
    before, after = tf.maximum(shift, 0), tf.maximum(-shift, 0)
    unit = tf.one_hot(2 - axis, 4, dtype=tf.int32)  # The image's axis.
    kept = tf.slice(images, unit * after, tf.shape(images) - unit * (before + after))
    return tf.pad(kept, unit[:, None] * tf.stack([before, after])[None])


def _rotate(images, signs):
    """Rotation by up to 30 degrees x LEVEL about the image's centre."""
    height, width = tf.unstack(tf.cast(tf.shape(images)[1:3], tf.float32))
    angle = signs * math.radians(30.0) * LEVEL
    cx, cy, cos, sin = (width - 1) / 2, (height - 1) / 2, tf.cos(angle), tf.sin(angle)
    return _affine(images, (cos, sin, cx - cos * cx - sin * cy),
                   (-sin, cos, cy + sin * cx - cos * cy))


def _contrast(images, signs):
    """PIL's `ImageEnhance.Contrast`, `f x + (1 - f) mean luma`, clipped; the rows' luma
    sums as one matrix-vector product."""
    width = _dims(images)[1]
    luma = tf.matmul(_rows(images), tf.tile(tf.constant(_GRAY), [width])[:, None])
    mean = tf.reduce_mean(luma) / tf.cast(width, tf.float32)
    factor = _factor(signs)
    return tf.clip_by_value(factor * images + (1.0 - factor) * mean, 0.0, 255.0)


def _color(images, signs):
    """PIL's `ImageEnhance.Color` as one channel matmul, `(f I + (1 - f) 1 g^T) x`, clipped."""
    factor = _factor(signs)
    mix = factor * tf.eye(3) + (1.0 - factor) * tf.constant([_GRAY] * 3)
    flat = tf.matmul(tf.reshape(images, [-1, 3]), mix, transpose_b=True)
    return tf.clip_by_value(tf.reshape(flat, tf.shape(images)), 0.0, 255.0)


def _sharpness(images, signs):
    """PIL's `ImageEnhance.Sharpness`, `x + (1 - f) (smooth - x)` inside, border pixels
    kept; its SMOOTH filter is (3x3 sum + 4 x) / 13, here sums of shifted rows."""
    rows = _rows(images)
    sums = rows[:-2] + rows[1:-1] + rows[2:]
    sums = sums[:, :-6] + sums[:, 3:-3] + sums[:, 6:]
    inner = (sums - 9.0 * rows[1:-1, 3:-3]) * ((1.0 - _factor(signs)) / 13.0)
    out = tf.clip_by_value(rows + tf.pad(inner, [[1, 1], [3, 3]]), 0.0, 255.0)
    return tf.reshape(out, tf.shape(images))


def _autocontrast(images):
    """Each channel stretched to 0..255 (a constant channel is kept)."""
    rows, width = _rows(images), _dims(images)[1]
    low = tf.reduce_min(tf.reshape(tf.reduce_min(rows, 0), [-1, 3]), 0)
    high = tf.reduce_max(tf.reshape(tf.reduce_max(rows, 0), [-1, 3]), 0)
    flat = high <= low
    scale = tf.where(flat, 1.0, 255.0 / tf.where(flat, 1.0, high - low))
    out = (rows - tf.tile(tf.where(flat, 0.0, low), [width])) * tf.tile(scale, [width])
    return tf.reshape(tf.clip_by_value(out, 0.0, 255.0), tf.shape(images))


def _equalize(images):
    """PIL's `ImageOps.equalize` per channel, on the image rounded down to uint8 (a raw
    `Bincount`: `tf.math.bincount` adds a pass for the maximum)."""
    values = (tf.cast(tf.clip_by_value(_rows(images), 0.0, 255.0), tf.int32)
              + tf.tile(tf.range(3) * 256, _dims(images)[1:]))  # A bin range per channel.
    hist = tf.reshape(tf.raw_ops.Bincount(arr=tf.reshape(values, [-1]), size=768,
                                          weights=tf.constant([], tf.int32)), [3, 256])
    below = tf.cumsum(hist, axis=1, exclusive=True)
    # PIL: step = (pixels - count of the last non-empty bin) // 255.
    step = tf.reduce_max(tf.where(hist > 0, below, 0), axis=1, keepdims=True) // 255
    safe = tf.maximum(step, 1)  # Step 0 (one value): the channel is kept.
    lut = tf.where(step > 0, tf.minimum((below + safe // 2) // safe, 255), tf.range(256))
    lut = tf.reshape(tf.cast(lut, tf.float32), [-1, 1])
    return tf.reshape(tf.gather_nd(lut, values[..., None]), tf.shape(images))


_POSTERIZE = 2.0 ** round(MAGNITUDE / ((BINS - 1) / 4))  # torchvision: 8 - m / 7.5 bits kept.

# In the order of OPS: `fn(image [1, H, W, 3], sign [1] +-1.0) -> [1, H, W, 3]`.
FUNCTIONS = (
    lambda x, s: x,
    lambda x, s: _affine(x, row_x=(tf.ones_like(s), s * 0.3 * LEVEL, tf.zeros_like(s))),
    lambda x, s: _affine(x, row_y=(s * 0.3 * LEVEL, tf.ones_like(s), tf.zeros_like(s))),
    lambda x, s: _translate(x, s, 0),
    lambda x, s: _translate(x, s, 1),
    _rotate,
    lambda x, s: tf.clip_by_value(_factor(s) * x, 0.0, 255.0),  # Brightness.
    _color,
    _contrast,
    _sharpness,
    lambda x, s: tf.floor(x / _POSTERIZE) * _POSTERIZE,
    lambda x, s: x + tf.cast(x >= 255.0 * (1.0 - LEVEL), tf.float32) * (255.0 - 2.0 * x),
    lambda x, s: _autocontrast(x),
    lambda x, s: _equalize(x),
)
