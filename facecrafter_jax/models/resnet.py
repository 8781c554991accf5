"""ResNet blocks and resamplers shared by the UNet and the VAE (names mirror ``diffusers.models.resnet``).

All tensors are NHWC. Parameters are float32; ``dtype`` is the compute dtype (bf16 on accelerators).
Group norms compute their statistics in float32 whatever the compute dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from .ops import conv2d, linear, upsample_nearest_2x

__all__ = ["group_norm", "conv2d", "linear", "ResnetBlock2D", "Downsample2D", "Upsample2D"]


def group_norm(num_channels: int, num_groups: int, eps: float, dtype, rngs: nnx.Rngs) -> nnx.GroupNorm:
    return nnx.GroupNorm(num_channels, num_groups=num_groups, epsilon=eps, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)




class ResnetBlock2D(nnx.Module):
    """GroupNorm -> SiLU -> conv3x3 (+ time embedding) -> GroupNorm -> SiLU -> dropout -> conv3x3, plus shortcut.

    The sum is divided by ``output_scale_factor`` (diffusers' ``mid_block_scale_factor``; 1.0 almost always).
    """

    def __init__(self, in_channels: int, out_channels: int | None = None, *, temb_channels: int | None = 512,
                 groups: int = 32, eps: float = 1e-6, dropout: float = 0.0, output_scale_factor: float = 1.0,
                 dtype=jnp.float32, rngs: nnx.Rngs):
        out_channels = out_channels or in_channels
        self.in_channels, self.out_channels = in_channels, out_channels
        self.output_scale_factor = output_scale_factor
        self.norm1 = group_norm(in_channels, groups, eps, dtype, rngs)
        self.conv1 = conv2d(in_channels, out_channels, 3, dtype, rngs)
        self.time_emb_proj = (linear(temb_channels, out_channels, dtype, rngs)
                              if temb_channels is not None else None)
        self.norm2 = group_norm(out_channels, groups, eps, dtype, rngs)
        # Dropout between norm2/SiLU and conv2 (diffusers' order); rate 0 is a no-op and needs no rng.
        self.dropout = nnx.Dropout(dropout, rngs=rngs if dropout > 0 else None)
        self.conv2 = conv2d(out_channels, out_channels, 3, dtype, rngs)
        self.conv_shortcut = conv2d(in_channels, out_channels, 1, dtype, rngs) if in_channels != out_channels else None

    def __call__(self, x: jax.Array, temb: jax.Array | None = None) -> jax.Array:
        h = self.conv1(jax.nn.silu(self.norm1(x)))
        if temb is not None and self.time_emb_proj is not None:
            h = h + self.time_emb_proj(jax.nn.silu(temb))[:, None, None, :]
        h = self.conv2(self.dropout(jax.nn.silu(self.norm2(h))))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        out = x + h
        if self.output_scale_factor != 1.0:
            out = out / self.output_scale_factor
        return out


class Downsample2D(nnx.Module):
    """Stride-2 3x3 conv. ``padding=1`` (UNet) pads symmetrically; ``padding=0`` (VAE) pads right/bottom by one."""

    def __init__(self, channels: int, out_channels: int | None = None, *, padding: int = 1, dtype=jnp.float32, rngs: nnx.Rngs):
        self.padding = padding
        self.conv = conv2d(channels, out_channels or channels, 3, dtype, rngs, stride=2, padding=padding)

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.padding == 0:
            x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
        return self.conv(x)


class Upsample2D(nnx.Module):
    """Nearest-neighbour 2x upsampling followed by a 3x3 conv."""

    def __init__(self, channels: int, out_channels: int | None = None, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.conv = conv2d(channels, out_channels or channels, 3, dtype, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.conv(upsample_nearest_2x(x))
