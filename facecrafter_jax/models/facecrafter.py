"""The FaceCrafter model: the Arc2Face UNet with decoupled control adapters, plus the token encoders.

Usage::

    unet = load_unet("arc2face/unet")                      # frozen base (nnx.Param)
    model = FaceCrafter(unet, FaceCrafterConfig(), rngs=nnx.Rngs(0))   # installs adapters (AdapterParam)
    eps = model(latents, t, id_context, landmarks=lmk, emotion=emo,
                landmark_mask=m_lmk, emotion_mask=m_emo, landmark_scale=1.0, emotion_scale=0.8)

    # AD loss: explicit-softmax maps / branch outputs of chosen layers, from inside a jitted loss
    model.unet.configure_attention(explicit_cross_attention=[4, 5, 6, 7, 8, 9])
    eps, maps = model.forward_with_maps(latents, t, id_context, landmarks=lmk, emotion=emo, ...)
    maps[6]["id"]["probs"]      # [B, heads, HW, 77]   ID branch probabilities
    maps[6]["landmark"]["out"]  # [B, HW, heads, d]    landmark branch output (before mask/scale and to_out)

See ``docs/method.md`` for the equations and the choices made.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from .attention import AttentionProbs, BranchOutputs
from .control import ADAPTER_VALUE_INITS, CONTROL_INPUT_DIMS, ControlTokenEncoder, add_control_adapters, null_input

__all__ = ["FaceCrafterConfig", "FaceCrafter", "collect_control_maps", "parameter_report"]


@dataclass(frozen=True)
class FaceCrafterConfig:
    """Which controls FaceCrafter has and the size of their token encoders (round-trips to JSON).

    ``controls`` is any non-empty subset of ``("landmark", "emotion")`` (one of them for the
    single-module pre-training stages). ``cross_attention_dim`` is the token width D; None takes the
    UNet's when the model is built (the saved config always holds the resolved value).
    ``adapter_value_init``: ``"copy"`` (IP-Adapter: ``to_v_c`` starts as a copy of ``to_v``) or ``"zeros"``
    (the branch starts as exactly nothing; :func:`~facecrafter_jax.models.control.add_control_adapters`).
    It only matters when adapters are created, not when trained ones are loaded.

    The encoder hidden widths default to integer multiples of the input widths (1434 landmark values, 10
    emotion values): diffusers' FaceID projection, the form of the IP-Adapter export, sizes its hidden layer
    as ``mult * input`` (:mod:`facecrafter_jax.convert.ip_adapter`; other widths export zero-padded).
    """

    controls: tuple[str, ...] = ("landmark", "emotion")
    landmark_tokens: int = 4
    emotion_tokens: int = 4
    landmark_hidden_dim: int = 1434  # 1 x the 1434 inputs
    emotion_hidden_dim: int = 510    # 51 x the 10 inputs
    cross_attention_dim: int | None = None
    adapter_value_init: str = "copy"

    def __post_init__(self):
        if self.adapter_value_init not in ADAPTER_VALUE_INITS:
            raise ValueError(f"FaceCrafterConfig.adapter_value_init must be one of {ADAPTER_VALUE_INITS}, "
                             f"got {self.adapter_value_init!r}")
        controls = tuple(self.controls) if isinstance(self.controls, (list, tuple)) else self.controls
        if not isinstance(controls, tuple) or not controls:
            raise ValueError(f"FaceCrafterConfig.controls must be a non-empty list, got {self.controls!r}")
        unknown = [c for c in controls if c not in CONTROL_INPUT_DIMS]
        if unknown:
            raise ValueError(f"FaceCrafterConfig.controls: unknown control(s) {unknown}; known: {sorted(CONTROL_INPUT_DIMS)}")
        if len(set(controls)) != len(controls):
            raise ValueError(f"FaceCrafterConfig.controls has duplicates: {list(controls)}")
        object.__setattr__(self, "controls", controls)
        for f in ("landmark_tokens", "emotion_tokens", "landmark_hidden_dim", "emotion_hidden_dim", "cross_attention_dim"):
            v = getattr(self, f)
            if f == "cross_attention_dim" and v is None:
                continue
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"FaceCrafterConfig.{f} must be a positive int, got {v!r}")

    def num_tokens(self, name: str) -> int:
        return getattr(self, f"{name}_tokens")

    def hidden_dim(self, name: str) -> int:
        return getattr(self, f"{name}_hidden_dim")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["controls"] = list(self.controls)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "FaceCrafterConfig":
        """Inverse of :meth:`to_dict`; an unknown key raises ``ValueError`` naming it."""
        if not isinstance(d, Mapping):
            raise ValueError(f"FaceCrafter config must be a mapping, got {type(d).__name__}")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - fields)
        if unknown:
            raise ValueError(f"unknown FaceCrafter config key(s) {unknown}; expected a subset of {sorted(fields)}")
        d = dict(d)
        if "controls" in d and isinstance(d["controls"], list):
            d["controls"] = tuple(d["controls"])
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "FaceCrafterConfig":
        return cls.from_dict(json.loads(text))


class FaceCrafter(nnx.Module):
    """Arc2Face UNet + FaceCrafter control modules.

    Attributes: ``unet`` (the given UNet, with ``to_k_c`` / ``to_v_c`` adapters installed in place in
    every ``attn2``), ``landmark_encoder`` and ``emotion_encoder`` (:class:`ControlTokenEncoder`, None
    when the control is not configured), ``config`` (resolved :class:`FaceCrafterConfig`).

    Args:
      unet: a :class:`~facecrafter_jax.models.unet_2d_condition.UNet2DConditionModel` (typically
        loaded; its parameters stay ``nnx.Param`` = frozen). Its adapters are copies of its ``to_k``/``to_v``.
      config: the controls and encoder sizes.
      dtype: compute dtype of the encoders (default: the UNet's).
      rngs: initialisation of the token encoders.
    """

    def __init__(self, unet, config: FaceCrafterConfig | None = None, *, dtype=None, rngs: nnx.Rngs):
        config = FaceCrafterConfig() if config is None else config
        layers = unet.cross_attention_layers()
        if not layers:
            raise ValueError("FaceCrafter: the UNet has no cross-attention layers")
        unet_dim = layers[0].to_k.kernel.shape[0]
        if config.cross_attention_dim is None:
            config = dataclasses.replace(config, cross_attention_dim=int(unet_dim))
        elif config.cross_attention_dim != unet_dim:
            raise ValueError(f"FaceCrafterConfig.cross_attention_dim = {config.cross_attention_dim} but the UNet's "
                             f"cross-attention layers take {unet_dim}-d context")
        dtype = unet.dtype if dtype is None else dtype
        installed = unet.control_names
        missing = [c for c in config.controls if c not in installed]
        extra = [c for c in installed if c not in config.controls]
        if extra:
            raise ValueError(f"FaceCrafter: the UNet already has adapters {extra} not in config.controls {list(config.controls)}")
        if missing:
            add_control_adapters(unet, missing, value_init=config.adapter_value_init)
        self.config = config
        self.dtype = dtype
        self.unet = unet
        for name in ("landmark", "emotion"):
            enc = (ControlTokenEncoder(name, num_tokens=config.num_tokens(name), hidden_dim=config.hidden_dim(name),
                                       output_dim=config.cross_attention_dim, dtype=dtype, rngs=rngs)
                   if name in config.controls else None)
            setattr(self, f"{name}_encoder", enc)

    @property
    def controls(self) -> tuple[str, ...]:
        return self.config.controls

    def encoder(self, name: str) -> ControlTokenEncoder:
        enc = getattr(self, f"{name}_encoder", None) if name in CONTROL_INPUT_DIMS else None
        if enc is None:
            raise ValueError(f"this FaceCrafter has no {name!r} control (controls: {list(self.controls)})")
        return enc

    def encode_controls(self, *, landmarks=None, emotion=None, masks: Mapping[str, Any] | None = None,
                        scales: Mapping[str, Any] | None = None, batch: int | None = None) -> dict[str, tuple]:
        """Token-encode the raw conditions of every control of the model -> ``{name: (tokens [B, N, D], mask, scale)}``.

        A control left as None runs on its **null tokens** (the all-zero raw input through its encoder, ``batch``
        rows): training's and sampling's meaning of an absent condition. A mask of 0 switches a branch off
        exactly. ``masks`` / ``scales`` map a control name to a per-sample array ``[B]`` or a scalar (default:
        mask None = on, scale 1.0). Feed the result to ``self.unet(..., controls=...)``.
        """
        masks = dict(masks or {})
        scales = dict(scales or {})
        raw = {"landmark": landmarks, "emotion": emotion}
        for what, d in (("masks", masks), ("scales", scales)):
            unknown = sorted(set(d) - set(raw))
            if unknown:
                raise ValueError(f"encode_controls: {what} for unknown control(s) {unknown}")
        given = [n for n, x in raw.items() if x is not None]
        for name in given:
            self.encoder(name)  # raises for a control the model does not have
        if batch is None:
            if not given:
                raise ValueError("encode_controls: give batch when no control input is given")
            batch = int(jnp.shape(raw[given[0]])[0])
        out = {}
        for name in self.controls:
            x = raw[name] if raw[name] is not None else null_input(name, batch)
            out[name] = (self.encoder(name)(x), masks.get(name), scales.get(name, 1.0))
        return out

    def __call__(self, latents: jax.Array, timesteps, id_context: jax.Array, *, landmarks=None, emotion=None,
                 landmark_mask=None, emotion_mask=None, landmark_scale=1.0, emotion_scale=1.0) -> jax.Array:
        """Noise prediction ``[B, H, W, 4]`` for NHWC ``latents`` given the identity context ``[B, 77, D]``.

        ``landmarks`` ``[B, 478, 3]`` / ``emotion`` ``[B, 10]``: raw conditions (None: the control's null tokens).
        ``*_mask``: per-sample 0/1 ``[B]`` (None: all on; 0 switches a branch off); ``*_scale``: scalar or ``[B]``
        (lambda_c). Every mask 0 is exactly the base UNet.
        """
        controls = self.encode_controls(landmarks=landmarks, emotion=emotion,
                                        masks={"landmark": landmark_mask, "emotion": emotion_mask},
                                        scales={"landmark": landmark_scale, "emotion": emotion_scale},
                                        batch=latents.shape[0])
        return self.unet(latents, timesteps, id_context, controls=controls)

    def predict(self, latents: jax.Array, timesteps, condition) -> jax.Array:
        """Noise prediction for a :class:`~facecrafter_jax.conditioning.ModelCondition` (context + per control
        ``(tokens, weight)``): the one path the train step and the samplers use."""
        controls = {name: (tokens, None, weight) for name, (tokens, weight) in condition.controls.items()}
        return self.unet(latents, timesteps, condition.context, controls=controls or None)

    def forward_with_maps(self, latents, timesteps, id_context, *, capture: tuple[str, ...] = ("probs", "out"), **kwargs):
        """Like :meth:`__call__`, plus the exposed maps of the UNet's explicit cross-attention layers.

        Returns ``(eps, maps)`` with ``maps[layer_index][branch][kind]``: ``branch`` is ``"id"`` or a
        control name, ``kind`` is ``"probs"`` (``[B, heads, HW, S]`` float32; S = 77 or N tokens) or
        ``"out"`` (``[B, HW, heads, d]`` branch output before mask/scale and ``to_out``; only when
        controls run). ``capture`` limits what is recorded (less memory). Select the layers with
        ``self.unet.configure_attention(explicit_cross_attention=...)``. Works inside ``nnx.jit`` / ``nnx.grad``.
        """
        return self._with_maps(type(self).__call__, capture, latents, timesteps, id_context, **kwargs)

    def predict_with_maps(self, latents, timesteps, condition, *, capture: tuple[str, ...] = ("probs", "out")):
        """:meth:`predict` plus the exposed maps (as :meth:`forward_with_maps`)."""
        return self._with_maps(type(self).predict, capture, latents, timesteps, condition)

    def _with_maps(self, method, capture, *args, **kwargs):
        types = []
        for c in capture:
            if c not in ("probs", "out"):
                raise ValueError(f"forward_with_maps: capture entries must be 'probs' or 'out', got {c!r}")
            types.append(AttentionProbs if c == "probs" else BranchOutputs)
        if not types:
            raise ValueError("forward_with_maps: capture is empty")
        result = nnx.capture(method, *types)(self, *args, **kwargs)
        out, states = result[0], result[1:]
        return out, collect_control_maps(self.unet, states, prefix=("unet",))


def collect_control_maps(unet, states, *, prefix: tuple = ()) -> dict[int, dict[str, dict[str, jax.Array]]]:
    """Arrange captured :class:`AttentionProbs` / :class:`BranchOutputs` states as ``{layer: {branch: {kind: array}}}``.

    ``prefix`` is the path of ``unet`` inside the captured module (``("unet",)`` for :class:`FaceCrafter`).
    Sown names map as ``probs -> ["id"]["probs"]``, ``probs_<c> -> [c]["probs"]``, ``out_id -> ["id"]["out"]``,
    ``out_<c> -> [c]["out"]``. Raises if a layer recorded a value more than once.
    """
    index = {tuple(prefix) + tuple(name.split(".")): attn.layer_index for name, attn in unet._walk_cross_attention()}
    maps: dict[int, dict[str, dict[str, jax.Array]]] = {}
    for state in states:
        for path, var in nnx.to_flat_state(state):
            key = tuple(str(p) for p in path[:-1])
            if key not in index:
                continue
            leaf = str(path[-1])
            if leaf == "probs":
                branch, kind = "id", "probs"
            elif leaf.startswith("probs_"):
                branch, kind = leaf[len("probs_"):], "probs"
            elif leaf.startswith("out_"):
                branch, kind = leaf[len("out_"):], "out"
            else:
                continue
            values = var.get_value()
            if len(values) != 1:
                raise ValueError(f"layer {'.'.join(key)} recorded {len(values)} values of {leaf!r} in one capture")
            maps.setdefault(index[key], {}).setdefault(branch, {})[kind] = values[0]
    return dict(sorted(maps.items()))


# --------------------------------------------------------------------------------------------
# Parameter report (weight I/O lives in facecrafter_jax/convert/adapters.py)
# --------------------------------------------------------------------------------------------


def parameter_report(unet_config, config: FaceCrafterConfig | None = None) -> dict[str, Any]:
    """Parameter counts of FaceCrafter on ``unet_config``, built abstractly (``nnx.eval_shape``, no memory).

    Returns ``{"unet": frozen UNet params, "trainable": AdapterParam total, "percent_of_unet": ...,
    "total": ..., "breakdown": {"<name> K/V (<L> layers)": n, "<name>_encoder": n, ...}, "config": {...}}``.
    """
    from .control import FROZEN, AdapterParam, count_params
    from .unet_2d_condition import UNet2DConditionModel, _AbstractKeys

    config = FaceCrafterConfig() if config is None else config
    model = nnx.eval_shape(lambda: FaceCrafter(UNet2DConditionModel(unet_config, rngs=_AbstractKeys()), config,
                                               rngs=nnx.Rngs(0)))
    frozen = count_params(model, FROZEN)
    trainable = count_params(model, AdapterParam)
    layers = model.unet.cross_attention_layers()
    breakdown = {}
    for name in model.config.controls:
        n = sum(count_params(a.to_k_c[name], AdapterParam) + count_params(a.to_v_c[name], AdapterParam) for a in layers)
        breakdown[f"{name} K/V ({len(layers)} layers)"] = n
    for name in model.config.controls:
        breakdown[f"{name}_encoder"] = count_params(model.encoder(name), AdapterParam)
    if sum(breakdown.values()) != trainable:  # pragma: no cover - every AdapterParam is in one bucket
        raise RuntimeError(f"parameter breakdown {breakdown} does not add up to {trainable}")
    return {"unet": frozen, "trainable": trainable, "percent_of_unet": 100.0 * trainable / frozen,
            "total": frozen + trainable, "breakdown": breakdown, "config": model.config.to_dict()}
