"""Training losses: the denoising loss and FaceCrafter's attention-disentanglement (AD) loss.

The AD loss reads the exposed maps of :meth:`facecrafter_jax.models.facecrafter.FaceCrafter.forward_with_maps`
(``maps[layer][branch][kind]``, ``branch`` = ``"id"`` or a control name, ``kind`` = ``"probs"`` or ``"out"``)
and the per-sample *active* flags of each control (mask on and not null-dropped; see
:func:`facecrafter_jax.conditioning.active_controls`). Readings, pluggable by name (:data:`AD_LOSSES`):

``orthogonality`` (reading A)
    per layer l, query position q and active sample b: ``cos^2(o_id[b, q], o_c[b, q])`` between the
    identity-branch and control-branch outputs (before ``to_out``; concatenated heads, or per head).
``map_overlap`` (reading B)
    overlap between the spatial map of the identity token(s) and the spatial map of each control token,
    each normalised over the spatial positions (head-averaged); cosine or histogram intersection.
``across_setups`` (reading C)
    the same noisy latent and timestep under two setups of one sample, stacked in one forward: its own setup
    (rows ``[0, B)``) and the same with every control on its null tokens (rows ``[B, 2B)``, ID-only). Per layer
    and query position, with ``h = o_id + sum_c w_c o_c`` the cross-attention output before ``to_out``:
    ``cos^2(h_ref, h_own - h_ref)``: what the controls change must be orthogonal to the ID-only representation.
    Readings that need the paired rows are listed in :data:`PAIRED_READINGS`.

Each reading averages over query positions (and tokens / heads), then over every (layer, control,
active sample) triple (reading C: every (layer, sample with an active control)); samples whose control is off
or null-dropped contribute nothing. With no active sample at all the loss is 0. Equations and rationale:
``docs/method.md``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp

from .tokens import ID_TOKEN_POSITION

__all__ = [
    "diffusion_loss",
    "orthogonality_loss",
    "map_overlap_loss",
    "across_setups_loss",
    "AD_LOSSES",
    "PAIRED_READINGS",
    "ADLossConfig",
    "ad_loss",
]


def diffusion_loss(prediction: jax.Array, target: jax.Array, weights: jax.Array | None = None) -> jax.Array:
    """Mean squared error in float32, optionally with per-sample ``weights`` ``[B]`` (weighted mean over samples)."""
    err = jnp.square(prediction.astype(jnp.float32) - target.astype(jnp.float32))
    per_sample = jnp.mean(err.reshape(err.shape[0], -1), axis=1)
    if weights is None:
        return jnp.mean(per_sample)
    w = jnp.asarray(weights, jnp.float32)
    return jnp.sum(per_sample * w) / jnp.maximum(jnp.sum(w), 1e-12)


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def _select_layers(maps: Mapping[int, Any], layers) -> list[int]:
    if layers is None or layers == "all":
        chosen = sorted(maps)
    else:
        chosen = sorted(set(int(i) for i in layers))
        missing = [i for i in chosen if i not in maps]
        if missing:
            raise ValueError(f"AD loss: layer(s) {missing} have no exposed maps (exposed: {sorted(maps)}); "
                             "make them explicit with unet.configure_attention(explicit_cross_attention=...)")
    if not chosen:
        raise ValueError("AD loss: no exposed attention maps (no explicit cross-attention layer was run)")
    return chosen


def _get(maps, layer, branch, kind):
    try:
        return maps[layer][branch][kind]
    except KeyError:
        what = "branch outputs ('out')" if kind == "out" else "probabilities ('probs')"
        raise ValueError(f"AD loss: layer {layer} has no {what} for branch {branch!r}; run forward_with_maps with "
                         f"that control given and capture containing {kind!r}") from None


def _masked_mean(values: list[jax.Array], weights: list[jax.Array]) -> jax.Array:
    """``sum(w * v) / max(sum(w), 1)`` over every (layer, control, sample); inactive values are ignored (where)."""
    num = jnp.zeros((), jnp.float32)
    den = jnp.zeros((), jnp.float32)
    for v, w in zip(values, weights):
        num = num + jnp.sum(jnp.where(w > 0, v * w, 0.0))
        den = den + jnp.sum(w)
    return num / jnp.maximum(den, 1.0)


def _active(active: Mapping[str, jax.Array], batch: int) -> dict[str, jax.Array]:
    out = {}
    for name, a in active.items():
        a = jnp.asarray(a, jnp.float32)
        if a.shape != (batch,):
            raise ValueError(f"AD loss: active[{name!r}] must be [B={batch}], got shape {a.shape}")
        out[name] = a
    if not out:
        raise ValueError("AD loss: no control given in `active`")
    return out


# --------------------------------------------------------------------------------------------
# Reading A: orthogonality of branch outputs
# --------------------------------------------------------------------------------------------


def orthogonality_loss(maps, active: Mapping[str, jax.Array], *, layers=None, per_head: bool = False,
                       eps: float = 1e-6) -> jax.Array:
    """Mean squared cosine similarity between the ID branch output and each control branch output.

    For layer l, control c, sample b: ``v = mean_q cos^2(o_id[b, q], o_c[b, q])`` with the vectors the
    concatenated heads (``[heads * d]``), or per head and averaged over heads with ``per_head``.
    The loss is the average of v over (l, c, b) with ``active[c][b] > 0``. Orthogonal outputs -> 0,
    parallel -> 1. Computed as ``<x, y>^2 / max(|x|^2 |y|^2, eps^2)`` (no square root), so a zero
    branch output (e.g. a null-dropped input through zero-bias layers) gives 0 with a finite gradient.
    """
    chosen = _select_layers(maps, layers)
    values, weights = [], []
    for layer in chosen:
        o_id = _get(maps, layer, "id", "out").astype(jnp.float32)  # [B, Lq, heads, d]
        act = _active(active, o_id.shape[0])
        for name, a in act.items():
            o_c = _get(maps, layer, name, "out").astype(jnp.float32)
            if not per_head:
                x = o_id.reshape(o_id.shape[0], o_id.shape[1], -1)
                y = o_c.reshape(o_c.shape[0], o_c.shape[1], -1)
            else:
                x, y = o_id, o_c
            dot = jnp.sum(x * y, axis=-1)
            norms2 = jnp.sum(x * x, axis=-1) * jnp.sum(y * y, axis=-1)
            cos2 = jnp.square(dot) / jnp.maximum(norms2, eps * eps)
            v = jnp.mean(cos2.reshape(cos2.shape[0], -1), axis=1)  # [B]
            values.append(v)
            weights.append(a)
    return _masked_mean(values, weights)


# --------------------------------------------------------------------------------------------
# Reading B: overlap of spatial attention maps
# --------------------------------------------------------------------------------------------


def _safe_norm(x: jax.Array, axis: int, eps: float) -> jax.Array:
    """``|x|`` with a finite gradient at 0 (``sqrt(max(|x|^2, eps))``)."""
    return jnp.sqrt(jnp.maximum(jnp.sum(x * x, axis=axis), eps))


def _spatial(probs: jax.Array, eps: float) -> jax.Array:
    """``[B, heads, Lq, K] -> [B, Lq, K]``: head-average, then normalise each key's map over the Lq positions."""
    m = jnp.mean(probs.astype(jnp.float32), axis=1)
    return m / jnp.maximum(jnp.sum(m, axis=1, keepdims=True), eps)


