"""Import a diffusers ``UNet2DConditionModel`` folder into our Flax NNX UNet, and export it back.

Our module tree mirrors diffusers' attribute names exactly, so the key map is the generic one of
:func:`facecrafter_jax.convert.weights.build_key_map` with no renames; every parameter is accounted for
in both directions (missing, unused and mis-shaped keys raise :class:`WeightConversionError`).
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ..models.control import FROZEN
from ..models.unet_2d_condition import UNet2DConditionConfig, UNet2DConditionModel
from .weights import (KeyRule, build_key_map, export_torch_state, flax_path_str, load_torch_state, read_json,
                      read_torch_checkpoint)

__all__ = ["load_unet", "unet_key_map", "export_unet_state", "load_unet_config"]


def unet_key_map(model: UNet2DConditionModel) -> list[KeyRule]:
    """One rule per base parameter: Flax path <-> diffusers key (e.g. ``down_blocks.0.attentions.0.proj_in.weight``).

    FaceCrafter adapter parameters (``AdapterParam``) a UNet may carry are not part of the diffusers UNet
    and are excluded (they have their own map in :mod:`facecrafter_jax.convert.adapters`).
    """
    return build_key_map(model, variable_type=FROZEN)


def load_unet_config(folder: str) -> UNet2DConditionConfig:
    """Read ``<folder>/config.json`` (diffusers format) into a :class:`UNet2DConditionConfig`."""
    path = os.path.join(folder, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"no UNet config at {path}")
    return UNet2DConditionConfig.from_diffusers_config(read_json(path))


def load_unet(folder: str, dtype=jnp.float32, **model_options) -> UNet2DConditionModel:
    """Build our UNet from a diffusers UNet folder (``config.json`` + safetensors or ``.bin`` weights).

    ``dtype`` is the compute dtype (parameters stay float32). ``model_options`` go to
    :class:`UNet2DConditionModel` (``attention_implementation``, ``explicit_cross_attention``, ``remat``).
    A checkpoint that does not match the config exactly raises ``WeightConversionError`` naming the key.
    """
    config = load_unet_config(folder)
    state = read_torch_checkpoint(folder)
    model = _build(config, dtype, model_options)
    load_torch_state(model, state, unet_key_map(model), variable_type=FROZEN)
    abstract = [flax_path_str(p) for p, v in nnx.to_flat_state(nnx.state(model))
                if isinstance(v.get_value(), jax.ShapeDtypeStruct)]
    if abstract:  # pragma: no cover - guards the eval_shape shortcut below
        raise RuntimeError(f"variables left uninitialised after loading: {abstract[:10]}")
    return model


def _build(config: UNet2DConditionConfig, dtype, model_options: dict) -> UNet2DConditionModel:
    if config.dropout > 0:  # dropout layers hold RNG state that must be real
        return UNet2DConditionModel(config, dtype=dtype, rngs=nnx.Rngs(0), **model_options)
    # Every variable is a Param that the checkpoint overwrites: skip the random initialisation.
    return UNet2DConditionModel.create_abstract(config, dtype=dtype, **model_options)


def export_unet_state(model: UNet2DConditionModel) -> dict[str, np.ndarray]:
    """The model's parameters as a diffusers (PyTorch-layout) state dict of float32 NumPy arrays."""
    return export_torch_state(model, unet_key_map(model), variable_type=FROZEN)
