"""grafit_tf.serving.images: decoding image files, against TensorFlow's.

The resizing itself (grafit_tf.serving.resize) is tested in test_serving_resize.py.
"""

import io

import numpy as np
import pytest
from PIL import Image

from grafit_tf.serving import images
from tests.image_files import png_header_only, rgb_picture


def _tf():
    import tensorflow as tf

    return tf


def _save(path, image, **kwargs):
    image.save(path, **kwargs)
    return str(path)


def _tf_decode(path, channels):
    tf = _tf()
    with open(path, "rb") as f:
        return tf.io.decode_image(f.read(), channels=channels, expand_animations=False).numpy()


def test_modes_decode_like_tensorflow(tmp_path):
    rng = np.random.default_rng(2)
    rgba = rng.integers(0, 256, (20, 30, 4)).astype(np.uint8)
    sixteen = rng.integers(0, 65536, (20, 30)).astype(np.uint16)
    cases = {
        "rgba.png": (Image.fromarray(rgba, "RGBA"), 3),
        "palette.png": (Image.fromarray(rgba[..., :3]).convert(
            "P", palette=Image.Palette.ADAPTIVE), 3),
        "gray16.png": (Image.fromarray(sixteen), 1),
        "gray.png": (Image.fromarray(rgba[..., 0]), 1),
        "rgb.png": (Image.fromarray(rgba[..., :3]), 3),
    }
    for name, (image, channels) in cases.items():
        path = _save(tmp_path / name, image)
        spec = images.Spec((20, 30, channels))
        np.testing.assert_array_equal(images.load(path, spec), _tf_decode(path, channels),
                                      err_msg=name)


def test_other_modes_become_model_channels(tmp_path):
    rng = np.random.default_rng(3)
    pixels = rng.integers(0, 256, (12, 9, 4)).astype(np.uint8)
    files = {
        "cmyk.jpg": Image.fromarray(pixels, "CMYK"),
        "la.png": Image.fromarray(pixels[..., :2], "LA"),
        "bilevel.png": Image.fromarray(pixels[..., 0] > 128),
        "palette_transparent.png": Image.fromarray(pixels[..., :3]).convert("P"),
    }
    for name, image in files.items():
        # A palette index marked transparent: Pillow warns and keeps the colour.
        extra = {"transparency": 0} if name.startswith("palette") else {}
        path = _save(tmp_path / name, image, **extra)
        for channels in (1, 3):
            out = images.load(path, images.Spec((28, 28, channels)))
            assert out.shape == (28, 28, channels) and out.dtype == np.uint8, name


def test_exif_orientation_is_applied(tmp_path):
    upright = np.zeros((20, 32), np.uint8)
    upright[2:6, 3:25] = 255  # A bar near the top: any rotation moves it.
    # Orientation 6: the stored pixels must be turned 90 degrees clockwise to
    # display, so store them turned 90 degrees counter-clockwise.
    stored = Image.fromarray(np.rot90(upright, 1).copy())
    exif = Image.Exif()
    exif[0x0112] = 6
    rotated = _save(tmp_path / "rotated.png", stored, exif=exif)
    plain = _save(tmp_path / "upright.png", Image.fromarray(upright))
    spec = images.Spec((20, 32, 1))
    np.testing.assert_array_equal(images.load(rotated, spec), images.load(plain, spec))


def test_bad_files_raise_image_error_with_reason(tmp_path):
    good = io.BytesIO()
    Image.fromarray(np.random.default_rng(4).integers(0, 256, (64, 64), np.uint8)).save(good, "PNG")
    files = {
        "empty.png": (b"", "empty file"),
        "text.png": (b"hello, not an image\n", "not an image"),
        "truncated.png": (good.getvalue()[: len(good.getvalue()) // 2], "truncated"),
        "bomb.png": (png_header_only(40000, 40000), "decompression bomb"),
    }
    spec = images.Spec((28, 28, 1))
    for name, (data, reason) in files.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(images.ImageError, match=reason):
            images.load(str(tmp_path / name), spec)
    # The limit is a setting: a small image is a "bomb" under a tiny limit.
    (tmp_path / "good.png").write_bytes(good.getvalue())
    with pytest.raises(images.ImageError, match="decompression bomb"):
        images.load(str(tmp_path / "good.png"), images.Spec((28, 28, 1), max_pixels=100))


def test_other_size_is_resized_bilinearly(tmp_path):
    """Antialiased, as `pipeline.eval_image` resizes for `--eval_protocol=maskcon`."""
    tf = _tf()
    pixels = np.random.default_rng(5).integers(0, 256, (50, 40), np.uint8)
    path = _save(tmp_path / "big.png", Image.fromarray(pixels))
    got = images.load(path, images.Spec((28, 28, 1)))
    want = tf.image.resize(pixels[..., None].astype(np.float32), (28, 28),
                           antialias=True).numpy()
    # Pillow's 8-bit resize rounds after each of its two passes: within 1 level.
    assert np.abs(got.astype(np.float32) - want).max() <= 1.01


def test_jpegs_decode_at_the_scale_evaluation_decodes_them_at(tmp_path):
    """Pillow's draft (serving) and `decode_jpeg`'s ratio (`pipeline.decode_for_eval`) pick
    the same DCT scale, 1/1 to 1/8 here, and the two preprocessings then agree."""
    tf = _tf()
    from grafit_tf.data import pipeline, types

    rng = np.random.default_rng(5)
    sizes = [(60, 80), (100, 133), (200, 260), (375, 500), (1200, 1600)]
    paths = [_save(tmp_path / f"{i}.jpg", Image.fromarray(rgb_picture(rng, h, w)), quality=90)
             for i, (h, w) in enumerate(sizes)]
    zeros = np.zeros(len(paths), np.int32)
    split = types.Split(paths=np.asarray(paths), fine=zeros, coarse=zeros)
    for shape, method, scales in (((32, 32, 3), "resize_center_crop", [1, 2, 4, 8, 8]),
                                  ((40, 48, 1), "none", [1, 2, 4, 8, 8])):
        source = types.Source("t", split, split, None, shape, (0.0,), (1.0,), resize=method,
                              eval_resize="" if method != "none" else "resize")
        for path, (h, w), scale in zip(paths, sizes, scales):
            pil = images.decode(path, spec=images.Spec(shape, method))
            decoded = pipeline.decode_for_eval(tf.io.read_file(path), source)
            assert pil.size == (-(-w // scale), -(-h // scale)), (path, method)
            assert tuple(decoded.shape) == (pil.size[1], pil.size[0], shape[-1])
        want = np.concatenate([b.numpy() for b in pipeline.eval_dataset(split, source)])
        got = np.stack([images.load(p, images.Spec(shape, method)) for p in paths])
        # Pillow's 8-bit resize (within 1 level), and for grey libjpeg's luma against
        # Pillow's: a full-size decode against a 1/8 one would differ by tens of levels.
        assert np.abs(got - want).max() <= (1.01 if shape[-1] == 3 else 3), shape
