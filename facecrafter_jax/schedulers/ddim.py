"""DDIM (Song et al. 2021), step for step like diffusers' ``DDIMScheduler``."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from .base import BaseScheduler, PlanMixin, StepOutput, check_num_steps


def ddim_timesteps(num_inference_steps: int, num_train_timesteps: int, spacing: str, steps_offset: int) -> np.ndarray:
    """diffusers ``DDIMScheduler.set_timesteps`` timesteps (int64, descending)."""
    n, T = num_inference_steps, num_train_timesteps
    if spacing == "linspace":
        return np.linspace(0, T - 1, n).round()[::-1].copy().astype(np.int64)
    if spacing == "leading":
        ratio = T // n
        return (np.arange(0, n) * ratio).round()[::-1].copy().astype(np.int64) + steps_offset
    if spacing == "trailing":
        ratio = T / n
        return np.round(np.arange(T, 0, -ratio)).astype(np.int64) - 1
    raise ValueError(f"scheduler config key 'timestep_spacing' = {spacing!r} is not supported")


@struct.dataclass
class DDIMPlan(PlanMixin):
    """Per-step DDIM coefficients (float32, computed in float64). Build with ``DDIMScheduler.set_timesteps``.

    A step is ``x0 = a*x + b*m``, ``eps = c*x + d*m`` (``m`` the model output), optional clipping of
    ``x0``, then ``x_prev = sqrt(abar_prev) * x0 + sqrt(1 - abar_prev - std^2) * eps + std * z``.
    """

    timesteps: jax.Array  # int32 [N], the t fed to the denoiser
    x0_coef_sample: jax.Array
    x0_coef_output: jax.Array
    eps_coef_sample: jax.Array
    eps_coef_output: jax.Array
    prev_coef_x0: jax.Array
    prev_coef_eps: jax.Array
    noise_std: jax.Array
    num_steps: int = struct.field(pytree_node=False)
    clip_sample_range: float | None = struct.field(pytree_node=False)
    stochastic: bool = struct.field(pytree_node=False)
    init_noise_sigma: float = struct.field(pytree_node=False, default=1.0)

    def step(self, state, model_output: jax.Array, step_index, sample: jax.Array,
             key: jax.Array | None = None) -> StepOutput:
        """One DDIM step from ``timesteps[step_index]`` (pure; ``key`` is needed only when eta > 0)."""
        i = step_index
        x = sample.astype(jnp.float32)
        m = model_output.astype(jnp.float32)
        x0 = self.x0_coef_sample[i] * x + self.x0_coef_output[i] * m
        eps = self.eps_coef_sample[i] * x + self.eps_coef_output[i] * m
        if self.clip_sample_range is not None:
            x0 = jnp.clip(x0, -self.clip_sample_range, self.clip_sample_range)
        prev = self.prev_coef_x0[i] * x0 + self.prev_coef_eps[i] * eps
        if self.stochastic:
            prev = prev + self.noise_std[i] * self._noise(key, x)
        return StepOutput(prev.astype(sample.dtype), x0.astype(sample.dtype), state)


class DDIMScheduler(BaseScheduler):
    """diffusers ``DDIMScheduler`` (defaults and quirks included: the previous timestep is always
    ``t - num_train_timesteps // num_inference_steps``, whatever the spacing)."""

    class_name = "DDIMScheduler"

    def set_timesteps(self, num_inference_steps: int, eta: float = 0.0) -> DDIMPlan:
        """Precompute the plan for ``num_inference_steps`` steps; ``eta > 0`` adds noise (needs a key per step)."""
        cfg = self.config
        T = self.num_train_timesteps
        n = check_num_steps(num_inference_steps, T)
        if not eta >= 0:
            raise ValueError(f"eta must be >= 0, got {eta}")
        ts = ddim_timesteps(n, T, cfg["timestep_spacing"], cfg["steps_offset"])
        if ts.max() >= T or ts.min() < 0:
            raise ValueError(f"timesteps {ts.tolist()} fall outside [0, {T}) (check 'steps_offset')")
        ac = self.alphas_cumprod_f64
        final = 1.0 if cfg["set_alpha_to_one"] else ac[0]
        prev_t = ts - T // n
        a_t = ac[ts]
        a_prev = np.where(prev_t >= 0, ac[np.clip(prev_t, 0, None)], final)
        b_t = 1.0 - a_t
        variance = (1.0 - a_prev) / b_t * (1.0 - a_t / a_prev)
        std = eta * np.sqrt(variance)
        dir_sq = 1.0 - a_prev - std**2
        if np.any(dir_sq < 0):
            raise ValueError(f"eta={eta} is too large: 1 - abar_prev - std^2 < 0")

        pt = cfg["prediction_type"]
        one, zero = np.ones_like(a_t), np.zeros_like(a_t)
        if pt == "epsilon":
            x0s, x0m = 1.0 / np.sqrt(a_t), -np.sqrt(b_t) / np.sqrt(a_t)
            es, em = zero, one
        elif pt == "v_prediction":
            x0s, x0m = np.sqrt(a_t), -np.sqrt(b_t)
            es, em = np.sqrt(b_t), np.sqrt(a_t)
        else:  # sample
            x0s, x0m = zero, one
            es, em = 1.0 / np.sqrt(b_t), -np.sqrt(a_t) / np.sqrt(b_t)

        f32 = lambda v: jnp.asarray(v, dtype=jnp.float32)  # noqa: E731
        return DDIMPlan(
            timesteps=jnp.asarray(ts, dtype=jnp.int32),
            x0_coef_sample=f32(x0s), x0_coef_output=f32(x0m),
            eps_coef_sample=f32(es), eps_coef_output=f32(em),
            prev_coef_x0=f32(np.sqrt(a_prev)), prev_coef_eps=f32(np.sqrt(dir_sq)),
            noise_std=f32(std),
            num_steps=int(ts.shape[0]),
            clip_sample_range=float(cfg["clip_sample_range"]) if cfg["clip_sample"] else None,
            stochastic=bool(eta > 0),
        )
