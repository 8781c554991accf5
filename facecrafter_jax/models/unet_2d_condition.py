"""The Stable Diffusion 1.x ``UNet2DConditionModel`` in Flax NNX (NHWC; names mirror diffusers).

Usage::

    cfg = UNet2DConditionConfig.from_diffusers_config(json.load(open("unet/config.json")))
    unet = UNet2DConditionModel(cfg, dtype=jnp.bfloat16, explicit_cross_attention=[3, 12], rngs=nnx.Rngs(0))
    eps = unet(latents_nhwc, timesteps, context)                  # [B, H, W, 4] float32
    eps, maps = unet.forward_with_attention_probs(latents_nhwc, timesteps, context)  # maps: {3: [B, h, HW, S], 12: ...}

Cross-attention layers (``attn2`` of every BasicTransformerBlock) carry a stable ``layer_index``
0..N-1 in down -> mid -> up order (N = 16 for SD1.5) and a ``layer_name`` (their dotted path).

FaceCrafter control adapters (:func:`facecrafter_jax.models.control.add_control_adapters`) add
decoupled key/value projections to every ``attn2``; their inputs go through the keyword argument
``controls`` of :meth:`UNet2DConditionModel.__call__` (absent or None: the plain UNet, no extra work).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from .attention import ATTENTION_IMPLEMENTATIONS, Attention, AttentionProbs
from .embeddings import TimestepEmbedding, Timesteps
from .resnet import conv2d, group_norm
from .unet_blocks import DOWN_BLOCKS, MID_BLOCKS, UP_BLOCKS

__all__ = ["UNet2DConditionConfig", "UNet2DConditionModel"]

# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------

# Written by diffusers' ConfigMixin; carry no model information.
_BOOKKEEPING_KEYS = {"_class_name", "_diffusers_version", "_name_or_path", "_use_default_values"}


def _all_false(v) -> bool:
    return v is False or (isinstance(v, (list, tuple)) and all(x is False for x in v))


# Keys of diffusers' UNet2DConditionModel that select features we do not implement: accepted only at
# their neutral value (the value that turns the feature off).
_NEUTRAL: dict[str, Any] = {
    "only_cross_attention": _all_false,
    "mid_block_only_cross_attention": lambda v: v is None or v is False,
    "dual_cross_attention": False,
    "class_embed_type": None,
    "num_class_embeds": None,
    "class_embeddings_concat": False,
    "projection_class_embeddings_input_dim": None,
    "addition_embed_type": None,
    "addition_time_embed_dim": None,
    "addition_embed_type_num_heads": lambda v: True,  # only read when addition_embed_type is set
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "resnet_time_scale_shift": "default",
    "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1.0,
    "time_embedding_type": "positional",
    "time_embedding_act_fn": None,
    "timestep_post_act": None,
    "time_cond_proj_dim": None,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "attention_type": "default",
    "cross_attention_norm": None,
    "reverse_transformer_layers_per_block": None,
}
# Value written by to_dict() for each neutral key (diffusers' defaults).
_NEUTRAL_VALUES = {
    "only_cross_attention": False, "mid_block_only_cross_attention": None, "dual_cross_attention": False,
    "class_embed_type": None, "num_class_embeds": None, "class_embeddings_concat": False,
    "projection_class_embeddings_input_dim": None, "addition_embed_type": None, "addition_time_embed_dim": None,
    "addition_embed_type_num_heads": 64, "encoder_hid_dim": None, "encoder_hid_dim_type": None,
    "resnet_time_scale_shift": "default", "resnet_skip_time_act": False, "resnet_out_scale_factor": 1.0,
    "time_embedding_type": "positional", "time_embedding_act_fn": None, "timestep_post_act": None,
    "time_cond_proj_dim": None, "conv_in_kernel": 3, "conv_out_kernel": 3, "attention_type": "default",
    "cross_attention_norm": None, "reverse_transformer_layers_per_block": None,
}


def _is_neutral(key: str, value) -> bool:
    rule = _NEUTRAL[key]
    if callable(rule):
        return bool(rule(value))
    if isinstance(rule, float):
        return isinstance(value, (int, float)) and not isinstance(value, bool) and float(value) == rule
    return value == rule and type(value) is type(rule)


def _tuplify(v):
    return tuple(_tuplify(x) for x in v) if isinstance(v, (list, tuple)) else v


def _listify(v):
    return [_listify(x) for x in v] if isinstance(v, tuple) else v


@dataclass(frozen=True)
class UNet2DConditionConfig:
    """Architecture of an SD1.x-family UNet; field names and meanings are those of diffusers' ``config.json``.

    Per-block fields (``layers_per_block``, ``cross_attention_dim``, ``transformer_layers_per_block``,
    ``attention_head_dim``, ``num_attention_heads``) take an int or one value per down block.
    diffusers quirk kept: when ``num_attention_heads`` is None, ``attention_head_dim`` is the number of
    heads (8 for SD1.5, so heads have ``channels // 8`` dims); see :meth:`heads`.
    """

    sample_size: int | tuple[int, int] | None = None
    in_channels: int = 4
    out_channels: int = 4
    center_input_sample: bool = False
    flip_sin_to_cos: bool = True
    freq_shift: float = 0
    down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
    mid_block_type: str | None = "UNetMidBlock2DCrossAttn"
    up_block_types: tuple[str, ...] = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int | tuple[int, ...] = 2
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    dropout: float = 0.0
    act_fn: str = "silu"
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    cross_attention_dim: int | tuple[int, ...] = 1280
    transformer_layers_per_block: int | tuple[int, ...] = 1
    attention_head_dim: int | tuple[int, ...] = 8
    num_attention_heads: int | tuple[int, ...] | None = None
    use_linear_projection: bool = False
    upcast_attention: bool = False
    time_embedding_dim: int | None = None

    # -- construction / serialisation --------------------------------------------------------------
    @classmethod
    def from_diffusers_config(cls, d: Mapping[str, Any]) -> "UNet2DConditionConfig":
        """Build from a diffusers UNet ``config.json`` dict.

        Bookkeeping keys (``_class_name``, ``_diffusers_version``, ``_name_or_path``) are ignored; keys of
        features we do not implement are accepted only at their neutral value; anything else unknown or
        unsupported raises ``ValueError`` naming the key.
        """
        if not isinstance(d, Mapping):
            raise ValueError(f"UNet config must be a mapping, got {type(d).__name__}")
        name = d.get("_class_name")
        if name is not None and name != "UNet2DConditionModel":
            raise ValueError(f"config key '_class_name' is {name!r}; expected 'UNet2DConditionModel'")
        fields = {f.name for f in dataclasses.fields(cls)}
        kwargs = {}
        for key, value in d.items():
            if key in _BOOKKEEPING_KEYS:
                continue
            if key in fields:
                kwargs[key] = _tuplify(value)
            elif key in _NEUTRAL:
                if not _is_neutral(key, value):
                    raise ValueError(f"unsupported UNet config: key {key!r} = {value!r} is not implemented "
                                     f"(only {_NEUTRAL_VALUES[key]!r} is supported)")
            else:
                raise ValueError(f"unknown UNet config key {key!r}")
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        """diffusers-style ``config.json`` dict (JSON-serialisable); ``from_diffusers_config`` inverts it."""
        out: dict[str, Any] = {"_class_name": "UNet2DConditionModel"}
        for f in dataclasses.fields(self):
            out[f.name] = _listify(getattr(self, f.name))
        out.update(_NEUTRAL_VALUES)
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    # -- validation and per-block views ------------------------------------------------------------
    def __post_init__(self):
        n = len(self.block_out_channels)

        def fail(key, why):
            raise ValueError(f"invalid UNet config key {key!r}: {why}")

        if n == 0:
            fail("block_out_channels", "empty")
        for key in ("down_block_types", "up_block_types"):
            if len(getattr(self, key)) != n:
                fail(key, f"has {len(getattr(self, key))} entries, block_out_channels has {n}")
        for i, t in enumerate(self.down_block_types):
            if t not in DOWN_BLOCKS:
                fail("down_block_types", f"block {i} type {t!r} not supported (supported: {sorted(DOWN_BLOCKS)})")
        for i, t in enumerate(self.up_block_types):
            if t not in UP_BLOCKS:
                fail("up_block_types", f"block {i} type {t!r} not supported (supported: {sorted(UP_BLOCKS)})")
        if self.mid_block_type is not None and self.mid_block_type not in MID_BLOCKS:
            fail("mid_block_type", f"{self.mid_block_type!r} not supported (supported: {sorted(MID_BLOCKS)} or null)")
        if self.act_fn not in ("silu", "swish"):
            fail("act_fn", f"{self.act_fn!r} not supported (only 'silu')")
        if not isinstance(self.norm_num_groups, int) or isinstance(self.norm_num_groups, bool) or self.norm_num_groups <= 0:
            fail("norm_num_groups", f"{self.norm_num_groups!r} not supported (a positive int is required)")
        if self.downsample_padding not in (0, 1):
            fail("downsample_padding", f"{self.downsample_padding!r} not supported (0 or 1)")
        if not 0.0 <= float(self.dropout) < 1.0:
            fail("dropout", f"{self.dropout!r} not in [0, 1)")
        for key in ("layers_per_block", "cross_attention_dim", "transformer_layers_per_block", "attention_head_dim",
                    "num_attention_heads"):
            v = getattr(self, key)
            if v is None and key == "num_attention_heads":
                continue
            vals = v if isinstance(v, tuple) else (v,)
            if isinstance(v, tuple) and len(v) != n:
                fail(key, f"has {len(v)} entries for {n} blocks")
            for x in vals:
                if isinstance(x, tuple):
                    fail(key, "nested per-layer lists are not supported")
                if not isinstance(x, int) or isinstance(x, bool) or x <= 0:
                    fail(key, f"entries must be positive ints, got {x!r}")
        for i, ch in enumerate(self.block_out_channels):
            if ch % self.norm_num_groups:
                fail("norm_num_groups", f"{self.norm_num_groups} does not divide block {i} width {ch}")
            if ch % self.heads(i):
                fail("attention_head_dim" if self.num_attention_heads is None else "num_attention_heads",
                     f"{self.heads(i)} heads do not divide block {i} width {ch}")
        if self.time_embedding_dim is not None and self.time_embedding_dim <= 0:
            fail("time_embedding_dim", f"{self.time_embedding_dim!r} must be positive")

    @classmethod
    def sd15(cls) -> "UNet2DConditionConfig":
        """The Stable Diffusion 1.5 (and Arc2Face) UNet architecture (cross_attention_dim 768, 64x64 latents)."""
        return cls(sample_size=64, cross_attention_dim=768)

    @property
    def num_blocks(self) -> int:
        return len(self.block_out_channels)

    def per_block(self, key: str) -> tuple:
        """A per-block field expanded to one value per down block."""
        v = getattr(self, key)
        return v if isinstance(v, tuple) else (v,) * self.num_blocks

    def heads(self, i: int) -> int:
        """Number of attention heads in down block ``i`` (diffusers: ``num_attention_heads or attention_head_dim``)."""
        src = self.num_attention_heads if self.num_attention_heads is not None else self.attention_head_dim
        return src[i] if isinstance(src, tuple) else src

    @property
    def time_embed_dim(self) -> int:
        return self.time_embedding_dim or 4 * self.block_out_channels[0]


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------


class _AbstractKeys:
    """Stands in for ``nnx.Rngs`` under ``nnx.eval_shape``: the same key for every initialiser and no
    counter to update (updating traced RNG counters makes abstract construction of a large model slow)."""

    def params(self):
        return jax.random.key(0)


class UNet2DConditionModel(nnx.Module):
    """SD1.x UNet: ``unet(latents [B, H, W, C], timesteps [B] or scalar, context [B, S, D]) -> [B, H, W, C]``.

    Args:
      config: the architecture.
      dtype: compute dtype (``jnp.bfloat16`` on accelerators). Parameters are always float32; group/layer
        norm statistics and the explicit attention softmax stay float32; the output is float32.
      attention_implementation: fused path for every attention layer not selected below:
        ``"xla"`` (default), ``"cudnn"`` or ``"auto"``.
      explicit_cross_attention: cross-attention layers (``attn2``, by index 0..N-1, or ``"all"``) that use
        the explicit softmax and expose their probabilities (see :meth:`forward_with_attention_probs`).
      remat: gradient checkpointing (``nnx.remat``) per block: ``True`` for every block, or block names
        such as ``"down_blocks.0"``, ``"mid_block"``, ``"up_blocks.3"``.
      rngs: parameter initialisation (and dropout, when ``config.dropout > 0``).
    """

    def __init__(self, config: UNet2DConditionConfig, *, dtype=jnp.float32, attention_implementation: str = "xla",
                 explicit_cross_attention: Iterable[int] | str | None = None, remat: bool | Iterable[str] = False,
                 rngs: nnx.Rngs):
        self.config = config
        self.dtype = dtype
        c = config
        ch = c.block_out_channels
        n = c.num_blocks
        layers = c.per_block("layers_per_block")
        tlayers = c.per_block("transformer_layers_per_block")
        xdim = c.per_block("cross_attention_dim")
        temb = c.time_embed_dim
        common = dict(resnet_eps=c.norm_eps, resnet_groups=c.norm_num_groups, dropout=c.dropout, dtype=dtype, rngs=rngs)
        attn_common = dict(use_linear_projection=c.use_linear_projection, attention_implementation=attention_implementation)

        self.conv_in = conv2d(c.in_channels, ch[0], 3, dtype, rngs)
        self.time_proj = Timesteps(ch[0], c.flip_sin_to_cos, c.freq_shift)
        self.time_embedding = TimestepEmbedding(ch[0], temb, dtype=dtype, rngs=rngs)

        down = []
        out_ch = ch[0]
        for i, kind in enumerate(c.down_block_types):
            in_ch, out_ch = out_ch, ch[i]
            kw = dict(num_layers=layers[i], add_downsample=i < n - 1, downsample_padding=c.downsample_padding, **common)
            if kind == "CrossAttnDownBlock2D":
                kw.update(transformer_layers_per_block=tlayers[i], num_attention_heads=c.heads(i),
                          cross_attention_dim=xdim[i], **attn_common)
            down.append(DOWN_BLOCKS[kind](in_ch, out_ch, temb, **kw))
        self.down_blocks = nnx.List(down)

        if c.mid_block_type is not None:
            self.mid_block = MID_BLOCKS[c.mid_block_type](
                ch[-1], temb, transformer_layers_per_block=tlayers[-1], num_attention_heads=c.heads(n - 1),
                cross_attention_dim=xdim[-1], output_scale_factor=c.mid_block_scale_factor, **attn_common, **common)
        else:
            self.mid_block = None

        up = []
        rch = list(reversed(ch))
        rlayers, rtlayers, rxdim = list(reversed(layers)), list(reversed(tlayers)), list(reversed(xdim))
        rheads = [c.heads(n - 1 - i) for i in range(n)]
        out_ch = rch[0]
        for i, kind in enumerate(c.up_block_types):
            prev_ch, out_ch = out_ch, rch[i]
            in_ch = rch[min(i + 1, n - 1)]
            kw = dict(num_layers=rlayers[i] + 1, add_upsample=i < n - 1, **common)
            if kind == "CrossAttnUpBlock2D":
                kw.update(transformer_layers_per_block=rtlayers[i], num_attention_heads=rheads[i],
                          cross_attention_dim=rxdim[i], **attn_common)
            up.append(UP_BLOCKS[kind](in_ch, prev_ch, out_ch, temb, **kw))
        self.up_blocks = nnx.List(up)

        self.conv_norm_out = group_norm(ch[0], c.norm_num_groups, c.norm_eps, dtype, rngs)
        self.conv_out = conv2d(ch[0], c.out_channels, 3, dtype, rngs)

        for index, (name, attn) in enumerate(self._walk_cross_attention()):
            attn.layer_index = index
            attn.layer_name = name
        self.configure_attention(implementation=attention_implementation, explicit_cross_attention=explicit_cross_attention)
        self.set_remat(remat)

    @classmethod
    def create_abstract(cls, config: UNet2DConditionConfig, **options) -> "UNet2DConditionModel":
        """The model with abstract (shape-only) parameters, to be filled by a weight loader.

        Much faster than a random initialisation (seconds for SD1.5): no parameter is materialised and
        no RNG state is threaded. Every variable must then be set (``load_torch_state`` /
        ``load_flax_params`` do). Not for ``config.dropout > 0`` (dropout RNG state must be real).
        """
        if config.dropout > 0:
            raise ValueError("create_abstract: config.dropout > 0 needs real dropout RNG state; build with nnx.Rngs")
        return nnx.eval_shape(lambda: cls(config, rngs=_AbstractKeys(), **options))

    # -- attention / remat selection ------------------------------------------------------------------
    def _block_names(self) -> list[str]:
        names = [f"down_blocks.{i}" for i in range(len(self.down_blocks))]
        if self.mid_block is not None:
            names.append("mid_block")
        return names + [f"up_blocks.{i}" for i in range(len(self.up_blocks))]

    def _walk_cross_attention(self):
        """(dotted name, attn2) of every transformer block, in down -> mid -> up order."""
        blocks = [(f"down_blocks.{i}", b) for i, b in enumerate(self.down_blocks)]
        if self.mid_block is not None:
            blocks.append(("mid_block", self.mid_block))
        blocks += [(f"up_blocks.{i}", b) for i, b in enumerate(self.up_blocks)]
        for prefix, block in blocks:
            for a, t in enumerate(getattr(block, "attentions", ())):
                for j, tb in enumerate(t.transformer_blocks):
                    yield f"{prefix}.attentions.{a}.transformer_blocks.{j}.attn2", tb.attn2

    def cross_attention_layers(self) -> list[Attention]:
        """The cross-attention modules, ``result[i].layer_index == i``."""
        return [attn for _, attn in self._walk_cross_attention()]

    @property
    def num_cross_attention_layers(self) -> int:
        return len(self.cross_attention_layers())

    def configure_attention(self, *, implementation: str | None = None,
                            explicit_cross_attention: Iterable[int] | str | None = None) -> None:
        """Choose the attention path of every layer (static: a jitted function retraces after a change).

        ``implementation`` is the fused path for all other layers; ``explicit_cross_attention`` is
        ``"all"``, an iterable of cross-attention indices, or None (no explicit layer).
        """
        impl = implementation or getattr(self, "attention_implementation", "xla")
        if impl not in ATTENTION_IMPLEMENTATIONS or impl == "explicit":
            fused = [i for i in ATTENTION_IMPLEMENTATIONS if i != "explicit"]
            raise ValueError(f"attention_implementation must be one of {fused}, got {impl!r}")
        layers = self.cross_attention_layers()
        if explicit_cross_attention is None:
            explicit = set()
        elif isinstance(explicit_cross_attention, str):
            if explicit_cross_attention != "all":
                raise ValueError(f"explicit_cross_attention must be 'all' or layer indices, got {explicit_cross_attention!r}")
            explicit = set(range(len(layers)))
        else:
            explicit = set()
            for i in explicit_cross_attention:
                if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < len(layers):
                    raise ValueError(f"explicit_cross_attention: {i!r} is not a cross-attention layer index "
                                     f"(0..{len(layers) - 1})")
                explicit.add(i)
        self.attention_implementation = impl
        self.explicit_cross_attention = tuple(sorted(explicit))
        for _, module in nnx.iter_modules(self):
            if isinstance(module, Attention):
                module.implementation = impl
        for i in explicit:
            layers[i].implementation = "explicit"

    def set_remat(self, remat: bool | Iterable[str]) -> None:
        """Turn ``nnx.remat`` on for all blocks (``True``), none (``False``) or the named blocks."""
        names = self._block_names()
        if remat is True:
            chosen = set(names)
        elif remat is False or remat is None:
            chosen = set()
        else:
            if isinstance(remat, str):
                remat = [remat]
            chosen = set(remat)
            unknown = sorted(chosen - set(names))
            if unknown:
                raise ValueError(f"remat: unknown block name(s) {unknown}; valid names are {names}")
        self.remat_blocks = tuple(n for n in names if n in chosen)

    def _run(self, name: str, block, *args, controls=None):
        if controls is None:
            if name in self.remat_blocks:
                # Tree mode: graph mode cannot flatten the containers while nnx.capture is active (flax 0.12.8).
                return nnx.remat(lambda blk, *a: blk(*a), graph=False)(block, *args)
            return block(*args)
        if name in self.remat_blocks:
            return nnx.remat(lambda blk, c, *a: blk(*a, controls=c), graph=False)(block, controls, *args)
        return block(*args, controls=controls)

    # -- FaceCrafter controls ----------------------------------------------------------------------
    @property
    def control_names(self) -> tuple[str, ...]:
        """Names of the installed control adapters (empty for a plain UNet)."""
        layers = self.cross_attention_layers()
        to_k_c = getattr(layers[0], "to_k_c", None) if layers else None
        return tuple(to_k_c.keys()) if to_k_c is not None else ()

    def _prepare_controls(self, controls, batch: int):
        """Validate ``{name: (tokens, mask, scale)}`` and turn it into ``{name: (tokens, weight [B])}``."""
        if controls is None or len(controls) == 0:
            return None
        if not isinstance(controls, Mapping):
            raise ValueError(f"controls must be a dict name -> (tokens, mask, scale), got {type(controls).__name__}")
        installed = self.control_names
        layers = self.cross_attention_layers()
        out = {}
        for name, value in controls.items():
            if name not in installed:
                raise ValueError(f"control {name!r} has no adapter in this UNet (installed: {list(installed)}); "
                                 "install it with add_control_adapters")
            if not isinstance(value, (tuple, list)) or len(value) != 3:
                raise ValueError(f"controls[{name!r}] must be (tokens [B, N, D], mask [B] or None, scale scalar or [B])")
            tokens, mask, scale = value
            tokens = jnp.asarray(tokens)
            dim = layers[0].to_k_c[name].kernel.shape[0]
            if tokens.ndim != 3 or tokens.shape[0] != batch or tokens.shape[2] != dim:
                raise ValueError(f"controls[{name!r}] tokens must be [B={batch}, N, D={dim}], got shape {tokens.shape}")
            weights = []
            for what, v in (("mask", mask), ("scale", scale)):
                v = jnp.ones((), jnp.float32) if v is None else jnp.asarray(v, jnp.float32)
                if v.ndim > 1 or (v.ndim == 1 and v.shape[0] not in (1, batch)):
                    raise ValueError(f"controls[{name!r}] {what} must be a scalar or [B={batch}], got shape {v.shape}")
                weights.append(jnp.broadcast_to(v.reshape(-1), (batch,)))
            out[name] = (tokens.astype(self.dtype), weights[0] * weights[1])
        return out

    # -- forward -----------------------------------------------------------------------------------
    def __call__(self, sample: jax.Array, timesteps: jax.Array | float | int, encoder_hidden_states: jax.Array, *,
                 controls: Mapping[str, tuple] | None = None) -> jax.Array:
        """Predict the noise (or v) for NHWC latents ``sample`` at ``timesteps`` given ``encoder_hidden_states``.

        ``controls`` (FaceCrafter, needs :func:`~facecrafter_jax.models.control.add_control_adapters`):
        ``{name: (tokens [B, N, D], mask [B] or None, scale scalar or [B])}``; every cross-attention layer
        adds ``mask * scale * Attn(Q, to_k_c[name](tokens), to_v_c[name](tokens))`` to its identity branch.
        A mask of 0 removes the control exactly; None or ``{}`` runs the plain UNet.
        """
        c = self.config
        if sample.ndim != 4 or sample.shape[-1] != c.in_channels:
            raise ValueError(f"sample must be [B, H, W, {c.in_channels}] (NHWC), got shape {sample.shape}")
        factor = 2 ** (len(self.up_blocks) - 1)
        if sample.shape[1] % factor or sample.shape[2] % factor:
            raise ValueError(f"sample height and width must be multiples of {factor}, got {sample.shape[1:3]}")
        if encoder_hidden_states.ndim != 3 or encoder_hidden_states.shape[0] != sample.shape[0]:
            raise ValueError(f"encoder_hidden_states must be [B={sample.shape[0]}, S, D], got {encoder_hidden_states.shape}")
        batch = sample.shape[0]
        timesteps = jnp.asarray(timesteps)
        if timesteps.ndim > 1 or (timesteps.ndim == 1 and timesteps.shape[0] not in (1, batch)):
            raise ValueError(f"timesteps must be a scalar or [B={batch}], got shape {timesteps.shape}")
        timesteps = jnp.broadcast_to(timesteps.reshape(-1), (batch,))
        controls = self._prepare_controls(controls, batch)

        x = sample.astype(self.dtype)
        if c.center_input_sample:
            x = 2 * x - 1.0
        context = encoder_hidden_states.astype(self.dtype)
        emb = self.time_embedding(self.time_proj(timesteps).astype(self.dtype))

        x = self.conv_in(x)
        skips = [x]
        for i, block in enumerate(self.down_blocks):
            x, states = self._run(f"down_blocks.{i}", block, x, emb, context, controls=controls)
            skips.extend(states)
        if self.mid_block is not None:
            x = self._run("mid_block", self.mid_block, x, emb, context, controls=controls)
        for i, block in enumerate(self.up_blocks):
            k = len(block.resnets)
            block_skips, skips = tuple(skips[-k:]), skips[:-k]
            x = self._run(f"up_blocks.{i}", block, x, block_skips, emb, context, controls=controls)
        x = self.conv_out(jax.nn.silu(self.conv_norm_out(x)))
        return x.astype(jnp.float32)

    def forward_with_attention_probs(self, sample, timesteps, encoder_hidden_states, *, name: str = "probs",
                                     controls=None):
        """Run the model and return ``(output, {layer_index: probs})`` for the explicit cross-attention layers.

        ``probs`` is ``[B, heads, H_l * W_l, S]`` float32 (rows sum to 1). Works inside ``nnx.jit`` /
        ``nnx.grad``. Equivalent to ``nnx.capture(unet, AttentionProbs)`` plus :meth:`attention_probs_by_index`.
        With ``controls``, ``name="probs_<control>"`` selects a control branch's maps ``[B, heads, HW, N]``.
        """
        out, inter = nnx.capture(self, AttentionProbs)(sample, timesteps, encoder_hidden_states, controls=controls)
        return out, self.attention_probs_by_index(inter, name=name)

    def attention_probs_by_index(self, intermediates, *, name: str = "probs") -> dict[int, jax.Array]:
        """Map the ``AttentionProbs`` captured from this model to ``{layer_index: probs}``.

        Raises if a layer sowed more than once (called several times inside one capture).
        """
        index = {tuple(n.split(".")): a.layer_index for n, a in self._walk_cross_attention()}
        out = {}
        for path, var in nnx.to_flat_state(intermediates):
            if path[-1] != name:
                continue
            key = tuple(str(p) for p in path[:-1])
            if key not in index:
                continue
            values = var.get_value()
            if len(values) != 1:
                raise ValueError(f"layer {'.'.join(key)} recorded {len(values)} attention maps in one capture; "
                                 "read the raw nnx.capture intermediates instead")
            out[index[key]] = values[0]
        return dict(sorted(out.items()))
