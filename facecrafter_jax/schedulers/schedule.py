"""The training noise schedule (betas -> alphas_cumprod) and the pure training-side functions.

``NoiseSchedule`` is a pytree (its arrays are leaves, its config is static), so it can be passed into a
jitted train step. Everything is derived in NumPy float64 from the config and stored as float32.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from .config import SCHEDULE_KEYS, resolve_config


def betas_for_alpha_bar(num_diffusion_timesteps: int, max_beta: float = 0.999) -> np.ndarray:
    """Betas of the cosine ("squaredcos_cap_v2") schedule, float64 (diffusers' ``betas_for_alpha_bar``)."""

    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = [
        min(1 - alpha_bar((i + 1) / num_diffusion_timesteps) / alpha_bar(i / num_diffusion_timesteps), max_beta)
        for i in range(num_diffusion_timesteps)
    ]
    return np.asarray(betas, dtype=np.float64)


def make_betas(config: Mapping[str, Any]) -> np.ndarray:
    """Float64 betas for a resolved config (``beta_schedule`` / ``trained_betas``)."""
    n = int(config["num_train_timesteps"])
    if config.get("trained_betas") is not None:
        return np.asarray(config["trained_betas"], dtype=np.float64)
    schedule = config["beta_schedule"]
    if schedule == "linear":
        return np.linspace(config["beta_start"], config["beta_end"], n, dtype=np.float64)
    if schedule == "scaled_linear":
        return np.linspace(config["beta_start"] ** 0.5, config["beta_end"] ** 0.5, n, dtype=np.float64) ** 2
    if schedule == "squaredcos_cap_v2":
        return betas_for_alpha_bar(n)
    raise ValueError(f"scheduler config key 'beta_schedule' = {schedule!r} is not supported")


def alphas_cumprod_f64(config: Mapping[str, Any]) -> np.ndarray:
    """Float64 cumulative product of (1 - beta) for a resolved config."""
    return np.cumprod(1.0 - make_betas(config))


@struct.dataclass
class NoiseSchedule:
    """The forward (noising) process q(x_t | x_0) of a DDPM-family model.

    Attributes:
        alphas_cumprod: ``[num_train_timesteps]`` float32, \\bar{alpha}_t.
        sqrt_alphas_cumprod: ``[T]`` float32, sqrt(\\bar{alpha}_t) (computed in float64).
        sqrt_one_minus_alphas_cumprod: ``[T]`` float32, sqrt(1 - \\bar{alpha}_t) (computed in float64).
        num_train_timesteps: static.
        prediction_type: static, ``"epsilon"``, ``"v_prediction"`` or ``"sample"``.
    """

    alphas_cumprod: jax.Array
    sqrt_alphas_cumprod: jax.Array
    sqrt_one_minus_alphas_cumprod: jax.Array
    num_train_timesteps: int = struct.field(pytree_node=False)
    prediction_type: str = struct.field(pytree_node=False)

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | str | os.PathLike, **overrides: Any) -> NoiseSchedule:
        """Build from a diffusers scheduler config dict or ``scheduler_config.json`` path.

        Only the schedule keys matter (``num_train_timesteps``, ``beta_*``, ``trained_betas``,
        ``prediction_type``); other diffusers scheduler keys are accepted and ignored, unknown keys
        raise ``ValueError``. Absent keys take diffusers' ``DDPMScheduler`` defaults (the class
        diffusers' training scripts use). ``overrides`` replace config entries (e.g.
        ``prediction_type="v_prediction"``).
        """
        from .config import read_config_file

        if isinstance(config, (str, os.PathLike)):
            config = read_config_file(config)
        cfg = resolve_config({**dict(config), **overrides}, "DDPMScheduler", keys=SCHEDULE_KEYS)
        return cls.from_alphas_cumprod(alphas_cumprod_f64(cfg), cfg["prediction_type"])

    @classmethod
    def from_alphas_cumprod(cls, alphas_cumprod: np.ndarray, prediction_type: str = "epsilon") -> NoiseSchedule:
        """Build from a float64 \\bar{alpha} table (used by the samplers, which share the schedule)."""
        ac = np.asarray(alphas_cumprod, dtype=np.float64)
        return cls(
            alphas_cumprod=jnp.asarray(ac, dtype=jnp.float32),
            sqrt_alphas_cumprod=jnp.asarray(np.sqrt(ac), dtype=jnp.float32),
            sqrt_one_minus_alphas_cumprod=jnp.asarray(np.sqrt(1.0 - ac), dtype=jnp.float32),
            num_train_timesteps=int(ac.shape[0]),
            prediction_type=prediction_type,
        )


