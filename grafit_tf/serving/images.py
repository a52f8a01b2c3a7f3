"""Decodes one image file into the model's input, with Pillow and NumPy.

`load(path, spec)` mirrors training's evaluation pipeline (`grafit_tf.data.pipeline`'s
`decode_for_eval` then `eval_image`): decode the first frame (refusing a decompression
bomb before any pixel is decoded; a JPEG at evaluation's DCT scale), apply the EXIF
orientation, convert to the model's channels (dropping alpha as `tf.io.decode_image`
does), resize as evaluation did and round to uint8, the model's dtype.
"""

import dataclasses
import os
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from grafit_tf.serving import resize

DEFAULT_MAX_PIXELS = Image.MAX_IMAGE_PIXELS  # Pillow's own default, ~89 Mpx.
_HIGH_DEPTH = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")  # 16- or 32-bit samples.


class ImageError(Exception):
    """A file that cannot be served; the message is the reason for errors.csv."""


@dataclasses.dataclass(frozen=True)
class Spec:
    """What the model takes (picklable: sent to the decoding workers)."""

    image_shape: tuple  # (H, W, C) with C in (1, 3).
    resize: str = "none"  # Or 'resize_center_crop': the training config's method.
    max_pixels: int = DEFAULT_MAX_PIXELS  # Decompression-bomb limit (width * height).


def load(path, spec):
    """Reads, decodes and preprocesses one image file into `[H, W, C]` uint8 for a `Spec`.

    Raises:
        ImageError: with the reason the file cannot be served.
    """
    pixels = to_channels(decode(path, spec.max_pixels, spec), spec.image_shape[-1])
    resized = resize.to_model_size(pixels, spec.image_shape, spec.resize)
    return np.clip(np.rint(resized, out=resized), 0, 255, out=resized).astype(np.uint8)


def decode(path, max_pixels=DEFAULT_MAX_PIXELS, spec=None):
    """The first frame of an image file as a loaded `PIL.Image.Image`, EXIF orientation applied;
    with a `Spec`, a JPEG at the DCT scale `pipeline.decode_for_eval` decodes it at.

    Raises:
        ImageError: unreadable, empty, not an image, too large, corrupt or truncated.
    """
    # Pillow's own bomb check (at twice its limit) follows: --max_image_pixels can raise it.
    Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        with open(path, "rb") as f:
            if os.fstat(f.fileno()).st_size == 0:
                raise ImageError("empty file (0 bytes)")
            with warnings.catch_warnings():
                # The pixel limit is checked below with the reason spelt out;
                # other Pillow warnings (odd palettes, EXIF) are no errors.
                warnings.simplefilter("ignore")
                try:
                    image = Image.open(f)
                except Image.DecompressionBombError as e:
                    raise ImageError(f"decompression bomb: {_one_line(e)} (see "
                                     "--max_image_pixels)") from None
                width, height = image.size
                if width * height > max_pixels:
                    raise ImageError(
                        f"decompression bomb: {width}x{height} = {width * height} pixels is "
                        f"above the limit of {max_pixels} (--max_image_pixels)")
                if spec is not None:  # JPEG only; stored orientation, as TensorFlow.
                    image.draft(None, resize.eval_size((height, width), spec.image_shape,
                                                       spec.resize)[::-1])
                image.load()
                return ImageOps.exif_transpose(image, in_place=True) or image
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError("not an image (Pillow cannot identify the format)") from None
    except PermissionError:
        raise ImageError("unreadable: permission denied") from None
    except FileNotFoundError:
        raise ImageError("vanished: the file was deleted while serving") from None
    except MemoryError:
        raise ImageError("out of memory while decoding") from None
    except OSError as e:
        if e.filename is not None or isinstance(e, (IsADirectoryError, BlockingIOError)):
            raise ImageError(f"unreadable: {(e.strerror or str(e)).lower()}") from None
        raise ImageError(f"corrupt or truncated image: {_one_line(e)}") from None
    except Exception as e:  # Damaged files raise SyntaxError, ValueError, EOFError...
        raise ImageError(f"corrupt image ({type(e).__name__}: {_one_line(e)})") from None


def to_channels(image, channels):
    """Pixels `[h, w, channels]` uint8 of a loaded image of any mode; channels: 1 or 3."""
    if image.mode in _HIGH_DEPTH:
        samples = np.asarray(image)
        if samples.dtype.kind == "f":  # Taken as 0..1 when at most 1, else as 0..255.
            scale = 255.0 if samples.size and np.nanmax(samples) <= 1.0 else 1.0
            gray = np.clip(np.nan_to_num(samples) * scale, 0, 255).round().astype(np.uint8)
        else:  # The high byte, like libpng's strip_16 in `tf.io.decode_png` to uint8.
            gray = (np.clip(samples.astype(np.int64), 0, 65535) >> 8).astype(np.uint8)
        array = gray if channels == 1 else np.repeat(gray[..., None], 3, axis=-1)
    else:
        if image.mode not in ("L", "RGB", "1", "LA", "RGBA", "RGBX"):
            # CMYK, palette (P, PA), YCbCr...: through RGB, which Pillow always
            # knows; the direct 'P' -> 'L' path ignores some transparency setups.
            image = image.convert("RGBA" if "A" in image.mode else "RGB")
        try:
            array = np.asarray(image.convert("L" if channels == 1 else "RGB"), np.uint8)
        except (ValueError, OSError) as e:
            raise ImageError(f"unsupported image mode {image.mode}: {_one_line(e)}") from None
    return array.reshape(array.shape[0], array.shape[1], channels)


def _one_line(error):
    text = " ".join(str(error).split())
    return text or type(error).__name__
