"""The generic sampling pieces: seeded noise, the guidance chain in one model call, the whole loop in one scan.

Pure functions, usable inside any ``jit``. The denoiser is any ``model_fn(latents [B, h, w, C], t, cond) -> eps``
where ``cond`` is a **pytree** (the context array for Arc2Face; a
:class:`~facecrafter_jax.conditioning.ModelCondition` for FaceCrafter).

Guidance chain
--------------
Given conditions ``c_0`` (unconditional), ``c_1``, ..., ``c_K`` and scales ``g_1 .. g_K``::

    eps = e_0 + sum_k g_k * (e_k - e_{k-1}),        e_k = model_fn(x, t, c_k)

With ``K = 1`` this is standard CFG (``e_0 + g (e_1 - e_0)``, Arc2Face uses g = 3). With
``c_0 = uncond, c_1 = identity, c_2 = identity + controls`` the identity and the controls get separate
scales (:func:`guidance_branches`). All ``K + 1`` conditions are evaluated in **one** model call: the latents
are tiled and every leaf of the condition pytrees is concatenated along the batch axis (order ``c_0, c_1, ...``,
as diffusers puts ``[uncond, cond]``).

Seeds
-----
:func:`initial_noise`: image ``i`` starts from
``jax.random.normal(jax.random.fold_in(jax.random.key(seed), i), (h, w, C), float32)``, so the same seed
gives the same images and image ``i`` does not depend on the batch size or on how a long run is split
into batches (``first_index``). The values are stable for a given JAX version and PRNG configuration
(default ``threefry2x32``; ``samples.json`` of the CLI records the JAX version).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from facecrafter_jax import schedulers as S

__all__ = ["SCHEDULERS", "combine_guidance", "concat_conditions", "guidance_branches", "guided_denoiser",
           "initial_noise", "make_plan", "sample_latents", "to_uint8"]

SCHEDULERS: dict[str, type] = {
    "dpm++2m": S.DPMSolverMultistepScheduler,
    "ddim": S.DDIMScheduler,
    "euler": S.EulerDiscreteScheduler,
}
"""Sampler names accepted by the pipeline and the CLI (built from the scheduler config, SD1.5's by default)."""


def initial_noise(seed: int | jax.Array, num: int, shape: Sequence[int], *, first_index: int = 0,
                  dtype=jnp.float32) -> jax.Array:
    """Standard-normal starting latents ``[num, *shape]`` (NHWC), one independent stream per image.

    Image ``j`` of the result is ``normal(fold_in(key(seed), first_index + j), shape)``: it depends only on
    ``seed`` and its global index, not on ``num`` (so batching a long run changes nothing).
    ``seed`` is a Python int (or a PRNG key from ``jax.random.key``).
    """
    if num < 0:
        raise ValueError(f"num must be >= 0, got {num}")
    key = jax.random.key(seed) if not _is_key(seed) else seed
    idx = jnp.arange(first_index, first_index + num, dtype=jnp.uint32)
    keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(idx)
    return jax.vmap(lambda k: jax.random.normal(k, tuple(shape), jnp.float32))(keys).astype(dtype)


def _is_key(x) -> bool:
    return isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jax.dtypes.prng_key)


def concat_conditions(conds: Sequence[Any], batch: int) -> Any:
    """Concatenate condition pytrees along axis 0 (order kept) -> one pytree with ``len(conds) * batch`` rows.

    Every condition must have the same tree structure. A leaf whose leading size is 1 is broadcast to
    ``batch`` first (e.g. the empty-prompt context ``[1, 77, D]``); any other leading size than 1 or
    ``batch`` is an error naming the leaf.
    """
    if not conds:
        raise ValueError("need at least one condition")
    structs = [jax.tree.structure(c) for c in conds]
    for k, s in enumerate(structs[1:], 1):
        if s != structs[0]:
            raise ValueError(f"condition {k} has tree structure {s}, condition 0 has {structs[0]}")

    def fit(path, leaf):
        leaf = jnp.asarray(leaf)
        if leaf.ndim == 0:
            raise ValueError(f"condition leaf {jax.tree_util.keystr(path)} is a scalar; it needs a batch axis")
        if leaf.shape[0] == batch:
            return leaf
        if leaf.shape[0] == 1:
            return jnp.broadcast_to(leaf, (batch,) + leaf.shape[1:])
        raise ValueError(f"condition leaf {jax.tree_util.keystr(path)} has batch {leaf.shape[0]}, expected {batch} or 1")

    fitted = [jax.tree_util.tree_map_with_path(fit, c) for c in conds]
    return jax.tree.map(lambda *xs: jnp.concatenate(xs, axis=0), *fitted)


def combine_guidance(eps: Sequence[jax.Array], scales: Sequence[float] | jax.Array) -> jax.Array:
    """``e_0 + sum_k g_k (e_k - e_{k-1})`` in float32 (``len(scales) == len(eps) - 1``)."""
    eps = [jnp.asarray(e, jnp.float32) for e in eps]
    if len(scales) != len(eps) - 1:
        raise ValueError(f"{len(eps)} conditions need {len(eps) - 1} guidance scales, got {len(scales)}")
    out = eps[0]
    for k in range(1, len(eps)):
        out = out + jnp.asarray(scales[k - 1], jnp.float32) * (eps[k] - eps[k - 1])
    return out


