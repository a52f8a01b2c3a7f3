"""Image files are checked before training: every one must decode as the pipeline will."""

import io

import numpy as np
from PIL import Image

from grafit_tf.data import image_check
from tests.image_files import png_bytes, png_header_only


def _write(path, data):
    path.write_bytes(data)
    return str(path)


def _encoded(fmt, **kwargs):
    buffer = io.BytesIO()
    Image.fromarray(np.full((40, 30, 3), 90, np.uint8)).save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def test_good_files_pass_in_any_format_the_pipeline_decodes(tmp_path):
    paths = [_write(tmp_path / f"a.{ext}", _encoded(fmt))
             for ext, fmt in (("png", "PNG"), ("jpg", "JPEG"), ("gif", "GIF"), ("bmp", "BMP"))]
    assert image_check.bad_images(paths) == []


def test_every_kind_of_bad_file_is_named_with_a_reason(tmp_path):
    good = _write(tmp_path / "good.png", png_bytes(np.zeros((8, 8), np.uint8)))
    jpeg = _encoded("JPEG")
    bad = [
        _write(tmp_path / "truncated.png", png_bytes(np.arange(64 * 64, dtype=np.uint8)
                                                     .reshape(64, 64))[:100]),
        _write(tmp_path / "truncated.jpg", jpeg[: len(jpeg) // 2]),
        _write(tmp_path / "empty.png", b""),
        _write(tmp_path / "text.png", b"hello"),
        _write(tmp_path / "no_data.png", png_header_only(64, 64)),
        _write(tmp_path / "webp.webp", _encoded("WEBP")),  # tf.io.decode_image has no WebP.
    ]
    found = image_check.bad_images([good] + bad, workers=2)
    assert [p for p, _ in found] == bad
    assert all(reason for _, reason in found)
    assert "WEBP" in found[-1][1]
