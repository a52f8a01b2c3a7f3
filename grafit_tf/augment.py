"""Data augmentation as pure tensor ops (RandAugment: `grafit_tf.rand_augment`).

Every random op is *stateless*, with an explicit `seed` (int32 `[2]`): a pipeline run
twice with the same `--seed` yields the same views, whatever the parallelism. No
tensorflow-addons or keras-cv. Images are float32 in 0..255 (the model normalises).
"""

import math

import numpy as np
import tensorflow as tf


def fold(seed, k):
    """Derives an independent seed `[2]` from `seed` and an integer `k`."""
    return tf.random.experimental.stateless_fold_in(seed, k)


def random_resized_crop(image, seed, size, scale=(0.35, 1.0), ratio=(3 / 4, 4 / 3)):
    """Inception-style crop of a random area and aspect ratio, resized to `size`.

    Args:
        image: `[H, W, C]` float32.
        seed: `[2]` int32 stateless seed.
        size: `(height, width)` of the output.
        scale: range of the crop's area as a fraction of the image.
        ratio: range of the crop's aspect ratio (width / height).

    Returns:
        `[size[0], size[1], C]` float32.
    """
    begin, crop_size = crop_box(tf.shape(image), seed, scale, ratio)
    return tf.image.resize(tf.slice(image, begin, crop_size), size, method="bilinear")


def crop_box(shape, seed, scale=(0.35, 1.0), ratio=(3 / 4, 4 / 3)):
    """The box `random_resized_crop` cuts for `seed` from an image of `shape` `[3]`:
    `begin`, `size`, each `[3]` int32. Depends on the shape only, so a JPEG's box is
    known before decoding (`tf.image.extract_jpeg_shape`)."""
    begin, crop_size, _ = tf.image.stateless_sample_distorted_bounding_box(
        shape,
        bounding_boxes=tf.constant([0.0, 0.0, 1.0, 1.0], shape=[1, 1, 4]),
        seed=seed,
        min_object_covered=0.0,
        aspect_ratio_range=ratio,
        area_range=scale,
        max_attempts=10,
        use_image_if_no_bounding_boxes=True,
    )
    return begin, crop_size


def random_flip(image, seed):
    """Horizontal flip with probability 1/2. `image`: `[H, W, C]`."""
    return tf.image.stateless_random_flip_left_right(image, seed)


def _maybe(seed, probability, fn, image):
    apply = tf.random.stateless_uniform([], seed) < probability
    return tf.cond(apply, lambda: fn(image), lambda: image)


def brightness_contrast(image, seed, strength=0.4):
    """Random brightness and contrast jitter (grayscale or RGB), clipped to 0..255."""
    delta, factor = _jitter_draws(seed, strength)
    mean = tf.reduce_mean(image)
    image = (image - mean) * factor + mean + delta
    return tf.clip_by_value(image, 0.0, 255.0)


def _jitter_draws(seed, strength):
    """The brightness shift (0..255 units) and contrast factor of `brightness_contrast`."""
    delta = strength * 255.0 * tf.random.stateless_uniform([], fold(seed, 0), -1.0, 1.0)
    factor = tf.random.stateless_uniform(
        [], fold(seed, 1), max(0.0, 1.0 - strength), 1.0 + strength
    )
    return delta, factor


def random_gamma(image, seed, strength=0.5):
    """Random gamma `255 * (x / 255) ** g`, `log g` uniform in `[-strength, strength]`
    (`grayscale_small`; `colour` draws the RGB recipe's).

    Keeps black and white but, unlike brightness / contrast, moves the mid-tones
    against each other: two views cannot be matched by their histogram alone.

    Args:
        image: `[H, W, C]` float32 in 0..255.
        seed: `[2]` int32 stateless seed.
        strength: half-width of the range of `log g` (0: identity).
    """
    log_gamma = tf.random.stateless_uniform([], seed, -strength, strength)
    x = tf.clip_by_value(image, 0.0, 255.0) / 255.0
    return 255.0 * tf.pow(x, tf.exp(log_gamma))


# ITU-R 601 luma; a hue rotation by angle t is `_HUE[0] + cos t _HUE[1] + sin t _HUE[2]`:
# in YIQ it keeps Y and turns the I-Q plane (torchvision's approximation of HSV's hue).
_LUMA = np.array([[0.299, 0.587, 0.114]], np.float32)
_YIQ = np.array([_LUMA[0], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]], np.float32)
_HUE = np.stack([np.linalg.inv(_YIQ) @ np.diag(d) @ _YIQ for d in ([1, 0, 0], [0, 1, 1])]
                + [np.linalg.inv(_YIQ) @ np.array([[0, 0, 0], [0, 0, -1], [0, 1, 0]]) @ _YIQ])


def colour_draws(seed):
    """The 8 uniform numbers `[8]` that `colour` turns into one view's jitter (fold 2 of
    the view's `seed`: one draw, as each random op costs more than its arithmetic)."""
    return tf.random.stateless_uniform([8], fold(seed, 2))


