"""Timestep embeddings of the UNet (names mirror ``diffusers.models.embeddings``).

The sinusoidal projection is always computed in float32 (timesteps up to 1000 need the precision);
the MLP that follows runs in the compute ``dtype``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from .ops import linear


def get_timestep_embedding(timesteps: jax.Array, embedding_dim: int, *, flip_sin_to_cos: bool = False,
                           downscale_freq_shift: float = 1.0, scale: float = 1.0, max_period: int = 10000) -> jax.Array:
    """Sinusoidal embedding of 1-D ``timesteps`` -> ``[N, embedding_dim]`` float32 (DDPM / diffusers convention).

    Frequencies are ``exp(-log(max_period) * i / (half - downscale_freq_shift))`` for ``i < half``; the
    output is ``[sin, cos]`` (or ``[cos, sin]`` with ``flip_sin_to_cos``), zero-padded when the dimension is odd.
    """
    timesteps = jnp.asarray(timesteps)
    if timesteps.ndim != 1:
        raise ValueError(f"timesteps must be 1-D, got shape {timesteps.shape}")
    half = embedding_dim // 2
    exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - downscale_freq_shift)
    emb = timesteps.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
    emb = scale * emb
    sin, cos = jnp.sin(emb), jnp.cos(emb)
    emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
    if embedding_dim % 2 == 1:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class Timesteps(nnx.Module):
    """Parameter-free sinusoidal projection of timesteps (float32 output)."""

    def __init__(self, num_channels: int, flip_sin_to_cos: bool, downscale_freq_shift: float, scale: float = 1.0):
        self.num_channels = num_channels
        self.flip_sin_to_cos = flip_sin_to_cos
        self.downscale_freq_shift = downscale_freq_shift
        self.scale = scale

    def __call__(self, timesteps: jax.Array) -> jax.Array:
        return get_timestep_embedding(timesteps, self.num_channels, flip_sin_to_cos=self.flip_sin_to_cos,
                                      downscale_freq_shift=self.downscale_freq_shift, scale=self.scale)


class TimestepEmbedding(nnx.Module):
    """``linear_1 -> SiLU -> linear_2`` applied to the sinusoidal projection."""

    def __init__(self, in_channels: int, time_embed_dim: int, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.linear_1 = linear(in_channels, time_embed_dim, dtype, rngs)
        self.linear_2 = linear(time_embed_dim, time_embed_dim, dtype, rngs)

    def __call__(self, sample: jax.Array) -> jax.Array:
        return self.linear_2(jax.nn.silu(self.linear_1(sample)))
