"""diffusers ``AutoencoderKL`` folders <-> our Flax :class:`~facecrafter_jax.models.vae.AutoencoderKL`.

::

    from facecrafter_jax.convert import load_vae
    vae = load_vae("stable-diffusion-v1-5/vae")            # or the pipeline root (uses its vae/ subfolder)
    state = export_vae_state(vae)                          # PyTorch-layout dict, loads into diffusers strictly

The key map is the generic one (:func:`~facecrafter_jax.convert.weights.build_key_map`): our module
paths equal diffusers' module paths, so every rule is ``path.{kernel,scale,bias}`` ->
``path.{weight,bias}`` plus the layout transform. Loading is strict: a missing, unused or
mis-shaped key raises :class:`~facecrafter_jax.convert.weights.WeightConversionError` naming it.

Legacy layout: VAE checkpoints saved by diffusers < 0.14 (several SD1.x ``vae/`` folders) name the
mid-block attention parameters ``query`` / ``key`` / ``value`` / ``proj_attn`` instead of ``to_q`` /
``to_k`` / ``to_v`` / ``to_out.0``, and some conversions store those projections as 1x1 convs
``[C, C, 1, 1]``. :func:`convert_legacy_vae_keys` renames them (and squeezes the 1x1 convs to
``[C, C]``) before the strict load, exactly as diffusers does when it loads such a folder.
"""

from __future__ import annotations

import os
import re
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from facecrafter_jax.convert.weights import (
    KeyRule,
    WeightConversionError,
    build_key_map,
    export_torch_state,
    load_torch_state,
    read_torch_checkpoint,
)
from facecrafter_jax.models.vae import AutoencoderKL, AutoencoderKLConfig

__all__ = ["load_vae", "load_vae_config", "vae_key_map", "export_vae_state", "convert_legacy_vae_keys", "save_vae_diffusers"]

_LEGACY_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_ATTN_KEY = re.compile(
    r"^(?P<prefix>(?:encoder|decoder)\.mid_block\.attentions\.\d+)\.(?P<name>query|key|value|proj_attn|to_q|to_k|to_v|to_out\.0)\.(?P<leaf>weight|bias)$"
)


def vae_key_map(model: AutoencoderKL) -> list[KeyRule]:
    """One :class:`KeyRule` per parameter of ``model``: Flax path <-> diffusers key + layout transform."""
    return build_key_map(model)


def convert_legacy_vae_keys(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Rename legacy mid-block attention keys (``query/key/value/proj_attn``) to the current diffusers
    names (``to_q/to_k/to_v/to_out.0``) and squeeze their 1x1-conv weights ``[C, C, 1, 1]`` to ``[C, C]``.

    Current-layout checkpoints pass through unchanged. A checkpoint holding both names for the same
    parameter, or a 4-D projection weight that is not 1x1, raises :class:`WeightConversionError`.
    """
    out: dict[str, np.ndarray] = {}
    origin: dict[str, str] = {}
    for k, v in state.items():
        m = _ATTN_KEY.match(k)
        new_k = k
        if m is not None:
            name = _LEGACY_NAMES.get(m["name"], m["name"])
            new_k = f"{m['prefix']}.{name}.{m['leaf']}"
            if m["leaf"] == "weight" and np.ndim(v) == 4:
                if tuple(np.shape(v)[2:]) != (1, 1):
                    raise WeightConversionError(f"{k!r}: expected a linear [C, C] or 1x1 conv [C, C, 1, 1] weight, got shape {tuple(np.shape(v))}")
                v = np.asarray(v)[:, :, 0, 0]
        if new_k in out:
            raise WeightConversionError(f"checkpoint holds both {origin[new_k]!r} and {k!r} for {new_k!r}")
        out[new_k] = v
        origin[new_k] = k
    return out


def _resolve_folder(folder: str) -> str:
    """A VAE folder, or a pipeline root that has a ``vae/`` subfolder."""
    if os.path.isfile(os.path.join(folder, "config.json")):
        return folder
    sub = os.path.join(folder, "vae")
    if os.path.isfile(os.path.join(sub, "config.json")):
        return sub
    raise FileNotFoundError(f"no config.json in {folder} (nor in {sub})")


def load_vae_config(folder: str) -> AutoencoderKLConfig:
    """The :class:`AutoencoderKLConfig` of a diffusers VAE folder (or pipeline root with ``vae/``)."""
    return AutoencoderKLConfig.from_json_file(os.path.join(_resolve_folder(folder), "config.json"))


def load_vae(folder: str, dtype=jnp.float32, *, config: AutoencoderKLConfig | None = None) -> AutoencoderKL:
    """Build our :class:`AutoencoderKL` from a diffusers VAE folder and load its weights strictly.

    Args:
      folder: a diffusers ``AutoencoderKL`` folder (``config.json`` + ``diffusion_pytorch_model.safetensors``
        or ``.bin``), or a pipeline root with a ``vae/`` subfolder.
      dtype: compute dtype (parameters are float32 whatever this is).
      config: overrides the folder's ``config.json`` (weights are still read from ``folder``).

    Legacy attention key names are converted (see :func:`convert_legacy_vae_keys`). Raises
    :class:`WeightConversionError` naming any missing, unused or mis-shaped key.
    """
    path = _resolve_folder(folder)
    cfg = config if config is not None else load_vae_config(path)
    # Build the module abstractly (no random init of ~84M parameters), then fill it from the checkpoint.
    model = nnx.eval_shape(lambda: AutoencoderKL(cfg, dtype=dtype, rngs=nnx.Rngs(0)))
    state = convert_legacy_vae_keys(read_torch_checkpoint(path))
    load_torch_state(model, state, vae_key_map(model))
    leftover = [p for p, v in nnx.to_flat_state(nnx.state(model)) if isinstance(v.get_value(), jax.ShapeDtypeStruct)]
    if leftover:  # cannot happen with a strict key map, but never hand out a half-built model
        raise WeightConversionError(f"parameters not loaded: {leftover[:10]}")
    return model


def export_vae_state(model: AutoencoderKL) -> dict[str, np.ndarray]:
    """The PyTorch / diffusers state dict (NumPy float32, current key names) of ``model``."""
    return export_torch_state(model, vae_key_map(model))


def save_vae_diffusers(model: AutoencoderKL, folder: str) -> None:
    """Write ``config.json`` + ``diffusion_pytorch_model.safetensors`` that ``diffusers.AutoencoderKL.from_pretrained`` loads."""
    import json

    from safetensors.numpy import save_file

    os.makedirs(folder, exist_ok=True)
    save_file(export_vae_state(model), os.path.join(folder, "diffusion_pytorch_model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(model.config.to_dict(), f, indent=2)