def guided_denoiser(model_fn: Callable[[jax.Array, jax.Array, Any], jax.Array], conds: Sequence[Any],
                    scales: Sequence[float] | jax.Array) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """Wrap ``model_fn(x, t, cond)`` into ``denoise(x, t)`` applying the guidance chain in one model call.

    ``conds = [c_0, ..., c_K]`` (pytrees with batch axis 0, see :func:`concat_conditions`), ``scales`` has
    ``K`` entries (Python floats or a traced ``[K]`` array, so changing them does not recompile). With a
    single condition the model runs once on it, unguided.
    """
    n = len(conds)
    if len(scales) != n - 1:
        raise ValueError(f"{n} conditions need {n - 1} guidance scales, got {len(scales)}")

    def denoise(x: jax.Array, t: jax.Array) -> jax.Array:
        batch = x.shape[0]
        cond = concat_conditions(conds, batch)
        xx = jnp.concatenate([x] * n, axis=0) if n > 1 else x
        out = model_fn(xx, t, cond)
        if n == 1:
            return out
        return combine_guidance(jnp.split(out, n, axis=0), scales)

    return denoise


def sample_latents(model_fn: Callable[[jax.Array, jax.Array, Any], jax.Array], plan, noise: jax.Array,
                   conds: Sequence[Any], scales: Sequence[float] | jax.Array = (), *,
                   key: jax.Array | None = None, return_intermediates: bool = False):
    """Run the whole guided sampling chain (one ``lax.scan``); jittable.

    Args:
        model_fn: ``model_fn(latents, t, cond) -> model output`` (NHWC), ``t`` a scalar timestep.
        plan: a scheduler plan (``scheduler.set_timesteps(n)``); see :func:`make_plan`.
        noise: starting latents, standard normal ``[B, h, w, C]`` (scaled by ``plan.init_noise_sigma``
            here, like diffusers scales its ``latents=`` argument).
        conds, scales: the guidance chain (see the module docstring and :func:`guided_denoiser`).
        key: PRNG key for stochastic plans only (DDIM eta > 0, sde-dpmsolver++).
        return_intermediates: also return the latents after every step ``[num_steps, B, h, w, C]``.

    Returns:
        The final latents ``[B, h, w, C]`` in the dtype of ``noise`` (scaled latents, what ``vae.decode`` takes).
    """
    return S.sample_loop(plan, guided_denoiser(model_fn, conds, scales), noise, key=key,
                         return_intermediates=return_intermediates)


@functools.lru_cache(maxsize=64)
def _plan_cached(name: str, config_items: tuple, num_steps: int):
    return SCHEDULERS[name].from_config(dict(config_items)).set_timesteps(num_steps)


def _freeze(v):
    if isinstance(v, (list, tuple)):
        return tuple(_freeze(x) for x in v)
    if isinstance(v, dict):
        return tuple(sorted((k, _freeze(x)) for k, x in v.items()))
    return v


def make_plan(scheduler: str | S.DDIMScheduler | S.DPMSolverMultistepScheduler | S.EulerDiscreteScheduler,
              num_steps: int, config: dict | None = None):
    """A sampling plan: ``scheduler`` is a name from :data:`SCHEDULERS` (built from ``config``, default
    SD1.5's scheduler config) or a scheduler instance."""
    if isinstance(scheduler, str):
        if scheduler not in SCHEDULERS:
            raise ValueError(f"unknown scheduler {scheduler!r}; choose one of {sorted(SCHEDULERS)}")
        cfg = S.SD15_SCHEDULER_CONFIG if config is None else config
        try:
            return _plan_cached(scheduler, tuple(sorted((k, _freeze(v)) for k, v in cfg.items())), int(num_steps))
        except TypeError:  # unhashable values: build directly
            return SCHEDULERS[scheduler].from_config(cfg).set_timesteps(num_steps)
    if config is not None:
        raise ValueError("pass either a scheduler instance or a config, not both")
    return scheduler.set_timesteps(num_steps)


def to_uint8(images: jax.Array | np.ndarray) -> np.ndarray:
    """Images in [0, 1] -> uint8 ``round(x * 255)`` (diffusers' ``numpy_to_pil``)."""
    x = np.clip(np.asarray(images, np.float32), 0.0, 1.0)
    return (x * 255.0).round().astype(np.uint8)


def guidance_branches(guidance_id: float, guidance_control: float, has_controls: bool) -> tuple[tuple[int, ...], list[float]]:
    """Which of the branches ``0 = null, 1 = id, 2 = id + controls`` the chain
    ``e0 + g_id (e1 - e0) + g_ctl (e2 - e1)`` needs, and the chain scales over the kept branches.

    A branch whose coefficient is exactly 0 is dropped (algebraically the same result, less UNet work):
    ``g_id == 1`` drops e0, ``g_ctl == 0`` (or no controls) drops e2, ``g_id == g_ctl`` drops e1
    (``e0 + g (e2 - e0)``, standard CFG on the full condition).
    """
    g1, g2 = float(guidance_id), float(guidance_control)
    need2 = has_controls and g2 != 0.0
    coef = {0: 1.0 - g1, 1: (g1 - g2) if need2 else g1, 2: g2 if need2 else 0.0}
    branches = tuple(k for k in (0, 1, 2) if coef[k] != 0.0)
    if not branches:  # e.g. g_id = 0 and no controls: eps = e0
        branches = (0,)
    scales = [g1 if k == 1 else g2 for k in branches[1:]]
    return branches, scales
