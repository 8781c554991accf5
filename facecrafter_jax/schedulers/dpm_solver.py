"""DPM-Solver++ multistep (Lu et al. 2022), step for step like diffusers' ``DPMSolverMultistepScheduler``.

Implemented: ``algorithm_type`` 'dpmsolver++' (and its SDE variant 'sde-dpmsolver++', which needs a
key), ``solver_order`` 1 or 2, ``solver_type`` 'midpoint' or 'heun', ``lower_order_final``,
``euler_at_final``, ``final_sigmas_type`` 'zero' / 'sigma_min', the three timestep spacings, with
the default (non-Karras) sigmas interpolated linearly in t.

For dpmsolver++ both the first- and the second-order update have the form

    x_prev = A_i * x + B_i * D0 + C_i * (D0 - D0_prev),     D0 = x0 prediction at step i

(C_i = 0 for a first-order step), so the plan stores A, B, C per step and the carried state holds the
previous x0 prediction and whether there is one (diffusers' ``lower_order_nums``).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from .base import BaseScheduler, PlanMixin, StepOutput, check_num_steps


def dpm_timesteps(num_inference_steps: int, num_train_timesteps: int, spacing: str, steps_offset: int) -> np.ndarray:
    """diffusers ``DPMSolverMultistepScheduler.set_timesteps`` timesteps (int64, descending),
    for ``lambda_min_clipped = -inf`` (so the last usable timestep is ``num_train_timesteps``)."""
    n, T = num_inference_steps, num_train_timesteps
    last = T
    if spacing == "linspace":
        return np.linspace(0, last - 1, n + 1).round()[::-1][:-1].copy().astype(np.int64)
    if spacing == "leading":
        ratio = last // (n + 1)
        return (np.arange(0, n + 1) * ratio).round()[::-1][:-1].copy().astype(np.int64) + steps_offset
    if spacing == "trailing":
        ratio = T / n
        return np.arange(last, 0, -ratio).round().copy().astype(np.int64) - 1
    raise ValueError(f"scheduler config key 'timestep_spacing' = {spacing!r} is not supported")


class DPMState(NamedTuple):
    """Carried DPM-Solver state: the previous step's x0 prediction and whether it exists."""

    prev_x0: jax.Array
    has_prev: jax.Array


@struct.dataclass
class DPMSolverPlan(PlanMixin):
    """Per-step DPM-Solver++ coefficients (float32, computed in float64).

    Build with ``DPMSolverMultistepScheduler.set_timesteps``; ``sigmas`` has ``num_steps + 1`` entries
    (the last is the final sigma, 0 for ``final_sigmas_type='zero'``).
    """

    timesteps: jax.Array  # int32 [N]
    sigmas: jax.Array  # float32 [N+1]
    x0_coef_sample: jax.Array
    x0_coef_output: jax.Array
    coef_sample: jax.Array  # A
    coef_x0: jax.Array  # B
    coef_d1: jax.Array  # C (second-order correction; 0 where unused)
    first_order: jax.Array  # bool [N]: this step is forced first order
    noise_std: jax.Array  # SDE variant only
    num_steps: int = struct.field(pytree_node=False)
    stochastic: bool = struct.field(pytree_node=False)
    init_noise_sigma: float = struct.field(pytree_node=False, default=1.0)

    def init_state(self, sample: jax.Array) -> DPMState:
        """No previous x0 prediction yet: the first step is first order (as in diffusers)."""
        return DPMState(jnp.zeros(sample.shape, jnp.float32), jnp.zeros((), jnp.bool_))

    def step(self, state: DPMState, model_output: jax.Array, step_index, sample: jax.Array,
             key: jax.Array | None = None) -> StepOutput:
        """One multistep update from ``timesteps[step_index]`` (pure; ``key`` only for sde-dpmsolver++)."""
        i = step_index
        x = sample.astype(jnp.float32)
        m = model_output.astype(jnp.float32)
        x0 = self.x0_coef_sample[i] * x + self.x0_coef_output[i] * m
        use_second = jnp.logical_and(state.has_prev, jnp.logical_not(self.first_order[i]))
        c = jnp.where(use_second, self.coef_d1[i], jnp.zeros((), jnp.float32))
        prev = self.coef_sample[i] * x + self.coef_x0[i] * x0 + c * (x0 - state.prev_x0)
        if self.stochastic:
            prev = prev + self.noise_std[i] * self._noise(key, x)
        new_state = DPMState(x0, jnp.ones((), jnp.bool_))
        return StepOutput(prev.astype(sample.dtype), x0.astype(sample.dtype), new_state)