def map_overlap_loss(maps, active: Mapping[str, jax.Array], *, layers=None,
                     id_token_positions: Sequence[int] = (ID_TOKEN_POSITION,), overlap: str = "cosine",
                     eps: float = 1e-12) -> jax.Array:
    """Overlap between the identity token's spatial attention map and each control token's map.

    Each branch's softmax runs over its own keys, so a control's probabilities always sum to 1 over its
    tokens; the comparison is therefore between *spatial* distributions: for a key k, its map is
    ``A[:, k]`` (head-averaged) normalised over the query positions. The ID map is the mean over
    ``id_token_positions`` (default: the ``id`` token, position 4, which carries the ArcFace vector).
    ``overlap="cosine"``: ``<p, r> / (|p| |r|)``; ``"min"``: ``sum_q min(p_q, r_q)`` (histogram
    intersection). Both are 0 for disjoint maps and 1 for identical ones. Averaged over the control's
    tokens, then over (layer, control, active sample).
    """
    if overlap not in ("cosine", "min"):
        raise ValueError(f"map_overlap: overlap must be 'cosine' or 'min', got {overlap!r}")
    positions = tuple(int(p) for p in id_token_positions)
    if not positions:
        raise ValueError("map_overlap: id_token_positions is empty")
    chosen = _select_layers(maps, layers)
    values, weights = [], []
    for layer in chosen:
        p_id = _get(maps, layer, "id", "probs")  # [B, heads, Lq, S]
        bad = [p for p in positions if not 0 <= p < p_id.shape[-1]]
        if bad:
            raise ValueError(f"map_overlap: id_token_positions {bad} outside the {p_id.shape[-1]} context tokens")
        act = _active(active, p_id.shape[0])
        id_map = jnp.mean(_spatial(p_id, eps)[:, :, list(positions)], axis=-1)  # [B, Lq]
        id_map = id_map / jnp.maximum(jnp.sum(id_map, axis=1, keepdims=True), eps)
        for name, a in act.items():
            c_map = _spatial(_get(maps, layer, name, "probs"), eps)  # [B, Lq, N]
            if overlap == "cosine":
                num = jnp.einsum("bq,bqn->bn", id_map, c_map)
                per_token = num / (_safe_norm(id_map, 1, eps)[:, None] * _safe_norm(c_map, 1, eps))
            else:
                per_token = jnp.sum(jnp.minimum(id_map[:, :, None], c_map), axis=1)
            values.append(jnp.mean(per_token, axis=1))
            weights.append(a)
    return _masked_mean(values, weights)


