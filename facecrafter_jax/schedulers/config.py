"""Reading diffusers scheduler configs (``scheduler_config.json``) with diffusers' own defaults.

A diffusers scheduler config is a flat JSON dict. ``SomeScheduler.from_config(cfg)`` in diffusers
keeps the keys that ``SomeScheduler.__init__`` accepts, fills every absent key with that class's
default, and silently drops keys that belong to other scheduler classes (``skip_prk_steps`` from
PNDM, ``set_alpha_to_one`` when loading into Euler, ...). We do the same, with two additions:

* a key that no diffusers scheduler of the Stable-Diffusion family knows is an error (a typo must not
  silently fall back to a default);
* a key of the target class whose value would select behaviour we do not implement (for example
  ``thresholding: true`` or ``use_karras_sigmas: true``) is an error naming the key; keys that do
  not change the computation at the value given (``dynamic_thresholding_ratio`` while thresholding
  is off) are accepted.

The class defaults below are those of diffusers 0.42.1 (checked by ``tests/test_schedulers.py``
against the installed diffusers' ``__init__`` signatures).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

# Every keyword argument of the diffusers schedulers that interoperate through ``from_config`` with
# Stable Diffusion configs (``KarrasDiffusionSchedulers`` in diffusers 0.42.1, plus PNDM / DDPM).
KNOWN_DIFFUSERS_KEYS = frozenset(
    {
        "algorithm_type", "beta_end", "beta_schedule", "beta_start", "clip_sample", "clip_sample_range",
        "disable_corrector", "dynamic_thresholding_ratio", "euler_at_final", "final_sigmas_type",
        "flow_shift", "interpolation_type", "lambda_min_clipped", "lower_order_final",
        "num_train_timesteps", "predict_x0", "prediction_type", "rescale_betas_zero_snr", "rho",
        "sample_max_value", "set_alpha_to_one", "shift_terminal", "sigma_data", "sigma_max", "sigma_min",
        "sigma_schedule", "skip_prk_steps", "solver_order", "solver_p", "solver_type", "steps_offset",
        "thresholding", "time_shift_type", "timestep_spacing", "timestep_type", "trained_betas",
        "use_beta_sigmas", "use_dynamic_shifting", "use_exponential_sigmas", "use_flow_sigmas",
        "use_karras_sigmas", "use_lu_lambdas", "variance_type",
    }
)

# diffusers 0.42.1 defaults, per class (``inspect.signature(cls.__init__)``).
_COMMON = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "trained_betas": None,
}

CLASS_DEFAULTS: dict[str, dict[str, Any]] = {
    "DDPMScheduler": {
        **_COMMON,
        "variance_type": "fixed_small",
        "clip_sample": True,
        "prediction_type": "epsilon",
        "thresholding": False,
        "dynamic_thresholding_ratio": 0.995,
        "clip_sample_range": 1.0,
        "sample_max_value": 1.0,
        "timestep_spacing": "leading",
        "steps_offset": 0,
        "rescale_betas_zero_snr": False,
    },
    "DDIMScheduler": {
        **_COMMON,
        "clip_sample": True,
        "set_alpha_to_one": True,
        "steps_offset": 0,
        "prediction_type": "epsilon",
        "thresholding": False,
        "dynamic_thresholding_ratio": 0.995,
        "clip_sample_range": 1.0,
        "sample_max_value": 1.0,
        "timestep_spacing": "leading",
        "rescale_betas_zero_snr": False,
    },
    "DPMSolverMultistepScheduler": {
        **_COMMON,
        "solver_order": 2,
        "prediction_type": "epsilon",
        "thresholding": False,
        "dynamic_thresholding_ratio": 0.995,
        "sample_max_value": 1.0,
        "algorithm_type": "dpmsolver++",
        "solver_type": "midpoint",
        "lower_order_final": True,
        "euler_at_final": False,
        "use_karras_sigmas": False,
        "use_exponential_sigmas": False,
        "use_beta_sigmas": False,
        "use_lu_lambdas": False,
        "use_flow_sigmas": False,
        "flow_shift": 1.0,
        "final_sigmas_type": "zero",
        "lambda_min_clipped": -float("inf"),
        "variance_type": None,
        "timestep_spacing": "linspace",
        "steps_offset": 0,
        "rescale_betas_zero_snr": False,
        "use_dynamic_shifting": False,
        "time_shift_type": "exponential",
    },
    "EulerDiscreteScheduler": {
        **_COMMON,
        "prediction_type": "epsilon",
        "interpolation_type": "linear",
        "use_karras_sigmas": False,
        "use_exponential_sigmas": False,
        "use_beta_sigmas": False,
        "sigma_min": None,
        "sigma_max": None,
        "timestep_spacing": "linspace",
        "timestep_type": "discrete",
        "steps_offset": 0,
        "rescale_betas_zero_snr": False,
        "final_sigmas_type": "zero",
    },
}

# Values we implement. A key missing here accepts any value of a sensible type (it does not change
# our computation at all, e.g. ``dynamic_thresholding_ratio`` without thresholding).
_SUPPORTED_VALUES: dict[str, tuple] = {
    "beta_schedule": ("linear", "scaled_linear", "squaredcos_cap_v2"),
    "prediction_type": ("epsilon", "v_prediction", "sample"),
    "timestep_spacing": ("leading", "linspace", "trailing"),
    "thresholding": (False,),
    "rescale_betas_zero_snr": (False,),
    "use_karras_sigmas": (False, None),
    "use_exponential_sigmas": (False, None),
    "use_beta_sigmas": (False, None),
    "use_lu_lambdas": (False,),
    "use_flow_sigmas": (False,),
    "use_dynamic_shifting": (False,),
    "variance_type": (None,),  # DPM-Solver only ("learned" variants slice channels; not implemented)
    "algorithm_type": ("dpmsolver++", "sde-dpmsolver++"),
    "solver_type": ("midpoint", "heun"),
    "solver_order": (1, 2),
    "final_sigmas_type": ("zero", "sigma_min"),
    "interpolation_type": ("linear",),
    "lambda_min_clipped": (-float("inf"),),
}

_BOOL_KEYS = {
    "clip_sample", "set_alpha_to_one", "thresholding", "rescale_betas_zero_snr", "lower_order_final",
    "euler_at_final", "use_lu_lambdas", "use_flow_sigmas", "use_dynamic_shifting",
}
_INT_KEYS = {"num_train_timesteps", "steps_offset", "solver_order"}
_FLOAT_KEYS = {"beta_start", "beta_end", "clip_sample_range", "dynamic_thresholding_ratio", "sample_max_value",
               "flow_shift", "lambda_min_clipped"}

# Keys of the noise schedule itself (what a training step needs).
SCHEDULE_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas",
                 "prediction_type", "rescale_betas_zero_snr")


def read_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """Read a diffusers ``scheduler_config.json`` (a file, or a folder holding one) into a dict."""
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, "scheduler_config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"scheduler config not found: {path}")
    with open(path, encoding="utf-8") as f:
        cfg = json.load(f)  # accepts diffusers' "-Infinity" for lambda_min_clipped
    if not isinstance(cfg, dict):
        raise ValueError(f"{path}: a scheduler config must be a JSON object, got {type(cfg).__name__}")
    return cfg


def _check_type(key: str, value: Any) -> None:
    if key in _BOOL_KEYS and not isinstance(value, bool):
        raise ValueError(f"scheduler config key {key!r} must be true/false, got {value!r}")
    if key in _INT_KEYS and (isinstance(value, bool) or not isinstance(value, int)):
        raise ValueError(f"scheduler config key {key!r} must be an integer, got {value!r}")
    if key in _FLOAT_KEYS and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise ValueError(f"scheduler config key {key!r} must be a number, got {value!r}")
    if key == "num_train_timesteps" and value < 1:
        raise ValueError(f"scheduler config key 'num_train_timesteps' must be >= 1, got {value}")
    if key == "steps_offset" and value < 0:
        raise ValueError(f"scheduler config key 'steps_offset' must be >= 0, got {value}")


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):  # True must not match 1
        return type(a) is type(b) and a == b
    if a is None or b is None:
        return a is b
    return a == b  # -inf == -inf holds


def resolve_config(config: Mapping[str, Any] | str | os.PathLike, class_name: str,
                   keys: tuple[str, ...] | None = None) -> dict[str, Any]:
    """Resolve a diffusers scheduler config for ``class_name`` the way ``from_config`` does.

    Args:
        config: a dict, or a path to ``scheduler_config.json`` / the folder holding it.
        class_name: the diffusers class whose defaults fill absent keys (a key of ``CLASS_DEFAULTS``).
        keys: restrict the result (and validation) to these keys of the class; the other known keys
            are accepted and ignored.

    Returns:
        A new dict with exactly the class's keys (or ``keys``), absent ones filled with defaults.

    Raises:
        ValueError: naming the key, for an unknown key, a wrongly typed value, or a value selecting
            behaviour this implementation does not provide.
    """
    if isinstance(config, (str, os.PathLike)):
        config = read_config_file(config)
    if not isinstance(config, Mapping):
        raise TypeError(f"scheduler config must be a dict or a path, got {type(config).__name__}")
    if class_name not in CLASS_DEFAULTS:
        raise ValueError(f"unsupported scheduler class {class_name!r}; choose one of {sorted(CLASS_DEFAULTS)}")
    defaults = CLASS_DEFAULTS[class_name]
    wanted = tuple(defaults) if keys is None else keys
    out = {k: defaults[k] for k in wanted}
    for key, value in config.items():
        if not isinstance(key, str):
            raise ValueError(f"scheduler config keys must be strings, got {key!r}")
        if key.startswith("_"):  # _class_name, _diffusers_version, _use_default_values: bookkeeping
            continue
        if key not in KNOWN_DIFFUSERS_KEYS:
            raise ValueError(f"unknown scheduler config key {key!r}")
        if key not in out:
            continue  # belongs to another scheduler class: diffusers' from_config drops it too
        if value is None and defaults[key] is not None and None not in _SUPPORTED_VALUES.get(key, ()):
            raise ValueError(f"scheduler config key {key!r} must not be null")
        if value is not None:
            _check_type(key, value)
        out[key] = value

    for key, value in out.items():
        allowed = _SUPPORTED_VALUES.get(key)
        if allowed is not None and not any(_same(value, a) for a in allowed):
            raise ValueError(
                f"scheduler config key {key!r} = {value!r} is not supported here (supported: {list(allowed)})"
            )
    if out.get("trained_betas") is not None:
        tb = out["trained_betas"]
        if not hasattr(tb, "__len__") or len(tb) != out["num_train_timesteps"]:
            raise ValueError(
                f"scheduler config key 'trained_betas' must hold num_train_timesteps="
                f"{out['num_train_timesteps']} values"
            )
    if class_name == "EulerDiscreteScheduler":
        if out["timestep_type"] not in ("discrete", "continuous"):
            raise ValueError(f"scheduler config key 'timestep_type' = {out['timestep_type']!r} is not supported")
        if out["timestep_type"] == "continuous" and out["prediction_type"] == "v_prediction":
            raise ValueError(
                "scheduler config key 'timestep_type' = 'continuous' with v_prediction is not supported"
            )
    return out
