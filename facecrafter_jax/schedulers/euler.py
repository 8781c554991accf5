"""Euler (Karras et al. 2022, Algorithm 2 without churn), step for step like diffusers'
``EulerDiscreteScheduler`` with its default ``s_churn = 0``.

Works in sigma space: the initial noise is scaled by ``init_noise_sigma`` and the denoiser input by
``1 / sqrt(sigma^2 + 1)`` (``scale_model_input``). Timesteps are floats (fractional for 'linspace').
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from .base import BaseScheduler, PlanMixin, StepOutput, check_num_steps


def euler_timesteps(num_inference_steps: int, num_train_timesteps: int, spacing: str, steps_offset: int) -> np.ndarray:
    """diffusers ``EulerDiscreteScheduler.set_timesteps`` timesteps (float32, descending)."""
    n, T = num_inference_steps, num_train_timesteps
    if spacing == "linspace":
        return np.linspace(0, T - 1, n, dtype=np.float32)[::-1].copy()
    if spacing == "leading":
        ratio = T // n
        ts = (np.arange(0, n) * ratio).round()[::-1].copy().astype(np.float32)
        return ts + np.float32(steps_offset)
    if spacing == "trailing":
        ratio = T / n
        return np.arange(T, 0, -ratio).round().copy().astype(np.float32) - np.float32(1)
    raise ValueError(f"scheduler config key 'timestep_spacing' = {spacing!r} is not supported")


@struct.dataclass
class EulerPlan(PlanMixin):
    """Per-step Euler coefficients (float32, computed in float64). Build with ``EulerDiscreteScheduler.set_timesteps``.

    A step is ``x0 = a*x + b*m`` then ``x_prev = x + (x - x0) * (sigma_{i+1} - sigma_i) / sigma_i``.
    """

    timesteps: jax.Array  # float32 [N]
    sigmas: jax.Array  # float32 [N+1]
    input_scale: jax.Array  # 1 / sqrt(sigma^2 + 1)
    x0_coef_sample: jax.Array
    x0_coef_output: jax.Array
    deriv_coef: jax.Array  # (sigma_{i+1} - sigma_i) / sigma_i
    num_steps: int = struct.field(pytree_node=False)
    init_noise_sigma: float = struct.field(pytree_node=False)
    stochastic: bool = struct.field(pytree_node=False, default=False)

    def scale_model_input(self, sample: jax.Array, step_index) -> jax.Array:
        """Divide the denoiser input by sqrt(sigma_i^2 + 1) (diffusers ``scale_model_input``)."""
        return (sample.astype(jnp.float32) * self.input_scale[step_index]).astype(sample.dtype)

    def step(self, state, model_output: jax.Array, step_index, sample: jax.Array,
             key: jax.Array | None = None) -> StepOutput:
        """One Euler step from ``sigmas[step_index]`` to ``sigmas[step_index + 1]`` (pure, deterministic)."""
        del key
        i = step_index
        x = sample.astype(jnp.float32)
        m = model_output.astype(jnp.float32)
        x0 = self.x0_coef_sample[i] * x + self.x0_coef_output[i] * m
        prev = x + (x - x0) * self.deriv_coef[i]
        return StepOutput(prev.astype(sample.dtype), x0.astype(sample.dtype), state)


class EulerDiscreteScheduler(BaseScheduler):
    """diffusers ``EulerDiscreteScheduler`` (linear sigma interpolation, no churn)."""

    class_name = "EulerDiscreteScheduler"

    def set_timesteps(self, num_inference_steps: int) -> EulerPlan:
        """Precompute timesteps, sigmas and step coefficients for ``num_inference_steps`` steps."""
        cfg = self.config
        T = self.num_train_timesteps
        n = check_num_steps(num_inference_steps, T)
        ts = euler_timesteps(n, T, cfg["timestep_spacing"], cfg["steps_offset"])
        if ts.max() > T - 1 or ts.min() < 0:
            raise ValueError(f"timesteps {ts.tolist()} fall outside [0, {T - 1}] (check 'steps_offset')")
        n = int(ts.shape[0])
        train_sigmas = self.train_sigmas_f64()
        sig = np.interp(ts.astype(np.float64), np.arange(T), train_sigmas)
        last = train_sigmas[0] if cfg["final_sigmas_type"] == "sigma_min" else 0.0
        sig = np.concatenate([sig, [last]])
        s = sig[:-1]
        pt = cfg["prediction_type"]
        if pt == "epsilon":
            x0s, x0m = np.ones_like(s), -s
        elif pt == "v_prediction":
            x0s, x0m = 1.0 / (s**2 + 1.0), -s / np.sqrt(s**2 + 1.0)
        else:  # sample
            x0s, x0m = np.zeros_like(s), np.ones_like(s)
        max_sigma = float(sig.max())
        init = max_sigma if cfg["timestep_spacing"] in ("linspace", "trailing") else float(np.sqrt(max_sigma**2 + 1))

        f32 = lambda v: jnp.asarray(v, dtype=jnp.float32)  # noqa: E731
        return EulerPlan(
            timesteps=f32(ts),
            sigmas=f32(sig),
            input_scale=f32(1.0 / np.sqrt(s**2 + 1.0)),
            x0_coef_sample=f32(x0s), x0_coef_output=f32(x0m),
            deriv_coef=f32((sig[1:] - s) / s),
            num_steps=n,
            init_noise_sigma=init,
        )
