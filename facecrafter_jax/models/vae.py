"""The Stable Diffusion VAE (diffusers ``AutoencoderKL``) in Flax NNX.

Tensors are NHWC. Attribute names mirror ``diffusers.AutoencoderKL`` exactly
(``encoder.down_blocks[0].resnets[1].conv1``, ``decoder.mid_block.attentions[0].to_out[0]`` ...), so
the PyTorch key map in :mod:`facecrafter_jax.convert.vae` is mechanical.

Parameters are always float32; ``dtype`` is the compute dtype (``jnp.bfloat16`` on accelerators).
Group-norm statistics and the attention softmax are computed in float32 whatever the compute dtype,
and the public methods return float32 arrays.

Latent conventions (same as diffusers pipelines and training scripts)::

    moments = vae.encode_moments(images)        # [B, h, w, 2*latent_channels]: mean ++ logvar (raw quant_conv output)
    latents = vae.encode(images)                # (mean - shift_factor) * scaling_factor   (what the UNet sees)
    latents = vae.sample_latents(moments, key)  # (mean + std * eps - shift_factor) * scaling_factor
    images  = vae.decode(latents)               # decoder(latents / scaling_factor + shift_factor), about [-1, 1]

``shift_factor`` is ``None`` (i.e. 0) for SD1.x / SD2.x / SDXL VAEs.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from facecrafter_jax.models.ops import linear
from facecrafter_jax.models.resnet import Downsample2D, ResnetBlock2D, Upsample2D, conv2d, group_norm

__all__ = [
    "AutoencoderKLConfig",
    "AutoencoderKL",
    "VAEAttentionBlock",
    "DownEncoderBlock2D",
    "UpDecoderBlock2D",
    "UNetMidBlock2D",
    "Encoder",
    "Decoder",
    "sample_latents_from_moments",
]

_EPS = 1e-6  # diffusers hard-codes resnet/attention/out-norm eps = 1e-6 in the VAE


# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------

# Keys of a diffusers config.json that carry no architecture information.
_BOOKKEEPING_KEYS = {"_class_name", "_diffusers_version", "_name_or_path", "_use_default_values", "_commit_hash"}


@dataclass(frozen=True)
class AutoencoderKLConfig:
    """Architecture of a diffusers ``AutoencoderKL`` (defaults are diffusers' own class defaults).

    Build it from a diffusers ``config.json`` with :meth:`from_dict` / :meth:`from_json_file`;
    :meth:`to_dict` writes a dict diffusers can read back. Unknown keys, unsupported block types,
    activations and per-channel latent statistics raise ``ValueError`` naming the key.
    ``force_upcast`` is kept for round trips only (diffusers runs such VAEs in fp32 under fp16
    pipelines; here parameters are always fp32 and the caller picks the compute ``dtype``).
    """

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",)
    up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",)
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 1
    act_fn: str = "silu"
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int | tuple[int, ...] = 32
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    latents_mean: tuple[float, ...] | None = None
    latents_std: tuple[float, ...] | None = None
    force_upcast: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    def __post_init__(self):
        # Normalise JSON lists to tuples so the config is hashable (it is static module metadata).
        for name in ("down_block_types", "up_block_types", "block_out_channels", "latents_mean", "latents_std"):
            v = getattr(self, name)
            if isinstance(v, list):
                object.__setattr__(self, name, tuple(v))
        if isinstance(self.sample_size, list):
            object.__setattr__(self, "sample_size", tuple(self.sample_size))
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the key for anything this implementation does not support."""
        n = len(self.block_out_channels)
        if n == 0:
            raise ValueError("block_out_channels must not be empty")
        if len(self.down_block_types) != n:
            raise ValueError(f"down_block_types has {len(self.down_block_types)} entries but block_out_channels has {n}")
        if len(self.up_block_types) != n:
            raise ValueError(f"up_block_types has {len(self.up_block_types)} entries but block_out_channels has {n}")
        for i, t in enumerate(self.down_block_types):
            if t != "DownEncoderBlock2D":
                raise ValueError(f"down_block_types[{i}]={t!r} is not supported (only 'DownEncoderBlock2D')")
        for i, t in enumerate(self.up_block_types):
            if t != "UpDecoderBlock2D":
                raise ValueError(f"up_block_types[{i}]={t!r} is not supported (only 'UpDecoderBlock2D')")
        if self.act_fn not in ("silu", "swish"):
            raise ValueError(f"act_fn={self.act_fn!r} is not supported (only 'silu')")
        for c in self.block_out_channels:
            if c % self.norm_num_groups:
                raise ValueError(f"norm_num_groups={self.norm_num_groups} does not divide block_out_channels entry {c}")
        if self.layers_per_block < 1:
            raise ValueError(f"layers_per_block must be >= 1, got {self.layers_per_block}")
        if self.latents_mean is not None:
            raise ValueError("latents_mean is not supported (per-channel latent statistics); expected null")
        if self.latents_std is not None:
            raise ValueError("latents_std is not supported (per-channel latent statistics); expected null")
        if not self.scaling_factor > 0:
            raise ValueError(f"scaling_factor must be > 0, got {self.scaling_factor}")

    @property
    def downsample_factor(self) -> int:
        """Pixels per latent along each spatial axis (8 for the SD VAE)."""
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "AutoencoderKLConfig":
        """From a diffusers ``config.json`` dict. Keys starting with ``_`` are bookkeeping and ignored
        (``_class_name``, if present, must be ``AutoencoderKL``); any other unknown key raises."""
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {}
        for k, v in d.items():
            if k == "_class_name" and v != "AutoencoderKL":
                raise ValueError(f"_class_name={v!r}: this config is not a diffusers AutoencoderKL")
            if k in _BOOKKEEPING_KEYS or k.startswith("_"):
                continue
            if k not in known:
                raise ValueError(f"unknown AutoencoderKL config key {k!r}")
            kwargs[k] = v
        return cls(**kwargs)

    @classmethod
    def from_json_file(cls, path: str) -> "AutoencoderKLConfig":
        with open(path) as f:
            return cls.from_dict(json.load(f))

    def to_dict(self) -> dict:
        """A JSON-serialisable diffusers-style config dict (``_class_name`` included)."""
        out: dict[str, Any] = {"_class_name": "AutoencoderKL"}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            out[f.name] = list(v) if isinstance(v, tuple) else v
        return out

    @classmethod
    def sd15(cls) -> "AutoencoderKLConfig":
        """The Stable Diffusion 1.5 VAE (``runwayml/stable-diffusion-v1-5/vae/config.json``)."""
        return cls(
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(128, 256, 512, 512),
            layers_per_block=2,
            sample_size=512,
        )


# --------------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------------


def _linear(i: int, o: int, dtype, rngs: nnx.Rngs) -> nnx.Linear:
    return linear(i, o, dtype, rngs)


class VAEAttentionBlock(nnx.Module):
    """diffusers ``Attention`` as used in the VAE mid block: GroupNorm, single-head self-attention over
    all H*W positions (head dim = channels), output projection, residual connection.

    Keys: ``group_norm``, ``to_q``, ``to_k``, ``to_v``, ``to_out.0`` (``to_out[1]`` is a Dropout, as in diffusers).
    """

    def __init__(self, channels: int, *, groups: int, eps: float = _EPS, dtype=jnp.float32, rngs: nnx.Rngs):
        self.channels = channels
        self.dtype = dtype
        self.group_norm = group_norm(channels, groups, eps, dtype, rngs)
        self.to_q = _linear(channels, channels, dtype, rngs)
        self.to_k = _linear(channels, channels, dtype, rngs)
        self.to_v = _linear(channels, channels, dtype, rngs)
        self.to_out = nnx.List([_linear(channels, channels, dtype, rngs), nnx.Dropout(0.0, deterministic=True)])

    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        residual = x
        hs = self.group_norm(x).reshape(b, h * w, c)
        q, k, v = self.to_q(hs), self.to_k(hs), self.to_v(hs)
        # Scores and softmax in float32 (diffusers upcasts the VAE attention softmax too).
        scores = jnp.einsum("bqc,bkc->bqk", q, k, preferred_element_type=jnp.float32) * (c ** -0.5)
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        out = jnp.einsum("bqk,bkc->bqc", probs, v)
        out = self.to_out[1](self.to_out[0](out))
        return out.reshape(b, h, w, c) + residual


class DownEncoderBlock2D(nnx.Module):
    """``layers_per_block`` ResNet blocks, then (except for the last block) a stride-2 conv with
    diffusers' VAE padding (right/bottom by one)."""

    def __init__(self, in_channels: int, out_channels: int, *, num_layers: int, groups: int, add_downsample: bool,
                 dtype=jnp.float32, rngs: nnx.Rngs):
        self.resnets = nnx.List([
            ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, temb_channels=None, groups=groups,
                          eps=_EPS, dtype=dtype, rngs=rngs)
            for i in range(num_layers)
        ])
        self.downsamplers = (nnx.List([Downsample2D(out_channels, out_channels, padding=0, dtype=dtype, rngs=rngs)])
                             if add_downsample else None)

    def __call__(self, x: jax.Array) -> jax.Array:
        for r in self.resnets:
            x = r(x)
        if self.downsamplers is not None:
            for d in self.downsamplers:
                x = d(x)
        return x


