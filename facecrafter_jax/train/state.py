"""The model being trained and the train state.

:class:`TrainModel` bundles what the train step runs: the FaceCrafter model (Arc2Face UNet with control
adapters and token encoders) and the frozen CLIP identity encoder. It is split once by variable type::

    graphdef, trainable, frozen, rest = nnx.split(model, AdapterParam, nnx.Param, ...)

``trainable`` (every :class:`~facecrafter_jax.models.control.AdapterParam`) and ``frozen`` (every other
``nnx.Param``: the UNet and CLIP weights) become flat dicts ``{dotted path: array}``. The ``base`` stage
(training Arc2Face itself) splits with :data:`BASE_TRAINABLE` instead: UNet and text encoder are
trainable, the token-embedding table frozen. The train state is
a plain dict pytree::

    {"step": int32[], "params": {path: f32}, "opt_state": optax state over params,
     "ema": {path: f32} or {}, "rng": uint32[2] (key data of the run's base key)}

Only ``params`` has optimiser state: the frozen base never enters optax.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from .config import ConfigError, ModelConfig, OptimConfig, TrainConfig

__all__ = ["TrainModel", "World", "build_world", "make_lr_schedule", "make_optimizer", "init_train_state",
           "dotted", "trainable_meta", "load_init_params", "BASE_TRAINABLE"]

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def dotted(path: tuple) -> str:
    return ".".join(str(p) for p in path)


class TrainModel(nnx.Module):
    """What one train step runs: the denoiser and the ``text_encoder`` (Arc2Face's identity encoder).

    The denoiser is ``facecrafter`` (the UNet with control adapters and token encoders; control stages)
    or ``unet`` (the bare Arc2Face UNet; the ``base`` stage); :attr:`denoiser` is whichever it is.
    """

    def __init__(self, denoiser: nnx.Module, text_encoder: nnx.Module):
        from facecrafter_jax.models.facecrafter import FaceCrafter

        if isinstance(denoiser, FaceCrafter):
            self.facecrafter = denoiser
        else:
            self.unet = denoiser
        self.text_encoder = text_encoder

    @property
    def denoiser(self) -> nnx.Module:
        return self.facecrafter if hasattr(self, "facecrafter") else self.unet


BASE_TRAINABLE = nnx.All(nnx.Param, nnx.Not(nnx.PathContains("token_embedding")))
"""Parameters the ``base`` stage trains: every UNet and text-encoder weight except the token-embedding
table (49408 x D, of which the fixed prompt uses 7 rows; the identity enters as an input embedding)."""


@dataclasses.dataclass
class World:
    """Everything derived from the model config (see the module docstring).

    Attributes:
      graphdef: static structure of :class:`TrainModel`.
      params: initial trainable parameters ``{dotted path: array}`` (host / default device).
      frozen: frozen parameters ``{dotted path: array}``.
      rest: any other model state (``nnx.State``; empty for the supported models).
      paths: dotted path -> nnx path tuple, for trainable and frozen entries.
      vae_scaling_factor, vae_shift_factor: latent scaling of the VAE that made the records.
      vae: the VAE module when one is configured (sample grids), else None.
      meta: the architecture summary stored in checkpoints (trainable names/shapes, frozen-base digest).
      facecrafter_config: the resolved FaceCrafterConfig (None for the ``base`` stage).
    """

    graphdef: Any
    params: dict[str, jax.Array]
    frozen: dict[str, jax.Array]
    rest: Any
    paths: dict[str, tuple]
    vae_scaling_factor: float
    vae_shift_factor: float | None
    vae: Any
    meta: dict
    facecrafter_config: Any

    @property
    def controls(self) -> tuple[str, ...]:
        """The control modules being trained (empty for the ``base`` stage)."""
        return tuple(self.facecrafter_config.controls) if self.facecrafter_config is not None else ()

    def state_from_flat(self, flat: Mapping[str, jax.Array]) -> nnx.State:
        return nnx.from_flat_state({self.paths[k]: v for k, v in flat.items()})

    def merge(self, params: Mapping[str, jax.Array], frozen: Mapping[str, jax.Array]) -> TrainModel:
        """The :class:`TrainModel` with the given trainable and frozen values (inside or outside jit)."""
        return nnx.merge(self.graphdef, self.state_from_flat(params), self.state_from_flat(frozen), self.rest)


def _flat(state: nnx.State) -> tuple[dict[str, jax.Array], dict[str, tuple]]:
    values, paths = {}, {}
    for path, var in nnx.to_flat_state(state):
        k = dotted(path)
        if k in values:
            raise ValueError(f"two parameters share the dotted name {k!r}")
        values[k] = var.get_value()
        paths[k] = tuple(path)
    return values, paths


def _frozen_digest(frozen: Mapping[str, jax.Array]) -> dict:
    """Names, shapes and a value checksum of the frozen base (detects a different base on resume).

    The checksum sums the absolute values of every 4099th element of each parameter (float64), cheap
    even for SD1.5's 1B parameters.
    """
    h = hashlib.sha256()
    total = 0.0
    count = 0
    for k in sorted(frozen):
        a = frozen[k]
        h.update(f"{k}:{tuple(a.shape)};".encode())
        total += float(np.abs(np.asarray(a).reshape(-1)[::4099].astype(np.float64)).sum())
        count += int(np.prod(a.shape))
    return {"structure_sha256": h.hexdigest()[:16], "num_params": count, "abs_sum": float(f"{total:.6e}")}


def trainable_meta(params: Mapping[str, Any]) -> dict[str, list[int]]:
    return {k: [int(s) for s in np.shape(v)] for k, v in sorted(params.items())}


def _unet_options(cfg: TrainConfig) -> dict:
    remat = cfg.model.remat
    remat = list(remat) if isinstance(remat, tuple) else bool(remat)
    return {"attention_implementation": cfg.model.attention_implementation, "remat": remat}


def _ad_layers(cfg: TrainConfig):
    if cfg.loss.ad_weight <= 0:
        return None
    layers = cfg.loss.ad_layers
    return "all" if layers == "all" else [int(i) for i in layers]


def build_world(cfg: TrainConfig, *, load_vae: bool = False) -> World:
    """Build (or load) the frozen base, install the FaceCrafter adapters, split trainable / frozen."""
    from facecrafter_jax.models.control import AdapterParam
    from facecrafter_jax.models.facecrafter import FaceCrafter, FaceCrafterConfig

    m: ModelConfig = cfg.model
    if m.dtype not in DTYPES:
        raise ConfigError(f"model.dtype must be one of {sorted(DTYPES)}, got {m.dtype!r}")
    dtype = DTYPES[m.dtype]
    vae = None
    if m.pretrained is not None:
        from facecrafter_jax.pretrained import load_pretrained, read_manifest

        have = read_manifest(m.pretrained)["components"]
        comps = ["unet", "text_encoder"] + (["vae"] if (load_vae and "vae" in have) else [])
        pre = load_pretrained(m.pretrained, dtype=dtype, components=comps, unet_options=_unet_options(cfg))
        unet, text_encoder, vae = pre.unet, pre.text_encoder, pre.vae
        vae_cfg = vae.config if vae is not None else None
        if vae_cfg is None and "vae" in have:
            import json
            import os

            from facecrafter_jax.models.vae import AutoencoderKLConfig

            with open(os.path.join(m.pretrained, "vae", "config.json")) as f:
                vae_cfg = AutoencoderKLConfig.from_dict(json.load(f))
    else:
        from facecrafter_jax.models.clip_text import CLIPTextConfig, CLIPTextModel
        from facecrafter_jax.models.unet_2d_condition import UNet2DConditionConfig, UNet2DConditionModel
        from facecrafter_jax.models.vae import AutoencoderKL, AutoencoderKLConfig

        if m.unet is None or m.text_encoder is None:
            raise ConfigError("model.pretrained is null: model.unet and model.text_encoder must give inline configs")
        unet = UNet2DConditionModel.create_abstract(UNet2DConditionConfig.from_diffusers_config(_plain_dict(m.unet)),
                                                    dtype=dtype, **_unet_options(cfg))
        random_fill_(unet, m.init_seed)
        text_cfg = CLIPTextConfig.from_dict(_plain_dict(m.text_encoder))
        text_encoder = nnx.eval_shape(lambda: CLIPTextModel(text_cfg, dtype=dtype, rngs=nnx.Rngs(0)))
        random_fill_(text_encoder, m.init_seed + 1)
        vae_cfg = AutoencoderKLConfig.from_dict(_plain_dict(m.vae)) if m.vae is not None else None
        if load_vae and vae_cfg is not None:
            vae = nnx.eval_shape(lambda: AutoencoderKL(vae_cfg, dtype=dtype, rngs=nnx.Rngs(0)))
            random_fill_(vae, m.init_seed + 2)
    layers = _ad_layers(cfg)
    if layers is not None:
        unet.configure_attention(explicit_cross_attention=layers)

    if cfg.stage == "base":
        if m.init_from:
            raise ConfigError("model.init_from is for control stages; the base stage starts from model.pretrained "
                             "or the inline configs")
        fc_config = None
        model = TrainModel(unet, text_encoder)
        graphdef, trainable, frozen, rest = nnx.split(model, BASE_TRAINABLE, nnx.Param, ...)
    else:
        fc_dict = {"controls": list(m.controls), **_plain_dict(m.facecrafter)}
        facecrafter = FaceCrafter(unet, FaceCrafterConfig.from_dict(fc_dict), rngs=nnx.Rngs(m.init_seed + 1))
        fc_config = facecrafter.config
        model = TrainModel(facecrafter, text_encoder)
        graphdef, trainable, frozen, rest = nnx.split(model, AdapterParam, nnx.Param, ...)
    params, p_paths = _flat(trainable)
    frozen_flat, f_paths = _flat(frozen)
    if not params:
        raise ConfigError("the model has no trainable parameters")
    scaling = float(vae_cfg.scaling_factor) if vae_cfg is not None else 0.18215
    shift = (float(vae_cfg.shift_factor) if (vae_cfg is not None and vae_cfg.shift_factor is not None) else None)
    meta = {"params": trainable_meta(params), "base": _frozen_digest(frozen_flat),
            "facecrafter": fc_config.to_dict() if fc_config is not None else None}
    return World(graphdef=graphdef, params=params, frozen=frozen_flat, rest=rest, paths={**p_paths, **f_paths},
                 vae_scaling_factor=scaling, vae_shift_factor=shift, vae=vae, meta=meta,
                 facecrafter_config=fc_config)


def random_fill_(module: nnx.Module, seed: int) -> None:
    """Give every ``nnx.Param`` of a (possibly abstract) module a seeded random value, in place.

    For the random-init toy models (``model.pretrained: null``): ``kernel`` ~ N(0, 1 / fan_in) (fan_in =
    product of all but the last dim), ``embedding`` ~ N(0, 0.02^2), ``scale`` = 1, ``bias`` = 0. NumPy
    generators seeded by (seed, parameter path), so values do not depend on construction order. Much
    faster than running the Flax initialisers eagerly on a small CPU.
    """
    updates = {}
    for path, var in nnx.to_flat_state(nnx.state(module, nnx.Param)):
        shape = tuple(var.get_value().shape)
        name = str(path[-1])
        digest = int.from_bytes(hashlib.blake2b(dotted(path).encode(), digest_size=8).digest(), "little")
        rng = np.random.default_rng([seed, digest])
        if name == "scale":
            value = np.ones(shape, np.float32)
        elif name == "bias":
            value = np.zeros(shape, np.float32)
        elif name == "embedding":
            value = rng.normal(0.0, 0.02, shape).astype(np.float32)
        else:
            fan_in = max(1, int(np.prod(shape[:-1]))) if len(shape) > 1 else max(1, shape[0])
            value = rng.normal(0.0, 1.0 / math.sqrt(fan_in), shape).astype(np.float32)
        updates[tuple(path)] = jnp.asarray(value)
    nnx.update(module, nnx.from_flat_state(updates))


def _plain_dict(d) -> dict:
    def conv(v):
        if isinstance(v, Mapping):
            return {k: conv(x) for k, x in v.items()}
        if isinstance(v, tuple):
            return [conv(x) for x in v]
        return v

    return conv(d) if d is not None else {}


# ------------------------------------------------------------------------------------------- optimiser
def make_lr_schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    """Linear warm-up from 0 to ``lr`` over ``warmup_steps``, then cosine decay to ``lr * end_lr_ratio``
    over ``decay_steps`` (default: the rest of the run) or constant."""
    warmup = max(0, int(cfg.warmup_steps))
    if cfg.schedule == "cosine":
        decay = cfg.decay_steps if cfg.decay_steps is not None else max(1, total_steps - warmup)
        return optax.warmup_cosine_decay_schedule(init_value=0.0, peak_value=cfg.lr, warmup_steps=warmup,
                                                  decay_steps=warmup + decay, end_value=cfg.lr * cfg.end_lr_ratio)
    if cfg.schedule == "constant":
        if warmup == 0:
            return optax.constant_schedule(cfg.lr)
        return optax.join_schedules([optax.linear_schedule(0.0, cfg.lr, warmup), optax.constant_schedule(cfg.lr)],
                                    [warmup])
    raise ConfigError(f"optim.schedule must be 'cosine' or 'constant', got {cfg.schedule!r}")


def make_optimizer(cfg: OptimConfig, total_steps: int) -> optax.GradientTransformation:
    """Global-norm clipping, then AdamW; weight decay only on matrices (``ndim >= 2``), not on biases /
    LayerNorm parameters."""
    schedule = make_lr_schedule(cfg, total_steps)
    decay_mask = lambda params: {k: np.ndim(v) >= 2 for k, v in params.items()}  # noqa: E731
    parts = []
    if cfg.grad_clip_norm is not None:
        if cfg.grad_clip_norm <= 0:
            raise ConfigError(f"optim.grad_clip_norm must be positive or null, got {cfg.grad_clip_norm}")
        parts.append(optax.clip_by_global_norm(cfg.grad_clip_norm))
    parts.append(optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                             mask=decay_mask))
    return optax.chain(*parts)


def init_train_state(params: Mapping[str, jax.Array], tx: optax.GradientTransformation, *, seed: int,
                     ema: bool) -> dict:
    """A fresh train state (pure; jit it with out_shardings to create it sharded)."""
    return {
        "step": jnp.zeros((), jnp.int32),
        "params": dict(params),
        "opt_state": tx.init(dict(params)),
        "ema": {k: jnp.asarray(v, jnp.float32) for k, v in params.items()} if ema else {},
        "rng": jax.random.key_data(jax.random.key(seed)),
    }


# ------------------------------------------------------------------------------------------- stage c init
def load_init_params(init_from: Mapping[str, str], params: Mapping[str, jax.Array]) -> dict[str, np.ndarray]:
    """Trained adapter parameters from earlier stages (``model.init_from``: ``{control: run dir}``).

    Each source run must have trained exactly that control; every one of its parameters must exist
    with the same shape in this model, and no parameter may come from two sources. Returns the
    parameters read (a subset of ``params``' keys).
    """
    from .checkpoint import load_trained_params

    out: dict[str, np.ndarray] = {}
    source_of: dict[str, str] = {}
    for control, path in init_from.items():
        values, config = load_trained_params(path)
        controls = list(config.get("model", {}).get("controls", []))
        if controls != [control]:
            raise ConfigError(f"model.init_from.{control}: {path} trained controls {controls}, expected [{control!r}]")
        for k, v in values.items():
            if k not in params:
                raise ConfigError(f"model.init_from.{control}: parameter {k} of {path} does not exist in this model")
            if tuple(v.shape) != tuple(np.shape(params[k])):
                raise ConfigError(f"model.init_from.{control}: parameter {k} has shape {tuple(v.shape)} in {path}, "
                                 f"{tuple(np.shape(params[k]))} in this model")
            if k in out:
                raise ConfigError(f"model.init_from: parameter {k} comes from both {source_of[k]} and {path}")
            out[k] = v
            source_of[k] = path
    return out
