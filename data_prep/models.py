"""Batched JAX stage of data preparation: VAE latent moments (EmoNet: :mod:`facecrafter_jax.face.emotion`).

Batches are padded to a fixed ``batch_size`` so that each model is compiled once per run.
"""

from __future__ import annotations

import numpy as np

__all__ = ["LatentModel"]


_JITTED: dict = {}


def _jitted(name: str):
    """Module-level jitted functions: one compilation per process and shape, shared by successive runs."""
    if name not in _JITTED:
        from flax import nnx

        if name == "moments":
            _JITTED[name] = nnx.jit(lambda m, x: m.encode_moments(x))
    return _JITTED[name]


def _pad(x: np.ndarray, n: int) -> np.ndarray:
    if len(x) == n:
        return x
    pad = np.zeros((n - len(x),) + x.shape[1:], x.dtype)
    return np.concatenate([x, pad])


class LatentModel:
    """Our Flax ``AutoencoderKL`` from a diffusers folder; ``__call__`` maps uint8 RGB images [N, R, R, 3]
    to posterior moments [N, R/8, R/8, 8] (pixels mapped to [-1, 1] as ``x / 127.5 - 1``)."""

    def __init__(self, folder: str, resolution: int, batch_size: int):
        from facecrafter_jax.convert.vae import load_vae

        self.model = load_vae(folder)
        cfg = self.model.config
        factor = 2 ** (len(cfg.block_out_channels) - 1)
        if factor != 8:
            raise ValueError(f"{folder}: the VAE downsamples by {factor} (block_out_channels={list(cfg.block_out_channels)}); "
                             "the records need a factor of 8")
        if 2 * cfg.latent_channels != 8:
            raise ValueError(f"{folder}: the VAE has latent_channels={cfg.latent_channels}; the records need 4")
        self.resolution = resolution
        self.batch_size = batch_size
        self._fn = _jitted("moments")

    def __call__(self, images: np.ndarray) -> np.ndarray:
        n = len(images)
        x = _pad(np.asarray(images, np.float32) / 127.5 - 1.0, max(self.batch_size, n))
        out = np.asarray(self._fn(self.model, x))[:n]
        side = self.resolution // 8
        if out.shape[1:] != (side, side, 8):
            raise ValueError(f"VAE moments have shape {out.shape[1:]}, expected {(side, side, 8)}")
        return out