class DPMSolverMultistepScheduler(BaseScheduler):
    """diffusers ``DPMSolverMultistepScheduler`` (dpmsolver++ family; see the module docstring)."""

    class_name = "DPMSolverMultistepScheduler"

    def set_timesteps(self, num_inference_steps: int) -> DPMSolverPlan:
        """Precompute timesteps, sigmas and all update coefficients for ``num_inference_steps`` steps."""
        cfg = self.config
        T = self.num_train_timesteps
        n = check_num_steps(num_inference_steps, T)
        ts = dpm_timesteps(n, T, cfg["timestep_spacing"], cfg["steps_offset"])
        if ts.max() >= T or ts.min() < 0:
            raise ValueError(f"timesteps {ts.tolist()} fall outside [0, {T}) (check 'steps_offset')")
        n = int(ts.shape[0])
        train_sigmas = self.train_sigmas_f64()
        sig = np.interp(ts, np.arange(T), train_sigmas)
        last = train_sigmas[0] if cfg["final_sigmas_type"] == "sigma_min" else 0.0
        sig = np.concatenate([sig, [last]])

        alpha = 1.0 / np.sqrt(sig**2 + 1.0)
        sigma = sig * alpha
        with np.errstate(divide="ignore"):
            lam = np.log(alpha) - np.log(sigma)  # +inf where sigma == 0
        h = lam[1:] - lam[:-1]  # step i goes from s0 = i to t = i + 1
        a_t, s_t, s_s0 = alpha[1:], sigma[1:], sigma[:-1]
        sde = cfg["algorithm_type"] == "sde-dpmsolver++"
        with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
            if sde:
                A = s_t / s_s0 * np.exp(-h)
                B = a_t * (1.0 - np.exp(-2.0 * h))
                noise = s_t * np.sqrt(1.0 - np.exp(-2.0 * h))
            else:
                A = s_t / s_s0
                B = a_t * (1.0 - np.exp(-h))
                noise = np.zeros_like(A)
            h0 = np.concatenate([[np.nan], lam[1:-1] - lam[:-2]])  # lambda_s0 - lambda_s1
            r0 = h0 / h
            if cfg["solver_type"] == "midpoint":
                C = 0.5 * B / r0
            elif sde:
                C = a_t * ((1.0 - np.exp(-2.0 * h)) / (-2.0 * h) + 1.0) / r0
            else:
                C = a_t * ((np.exp(-h) - 1.0) / h + 1.0) / r0

        first = np.zeros(n, dtype=bool)
        first[0] = True
        if cfg["solver_order"] == 1:
            first[:] = True
        elif (cfg["euler_at_final"] or (cfg["lower_order_final"] and n < 15)
              or cfg["final_sigmas_type"] == "zero"):
            first[-1] = True
        C = np.where(first, 0.0, C)
        for name, v in (("A", A), ("B", B), ("C", C), ("noise", noise)):
            if not np.all(np.isfinite(v)):
                raise ValueError(f"non-finite DPM-Solver coefficient {name} for {n} steps: {v}")

        pt = cfg["prediction_type"]
        a_s, s_s = alpha[:-1], sigma[:-1]
        if pt == "epsilon":
            x0s, x0m = 1.0 / a_s, -s_s / a_s
        elif pt == "v_prediction":
            x0s, x0m = a_s, -s_s
        else:  # sample
            x0s, x0m = np.zeros_like(a_s), np.ones_like(a_s)

        f32 = lambda v: jnp.asarray(v, dtype=jnp.float32)  # noqa: E731
        return DPMSolverPlan(
            timesteps=jnp.asarray(ts, dtype=jnp.int32),
            sigmas=f32(sig),
            x0_coef_sample=f32(x0s), x0_coef_output=f32(x0m),
            coef_sample=f32(A), coef_x0=f32(B), coef_d1=f32(C),
            first_order=jnp.asarray(first),
            noise_std=f32(noise),
            num_steps=n,
            stochastic=sde,
        )
