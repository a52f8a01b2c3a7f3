"""NumPy image resizing that reproduces training's evaluation preprocessing.

`bilinear` matches `tf.image.resize(method="bilinear", antialias=True)` and
`resize_center_crop` matches `grafit_tf.augment.resize_center_crop`, so that
`serve.py` feeds the model what `grafit_tf.data.pipeline.eval_image` does,
without TensorFlow. Arithmetic is float32 in the kernel's order of operations
(scale_and_translate_op.cc), so the two agree to float32 rounding.
"""

import numpy as np

CROP_FRACTION = 0.875  # The default of `augment.resize_center_crop`.


def _axis_weights(in_size, out_size, start, count):
    """Input spans and weights of outputs `[start, start + count)` of one axis: a triangle
    filter (bilinear), widened by the downscale factor when shrinking (antialiasing).

    Returns:
        `(first [count] int64, weights [count, K] float32)`: output `start + i` is the
        sum over k of `weights[i, k]` times input `first[i] + k` (0 past the span).
    """
    inv_scale = np.float32(1.0 / np.float64(np.float32(out_size) / np.float32(in_size)))
    radius = max(inv_scale, np.float32(1))
    sample = (np.arange(start, start + count, dtype=np.float32) + np.float32(0.5)) * inv_scale
    first = np.clip(np.ceil(sample - radius - np.float32(0.5)), 0, in_size - 1)
    last = np.clip(np.floor(sample + radius - np.float32(0.5)), 0, in_size - 1)
    source = first[:, None] + np.arange(min(2 * int(np.ceil(radius)) + 1, in_size),
                                        dtype=np.float32)
    weights = np.maximum(np.float32(1) - np.abs(
        (source + np.float32(0.5) - sample[:, None]) * (np.float32(1) / radius)), 0)
    weights[source > last[:, None]] = 0
    total = np.add.accumulate(weights, axis=1)[:, -1:]  # In order, as the kernel sums.
    return first.astype(np.int64), weights * (np.float32(1) / total)


def bilinear(image, height, width, crop=None):
    """Antialiased bilinear resize (half-pixel centres), as TensorFlow's.

    `[H, W, C]` of any real dtype -> `[height, width, C]` float32; with `crop`
    `(h, w)` (at most `(height, width)`), only its centre `[h, w, C]` (where
    `tf.image.resize_with_crop_or_pad` cuts it), the other pixels never computed.
    """
    out_h, out_w = crop or (height, width)
    y0, wy = _axis_weights(image.shape[0], height, (height - out_h) // 2, out_h)
    x0, wx = _axis_weights(image.shape[1], width, (width - out_w) // 2, out_w)
    image = image[:, x0[0]:x0[-1] + wx.shape[1]]  # The columns the crop reads.
    x0 -= x0[0]
    # Rows, then columns, each a float32 running sum over the span in its order (the
    # kernel's GatherRows, GatherColumns); gathers stay in the input's dtype.
    rows = np.zeros((out_h,) + image.shape[1:], np.float32)
    for k in range(wy.shape[1]):
        rows += wy[:, k, None, None] * image[np.minimum(y0 + k, len(image) - 1)]
    out = np.zeros((out_h, out_w, image.shape[2]), np.float32)
    for k in range(wx.shape[1]):
        out += wx[:, k, None] * rows[:, np.minimum(x0 + k, rows.shape[1] - 1)]
    return out


def eval_size(shape, image_shape, method):
    """`(h, w)` that evaluation resizes an image of `shape` `(H, W)` to, before any crop.

    'resize_center_crop': shorter side to `ceil(max(size) / CROP_FRACTION)`, with
    the float32 steps of the TensorFlow version (same integers); else the model's size.
    """
    if method != "resize_center_crop":
        return tuple(image_shape[:2])
    target = np.ceil(np.float32(max(image_shape[:2]) / CROP_FRACTION))
    shape = np.asarray(shape, np.float32)
    return tuple(int(v) for v in np.ceil(shape * (np.float32(target) / shape.min())))


def to_model_size(image, image_shape, method):
    """`[h, w, C]` uint8 -> the model's `[H, W, C]` float32, resized as evaluation did.

    `method`: 'resize_center_crop' (to `eval_size`, then the centre crop), or
    'none' (training's images were already `H x W`; others are resized
    bilinearly, those of that size kept exact).
    """
    size = tuple(image_shape[:2])
    return bilinear(image, *eval_size(image.shape[:2], size, method), crop=size)
