"""Image resizing that reproduces training's evaluation preprocessing, with Pillow.

`bilinear` matches `tf.image.resize(method="bilinear", antialias=True)` and
`resize_center_crop` matches `grafit_tf.augment.resize_center_crop`, so that
`serve.py` feeds the model what `grafit_tf.data.pipeline.eval_image` does,
without TensorFlow: the same triangle filter, widened by the downscale factor.
8-bit images resize in one Pillow call, which rounds each of its two passes to a
level: within 1 of TensorFlow's float result, at ~4x the speed of a float resize.
Others resize channel by channel in float32 ("F", double weights): within 0.01.
"""

import numpy as np
from PIL import Image

CROP_FRACTION = 0.875  # The default of `augment.resize_center_crop`.


def bilinear(image, height, width, crop=None):
    """Antialiased bilinear resize (half-pixel centres), as TensorFlow's.

    `[H, W, C]` of any real dtype -> `[height, width, C]` float32; with `crop`
    `(h, w)` (at most `(height, width)`), only its centre `[h, w, C]` (where
    `tf.image.resize_with_crop_or_pad` cuts it), the other pixels never computed:
    Pillow's `box` resamples that part of the image at the whole resize's scale.
    """
    out_h, out_w = crop or (height, width)
    sy, sx = image.shape[0] / height, image.shape[1] / width
    top, left = (height - out_h) // 2, (width - out_w) // 2
    box = (left * sx, top * sy, (left + out_w) * sx, (top + out_h) * sy)
    if image.dtype == np.uint8 and image.shape[2] in (1, 3):  # One call in 8-bit mode.
        pil = Image.fromarray(image[..., 0] if image.shape[2] == 1 else image)
        out = np.asarray(pil.resize((out_w, out_h), Image.Resampling.BILINEAR, box=box))
        return out.reshape(out_h, out_w, image.shape[2]).astype(np.float32)
    channels = [Image.fromarray(np.ascontiguousarray(image[..., c], np.float32), "F")
                .resize((out_w, out_h), Image.Resampling.BILINEAR, box=box)
                for c in range(image.shape[2])]
    return np.stack([np.asarray(c) for c in channels], axis=-1)


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
