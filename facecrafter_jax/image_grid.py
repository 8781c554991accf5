"""Image grids (contact sheets) and PNG writing: the one helper every sample grid of the project uses."""

from __future__ import annotations

import math
import os

import numpy as np

__all__ = ["image_grid", "save_png"]


def image_grid(images, cols: int | None = None, *, pad: int = 2, fill: int = 255) -> np.ndarray:
    """Tile images into one uint8 RGB grid with ``pad`` px gaps (and borders) of colour ``fill``.

    ``images``: ``[N, H, W, 3]`` (row-major, ``cols`` per row, default ``ceil(sqrt(N))``) or
    ``[rows, cols, H, W, 3]`` (that layout; ``cols`` must then be None). uint8, or float in [0, 1]
    (clipped, ``round(x * 255)``).
    """
    x = np.asarray(images)
    if x.ndim == 5:
        if cols is not None:
            raise ValueError("image_grid: cols is given by a [rows, cols, H, W, 3] input")
        cols = x.shape[1]
        x = x.reshape((-1,) + x.shape[2:])
    if x.ndim != 4 or x.shape[-1] != 3 or len(x) == 0:
        raise ValueError(f"image_grid: images must be [N, H, W, 3] or [rows, cols, H, W, 3], got shape {np.shape(images)}")
    if x.dtype != np.uint8:
        x = (np.clip(x.astype(np.float32), 0.0, 1.0) * 255.0).round().astype(np.uint8)
    n, h, w, _ = x.shape
    cols = max(1, min(int(cols if cols is not None else math.ceil(math.sqrt(n))), n))
    rows = -(-n // cols)
    sheet = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, 3), fill, np.uint8)
    for k in range(n):
        r, c = divmod(k, cols)
        y, xx = pad + r * (h + pad), pad + c * (w + pad)
        sheet[y:y + h, xx:xx + w] = x[k]
    return sheet


def save_png(image: np.ndarray, path: str | os.PathLike, palette: bool = False) -> None:
    """Write a uint8 RGB image [H, W, 3] as PNG; ``palette`` stores 256 adaptive colours (smaller files for
    documentation, lossy)."""
    from PIL import Image

    im = Image.fromarray(np.asarray(image, np.uint8), "RGB")
    if palette:
        im = im.quantize(256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    im.save(path, optimize=True)