class UpDecoderBlock2D(nnx.Module):
    """``layers_per_block + 1`` ResNet blocks, then (except for the last block) nearest 2x upsampling + conv."""

    def __init__(self, in_channels: int, out_channels: int, *, num_layers: int, groups: int, add_upsample: bool,
                 dtype=jnp.float32, rngs: nnx.Rngs):
        self.resnets = nnx.List([
            ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, temb_channels=None, groups=groups,
                          eps=_EPS, dtype=dtype, rngs=rngs)
            for i in range(num_layers)
        ])
        self.upsamplers = (nnx.List([Upsample2D(out_channels, out_channels, dtype=dtype, rngs=rngs)])
                           if add_upsample else None)

    def __call__(self, x: jax.Array) -> jax.Array:
        for r in self.resnets:
            x = r(x)
        if self.upsamplers is not None:
            for u in self.upsamplers:
                x = u(x)
        return x


class UNetMidBlock2D(nnx.Module):
    """ResNet -> (attention) -> ResNet at the lowest resolution (``resnets[0]``, ``attentions[0]``, ``resnets[1]``)."""

    def __init__(self, channels: int, *, groups: int, add_attention: bool, dtype=jnp.float32, rngs: nnx.Rngs):
        self.resnets = nnx.List([
            ResnetBlock2D(channels, channels, temb_channels=None, groups=groups, eps=_EPS, dtype=dtype, rngs=rngs)
            for _ in range(2)
        ])
        # diffusers keeps a ``None`` entry when attention is disabled; so do we (no parameters either way).
        self.attentions = nnx.List([
            VAEAttentionBlock(channels, groups=groups, dtype=dtype, rngs=rngs) if add_attention else None
        ])

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.resnets[0](x)
        for attn, resnet in zip(self.attentions, list(self.resnets)[1:]):
            if attn is not None:
                x = attn(x)
            x = resnet(x)
        return x


