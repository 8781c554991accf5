"""A ``lax.scan`` sampling loop over any of the plans."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from .base import BaseScheduler


def sample_loop(
    scheduler,
    denoise_fn: Callable[[jax.Array, jax.Array], jax.Array],
    x_T: jax.Array,
    num_steps: int | None = None,
    *,
    key: jax.Array | None = None,
    scale_init_noise: bool = True,
    return_intermediates: bool = False,
):
    """Run a full sampling chain with ``jax.lax.scan``.

    Args:
        scheduler: a scheduler (``DDIMScheduler``, ...; then ``num_steps`` is required) or a plan
            returned by its ``set_timesteps`` (then ``num_steps`` must be None or match).
        denoise_fn: ``denoise_fn(x, t) -> model_output``, any jittable function; ``x`` is the already
            scaled model input (``plan.scale_model_input``), ``t`` a scalar timestep (int32 for
            DDIM / DPM-Solver, float32 for Euler). Classifier-free guidance belongs inside it.
        x_T: the starting noise, standard normal; it is multiplied by ``plan.init_noise_sigma`` first
            (as diffusers pipelines do) unless ``scale_init_noise=False``. Its dtype is the dtype of
            the carried sample.
        num_steps: number of sampling steps.
        key: PRNG key, required for stochastic plans (DDIM with eta > 0, sde-dpmsolver++); step ``i``
            draws its noise with ``jax.random.fold_in(key, i)``.
        return_intermediates: also return the sample after every step, stacked ``[num_steps, ...]``.

    Returns:
        The final sample (and the stacked intermediates if asked). Deterministic given the inputs.
    """
    if isinstance(scheduler, BaseScheduler):
        if num_steps is None:
            raise ValueError("num_steps is required when passing a scheduler (or pass a plan)")
        plan = scheduler.set_timesteps(num_steps)
    else:
        plan = scheduler
        if num_steps is not None and num_steps != plan.num_steps:
            raise ValueError(f"num_steps={num_steps} does not match the plan's {plan.num_steps} steps")
    if plan.stochastic and key is None:
        raise ValueError(f"{type(plan).__name__} is stochastic with this configuration: pass `key`")

    x = x_T
    if scale_init_noise and plan.init_noise_sigma != 1.0:
        x = (x_T.astype(jnp.float32) * plan.init_noise_sigma).astype(x_T.dtype)

    def body(carry, i):
        sample, state = carry
        model_out = denoise_fn(plan.scale_model_input(sample, i), plan.timesteps[i])
        step_key = jax.random.fold_in(key, i) if plan.stochastic else None
        out = plan.step(state, model_out, i, sample, key=step_key)
        return (out.prev_sample, out.state), (out.prev_sample if return_intermediates else None)

    (x, _), inter = jax.lax.scan(body, (x, plan.init_state(x)), jnp.arange(plan.num_steps))
    return (x, inter) if return_intermediates else x
