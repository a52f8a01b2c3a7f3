"""Data augmentation as pure tensor ops (plus core Keras 3 RandAugment for RGB).

Every random op is *stateless*, with an explicit `seed` (int32 `[2]`): a pipeline run
twice with the same `--seed` yields the same views, whatever the parallelism. No
tensorflow-addons or keras-cv. Images are float32 in 0..255 (the model normalises).
"""

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


def rgb(image, seed, size, crop_scale_min=0.08, jitter=0.4, gamma=0.0):
    """The recipe for full-size RGB images (before RandAugment).

    Random resized crop (area `crop_scale_min`..1) to `size`, flip,
    colour jitter of strength `jitter` (p=0.8; 0: none) and grayscale (p=0.2), as
    in SimCLR / BYOL; then `random_gamma` of strength `gamma` (p=0.8; 0: none).
    """
    x = random_resized_crop(image, fold(seed, 0), size, scale=(crop_scale_min, 1.0))
    x = random_flip(x, fold(seed, 1))
    if jitter > 0:
        x = _maybe(fold(seed, 2), 0.8, lambda t: color_jitter(t, fold(seed, 3), jitter), x)
    x = _maybe(fold(seed, 4), 0.2, to_grayscale_rgb, x)
    if gamma > 0:  # Folds 6 and 7: RandAugment takes fold 5 of the view's seed.
        x = _maybe(fold(seed, 6), 0.8, lambda t: random_gamma(t, fold(seed, 7), gamma), x)
    return x


def make_rand_augment(seed):
    """Core Keras 3 RandAugment for 0..255 images, driven by per-image stateless seeds.

    Keras's layer draws from a stateful `SeedGenerator`: in a parallel `tf.data` map
    the draws would follow thread scheduling, and a resumed run could not replay them.
    Here every draw of the layer and its sub-layers comes from the image's seed.

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

    Keras's TF random ops are stateless, fed by `generator.next()`: here the k-th draw
    of a trace is `fold(image_seed, k)`. The map function is traced once, so `start`
    binds the symbolic seed of the element being mapped.
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

