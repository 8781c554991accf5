"""Intra-batch mixed conditioning: every sample of a batch draws its own conditioning setup.

A setup says which conditions are *real* (the sample's own input); every other condition is *absent*. The
setups are every combination of identity {kept, dropped to the empty prompt} x landmark {real, null} x emotion
{real, null}::

    id_landmark_emotion   ID + LMK + EMO          landmark_emotion   (empty prompt) + LMK + EMO
    id_landmark           ID + LMK                landmark_only      (empty prompt) + LMK
    id_emotion            ID + EMO                emotion_only       (empty prompt) + EMO
    id_only               ID                      all_null           (empty prompt), every control null

An absent control is its **null tokens** (the all-zero raw input through its encoder) with the branch on
(``absent="null_tokens"``, the default; IP-Adapter's and Arc2Face's expression adapter's convention), so ID-only draws
train the null path and a FaceCrafter model conditioned on identity alone differs from its base. ``absent="switched_off"``
switches absent branches off instead (weight 0; only the all-null setup runs them on their null tokens): the
ablation that makes ID-only sampling Arc2Face exactly. A control that is not in ``controls`` (single-module
stages a / b) must have probability 0 in every setup where it is real.

Per sample the draw gives, for each control c: ``mask[c]`` (1 = the control branch runs, 0 = it is switched
off exactly), ``null[c]`` (1 = the control input is zeroed: the learned null tokens), and ``id_null`` (1 = the
identity context is replaced by the empty-prompt context). An ID-only sample is ``id_null = 0, mask[c] = 1,
null[c] = 1``. The AD loss uses ``active[c] = mask[c] * (1 - null[c])`` (:func:`active_controls`).

The condition of one model call is a :class:`ModelCondition` (the identity context and, per control, its
tokens and branch weight). Two builders make it, and every caller uses one of them:

* :func:`draw_condition`: from a per-sample draw (the train step)::

      draw = sample_conditioning(key, batch_size, config)
      cond = draw_condition(model, draw, id_context, empty_context, {"landmark": lmk, "emotion": emo})
      eps = model.predict(x_t, t, cond)

* :func:`setup_conditions`: from named :class:`Setup` s (the samplers' guidance branches and the training
  sample grids), with one tree structure for all of them so they concatenate into one batched call.

An *absent* control (not given in a setup) is either its null tokens (the all-zero raw input through its
encoder, branch on) or switched off (branch weight 0), per :attr:`Setup.absent`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from facecrafter_jax.models.control import null_input

__all__ = [
    "SETUPS",
    "MixedConditioningConfig",
    "ConditioningSample",
    "sample_conditioning",
    "apply_conditioning",
    "active_controls",
    "without_controls",
    "ABSENT_CONTROLS",
    "ModelCondition",
    "Setup",
    "null_input",
    "draw_condition",
    "setup_conditions",
    "controls_run",
]

ABSENT_CONTROLS = ("null_tokens", "switched_off")
"""What a control that a setup does not give does: ``"null_tokens"`` runs its branch on the null tokens (the
all-zero raw input through its encoder), ``"switched_off"`` switches the branch off (weight 0). (Not "null" / "off":
YAML reads those words as None / False in configs and overrides.)"""

# name -> (identity kept, the controls that are real); controls are always ("landmark", "emotion") in this order.
SETUPS: dict[str, tuple[bool, frozenset]] = {
    "id_landmark_emotion": (True, frozenset({"landmark", "emotion"})),
    "id_landmark": (True, frozenset({"landmark"})),
    "id_emotion": (True, frozenset({"emotion"})),
    "id_only": (True, frozenset()),
    "landmark_emotion": (False, frozenset({"landmark", "emotion"})),
    "landmark_only": (False, frozenset({"landmark"})),
    "emotion_only": (False, frozenset({"emotion"})),
    "all_null": (False, frozenset()),
}
_SETUP_NAMES = tuple(SETUPS)
_KNOWN_CONTROLS = ("landmark", "emotion")


@dataclass(frozen=True)
class MixedConditioningConfig:
    """Probability of each setup (they must sum to 1), how absent controls are fed, and the model's controls.

    Defaults (the joint stage): ID + both 25%, ID + one control 20% each, ID-only 22.5%, no identity with
    controls 2.5% each, all-null 5%. :meth:`single` gives the single-module stages' defaults.
    """

    id_landmark_emotion: float = 0.25
    id_landmark: float = 0.2
    id_emotion: float = 0.2
    id_only: float = 0.225
    landmark_emotion: float = 0.025
    landmark_only: float = 0.025
    emotion_only: float = 0.025
    all_null: float = 0.05
    absent: str = "null_tokens"
    controls: tuple[str, ...] = ("landmark", "emotion")

    def __post_init__(self):
        controls = tuple(self.controls)
        unknown = [c for c in controls if c not in _KNOWN_CONTROLS]
        if not controls or unknown or len(set(controls)) != len(controls):
            raise ValueError(f"MixedConditioningConfig.controls must be a non-empty subset of {_KNOWN_CONTROLS}, "
                             f"got {self.controls!r}")
        object.__setattr__(self, "controls", controls)
        if self.absent not in ABSENT_CONTROLS:
            raise ValueError(f"MixedConditioningConfig.absent must be one of {ABSENT_CONTROLS}, got {self.absent!r}")
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
    def single(cls, control: str, *, all_null: float = 0.05, absent: str = "null_tokens") -> "MixedConditioningConfig":
        """Stage a / b: one control. ID + control 45%, ID-only 40% (trains the null tokens), control without
        identity 10%, all-null 5%; with another ``all_null`` the other three keep their proportions."""
        if control not in _KNOWN_CONTROLS:
            raise ValueError(f"unknown control {control!r}; known: {_KNOWN_CONTROLS}")
        if not 0.0 <= all_null < 1.0:
            raise ValueError(f"all_null must be in [0, 1), got {all_null!r}")
        rest = (1.0 - all_null) / 0.95
        kw = {n: 0.0 for n in _SETUP_NAMES}
        kw.update({f"id_{control}": 0.45 * rest, "id_only": 0.4 * rest, f"{control}_only": 0.1 * rest,
                   "all_null": all_null})
        return cls(controls=(control,), absent=absent, **kw)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "MixedConditioningConfig":
        """From a config section. When it gives any setup probability, the setups it leaves out get 0."""
        from facecrafter_jax.config import from_dict  # the one config engine: typed values, unknown keys named

        if any(n in d for n in _SETUP_NAMES):
            d = {**{n: 0.0 for n in _SETUP_NAMES}, **d}
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
    id_on = jnp.asarray([SETUPS[n][0] for n in _SETUP_NAMES], jnp.float32)
    is_null = (setup == _SETUP_NAMES.index("all_null")).astype(jnp.float32)
    masks, nulls = {}, {}
    for c in config.controls:
        real = jnp.asarray([c in SETUPS[n][1] for n in _SETUP_NAMES], jnp.float32)[setup]
        nulls[c] = 1.0 - real
        # null_tokens: every branch runs (null tokens where not real); switched_off: only real ones and the all-null
        # setup's (so the null tokens the unconditional branch uses are still learned)
        masks[c] = jnp.ones_like(real) if config.absent == "null_tokens" else jnp.maximum(real, is_null)
    return ConditioningSample(setup=setup, id_null=1.0 - id_on[setup], masks=masks, nulls=nulls)


def without_controls(sample: ConditioningSample, absent: str = "null_tokens") -> ConditioningSample:
    """Each sample's setup with every control made absent, the identity as it was: ID-only (or all-null where the
    identity is dropped). The pairs of the AD loss's ``across_setups`` reading. ``absent`` as the draw's config."""
    if absent not in ABSENT_CONTROLS:
        raise ValueError(f"absent must be one of {ABSENT_CONTROLS}, got {absent!r}")
    setup = jnp.where(sample.id_null > 0, _SETUP_NAMES.index("all_null"), _SETUP_NAMES.index("id_only"))
    ones = jnp.ones_like(sample.id_null)
    masks = {c: ones if absent == "null_tokens" else sample.id_null for c in sample.masks}
    return ConditioningSample(setup=setup.astype(jnp.int32), id_null=sample.id_null, masks=masks,
                              nulls={c: ones for c in sample.masks})


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


# --------------------------------------------------------------------------------------------
# The condition of one model call, and its two builders
# --------------------------------------------------------------------------------------------
class ModelCondition(NamedTuple):
    """The condition of one FaceCrafter call (a pytree; every leaf has the batch axis first, 1 broadcasts).

    ``context``: the identity context ``[B, S, D]`` (or the empty-prompt context). ``controls``:
    ``{name: (tokens [B, N, D], weight [B])}`` for every control branch the call runs; ``weight`` is the
    per-sample ``mask * scale`` (0 adds exactly nothing). A control not in ``controls`` is not run.
    Consumed by :meth:`facecrafter_jax.models.facecrafter.FaceCrafter.predict`.
    """

    context: jax.Array
    controls: dict


@dataclass(frozen=True)
class Setup:
    """A conditioning setup: identity on (or the empty prompt), the controls given their real input, and what
    the model's other controls do (:data:`ABSENT_CONTROLS`)."""

    identity: bool = True
    controls: tuple[str, ...] = ()
    absent: str = "null_tokens"

    def __post_init__(self):
        object.__setattr__(self, "controls", tuple(self.controls))
        if self.absent not in ABSENT_CONTROLS:
            raise ValueError(f"Setup.absent must be one of {ABSENT_CONTROLS}, got {self.absent!r}")
        unknown = [c for c in self.controls if c not in _KNOWN_CONTROLS]
        if unknown:
            raise ValueError(f"Setup.controls: unknown control(s) {unknown}; known: {list(_KNOWN_CONTROLS)}")


