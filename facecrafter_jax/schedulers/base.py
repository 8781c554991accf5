"""Shared pieces of the samplers: the scheduler base class, the step output and timestep spacing."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from .config import resolve_config
from .schedule import NoiseSchedule, alphas_cumprod_f64


class StepOutput(NamedTuple):
    """What a sampler step returns.

    Attributes:
        prev_sample: the sample at the next (less noisy) timestep, in the dtype of the input sample.
        pred_original_sample: the step's prediction of x_0 (for previews), same dtype.
        state: the carried solver state for the next step (pass it back in).
    """

    prev_sample: jax.Array
    pred_original_sample: jax.Array
    state: Any


class PlanMixin:
    """Methods shared by the per-sampler plans (frozen pytrees made by ``set_timesteps``)."""

    def init_state(self, sample: jax.Array) -> Any:
        """The solver state before the first step (empty for single-step samplers)."""
        del sample
        return ()

    def scale_model_input(self, sample: jax.Array, step_index: jax.Array | int) -> jax.Array:
        """Scale the denoiser input at ``step_index`` (identity unless the sampler works in sigma space)."""
        del step_index
        return sample

    def _noise(self, key: jax.Array | None, like: jax.Array) -> jax.Array:
        if key is None:
            raise ValueError(f"{type(self).__name__}.step is stochastic with this configuration: pass `key`")
        return jax.random.normal(key, like.shape, jnp.float32)


def check_num_steps(num_inference_steps: int, num_train_timesteps: int) -> int:
    """Validate the requested number of sampling steps."""
    if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, (int, np.integer)):
        raise TypeError(f"num_inference_steps must be an int, got {num_inference_steps!r}")
    n = int(num_inference_steps)
    if not 1 <= n <= num_train_timesteps:
        raise ValueError(f"num_inference_steps must be in [1, num_train_timesteps={num_train_timesteps}], got {n}")
    return n


class BaseScheduler:
    """A diffusers-compatible scheduler: a resolved config plus its float64 noise schedule.

    Construct with ``from_config(dict_or_path, **overrides)``; ``set_timesteps(n)`` returns an immutable
    plan (a pytree of float32 tables) whose ``step`` is pure and jit/scan friendly. Unlike diffusers,
    ``set_timesteps`` does not mutate the scheduler: use its return value.
    """

    class_name: ClassVar[str]

    def __init__(self, config: Mapping[str, Any] | str | os.PathLike | None = None, **overrides: Any):
        from .config import read_config_file

        if config is None:
            config = {}
        elif isinstance(config, (str, os.PathLike)):
            config = read_config_file(config)
        self.config: dict[str, Any] = resolve_config({**dict(config), **overrides}, self.class_name)
        self.alphas_cumprod_f64: np.ndarray = alphas_cumprod_f64(self.config)
        self.schedule: NoiseSchedule = NoiseSchedule.from_alphas_cumprod(
            self.alphas_cumprod_f64, self.config["prediction_type"]
        )

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | str | os.PathLike, **overrides: Any):
        """Build from a diffusers scheduler config dict or ``scheduler_config.json`` path (or its folder).

        Absent keys take the diffusers class defaults (as ``diffusers.XScheduler.from_config`` does);
        ``overrides`` replace config entries.
        """
        return cls(config, **overrides)

    @property
    def num_train_timesteps(self) -> int:
        return int(self.config["num_train_timesteps"])

    def train_sigmas_f64(self) -> np.ndarray:
        """sigma_t = sqrt((1 - abar_t) / abar_t) for every training timestep, float64."""
        ac = self.alphas_cumprod_f64
        return np.sqrt((1.0 - ac) / ac)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config})"
