"""Augmentation ops: shapes, value range, and determinism under explicit seeds."""

import numpy as np
import tensorflow as tf

from grafit_tf import augment


def image(seed=0, size=(40, 56)):
    rng = np.random.default_rng(seed)
    return tf.constant(rng.uniform(0, 255, size + (3,)).astype("float32"))


def seeds(n):
    return [tf.constant([7, i], tf.int32) for i in range(n)]


def test_random_resized_crop_shape_and_determinism():
    x = image()
    a = augment.random_resized_crop(x, tf.constant([1, 2]), (32, 32))
    b = augment.random_resized_crop(x, tf.constant([1, 2]), (32, 32))
    c = augment.random_resized_crop(x, tf.constant([1, 3]), (32, 32))
    assert a.shape == (32, 32, 3)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_no_jitter_keeps_intensities():
    image = tf.constant(np.random.default_rng(0).uniform(0, 255, (12, 12, 1)), tf.float32)
    for i in range(8):  # Full-area crop and no jitter: the image or its mirror image.
        out = augment.grayscale_small(image, tf.constant([i, 1]), crop_scale_min=1.0,
                                      jitter=0.0).numpy()
        assert any(np.allclose(out, ref, atol=1e-3)
                   for ref in (image.numpy(), image.numpy()[:, ::-1]))
    # With jitter (p=0.8), some of the same seeds change the intensities.
    changed = [not np.allclose(augment.grayscale_small(
        image, tf.constant([i, 1]), crop_scale_min=1.0).numpy().sum(),
        image.numpy().sum(), rtol=1e-4) for i in range(8)]
    assert any(changed)


def test_random_gamma_matches_numpy_and_keeps_black_and_white():
    x = tf.constant([[[0.0], [51.0], [127.5], [204.0], [255.0]]])  # [1, 5, 1]
    seed = tf.constant([3, 4])
    out = augment.random_gamma(x, seed, strength=0.7).numpy()
    g = np.exp(tf.random.stateless_uniform([], seed, -0.7, 0.7).numpy())
    np.testing.assert_allclose(out, 255.0 * (x.numpy() / 255.0) ** g, rtol=1e-5, atol=1e-3)
    assert out[0, 0, 0] == 0.0 and abs(out[0, 4, 0] - 255.0) < 1e-3
    assert np.all(np.diff(out[0, :, 0]) > 0)  # Monotone: the order of tones is kept.
    assert not np.allclose(out, x.numpy(), atol=0.5)  # ...but the mid-tones move.
    # Strength 0 is the identity.
    np.testing.assert_allclose(augment.random_gamma(x, seed, 0.0), x, atol=1e-3)


def test_gamma_jitter_in_the_grayscale_recipe():
    image = tf.constant(np.random.default_rng(1).uniform(0, 255, (12, 12, 1)), tf.float32)
    for i in range(8):  # The gamma comes last, on its own draws: crop, flip and jitter
        seed = tf.constant([i, 2])  # are those of the plain recipe, gamma or not.
        plain = augment.grayscale_small(image, seed, 0.8).numpy()
        with_gamma = augment.grayscale_small(image, seed, 0.8, gamma=0.5).numpy()
        gammaed = augment.random_gamma(plain, augment.fold(seed, 5), 0.5).numpy()
        assert (np.array_equal(with_gamma, plain)
                or np.allclose(with_gamma, gammaed, rtol=1e-5, atol=1e-3))
    # Without jitter and crop, the gamma alone changes the tones of most views (p=0.8)
    # and never the dark and bright ends' order.
    outs = [augment.grayscale_small(image, tf.constant([i, 2]), 1.0, jitter=0.0,
                                    gamma=0.5).numpy() for i in range(8)]
    plain = [augment.grayscale_small(image, tf.constant([i, 2]), 1.0, jitter=0.0).numpy()
             for i in range(8)]
    assert sum(not np.allclose(o, p, atol=1e-2) for o, p in zip(outs, plain)) >= 4
    for o, p in zip(outs, plain):
        assert np.array_equal(np.argsort(o.ravel(), kind="stable"),
                              np.argsort(p.ravel(), kind="stable"))


