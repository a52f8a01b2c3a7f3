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


def test_rgb_recipe_stays_in_range():
    out = augment.rgb(image(), tf.constant([0, 1]), (32, 32), gamma=0.5)
    assert out.shape == (32, 32, 3)
    assert float(tf.reduce_min(out)) >= 0.0 and float(tf.reduce_max(out)) <= 255.0


def test_rand_augment_follows_the_image_seed_only():
    rand_augment = augment.make_rand_augment(seed=0)
    fn = tf.function(rand_augment)
    x = image(size=(32, 32))
    first = [fn(x, s).numpy() for s in seeds(8)]
    again = [fn(x, s).numpy() for s in reversed(seeds(8))][::-1]
    for a, b in zip(first, again):  # Same seed, same picture, whatever the call order.
        np.testing.assert_array_equal(a, b)
    changed = [not np.allclose(a, x.numpy()) for a in first]
    distinct = {a.tobytes() for a in first}
    assert sum(changed) >= 6 and len(distinct) >= 6


def test_rand_augment_in_a_parallel_map_is_reproducible():
    def views(parallel):
        rand_augment = augment.make_rand_augment(seed=0)
        ds = tf.data.Dataset.range(24).map(
            lambda i: rand_augment(tf.fill([32, 32, 3], tf.cast(i, tf.float32) * 10.0),
                                   tf.stack([tf.constant(3, tf.int64), i])),
            num_parallel_calls=parallel, deterministic=True)
        return np.stack([v.numpy() for v in ds])

    np.testing.assert_array_equal(views(tf.data.AUTOTUNE), views(tf.data.AUTOTUNE))
    np.testing.assert_array_equal(views(tf.data.AUTOTUNE), views(None))


def test_view_params_describe_the_view_they_come_with():
    image = tf.constant(np.random.default_rng(1).uniform(0, 255, (20, 24, 1)), tf.float32)
    flips = jitters = 0
    for i in range(24):
        seed = tf.constant([i, 5])
        view, params = augment.grayscale_small_with_params(image, seed, crop_scale_min=0.5)
        # The same view as the plain recipe: only what is reported is new.
        np.testing.assert_array_equal(view, augment.grayscale_small(image, seed, 0.5))
        assert params.shape == (len(augment.VIEW_PARAMS),)
        cy, cx, h, w, brightness, contrast = params.numpy()
        # Redo the view by hand from the reported box, flip and jitter.
        top, height = round((cy - h / 2) * 20), round(h * 20)
        width = round(w * 24)
        for flipped in (False, True):
            left = round(((1 - cx) if flipped else cx) * 24 - width / 2)
            crop = image[top:top + height, left:left + width]
            if left < 0 or left + width > 24 or crop.shape[:2] != (height, width):
                continue
            x = tf.image.resize(crop, (20, 24)).numpy()
            x = x[:, ::-1] if flipped else x
            if brightness or contrast:
                mean = x.mean()
                x = np.clip((x - mean) * (1 + 0.8 * contrast) + mean + 0.8 * 255 * brightness,
                            0, 255)
            if np.allclose(x, view.numpy(), atol=1e-2):
                flips += flipped
                jitters += bool(brightness or contrast)
                break
        else:
            raise AssertionError(f"seed {i}: params {params.numpy()} do not give the view")
        assert 0 < h <= 1 and 0 < w <= 1 and abs(brightness) <= 0.5 and abs(contrast) <= 0.5
    assert 0 < flips < 24 and 0 < jitters < 24  # Both branches of each draw were checked.
    # No jitter: nothing to report there.
    _, params = augment.grayscale_small_with_params(image, tf.constant([0, 5]), jitter=0.0)
    assert params.numpy()[4:].tolist() == [0.0, 0.0]


def erased_box(before, after):
    """The bounding box `(rows, cols)` of the pixels `after` changed, and the change mask."""
    changed = np.any(before != after, axis=-1)
    rows, cols = np.nonzero(changed)
    return (slice(rows.min(), rows.max() + 1), slice(cols.min(), cols.max() + 1)), changed


def test_random_erasing_replaces_one_box_with_noise():
    x = tf.fill([28, 28, 1], 100.0)  # No noise value lands on exactly 100.
    areas = []
    for s in seeds(30):
        out = augment.random_erasing(x, s, probability=1.0, scale=(0.02, 0.33)).numpy()
        box, changed = erased_box(x.numpy(), out)
        assert changed[box].all() and changed.sum() == changed[box].size  # One rectangle.
        assert out.min() >= 0.0 and out.max() <= 255.0
        areas.append(changed.mean())
    out = augment.random_erasing(x, seeds(1)[0], 1.0)  # The same seed, the same box.
    np.testing.assert_array_equal(out, augment.random_erasing(x, seeds(1)[0], 1.0))
    # Box sides are rounded and clipped to the image: allow a pixel's worth either side.
    assert min(areas) >= 0.015 and max(areas) <= 0.33 + 2 * 29 / 28**2
    assert np.std(areas) > 0.03  # Sizes vary over the seeds.


def test_random_erasing_probability():
    x = image(size=(12, 16))
    for s in seeds(3):
        np.testing.assert_array_equal(augment.random_erasing(x, s, probability=0.0), x)
    images = tf.repeat(x[None], 400, axis=0)
    draws, noise = augment.erasing_draws(tf.constant([3, 4]), 400, tf.shape(x))
    erased = augment.erase_boxes(images, draws, noise, probability=0.5).numpy()
    changed = np.any(erased != images.numpy(), axis=(1, 2, 3))
    assert 0.4 < changed.mean() < 0.6


def test_erase_boxes_on_a_batch_erases_each_image_by_its_own_draws():
    rng = np.random.default_rng(1)
    images = tf.constant(rng.uniform(0, 255, (2, 3, 9, 11, 1)), tf.float32)
    draws = tf.constant(rng.uniform(0, 1, (2, 3, augment.ERASE_DRAWS)), tf.float32)
    noise = tf.constant(rng.uniform(0, 255, (2, 3, 9, 11, 1)), tf.float32)
    batched = augment.erase_boxes(images, draws, noise, probability=0.7).numpy()
    for i in range(2):
        for v in range(3):
            one = augment.erase_boxes(images[i, v][None], draws[i, v][None],
                                      noise[i, v][None], probability=0.7)[0].numpy()
            np.testing.assert_array_equal(batched[i, v], one)
            # By hand: the box the draws describe (area 2-33%, ratio 0.3-3.3).
            d = draws[i, v].numpy()
            if d[4] >= 0.7:
                np.testing.assert_array_equal(one, images[i, v].numpy())
                continue
            area = 99 * (0.02 + 0.31 * d[0])
            r = np.exp(np.log(0.3) + (np.log(3.3) - np.log(0.3)) * d[1])
            h = int(np.clip(np.round(np.sqrt(area * r)), 1, 9))
            w = int(np.clip(np.round(np.sqrt(area / r)), 1, 11))
            top, left = int(d[2] * (9 - h + 1)), int(d[3] * (11 - w + 1))
            want = images[i, v].numpy().copy()
            want[top:top + h, left:left + w] = noise[i, v, top:top + h, left:left + w]
            np.testing.assert_allclose(one, want)