def colour(images, draws, strength=0.4, hue=0.1, gamma=0.0):
    """SimCLR's colour distortion of a batch of views, fused into one affine map each.

    With probability 0.8, brightness, contrast and saturation jitter of `strength`
    and a hue rotation of up to `hue` turns; then grayscale with probability 0.2;
    then (`gamma` > 0) `random_gamma` with probability 0.8. Each step but the gamma
    is linear in the channels and keeps grey grey, so together they are
    `clip(M x + b)`: one pass instead of five, in the train step (`GrafitModel.views`,
    on the accelerator), not on the pipeline's CPU. Draws of ones: the identity.

    Args:
        images: `[..., H, W, 3]` float32 in 0..255.
        draws: `[..., 8]` `colour_draws` of each view.
        strength: jitter strength (0: grayscale only).
        hue: largest hue rotation, in turns.
        gamma: strength of the gamma (0: none).

    Returns: `images`' shape, float32 in 0..255.
    """
    shape = tf.shape(images)
    x = tf.reshape(images, tf.concat([[-1], shape[-3:]], 0))  # [N, H, W, 3]
    u = tf.unstack(tf.reshape(draws, [-1, 8]), axis=1)  # 8 of [N]
    jitter = tf.cast(u[0] < 0.8, tf.float32) * strength  # 0: this image keeps its colours.
    factor, shift = 1.0 + jitter * (2.0 * u[1] - 1.0), jitter * 255.0 * (2.0 * u[2] - 1.0)
    sat = (1.0 + jitter * (2.0 * u[3] - 1.0))[:, None, None]
    angle = 2.0 * math.pi * hue * (2.0 * u[4] - 1.0) * tf.cast(jitter > 0, tf.float32)
    turn = _HUE[0] + tf.cos(angle)[:, None, None] * _HUE[1] + tf.sin(angle)[:, None, None] * _HUE[2]
    matrix = factor[:, None, None] * turn @ (sat * np.eye(3, dtype=np.float32)
                                             + (1.0 - sat) * _LUMA.repeat(3, 0))
    matrix = tf.where((u[5] < 0.2)[:, None, None], _LUMA.repeat(3, 0) @ matrix, matrix)
    # Contrast scales about the image's mean, brightness shifts every channel alike.
    offset = (1.0 - factor) * tf.reduce_mean(x, axis=[1, 2, 3]) + shift
    flat = tf.matmul(tf.reshape(x, [tf.shape(x)[0], -1, 3]), matrix, transpose_b=True)
    x = tf.clip_by_value(flat + offset[:, None, None], 0.0, 255.0)
    if gamma > 0:
        g = tf.where(u[6] < 0.8, tf.exp(gamma * (2.0 * u[7] - 1.0)), 1.0)[:, None, None]
        x = tf.where(g == 1.0, x, 255.0 * tf.pow(x / 255.0, g))
    return tf.reshape(x, shape)


def grayscale_small(image, seed, crop_scale_min=0.35, jitter=0.4, gamma=0.0):
    """The recipe for small grayscale images (Fashion-MNIST, 28x28): random resized crop
    to the input size, flip, brightness / contrast jitter (p=0.8), random gamma (p=0.8).

    Args:
        image: `[H, W, 1]` float32 in 0..255.
        seed: `[2]` int32.
        crop_scale_min: smallest crop area kept, as a fraction of the image.
        jitter: brightness / contrast strength (0: no jitter, intensities kept).
        gamma: strength of `random_gamma` (0: none).
    """
    x = random_resized_crop(image, fold(seed, 0), tf.shape(image)[:2],
                            scale=(crop_scale_min, 1.0))
    x = random_flip(x, fold(seed, 1))
    if jitter > 0:
        x = _maybe(fold(seed, 2), 0.8, lambda t: brightness_contrast(t, fold(seed, 3), jitter), x)
    if gamma > 0:
        x = _maybe(fold(seed, 4), 0.8, lambda t: random_gamma(t, fold(seed, 5), gamma), x)
    return x


def rgb(image, seed, size, crop_scale_min=0.08):
    """The recipe for full-size RGB images, in the input pipeline: a random resized crop
    (area `crop_scale_min`..1, fold 0 of `seed`), then `rgb_from_crop`. The colour
    jitter (`colour`) follows in the train step."""
    begin, crop_size = crop_box(tf.shape(image), fold(seed, 0), (crop_scale_min, 1.0))
    return rgb_from_crop(tf.slice(image, begin, crop_size), seed, size)


def rgb_from_crop(crop, seed, size):
    """`rgb` after its crop: resized to `size`, flipped (fold 1 of `seed`) with
    probability 1/2.

    Args:
        crop: `[h, w, 3]` uint8 or float32 in 0..255 (a decoded JPEG window).

    Returns:
        `[size[0], size[1], 3]` float32.
    """
    x = tf.image.resize(crop, size, method="bilinear")  # float32 from any dtype.
    return random_flip(x, fold(seed, 1))


def resize_center_crop(image, size, crop_fraction=0.875):
    """Evaluation resize: shorter side to size/crop_fraction (antialiased bilinear, as
    PIL / torchvision shrink photos), then centre crop.

    Args:
        image: `[H, W, C]` float32 of any size.
        size: `(height, width)` of the output.
    """
    image = tf.image.resize(image, resized_shape(tf.shape(image)[:2], size, crop_fraction),
                            method="bilinear", antialias=True)
    return tf.image.resize_with_crop_or_pad(image, size[0], size[1])


def resized_shape(shape, size, crop_fraction=0.875):
    """`[2]` int32: what `resize_center_crop` resizes an image of `shape` `[2]` to, the
    shorter side to `ceil(max(size) / crop_fraction)` (in float32 steps, as serving)."""
    target = tf.cast(tf.math.ceil(max(size) / crop_fraction), tf.float32)
    shape = tf.cast(shape, tf.float32)
    return tf.cast(tf.math.ceil(shape * (target / tf.reduce_min(shape))), tf.int32)