def _gather(table: jax.Array, t: jax.Array, ndim: int) -> jax.Array:
    """table[t] reshaped to broadcast against a ``[B, ...]`` tensor of rank ``ndim`` (t is [B] or scalar)."""
    t = jnp.asarray(t)
    if jnp.issubdtype(t.dtype, jnp.floating):
        raise TypeError(f"timesteps must be integers for the training schedule, got dtype {t.dtype}")
    v = table[t]
    if v.ndim == 0:
        return v
    v = v.reshape(-1)
    return v.reshape(v.shape + (1,) * (ndim - 1))


def add_noise(schedule: NoiseSchedule, x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
    """x_t = sqrt(abar_t) * x0 + sqrt(1 - abar_t) * noise (diffusers ``DDPMScheduler.add_noise``).

    ``t`` is an integer array ``[B]`` (one timestep per sample) or a scalar. Computed in float32 and
    returned in ``x0.dtype``.
    """
    a = _gather(schedule.sqrt_alphas_cumprod, t, x0.ndim)
    s = _gather(schedule.sqrt_one_minus_alphas_cumprod, t, x0.ndim)
    out = a * x0.astype(jnp.float32) + s * noise.astype(jnp.float32)
    return out.astype(x0.dtype)


def get_velocity(schedule: NoiseSchedule, x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
    """v = sqrt(abar_t) * noise - sqrt(1 - abar_t) * x0 (diffusers ``get_velocity``; x0 is its ``sample``)."""
    a = _gather(schedule.sqrt_alphas_cumprod, t, x0.ndim)
    s = _gather(schedule.sqrt_one_minus_alphas_cumprod, t, x0.ndim)
    out = a * noise.astype(jnp.float32) - s * x0.astype(jnp.float32)
    return out.astype(x0.dtype)


def training_target(schedule: NoiseSchedule, x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
    """The regression target of the denoiser for ``schedule.prediction_type``.

    ``epsilon`` -> noise, ``v_prediction`` -> velocity, ``sample`` -> x0.
    """
    if schedule.prediction_type == "epsilon":
        return noise
    if schedule.prediction_type == "v_prediction":
        return get_velocity(schedule, x0, noise, t)
    if schedule.prediction_type == "sample":
        return x0
    raise ValueError(f"unknown prediction_type {schedule.prediction_type!r}")


def snr(schedule: NoiseSchedule, t: jax.Array) -> jax.Array:
    """Signal-to-noise ratio abar_t / (1 - abar_t) at integer timesteps ``t`` (float32, shape of ``t``)."""
    t = jnp.asarray(t)
    return (schedule.sqrt_alphas_cumprod[t] / schedule.sqrt_one_minus_alphas_cumprod[t]) ** 2


def min_snr_weight(schedule: NoiseSchedule, t: jax.Array, gamma: float = 5.0) -> jax.Array:
    """Min-SNR-gamma loss weight per timestep (Hang et al. 2023), as diffusers' training scripts use it.

    For an MSE on the model output: ``min(snr, gamma) / snr`` for epsilon prediction,
    ``min(snr, gamma) / (snr + 1)`` for v-prediction, ``min(snr, gamma)`` for sample prediction.
    """
    s = snr(schedule, t)
    clipped = jnp.minimum(s, gamma)
    if schedule.prediction_type == "epsilon":
        return clipped / s
    if schedule.prediction_type == "v_prediction":
        return clipped / (s + 1.0)
    if schedule.prediction_type == "sample":
        return clipped
    raise ValueError(f"unknown prediction_type {schedule.prediction_type!r}")
