"""Robust image loading: every input either becomes an 8-bit RGB array or a :class:`SkipImage` with a reason.

* EXIF orientation is applied (``ImageOps.exif_transpose``), so coordinates refer to the upright image.
* Modes: grayscale (``L``, ``1``), palette (``P``), ``CMYK``, ``YCbCr``, ``LAB``, ``HSV`` -> RGB; 16-bit
  (``I;16*``) and 32-bit integer (``I``) grayscale are rescaled from their full range to 8 bits
  (``value / 257`` for 16-bit; PIL's own conversion would clip); float (``F``) images are clipped to [0, 1]
  when their values lie there, otherwise to [0, 255]; images with alpha (``RGBA``, ``LA``, ``PA``, palette
  with transparency) are composited onto a white background.
* The whole file is decoded (truncated files are caught here, not later).
* Images whose shorter side is below ``min_side`` (default :data:`MIN_SIDE` = 64 px) are skipped: the face
  detector cannot find a usable face in them and an upsampled crop would carry no detail.

Skip reasons (the ``reason`` of a manifest line): ``empty_file``, ``not_an_image``, ``corrupt_image``,
``too_small``, ``too_large`` (beyond PIL's decompression-bomb limit), ``unreadable`` (I/O error).
"""

from __future__ import annotations

import os
import struct
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

MIN_SIDE = 64
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm", ".pgm", ".pnm")

__all__ = ["SkipImage", "load_image", "MIN_SIDE", "IMAGE_EXTENSIONS"]


class SkipImage(Exception):
    """An input that is not processed; ``reason`` is a short code, ``detail`` a human-readable explanation."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def _to_rgb(img: Image.Image) -> np.ndarray:
    mode = img.mode
    if mode == "RGB":
        return np.asarray(img, dtype=np.uint8)
    if mode.startswith("I;16") or mode == "I":
        a = np.asarray(img).astype(np.float64)
        if mode == "I":  # 32-bit ints: PNG 16-bit grayscale often arrives as "I" with values in 0..65535
            top = 65535.0 if a.max(initial=0) > 255 else 255.0
        else:
            top = 65535.0
        g = np.clip(np.round(a / top * 255.0), 0, 255).astype(np.uint8)
        return np.repeat(g[:, :, None], 3, axis=2)
    if mode == "F":
        a = np.asarray(img, dtype=np.float64)
        a = np.nan_to_num(a)
        if a.min(initial=0) >= 0 and a.max(initial=0) <= 1.0:
            a = a * 255.0
        g = np.clip(np.round(a), 0, 255).astype(np.uint8)
        return np.repeat(g[:, :, None], 3, axis=2)
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in img.info)
    if has_alpha:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(background, rgba).convert("RGB"), dtype=np.uint8)
    return np.asarray(img.convert("RGB"), dtype=np.uint8)


def load_image(path: str | os.PathLike, *, min_side: int = MIN_SIDE) -> np.ndarray:
    """Decode ``path`` to an upright uint8 RGB array [H, W, 3]; raise :class:`SkipImage` when unusable."""
    path = os.fspath(path)
    try:
        size = os.path.getsize(path)
    except OSError as e:
        raise SkipImage("unreadable", str(e)) from None
    if size == 0:
        raise SkipImage("empty_file", "zero-byte file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                img.load()
                img = ImageOps.exif_transpose(img)
                if img.mode == "P" and "transparency" not in img.info:
                    img = img.convert("RGB")
                rgb = _to_rgb(img)
    except UnidentifiedImageError:
        raise SkipImage("not_an_image", "PIL cannot identify the file as an image") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise SkipImage("too_large", str(e)) from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error) as e:
        raise SkipImage("corrupt_image", f"{type(e).__name__}: {e}") from None
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise SkipImage("corrupt_image", f"decoded to an unexpected shape {rgb.shape}")
    h, w = rgb.shape[:2]
    if min(h, w) < min_side:
        raise SkipImage("too_small", f"{w}x{h} px, shorter side below the minimum of {min_side} px")
    return np.ascontiguousarray(rgb)