class Encoder(nnx.Module):
    """Images [B, H, W, in_channels] -> [B, H/f, W/f, 2*latent_channels] (before ``quant_conv``)."""

    def __init__(self, cfg: AutoencoderKLConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        boc, g = cfg.block_out_channels, cfg.norm_num_groups
        self.conv_in = conv2d(cfg.in_channels, boc[0], 3, dtype, rngs)
        blocks = []
        out_ch = boc[0]
        for i in range(len(boc)):
            in_ch, out_ch = out_ch, boc[i]
            blocks.append(DownEncoderBlock2D(in_ch, out_ch, num_layers=cfg.layers_per_block, groups=g,
                                             add_downsample=i < len(boc) - 1, dtype=dtype, rngs=rngs))
        self.down_blocks = nnx.List(blocks)
        self.mid_block = UNetMidBlock2D(boc[-1], groups=g, add_attention=cfg.mid_block_add_attention, dtype=dtype, rngs=rngs)
        self.conv_norm_out = group_norm(boc[-1], g, _EPS, dtype, rngs)
        self.conv_out = conv2d(boc[-1], 2 * cfg.latent_channels, 3, dtype, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.conv_in(x)
        for blk in self.down_blocks:
            x = blk(x)
        x = self.mid_block(x)
        return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


class Decoder(nnx.Module):
    """Latents [B, h, w, latent_channels] (after ``post_quant_conv``) -> images [B, h*f, w*f, out_channels]."""

    def __init__(self, cfg: AutoencoderKLConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        boc, g = cfg.block_out_channels, cfg.norm_num_groups
        rev = list(reversed(boc))
        self.conv_in = conv2d(cfg.latent_channels, rev[0], 3, dtype, rngs)
        self.mid_block = UNetMidBlock2D(rev[0], groups=g, add_attention=cfg.mid_block_add_attention, dtype=dtype, rngs=rngs)
        blocks = []
        out_ch = rev[0]
        for i in range(len(rev)):
            prev, out_ch = out_ch, rev[i]
            blocks.append(UpDecoderBlock2D(prev, out_ch, num_layers=cfg.layers_per_block + 1, groups=g,
                                           add_upsample=i < len(rev) - 1, dtype=dtype, rngs=rngs))
        self.up_blocks = nnx.List(blocks)
        self.conv_norm_out = group_norm(boc[0], g, _EPS, dtype, rngs)
        self.conv_out = conv2d(boc[0], cfg.out_channels, 3, dtype, rngs)

    def __call__(self, z: jax.Array) -> jax.Array:
        x = self.conv_in(z)
        x = self.mid_block(x)
        for blk in self.up_blocks:
            x = blk(x)
        return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


def sample_latents_from_moments(moments: jax.Array, key: jax.Array, *, scaling_factor: float,
                                shift_factor: float | None = None) -> jax.Array:
    """Draw scaled latents from the diagonal Gaussian posterior given by ``moments`` (mean ++ logvar on
    the last axis): ``(mean + exp(0.5 * clip(logvar, -30, 20)) * eps - shift) * scaling_factor``,
    ``eps ~ N(0, 1)`` from ``key``. Pure and jit-friendly (the training step calls this on cached moments).
    """
    moments = jnp.asarray(moments, jnp.float32)
    if moments.shape[-1] % 2:
        raise ValueError(f"moments must have an even number of channels (mean ++ logvar) on the last axis, got shape {moments.shape}")
    mean, logvar = jnp.split(moments, 2, axis=-1)
    std = jnp.exp(0.5 * jnp.clip(logvar, -30.0, 20.0))
    z = mean + std * jax.random.normal(key, mean.shape, jnp.float32)
    if shift_factor is not None:
        z = z - shift_factor
    return z * scaling_factor


class AutoencoderKL(nnx.Module):
    """diffusers ``AutoencoderKL`` in Flax NNX (NHWC). See the module docstring for the latent conventions.

    Args:
      config: the architecture (:class:`AutoencoderKLConfig`).
      dtype: compute dtype (parameters stay float32).
      rngs: parameter initialisation (weights are usually loaded with :func:`facecrafter_jax.convert.load_vae`).
    """

    def __init__(self, config: AutoencoderKLConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.config = config
        self.dtype = dtype
        self.encoder = Encoder(config, dtype=dtype, rngs=rngs)
        self.decoder = Decoder(config, dtype=dtype, rngs=rngs)
        lc = config.latent_channels
        self.quant_conv = conv2d(2 * lc, 2 * lc, 1, dtype, rngs) if config.use_quant_conv else None
        self.post_quant_conv = conv2d(lc, lc, 1, dtype, rngs) if config.use_post_quant_conv else None

    def _check(self, x: jax.Array, channels: int, what: str) -> None:
        if x.ndim != 4 or x.shape[-1] != channels:
            raise ValueError(f"{what} must be NHWC [B, H, W, {channels}], got shape {tuple(x.shape)}")

    def encode_moments(self, images: jax.Array) -> jax.Array:
        """Images [B, H, W, in_channels] in [-1, 1] -> posterior moments [B, H/f, W/f, 2*latent_channels]
        (mean ++ logvar on the last axis, unscaled and unclipped: the ``quant_conv`` output), float32."""
        images = jnp.asarray(images)
        self._check(images, self.config.in_channels, "images")
        h = self.encoder(images.astype(self.dtype))
        if self.quant_conv is not None:
            h = self.quant_conv(h)
        return h.astype(jnp.float32)

    def sample_latents(self, moments: jax.Array, key: jax.Array) -> jax.Array:
        """Scaled posterior sample from ``moments`` (see :func:`sample_latents_from_moments`)."""
        return sample_latents_from_moments(moments, key, scaling_factor=self.config.scaling_factor,
                                           shift_factor=self.config.shift_factor)

    def encode(self, images: jax.Array, *, key: jax.Array | None = None) -> jax.Array:
        """Images -> the latents the UNet sees: ``(mean - shift) * scaling_factor`` when ``key`` is None
        (deterministic), else a posterior sample drawn with ``key``. Float32."""
        moments = self.encode_moments(images)
        if key is not None:
            return self.sample_latents(moments, key)
        mean = moments[..., : self.config.latent_channels]
        if self.config.shift_factor is not None:
            mean = mean - self.config.shift_factor
        return mean * self.config.scaling_factor

    def decode(self, latents: jax.Array) -> jax.Array:
        """Scaled latents [B, h, w, latent_channels] -> images [B, h*f, w*f, out_channels], about [-1, 1]
        (not clipped), float32. Divides by ``scaling_factor`` (and adds ``shift_factor``) first."""
        latents = jnp.asarray(latents)
        self._check(latents, self.config.latent_channels, "latents")
        z = latents.astype(jnp.float32) / self.config.scaling_factor
        if self.config.shift_factor is not None:
            z = z + self.config.shift_factor
        z = z.astype(self.dtype)
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z).astype(jnp.float32)

    def __call__(self, images: jax.Array, *, key: jax.Array | None = None) -> jax.Array:
        """Reconstruction: ``decode(encode(images, key=key))``."""
        return self.decode(self.encode(images, key=key))