# --------------------------------------------------------------------------------------------
# Reading C: the controls' change across setups, orthogonal to the ID-only representation
# --------------------------------------------------------------------------------------------


def across_setups_loss(maps, active: Mapping[str, jax.Array], *, weights: Mapping[str, jax.Array], layers=None,
                       eps: float = 1e-6) -> jax.Array:
    """Squared cosine between the ID-only representation and the change the sample's controls make to it.

    ``maps`` come from one forward of ``2B`` rows: rows ``[0, B)`` the samples under their own setups, rows
    ``[B, 2B)`` the same (noisy latent, timestep, identity context) with every control on its null tokens.
    ``weights[c]`` ``[2B]`` are the branch weights of those rows (``mask * scale``), ``active[c]`` ``[B]`` the
    samples whose control ``c`` is real. For layer l, query position q and sample b::

        h = o_id + sum_c w_c o_c                      (the layer's attention output before to_out, heads concatenated)
        v_b = mean_q cos^2(h_ref[b, q], h_own[b, q] - h_ref[b, q])       h_own = h[b], h_ref = h[B + b]

    averaged over (l, b) for the samples with any active control. 0 when the controls' change is orthogonal to
    the ID-only representation (or zero), 1 when it only rescales it. Computed as ``<x, y>^2 / max(|x|^2 |y|^2,
    eps^2)``, so a zero change gives 0 with a finite gradient.
    """
    chosen = _select_layers(maps, layers)
    values, wts = [], []
    for layer in chosen:
        o_id = _get(maps, layer, "id", "out").astype(jnp.float32)  # [2B, Lq, heads, d]
        rows = o_id.shape[0]
        if rows % 2:
            raise ValueError(f"across_setups: the maps need 2B rows (own setups, then their ID-only pairs), got {rows}")
        b = rows // 2
        act = _active(active, b)
        h = o_id
        for name, w in weights.items():
            w = jnp.asarray(w, jnp.float32)
            if w.shape != (rows,):
                raise ValueError(f"across_setups: weights[{name!r}] must be [2B={rows}], got shape {w.shape}")
            h = h + w[:, None, None, None] * _get(maps, layer, name, "out").astype(jnp.float32)
        h = h.reshape(rows, h.shape[1], -1)
        ref = h[b:]
        change = h[:b] - ref
        dot = jnp.sum(ref * change, axis=-1)
        norms2 = jnp.sum(ref * ref, axis=-1) * jnp.sum(change * change, axis=-1)
        cos2 = jnp.square(dot) / jnp.maximum(norms2, eps * eps)
        values.append(jnp.mean(cos2, axis=1))  # [B]
        wts.append(jnp.max(jnp.stack(list(act.values())), axis=0))
    return _masked_mean(values, wts)


