"""Intra-batch mixed conditioning: every sample of a batch draws its own conditioning setup.

Setups (the identity is always on except in ``all_null``)::

    id_only               ID
    id_landmark           ID + LMK
    id_emotion            ID + EMO
    id_landmark_emotion   ID + LMK + EMO
    all_null              empty-prompt context + every control branch fed its null tokens (zero input)

Default: 5% ``all_null``, the other 95% uniform over the four ID setups (23.75% each). A control that
is not in ``controls`` (single-module stages a / b) must have probability 0 in every setup that uses it.

Per sample the draw gives, for each control c: ``mask[c]`` (1 = the control branch runs, 0 = it is
switched off exactly), ``null[c]`` (1 = the control input is zeroed: the learned null tokens), and
``id_null`` (1 = the identity context is replaced by the empty-prompt context). The AD loss uses
``active[c] = mask[c] * (1 - null[c])`` (:func:`active_controls`).

Usage inside a jitted train step::

    cond = sample_conditioning(key, batch_size, config)
    context, inputs = apply_conditioning(cond, id_context, empty_context, landmarks=lmk, emotion=emo)
    eps = model(x_t, t, context, **inputs)           # landmarks / emotion / *_mask
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "SETUPS",
    "MixedConditioningConfig",
    "ConditioningSample",
    "sample_conditioning",
    "apply_conditioning",
    "active_controls",
]

# name -> (id on, controls on); controls are always ("landmark", "emotion") in this order.
SETUPS: dict[str, tuple[bool, frozenset]] = {
    "id_only": (True, frozenset()),
    "id_landmark": (True, frozenset({"landmark"})),
    "id_emotion": (True, frozenset({"emotion"})),
    "id_landmark_emotion": (True, frozenset({"landmark", "emotion"})),
    "all_null": (False, frozenset()),
}
_SETUP_NAMES = tuple(SETUPS)
_KNOWN_CONTROLS = ("landmark", "emotion")


@dataclass(frozen=True)
class MixedConditioningConfig:
    """Probability of each setup (must sum to 1) and the controls the model has."""

    id_only: float = 0.2375
    id_landmark: float = 0.2375
    id_emotion: float = 0.2375
    id_landmark_emotion: float = 0.2375
    all_null: float = 0.05
    controls: tuple[str, ...] = ("landmark", "emotion")

    def __post_init__(self):
        controls = tuple(self.controls)
        unknown = [c for c in controls if c not in _KNOWN_CONTROLS]
        if not controls or unknown or len(set(controls)) != len(controls):
            raise ValueError(f"MixedConditioningConfig.controls must be a non-empty subset of {_KNOWN_CONTROLS}, "
                             f"got {self.controls!r}")
        object.__setattr__(self, "controls", controls)
        probs = self.probabilities()
        for name, p in zip(_SETUP_NAMES, probs):
            if not np.isfinite(p) or p < 0:
                raise ValueError(f"MixedConditioningConfig.{name} must be a probability >= 0, got {p!r}")
            missing = SETUPS[name][1] - set(controls)
            if p > 0 and missing:
                raise ValueError(f"MixedConditioningConfig.{name} = {p} uses control(s) {sorted(missing)} "
                                 f"that are not in controls {list(controls)}")
        if abs(sum(probs) - 1.0) > 1e-6:
            raise ValueError(f"MixedConditioningConfig probabilities must sum to 1, got {sum(probs)!r} "
                             f"({dict(zip(_SETUP_NAMES, probs))})")

    def probabilities(self) -> tuple[float, ...]:
        """Setup probabilities in :data:`SETUPS` order."""
        return tuple(float(getattr(self, n)) for n in _SETUP_NAMES)

    @classmethod
    def single(cls, control: str, *, all_null: float = 0.05) -> "MixedConditioningConfig":
        """Stage a / b: one control; ``(1 - all_null)`` split evenly between ID and ID + that control."""
        half = (1.0 - all_null) / 2
        kw = {"id_only": half, "id_landmark": 0.0, "id_emotion": 0.0, "id_landmark_emotion": 0.0, "all_null": all_null}
        if control not in _KNOWN_CONTROLS:
            raise ValueError(f"unknown control {control!r}; known: {_KNOWN_CONTROLS}")
        kw[f"id_{control}"] = half
        return cls(controls=(control,), **kw)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "MixedConditioningConfig":
        from facecrafter_jax.config import from_dict  # the one config engine: typed values, unknown keys named

        return from_dict(cls, d, what="mixed-conditioning")


class ConditioningSample(NamedTuple):
    """Per-sample draw (a pytree). ``setup`` indexes :data:`SETUPS`; masks / nulls are float32 0/1 ``[B]``."""

    setup: jax.Array  # [B] int32
    id_null: jax.Array  # [B] float32
    masks: dict  # control -> [B] float32
    nulls: dict  # control -> [B] float32


def sample_conditioning(key: jax.Array, batch_size: int, config: MixedConditioningConfig | None = None) -> ConditioningSample:
    """Draw one setup per sample (i.i.d. categorical with ``config``'s probabilities); deterministic per key."""
    config = MixedConditioningConfig() if config is None else config
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    probs = jnp.asarray(config.probabilities(), jnp.float32)
    setup = jax.random.choice(key, len(_SETUP_NAMES), shape=(batch_size,), p=probs).astype(jnp.int32)
    null_idx = _SETUP_NAMES.index("all_null")
    is_null = (setup == null_idx).astype(jnp.float32)
    masks, nulls = {}, {}
    for c in config.controls:
        uses = jnp.asarray([c in SETUPS[n][1] for n in _SETUP_NAMES], jnp.float32)
        # The all-null setup runs every branch on its null tokens (so they are learned).
        masks[c] = jnp.maximum(uses[setup], is_null)
        nulls[c] = is_null
    return ConditioningSample(setup=setup, id_null=is_null, masks=masks, nulls=nulls)


def active_controls(sample: ConditioningSample) -> dict[str, jax.Array]:
    """``{control: mask * (1 - null)}``: the samples whose control really conditions them (for the AD loss)."""
    return {c: sample.masks[c] * (1.0 - sample.nulls[c]) for c in sample.masks}


def apply_conditioning(sample: ConditioningSample, id_context: jax.Array, empty_context: jax.Array, *,
                       landmarks: jax.Array | None = None, emotion: jax.Array | None = None):
    """Apply a draw to a batch: ``(context, model_inputs)``.

    ``context``: ``id_context [B, S, D]`` where the identity is kept, ``empty_context`` (``[S, D]``,
    ``[1, S, D]`` or ``[B, S, D]``) where it is dropped (``jnp.where``). ``model_inputs``: keyword
    arguments of :class:`~facecrafter_jax.models.facecrafter.FaceCrafter`: each configured control's raw
    input with null-dropped samples zeroed, and its ``*_mask``.
    """
    batch = sample.setup.shape[0]
    id_context = jnp.asarray(id_context)
    if id_context.ndim != 3 or id_context.shape[0] != batch:
        raise ValueError(f"id_context must be [B={batch}, S, D], got shape {id_context.shape}")
    empty = jnp.asarray(empty_context, id_context.dtype)
    if empty.ndim == 2:
        empty = empty[None]
    if empty.ndim != 3 or empty.shape[1:] != id_context.shape[1:] or empty.shape[0] not in (1, batch):
        raise ValueError(f"empty_context must be [S, D], [1, S, D] or [B, S, D] matching {id_context.shape}, got {empty.shape}")
    context = jnp.where(sample.id_null[:, None, None] > 0, jnp.broadcast_to(empty, id_context.shape), id_context)
    raw = {"landmark": landmarks, "emotion": emotion}
    inputs = {}
    for c in sample.masks:
        x = raw[c]
        if x is None:
            raise ValueError(f"apply_conditioning: the draw includes control {c!r} but no {c} input was given")
        x = jnp.asarray(x)
        if x.shape[0] != batch:
            raise ValueError(f"apply_conditioning: {c} input has batch {x.shape[0]}, expected {batch}")
        null = sample.nulls[c].reshape((batch,) + (1,) * (x.ndim - 1)) > 0
        inputs["landmarks" if c == "landmark" else "emotion"] = jnp.where(null, jnp.zeros_like(x), x)
        inputs[f"{c}_mask"] = sample.masks[c]
    for c, x in raw.items():
        if x is not None and c not in sample.masks:
            raise ValueError(f"apply_conditioning: a {c} input was given but the draw has no {c!r} control")
    return context, inputs
