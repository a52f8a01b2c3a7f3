"""Image files for the serving tests, made in memory (NumPy + Pillow)."""

import io
import struct
import zlib

import numpy as np
from PIL import Image


def png_bytes(pixels):
    """A PNG of `[h, w]` or `[h, w, C]` uint8 pixels."""
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def png_header_only(width, height):
    """A PNG that claims `width x height` pixels but holds almost no data (a bomb)."""

    def chunk(kind, data):
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


def rgb_picture(rng, height, width):
    """A smooth RGB picture `[h, w, 3]` uint8 (waves plus noise, like a photo)."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    channels = []
    for _ in range(3):
        fy, fx, phase = rng.uniform(0.02, 0.2), rng.uniform(0.02, 0.2), rng.uniform(0, 6.3)
        channels.append(127.5 + 127.5 * np.sin(fy * y + fx * x + phase))
    noise = rng.normal(0, 8, (height, width, 3))
    return np.clip(np.stack(channels, -1) + noise, 0, 255).astype(np.uint8)
