"""Diffusion schedulers in JAX, matching diffusers step for step, plus the training noise schedule.

Samplers (``from_config`` a diffusers ``scheduler_config.json`` or dict, then ``set_timesteps(n)``
returns an immutable plan whose ``step`` is pure and jit / scan friendly)::

    DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler, sample_loop

Training side (pure functions over a ``NoiseSchedule`` pytree)::

    NoiseSchedule, add_noise, get_velocity, training_target, snr, min_snr_weight

See docs/schedulers.md.
"""

from .base import StepOutput
from .config import CLASS_DEFAULTS, KNOWN_DIFFUSERS_KEYS, read_config_file, resolve_config
from .ddim import DDIMPlan, DDIMScheduler
from .dpm_solver import DPMSolverMultistepScheduler, DPMSolverPlan, DPMState
from .euler import EulerDiscreteScheduler, EulerPlan
from .loop import sample_loop
from .schedule import NoiseSchedule, add_noise, get_velocity, min_snr_weight, snr, training_target

SD15_SCHEDULER_CONFIG = {
    "_class_name": "PNDMScheduler",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}
"""Stable Diffusion 1.5's ``scheduler/scheduler_config.json`` (the one Arc2Face uses)."""

__all__ = [
    "CLASS_DEFAULTS", "KNOWN_DIFFUSERS_KEYS", "SD15_SCHEDULER_CONFIG",
    "DDIMPlan", "DDIMScheduler", "DPMSolverMultistepScheduler", "DPMSolverPlan", "DPMState",
    "EulerDiscreteScheduler", "EulerPlan", "NoiseSchedule", "StepOutput",
    "add_noise", "get_velocity", "min_snr_weight", "read_config_file", "resolve_config",
    "sample_loop", "snr", "training_target",
]
