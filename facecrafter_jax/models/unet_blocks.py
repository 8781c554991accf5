"""Down / mid / up blocks of the SD1.x UNet (names mirror ``diffusers.models.unets.unet_2d_blocks``).

NHWC tensors; skip connections are concatenated on the channel (last) axis. Every block takes an optional
keyword ``controls`` (FaceCrafter control inputs, see :class:`facecrafter_jax.models.attention.Attention`),
passed to its transformers; blocks without attention accept and ignore it.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from .attention import Transformer2DModel
from .resnet import Downsample2D, ResnetBlock2D, Upsample2D


def _per_layer(value: int | Sequence[int], num_layers: int, name: str) -> tuple[int, ...]:
    if isinstance(value, int):
        return (value,) * num_layers
    value = tuple(value)
    if len(value) != num_layers:
        raise ValueError(f"{name} has {len(value)} entries for {num_layers} layers")
    return value


def _transformer(out_channels: int, heads: int, num_layers: int, *, cross_attention_dim: int, groups: int,
                 use_linear_projection: bool, dropout: float, attention_implementation: str, dtype, rngs):
    if out_channels % heads:
        raise ValueError(f"{out_channels} channels are not divisible by {heads} attention heads")
    return Transformer2DModel(heads, out_channels // heads, out_channels, num_layers=num_layers,
                              cross_attention_dim=cross_attention_dim, norm_num_groups=groups,
                              use_linear_projection=use_linear_projection, dropout=dropout,
                              attention_implementation=attention_implementation, dtype=dtype, rngs=rngs)


class DownBlock2D(nnx.Module):
    """``resnets`` (+ stride-2 ``downsamplers[0]``); returns the output and every intermediate for the skips."""

    has_cross_attention = False

    def __init__(self, in_channels: int, out_channels: int, temb_channels: int, *, num_layers: int = 1,
                 resnet_eps: float = 1e-6, resnet_groups: int = 32, dropout: float = 0.0, add_downsample: bool = True,
                 downsample_padding: int = 1, dtype=jnp.float32, rngs: nnx.Rngs):
        self.resnets = nnx.List([
            ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, temb_channels=temb_channels,
                          groups=resnet_groups, eps=resnet_eps, dropout=dropout, dtype=dtype, rngs=rngs)
            for i in range(num_layers)
        ])
        self.downsamplers = (nnx.List([Downsample2D(out_channels, out_channels, padding=downsample_padding, dtype=dtype, rngs=rngs)])
                             if add_downsample else None)

    def __call__(self, x: jax.Array, temb: jax.Array, context: jax.Array | None = None, *, controls=None):
        states = []
        for resnet in self.resnets:
            x = resnet(x, temb)
            states.append(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
            states.append(x)
        return x, tuple(states)


class CrossAttnDownBlock2D(nnx.Module):
    """``resnets[i]`` followed by ``attentions[i]`` (Transformer2DModel), then an optional downsampler."""

    has_cross_attention = True

    def __init__(self, in_channels: int, out_channels: int, temb_channels: int, *, num_layers: int = 1,
                 transformer_layers_per_block: int | Sequence[int] = 1, resnet_eps: float = 1e-6, resnet_groups: int = 32,
                 num_attention_heads: int = 1, cross_attention_dim: int = 1280, use_linear_projection: bool = False,
                 dropout: float = 0.0, add_downsample: bool = True, downsample_padding: int = 1,
                 attention_implementation: str = "xla", dtype=jnp.float32, rngs: nnx.Rngs):
        tlayers = _per_layer(transformer_layers_per_block, num_layers, "transformer_layers_per_block")
        self.resnets = nnx.List([
            ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, temb_channels=temb_channels,
                          groups=resnet_groups, eps=resnet_eps, dropout=dropout, dtype=dtype, rngs=rngs)
            for i in range(num_layers)
        ])
        self.attentions = nnx.List([
            _transformer(out_channels, num_attention_heads, tlayers[i], cross_attention_dim=cross_attention_dim,
                         groups=resnet_groups, use_linear_projection=use_linear_projection, dropout=dropout,
                         attention_implementation=attention_implementation, dtype=dtype, rngs=rngs)
            for i in range(num_layers)
        ])
        self.downsamplers = (nnx.List([Downsample2D(out_channels, out_channels, padding=downsample_padding, dtype=dtype, rngs=rngs)])
                             if add_downsample else None)

    def __call__(self, x: jax.Array, temb: jax.Array, context: jax.Array, *, controls=None):
        states = []
        for resnet, attn in zip(self.resnets, self.attentions):
            x = attn(resnet(x, temb), context, controls=controls)
            states.append(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
            states.append(x)
        return x, tuple(states)


class UNetMidBlock2DCrossAttn(nnx.Module):
    """``resnets[0]``, then (``attentions[i]``, ``resnets[i + 1]``) pairs."""

    has_cross_attention = True

    def __init__(self, in_channels: int, temb_channels: int, *, num_layers: int = 1,
                 transformer_layers_per_block: int | Sequence[int] = 1, resnet_eps: float = 1e-6, resnet_groups: int = 32,
                 num_attention_heads: int = 1, cross_attention_dim: int = 1280, use_linear_projection: bool = False,
                 dropout: float = 0.0, output_scale_factor: float = 1.0, attention_implementation: str = "xla",
                 dtype=jnp.float32, rngs: nnx.Rngs):
        tlayers = _per_layer(transformer_layers_per_block, num_layers, "transformer_layers_per_block")

        def resnet():
            return ResnetBlock2D(in_channels, in_channels, temb_channels=temb_channels, groups=resnet_groups, eps=resnet_eps,
                                 dropout=dropout, output_scale_factor=output_scale_factor, dtype=dtype, rngs=rngs)

        resnets, attentions = [resnet()], []
        for i in range(num_layers):
            attentions.append(_transformer(in_channels, num_attention_heads, tlayers[i], cross_attention_dim=cross_attention_dim,
                                           groups=resnet_groups, use_linear_projection=use_linear_projection, dropout=dropout,
                                           attention_implementation=attention_implementation, dtype=dtype, rngs=rngs))
            resnets.append(resnet())
        self.attentions = nnx.List(attentions)
        self.resnets = nnx.List(resnets)

    def __call__(self, x: jax.Array, temb: jax.Array, context: jax.Array, *, controls=None) -> jax.Array:
        x = self.resnets[0](x, temb)
        for i, attn in enumerate(self.attentions):
            x = self.resnets[i + 1](attn(x, context, controls=controls), temb)
        return x


def _up_resnets(in_channels, prev_output_channel, out_channels, temb_channels, num_layers, groups, eps, dropout, dtype, rngs):
    resnets = []
    for i in range(num_layers):
        skip = in_channels if i == num_layers - 1 else out_channels
        res_in = prev_output_channel if i == 0 else out_channels
        resnets.append(ResnetBlock2D(res_in + skip, out_channels, temb_channels=temb_channels, groups=groups, eps=eps,
                                     dropout=dropout, dtype=dtype, rngs=rngs))
    return nnx.List(resnets)


class UpBlock2D(nnx.Module):
    """Each resnet takes ``concat(x, skip)`` (skips popped last-first); then an optional 2x upsampler."""

    has_cross_attention = False

    def __init__(self, in_channels: int, prev_output_channel: int, out_channels: int, temb_channels: int, *,
                 num_layers: int = 1, resnet_eps: float = 1e-6, resnet_groups: int = 32, dropout: float = 0.0,
                 add_upsample: bool = True, dtype=jnp.float32, rngs: nnx.Rngs):
        self.resnets = _up_resnets(in_channels, prev_output_channel, out_channels, temb_channels, num_layers,
                                   resnet_groups, resnet_eps, dropout, dtype, rngs)
        self.upsamplers = nnx.List([Upsample2D(out_channels, out_channels, dtype=dtype, rngs=rngs)]) if add_upsample else None

    def __call__(self, x: jax.Array, skips: tuple, temb: jax.Array, context: jax.Array | None = None, *,
                 controls=None) -> jax.Array:
        for resnet, skip in zip(self.resnets, reversed(skips)):
            x = resnet(jnp.concatenate([x, skip], axis=-1), temb)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x)
        return x


class CrossAttnUpBlock2D(nnx.Module):
    """Like :class:`UpBlock2D` with a Transformer2DModel after every resnet."""

    has_cross_attention = True

    def __init__(self, in_channels: int, prev_output_channel: int, out_channels: int, temb_channels: int, *,
                 num_layers: int = 1, transformer_layers_per_block: int | Sequence[int] = 1, resnet_eps: float = 1e-6,
                 resnet_groups: int = 32, num_attention_heads: int = 1, cross_attention_dim: int = 1280,
                 use_linear_projection: bool = False, dropout: float = 0.0, add_upsample: bool = True,
                 attention_implementation: str = "xla", dtype=jnp.float32, rngs: nnx.Rngs):
        tlayers = _per_layer(transformer_layers_per_block, num_layers, "transformer_layers_per_block")
        self.resnets = _up_resnets(in_channels, prev_output_channel, out_channels, temb_channels, num_layers,
                                   resnet_groups, resnet_eps, dropout, dtype, rngs)
        self.attentions = nnx.List([
            _transformer(out_channels, num_attention_heads, tlayers[i], cross_attention_dim=cross_attention_dim,
                         groups=resnet_groups, use_linear_projection=use_linear_projection, dropout=dropout,
                         attention_implementation=attention_implementation, dtype=dtype, rngs=rngs)
            for i in range(num_layers)
        ])
        self.upsamplers = nnx.List([Upsample2D(out_channels, out_channels, dtype=dtype, rngs=rngs)]) if add_upsample else None

    def __call__(self, x: jax.Array, skips: tuple, temb: jax.Array, context: jax.Array, *, controls=None) -> jax.Array:
        for resnet, attn, skip in zip(self.resnets, self.attentions, reversed(skips)):
            x = attn(resnet(jnp.concatenate([x, skip], axis=-1), temb), context, controls=controls)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x)
        return x


DOWN_BLOCKS = {"DownBlock2D": DownBlock2D, "CrossAttnDownBlock2D": CrossAttnDownBlock2D}
UP_BLOCKS = {"UpBlock2D": UpBlock2D, "CrossAttnUpBlock2D": CrossAttnUpBlock2D}
MID_BLOCKS = {"UNetMidBlock2DCrossAttn": UNetMidBlock2DCrossAttn}
