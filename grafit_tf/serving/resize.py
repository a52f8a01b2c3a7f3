"""NumPy image resizing that reproduces training's evaluation preprocessing.

`bilinear` matches `tf.image.resize(method="bilinear", antialias=False)` and
`resize_center_crop` matches `grafit_tf.augment.resize_center_crop`, so that
`serve.py` feeds the model what `grafit_tf.data.pipeline.eval_image` does,
without TensorFlow. Arithmetic is float32 in the kernel's order of operations,
so the two agree to float32 rounding.
"""

import numpy as np

CROP_FRACTION = 0.875  # The default of `augment.resize_center_crop`.


def _axis_weights(in_size, out_size):
    """Source rows (or columns) and weights of one axis, as TensorFlow computes them.

    Returns:
        `(lower [out] int64, upper [out] int64, lerp [out] float32)`: output
        index `i` reads `lower[i] * (1 - lerp[i]) + upper[i] * lerp[i]`.
    """
    scale = np.float32(in_size) / np.float32(out_size)
    # Half-pixel centres: out pixel i samples the input at (i + 0.5) * scale - 0.5.
    centre = (np.arange(out_size, dtype=np.float32) + np.float32(0.5)) * scale - np.float32(0.5)
    floor = np.floor(centre)
    lower = np.maximum(floor, 0).astype(np.int64)
    upper = np.minimum(np.ceil(centre), in_size - 1).astype(np.int64)
    return lower, upper, (centre - floor).astype(np.float32)


def bilinear(image, height, width):
    """Bilinear resize with half-pixel centres and no antialiasing.

    `[H, W, C]` of any real dtype -> `[height, width, C]`, computed in float32.
    """
    image = np.asarray(image, np.float32)
    y0, y1, ly = _axis_weights(image.shape[0], height)
    x0, x1, lx = _axis_weights(image.shape[1], width)
    lx, ly = lx[None, :, None], ly[:, None, None]
    top_rows, bottom_rows = image[y0], image[y1]  # [height, W, C] each.
    top_left, top_right = top_rows[:, x0], top_rows[:, x1]
    bottom_left, bottom_right = bottom_rows[:, x0], bottom_rows[:, x1]
    # The kernel's order of operations (resize_bilinear_op.cc, compute_lerp).
    top = top_left + (top_right - top_left) * lx
    bottom = bottom_left + (bottom_right - bottom_left) * lx
    return top + (bottom - top) * ly


def crop_or_pad(image, height, width):
    """`tf.image.resize_with_crop_or_pad` on one `[H, W, C]` image: centre crop / zero pad."""
    in_h, in_w = image.shape[:2]
    top, left = max((in_h - height) // 2, 0), max((in_w - width) // 2, 0)
    image = image[top:top + min(height, in_h), left:left + min(width, in_w)]
    pad_top, pad_left = max((height - in_h) // 2, 0), max((width - in_w) // 2, 0)
    if image.shape[0] == height and image.shape[1] == width:
        return image
    out = np.zeros((height, width) + image.shape[2:], image.dtype)
    out[pad_top:pad_top + image.shape[0], pad_left:pad_left + image.shape[1]] = image
    return out


def resize_center_crop(image, size, crop_fraction=CROP_FRACTION):
    """Shorter side to `ceil(max(size) / crop_fraction)`, then a centre crop to `size`.

    `[H, W, C]` of any size -> `[size[0], size[1], C]` float32.
    """
    # Same float32 steps as the TensorFlow version (ceil of a float32 target,
    # float32 scale), so the intermediate size is the same integer.
    target = np.ceil(np.float32(max(size) / crop_fraction))
    shape = np.asarray(image.shape[:2], np.float32)
    scale = np.float32(target) / shape.min()
    new_h, new_w = np.ceil(shape * scale).astype(np.int32)
    return crop_or_pad(bilinear(image, int(new_h), int(new_w)), size[0], size[1])


def to_model_size(image, image_shape, method):
    """`[h, w, C]` uint8 -> the model's `[H, W, C]` float32, resized as evaluation did.

    `method`: 'resize_center_crop', or 'none' (training's images were already
    `H x W`; others are resized bilinearly, those of that size kept exact).
    """
    height, width = image_shape[:2]
    if method == "resize_center_crop":
        return resize_center_crop(image, (height, width))
    if image.shape[:2] == (height, width):
        return image.astype(np.float32)
    return bilinear(image, height, width)