AD_LOSSES: dict[str, Callable[..., jax.Array]] = {
    "orthogonality": orthogonality_loss,
    "map_overlap": map_overlap_loss,
    "across_setups": across_setups_loss,
}

PAIRED_READINGS = frozenset({"across_setups"})
"""Readings whose maps come from the paired forward (own setups + their ID-only pairs, ``2B`` rows) and that take
the rows' branch ``weights``."""


@dataclass(frozen=True)
class ADLossConfig:
    """Which AD-loss reading, its weight, the layers it reads and reading-specific options.

    ``layers``: ``"all"`` (every exposed layer) or cross-attention indices; the same list should be
    given to ``unet.configure_attention(explicit_cross_attention=...)`` (see :meth:`explicit_layers`).
    ``options``: keyword arguments of the reading (e.g. ``{"per_head": True}``, ``{"overlap": "min"}``).
    """

    kind: str = "orthogonality"
    weight: float = 0.05
    layers: str | tuple[int, ...] = "all"
    options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if self.kind not in AD_LOSSES:
            raise ValueError(f"unknown AD loss {self.kind!r}; choose from {sorted(AD_LOSSES)}")
        if isinstance(self.layers, str):
            if self.layers != "all":
                raise ValueError(f"ADLossConfig.layers must be 'all' or a list of layer indices, got {self.layers!r}")
        else:
            layers = tuple(self.layers)
            if not layers or any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in layers):
                raise ValueError(f"ADLossConfig.layers must be 'all' or non-negative ints, got {self.layers!r}")
            object.__setattr__(self, "layers", layers)
        if not float(self.weight) >= 0:
            raise ValueError(f"ADLossConfig.weight must be >= 0, got {self.weight!r}")
        import inspect

        allowed = set(inspect.signature(AD_LOSSES[self.kind]).parameters) - {"maps", "active", "layers", "weights"}
        unknown = sorted(set(self.options) - allowed)
        if unknown:
            raise ValueError(f"ADLossConfig.options: unknown option(s) {unknown} for {self.kind!r} (allowed: {sorted(allowed)})")

    def explicit_layers(self):
        """The value for ``configure_attention(explicit_cross_attention=...)``."""
        return "all" if self.layers == "all" else list(self.layers)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ADLossConfig":
        from facecrafter_jax.config import from_dict  # the one config engine: typed values, unknown keys named

        return from_dict(cls, d, what="AD loss")


def ad_loss(config: ADLossConfig, maps, active: Mapping[str, jax.Array], *,
            weights: Mapping[str, jax.Array] | None = None) -> jax.Array:
    """``config.weight * AD_LOSSES[config.kind](maps, active, layers=config.layers, **config.options)``; the paired
    readings (:data:`PAIRED_READINGS`) also get the rows' branch ``weights``."""
    fn = AD_LOSSES[config.kind]
    extra = dict(config.options)
    if config.kind in PAIRED_READINGS:
        if weights is None:
            raise ValueError(f"AD loss {config.kind!r} needs the branch weights of the paired rows")
        extra["weights"] = weights
    return jnp.float32(config.weight) * fn(maps, active, layers=config.layers, **extra)
