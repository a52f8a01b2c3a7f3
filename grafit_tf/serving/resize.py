"""NumPy image resizing that reproduces training's evaluation preprocessing.

`bilinear` matches `tf.image.resize(method="bilinear", antialias=False)` and
`resize_center_crop` matches `grafit_tf.augment.resize_center_crop`, so that
`serve.py` feeds the model what `grafit_tf.data.pipeline.eval_image` does,
without TensorFlow. Arithmetic is float32 in the kernel's order of operations,
so the two agree to float32 rounding.
"""

import numpy as np

CROP_FRACTION = 0.875  # The default of `augment.resize_center_crop`.


def _axis_weights(in_size, out_size, start, count):
    """Source rows (or columns) and weights of outputs `[start, start + count)` of one axis.

    Returns:
        `(lower [count] int64, upper [count] int64, lerp [count] float32)`: output
        `start + i` reads `lower[i] * (1 - lerp[i]) + upper[i] * lerp[i]`.
    """
    scale = np.float32(in_size) / np.float32(out_size)
    # Half-pixel centres: out pixel i samples the input at (i + 0.5) * scale - 0.5.
    centre = ((np.arange(start, start + count, dtype=np.float32) + np.float32(0.5)) * scale
              - np.float32(0.5))
    floor = np.floor(centre)
    lower = np.maximum(floor, 0).astype(np.int64)
    upper = np.minimum(np.ceil(centre), in_size - 1).astype(np.int64)
    return lower, upper, (centre - floor).astype(np.float32)


def bilinear(image, height, width, crop=None):
    """Bilinear resize with half-pixel centres and no antialiasing.

    `[H, W, C]` of any real dtype -> `[height, width, C]` float32; with `crop`
    `(h, w)` (at most `(height, width)`), only its centre `[h, w, C]` (where
    `tf.image.resize_with_crop_or_pad` cuts it), the other pixels never computed.
    """
    out_h, out_w = crop or (height, width)
    channels = image.shape[2]
    y0, y1, ly = _axis_weights(image.shape[0], height, (height - out_h) // 2, out_h)
    x0, x1, lx = _axis_weights(image.shape[1], width, (width - out_w) // 2, out_w)
    # Gathers stay in the input's dtype (uint8: a quarter of float32's memory
    # traffic), on rows of W * C samples: column x is samples x * C .. x * C + C - 1.
    rows = image.reshape(image.shape[0], -1)
    x0, x1 = ((x[:, None] * channels + np.arange(channels)).ravel() for x in (x0, x1))
    top_left, top_right, bottom_left, bottom_right = (
        rows[y][:, x].astype(np.float32) for y in (y0, y1) for x in (x0, x1))
    # In place, in the kernel's order of operations (resize_bilinear_op.cc,
    # compute_lerp): top = top_left + (top_right - top_left) * lx, bottom alike,
    # then top + (bottom - top) * ly.
    lx = np.repeat(lx, channels)
    for left, right in ((top_left, top_right), (bottom_left, bottom_right)):
        right -= left
        right *= lx
        right += left
    bottom_right -= top_right
    bottom_right *= ly[:, None]
    bottom_right += top_right
    return bottom_right.reshape(out_h, out_w, channels)


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