def draw_condition(model, draw: ConditioningSample, id_context: jax.Array, empty_context: jax.Array,
                   inputs: Mapping[str, jax.Array]) -> ModelCondition:
    """A per-sample draw applied to a batch (the train step): :func:`apply_conditioning`, then each control's
    input (null-dropped samples zeroed) through ``model``'s token encoder, weight = the draw's mask."""
    raw = {"landmarks" if c == "landmark" else c: inputs.get(c) for c in ("landmark", "emotion")}
    context, args = apply_conditioning(draw, id_context, empty_context, **raw)
    controls = {}
    for c in draw.masks:
        x = args["landmarks" if c == "landmark" else "emotion"]
        controls[c] = (model.encoder(c)(x), args[f"{c}_mask"])
    return ModelCondition(context=context, controls=controls)


def controls_run(controls, setups) -> tuple[str, ...]:
    """The controls (of ``controls``, in that order) whose branch a batched call of ``setups`` must run: those that
    some setup gives or feeds its null tokens."""
    return tuple(c for c in controls if any(c in s.controls or s.absent == "null_tokens" for s in setups))


def setup_conditions(model, setups, id_context: jax.Array, empty_context: jax.Array, *,
                     inputs: Mapping[str, jax.Array] | None = None,
                     weights: Mapping[str, jax.Array] | None = None) -> list[ModelCondition]:
    """One :class:`ModelCondition` per :class:`Setup`, all with the same tree structure (so they concatenate).

    ``id_context`` ``[B, S, D]``; ``empty_context`` ``[1, S, D]`` (kept at batch 1; the guidance concatenation
    broadcasts it). ``inputs``: the given controls' raw inputs ``[B, ...]``; ``weights``: their branch weights
    (``lambda_c``, scalar or ``[B]``; default 1). The call runs every control that some setup gives or feeds
    its null tokens; a setup that switches such a control off gets its null tokens at weight 0. Tokens are
    encoded once per control (the null tokens at batch 1). ``model`` is a FaceCrafter (``controls``,
    ``encoder(name)``) or, for setups without controls, any denoiser.
    """
    inputs = dict(inputs or {})
    weights = dict(weights or {})
    setups = list(setups)
    if not setups:
        raise ValueError("setup_conditions: no setups")
    have = tuple(getattr(model, "controls", ()) or ())
    for s in setups:
        missing = [c for c in s.controls if c not in inputs]
        if missing:
            raise ValueError(f"setup_conditions: a setup gives control(s) {missing} but no input was passed")
        if [c for c in s.controls if c not in have]:
            raise ValueError(f"setup_conditions: the model has no {[c for c in s.controls if c not in have]} "
                             f"control (controls: {list(have)})")
    run = controls_run(have, setups)
    given, null = {}, {}
    for c in run:
        enc = model.encoder(c)
        null[c] = enc(null_input(c, 1))  # [1, N, D]: the learned null tokens
        if c in inputs and any(c in s.controls for s in setups):
            given[c] = enc(inputs[c])
    out = []
    for s in setups:
        controls = {}
        for c in run:
            if c in s.controls:
                w = jnp.asarray(weights.get(c, 1.0), jnp.float32)
                controls[c] = (given[c], w.reshape(-1) if w.ndim else jnp.full((1,), w))
            else:
                controls[c] = (null[c], jnp.full((1,), 1.0 if s.absent == "null_tokens" else 0.0, jnp.float32))
        out.append(ModelCondition(context=id_context if s.identity else empty_context, controls=controls))
    return out