def jittered(x, seed, size, crop_scale_min=0.08, jitter=0.4, gamma=0.0):
    """The whole RGB recipe of one view: `augment.rgb` (pipeline), then `augment.colour`
    (train step) with the view's draws."""
    view = augment.rgb(x, seed, size, crop_scale_min)
    return augment.colour(view, augment.colour_draws(seed), jitter, gamma=gamma)


def test_rgb_recipe_stays_in_range():
    out = jittered(image(), tf.constant([0, 1]), (32, 32), gamma=0.5)
    assert out.shape == (32, 32, 3)
    assert float(tf.reduce_min(out)) >= 0.0 and float(tf.reduce_max(out)) <= 255.0


def test_gamma_jitter_in_the_rgb_recipe():
    x = image()
    changed = 0
    for i in range(8):  # The gamma comes last: it maps each value of the plain view alone,
        seed = tf.constant([i, 3])  # keeping black, white and the order of the tones.
        plain = jittered(x, seed, (32, 32), 0.5).numpy()
        with_gamma = jittered(x, seed, (32, 32), 0.5, gamma=0.5).numpy()
        g = np.log(np.clip(with_gamma, 1e-3, None) / 255) / np.log(np.clip(plain, 1e-3, 254) / 255)
        middle = (plain > 20) & (plain < 235)
        assert np.ptp(g[middle]) < 1e-3, i  # One exponent for the whole view.
        assert np.exp(-0.5) - 1e-4 <= np.median(g[middle]) <= np.exp(0.5) + 1e-4
        changed += not np.allclose(with_gamma, plain, atol=1e-2)
    assert changed >= 4
    # jitter=0 and a full-area crop: only the flip and the grayscale (p=0.2) remain.
    x = image(size=(32, 32))
    luma = x.numpy() @ np.array([0.299, 0.587, 0.114], np.float32)
    refs = (x.numpy(), x.numpy()[:, ::-1], np.repeat(luma[..., None], 3, -1))
    refs += (refs[2][:, ::-1],)
    kinds = set()
    for i in range(40):
        out = jittered(x, tf.constant([i, 4]), (32, 32), 1.0, jitter=0.0).numpy()
        kinds.add(next(k for k, r in enumerate(refs) if np.allclose(out, r, atol=1e-2)))
    assert kinds == {0, 1, 2, 3}


def test_colour_of_a_batch_is_each_views_own_and_ones_keep_a_view():
    """Batched over any leading dimensions, each view with its own draws (the train
    step's `[b, V, H, W, 3]`); draws of ones (a weak key view) change nothing but the
    float32 rounding of the hue matrices."""
    rng = np.random.default_rng(2)
    x = tf.constant(rng.uniform(0, 255, (3, 2, 8, 9, 3)), tf.float32)
    draws = tf.constant(rng.uniform(0, 1, (3, 2, 8)), tf.float32)
    got = augment.colour(x, draws, 0.4, gamma=0.5).numpy()
    for i in range(3):
        for v in range(2):
            want = augment.colour(x[i, v], draws[i, v], 0.4, gamma=0.5).numpy()
            np.testing.assert_allclose(got[i, v], want, atol=1e-3)
    np.testing.assert_allclose(augment.colour(x, tf.ones([3, 2, 8]), 0.4, gamma=0.5), x,
                               atol=1e-4)


def test_evaluation_resize_antialiases_shrinking_only():
    """Shrinking (Cars / SOP photos) is antialiased: a 1-pixel checkerboard becomes grey,
    as with PIL / torchvision. Enlarging (CIFAR's 32 px to 224) is the plain bilinear
    resize it was (measured 0 to 5e-5 apart), and `resize` 'none' (Fashion-MNIST, CIFAR
    at 32 px) never resizes."""
    board = tf.constant(np.indices((512, 512)).sum(0)[..., None] % 2 * 255.0, tf.float32)
    out = augment.resize_center_crop(board, (64, 64)).numpy()  # 512 -> 74, then 64.
    np.testing.assert_allclose(out, 127.5, atol=0.5)  # Not antialiased: 0 to 255.
    small = image(1, (32, 32))
    for size in ((224, 224), (64, 64)):
        plain = tf.image.resize_with_crop_or_pad(tf.image.resize(
            small, augment.resized_shape((32, 32), size)), *size)
        np.testing.assert_allclose(augment.resize_center_crop(small, size), plain, atol=1e-4)
