"""Data augmentation as pure tensor ops (plus core Keras 3 layers for RGB).

Every random op is *stateless*: it takes an explicit `seed` (an int32 tensor of
shape `[2]`) so that a pipeline run twice with the same `--seed` yields the same
views, whatever the number of parallel map calls. No tensorflow-addons and no
keras-cv: random resized crop is written on `tf.image`, RandAugment is the core
Keras 3 layer.

Images are float32 in 0..255 throughout; normalisation happens inside the model.
"""

import math

import keras
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
    begin, crop_size = crop_box(image, seed, scale, ratio)
    return tf.image.resize(tf.slice(image, begin, crop_size), size, method="bilinear")


def crop_box(image, seed, scale=(0.35, 1.0), ratio=(3 / 4, 4 / 3)):
    """The box `random_resized_crop` cuts for `seed`: `begin`, `size`, each `[3]` int32."""
    begin, crop_size, _ = tf.image.stateless_sample_distorted_bounding_box(
        tf.shape(image),
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
    """Random gamma `255 * (x / 255) ** g`, `log g` uniform in `[-strength, strength]`.

    A non-linear change of tone that keeps black and white where they are: unlike
    brightness / contrast, it moves the mid-tones against each other, so that two
    views cannot be matched by their intensity histogram alone.

    Args:
        image: `[H, W, C]` float32 in 0..255.
        seed: `[2]` int32 stateless seed.
        strength: half-width of the range of `log g` (0: identity).
    """
    log_gamma = tf.random.stateless_uniform([], seed, -strength, strength)
    x = tf.clip_by_value(image, 0.0, 255.0) / 255.0
    return 255.0 * tf.pow(x, tf.exp(log_gamma))


def random_erasing(image, seed, probability=0.5, scale=(0.02, 0.33), ratio=(0.3, 3.3)):
    """Random erasing (Zhong et al., AAAI 2020) of one image: `erase_boxes` on its draws.

    Args:
        image: `[H, W, C]` float32 in 0..255.
        seed: `[2]` int32 stateless seed.
        probability, scale, ratio: as `erase_boxes`.

    Returns:
        `[H, W, C]` float32.
    """
    draws, noise = erasing_draws(seed, 1, tf.shape(image))
    return erase_boxes(image[None], draws, noise, probability, scale, ratio)[0]


ERASE_DRAWS = 5  # Uniforms per box: area, aspect ratio, top, left, whether to erase.


def erasing_draws(seed, count, shape):
    """The random numbers of `count` erasings of images of `shape` `[H, W, C]`.

    Drawn apart from `erase_boxes` so that a pipeline draws them per image (its
    views stay a function of the image's seed) and erases a whole batch at once
    (a handful of ops per batch instead of per view, on CPUs busy training).

    Returns:
        `(draws [count, ERASE_DRAWS] in [0, 1), noise [count, H, W, C] in [0, 255))`.
    """
    draws = tf.random.stateless_uniform([count, ERASE_DRAWS], fold(seed, 0))
    noise = tf.random.stateless_uniform(tf.concat([[count], shape], 0), fold(seed, 1),
                                        0.0, 255.0)
    return draws, noise


def erase_boxes(images, draws, noise, probability=0.5, scale=(0.02, 0.33),
                ratio=(0.3, 3.3)):
    """Random erasing (Zhong et al., AAAI 2020): a random box filled with noise.

    For each image, with probability `probability`, a box of a random area (`scale`,
    as a fraction of the image) and aspect ratio (`ratio`, height / width, drawn
    log-uniformly) at a random place is replaced by the image's `noise`. The box is
    clipped to the image instead of redrawn, so that each erasing is a fixed number
    of draws.

    Args:
        images: `[..., H, W, C]` float32.
        draws: `[..., ERASE_DRAWS]` uniforms in [0, 1) (`erasing_draws`).
        noise: the fill, shaped like `images`.
        probability: chance that an image has a box erased.
        scale: range of the box's area as a fraction of the image.
        ratio: range of the box's height / width.

    Returns:
        `images`' shape, float32.
    """
    size = tf.cast(tf.shape(images)[-3:-1], tf.float32)  # [2]: H, W.
    area = size[0] * size[1] * (scale[0] + (scale[1] - scale[0]) * draws[..., 0])
    log_ratio = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * draws[..., 1]
    box_h = tf.clip_by_value(tf.round(tf.sqrt(area * tf.exp(log_ratio))), 1.0, size[0])
    box_w = tf.clip_by_value(tf.round(tf.sqrt(area * tf.exp(-log_ratio))), 1.0, size[1])
    top = tf.floor(draws[..., 2] * (size[0] - box_h + 1.0))
    left = tf.floor(draws[..., 3] * (size[1] - box_w + 1.0))
    rows = tf.range(size[0])  # [H], compared with each image's box: [..., H].
    cols = tf.range(size[1])
    in_rows = (rows >= top[..., None]) & (rows < (top + box_h)[..., None])
    in_cols = (cols >= left[..., None]) & (cols < (left + box_w)[..., None])
    erase = (draws[..., 4] < probability)[..., None, None, None]
    inside = in_rows[..., :, None, None] & in_cols[..., None, :, None] & erase
    return tf.where(inside, noise, images)


def color_jitter(image, seed, strength=0.4, hue=0.1):
    """SimCLR-style colour jitter for RGB `[H, W, 3]` images in 0..255."""
    image = brightness_contrast(image, seed, strength)
    x = image / 255.0
    x = tf.image.stateless_random_saturation(
        x, max(0.0, 1.0 - strength), 1.0 + strength, fold(seed, 2)
    )
    x = tf.image.stateless_random_hue(x, hue, fold(seed, 3))
    return tf.clip_by_value(x, 0.0, 1.0) * 255.0


def to_grayscale_rgb(image):
    """Keeps 3 channels, with the luminance in each."""
    return tf.image.grayscale_to_rgb(tf.image.rgb_to_grayscale(image))


def grayscale_small(image, seed, crop_scale_min=0.35, jitter=0.4, size=None,
                    crop_scale_max=1.0, gamma=0.0):
    """The recipe for small grayscale images (Fashion-MNIST, 28x28).

    Random resized crop back to the input size, horizontal flip, brightness /
    contrast jitter with probability 0.8, then (with `gamma`) a random gamma with
    probability 0.8. No colour ops: there is no colour.

    Args:
        image: `[H, W, 1]` float32 in 0..255.
        seed: `[2]` int32.
        crop_scale_min: smallest crop area kept, as a fraction of the image.
        jitter: brightness / contrast strength (0: no jitter, intensities kept).
        size: `(height, width)` of the output (None: the input's), smaller for
            the local crops of `--local_crops`.
        crop_scale_max: largest crop area kept.
        gamma: strength of `random_gamma` (0: none).
    """
    size = tf.shape(image)[:2] if size is None else size
    x = random_resized_crop(image, fold(seed, 0), size, scale=(crop_scale_min, crop_scale_max))
    x = random_flip(x, fold(seed, 1))
    if jitter > 0:
        x = _maybe(fold(seed, 2), 0.8, lambda t: brightness_contrast(t, fold(seed, 3), jitter), x)
    if gamma > 0:
        x = _maybe(fold(seed, 4), 0.8, lambda t: random_gamma(t, fold(seed, 5), gamma), x)
    return x


# What `grayscale_small_with_params` reports of a view (`--aug_pred_weight`).
VIEW_PARAMS = ("crop_center_y", "crop_center_x", "crop_height", "crop_width", "brightness",
               "contrast")
CROP_PARAMS = 4  # The first four; the last two are the jitter.


def grayscale_small_with_params(image, seed, crop_scale_min=0.35, jitter=0.4, size=None,
                                crop_scale_max=1.0, gamma=0.0):
    """`grayscale_small`'s view, and the draws that made it.

    Args: as `grayscale_small` (the same seed gives the same view; the gamma is
        not reported).

    Returns:
        `(view, params)`: `params` `[6]` float32, `VIEW_PARAMS` in order: the crop
        box's centre and size as fractions of the image's height and width (the
        centre's x mirrored when the view is flipped, so that it says where the
        crop sits in the view's own frame, as AugSelf does), then the brightness
        shift and contrast change scaled to [-1/2, 1/2] by the jitter strength (0
        when the jitter was not applied, or `jitter` is 0). The differences of two
        views' params are then all in [-1, 1].
    """
    x = grayscale_small(image, seed, crop_scale_min, jitter, size, crop_scale_max, gamma)
    # The draws below repeat those of grayscale_small, from the same seeds, so that the
    # plain recipe (every run without the term) computes nothing it does not use.
    begin, box = crop_box(image, fold(seed, 0), (crop_scale_min, crop_scale_max))
    # The draw of tf.image.stateless_random_flip_left_right (tests check the two agree).
    flipped = tf.random.stateless_uniform([], fold(seed, 1), 0.0, 1.0) < 0.5
    shape = tf.cast(tf.shape(image)[:2], tf.float32)
    extent = tf.cast(box[:2], tf.float32) / shape
    center = tf.cast(begin[:2], tf.float32) / shape + extent / 2.0
    center = tf.stack([center[0], tf.where(flipped, 1.0 - center[1], center[1])])
    jittered = tf.zeros([2])
    if jitter > 0:
        # The draws of `_maybe` and `brightness_contrast`.
        applied = tf.random.stateless_uniform([], fold(seed, 2)) < 0.8
        delta, factor = _jitter_draws(fold(seed, 3), jitter)
        # Scaled to [-1/2, 1/2], so that two views' difference is in tanh's range (AugSelf).
        jittered = tf.where(applied, tf.stack([delta / 255.0, factor - 1.0]) / (2.0 * jitter),
                            jittered)
    return x, tf.concat([center, extent, jittered], 0)


def rgb(image, seed, size, crop_scale_min=0.08, jitter=0.4, crop_scale_max=1.0, gamma=0.0):
    """The recipe for full-size RGB images (before RandAugment).

    Random resized crop (area `crop_scale_min`..`crop_scale_max`) to `size`, flip,
    colour jitter of strength `jitter` (p=0.8; 0: none) and grayscale (p=0.2), as
    in SimCLR / BYOL; then `random_gamma` of strength `gamma` (p=0.8; 0: none).
    """
    x = random_resized_crop(image, fold(seed, 0), size, scale=(crop_scale_min, crop_scale_max))
    x = random_flip(x, fold(seed, 1))
    if jitter > 0:
        x = _maybe(fold(seed, 2), 0.8, lambda t: color_jitter(t, fold(seed, 3), jitter), x)
    x = _maybe(fold(seed, 4), 0.2, to_grayscale_rgb, x)
    if gamma > 0:  # Folds 6 and 7: RandAugment takes fold 5 of the view's seed.
        x = _maybe(fold(seed, 6), 0.8, lambda t: random_gamma(t, fold(seed, 7), gamma), x)
    return x


def make_rand_augment(seed):
    """Core Keras 3 RandAugment for 0..255 images, driven by per-image stateless seeds.

    Keras's layer draws its randomness from a stateful `SeedGenerator`: inside a
    parallel `tf.data` map the draws would follow thread scheduling, and a run
    resumed mid-epoch could not replay them. Here every random draw of the layer
    and of its sub-layers comes from the seed of the image being augmented.

    Args:
        seed: the run's `--seed` (kept in the layer's config only).

    Returns:
        `fn(image [H, W, 3] float32 0..255, seed [2] int32) -> [H, W, 3]`.
    """
    layer = keras.layers.RandAugment(value_range=(0, 255), num_ops=2, factor=0.5, seed=seed)
    seeds = PerImageSeeds(seed)
    layer.generator = seeds
    for name in layer._AUGMENT_LAYERS:  # Its sub-layers (shear, rotation, ...) too.
        getattr(layer, name).generator = seeds

    def apply(image, image_seed):
        seeds.start(image_seed)
        return layer(image, training=True)

    return apply


class PerImageSeeds(keras.random.SeedGenerator):
    """A `SeedGenerator` whose draws are folds of one per-image seed tensor.

    Keras's TF random ops are stateless, fed by `generator.next()`; this
    `next()` returns `fold(image_seed, k)` for the k-th draw of a trace. The
    map function is traced once, so `start` binds the symbolic seed of the
    element being mapped.
    """

    def start(self, image_seed):
        self.image_seed, self.draws = image_seed, 0

    def next(self, ordered=True):
        del ordered
        self.draws += 1
        return fold(self.image_seed, self.draws)


def resize_center_crop(image, size, crop_fraction=0.875):
    """Evaluation resize: shorter side to size/crop_fraction, then centre crop.

    Args:
        image: `[H, W, C]` float32 of any size.
        size: `(height, width)` of the output.
    """
    target = tf.cast(tf.math.ceil(max(size) / crop_fraction), tf.float32)
    shape = tf.cast(tf.shape(image)[:2], tf.float32)
    scale = target / tf.reduce_min(shape)
    new = tf.cast(tf.math.ceil(shape * scale), tf.int32)
    image = tf.image.resize(image, new, method="bilinear")
    return tf.image.resize_with_crop_or_pad(image, size[0], size[1])

