"""Import / export of transformers ``CLIPTextModel`` checkpoints (SD1.5 ``text_encoder``, Arc2Face ``encoder``).

Two key layouts exist and both are accepted, detected from the keys:

* ``text_model.embeddings.token_embedding.weight`` ... (transformers < 5.6, Arc2Face's
  ``encoder/pytorch_model.bin``), possibly with the non-parameter buffer
  ``text_model.embeddings.position_ids``;
* ``embeddings.token_embedding.weight`` ... (transformers >= 5.6).

The buffer ``embeddings.position_ids`` (either layout) is ignored explicitly; any other missing,
unused or mis-shaped key raises :class:`~facecrafter_jax.convert.weights.WeightConversionError`
naming the key.
"""

from __future__ import annotations

import os
from typing import Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from facecrafter_jax.convert.weights import (
    KeyRule, WeightConversionError, build_key_map, export_torch_state, load_torch_state, read_torch_checkpoint,
)
from facecrafter_jax.models.clip_text import CLIPTextConfig, CLIPTextModel

__all__ = ["TEXT_MODEL_PREFIX", "text_encoder_key_map", "detect_text_encoder_prefix", "load_text_encoder_state",
           "load_text_encoder", "export_text_encoder_state"]

TEXT_MODEL_PREFIX = "text_model."
_BUFFERS = ("embeddings.position_ids",)


def text_encoder_key_map(model: CLIPTextModel, *, prefix: str = "") -> list[KeyRule]:
    """One :class:`KeyRule` per parameter of ``model``; PyTorch keys start with ``prefix`` ('' or 'text_model.')."""
    return build_key_map(model, torch_prefix=prefix)


def detect_text_encoder_prefix(keys) -> str:
    """``'text_model.'`` if every key carries it, ``''`` if none does; a mix raises naming a key of each kind."""
    keys = list(keys)
    with_prefix = [k for k in keys if k.startswith(TEXT_MODEL_PREFIX)]
    if not with_prefix:
        return ""
    without = [k for k in keys if not k.startswith(TEXT_MODEL_PREFIX)]
    if without:
        raise WeightConversionError(
            f"checkpoint mixes key layouts: {with_prefix[0]!r} has the {TEXT_MODEL_PREFIX!r} prefix but "
            f"{without[0]!r} does not")
    return TEXT_MODEL_PREFIX


def load_text_encoder_state(model: CLIPTextModel, state: Mapping[str, np.ndarray]) -> str:
    """Copy a transformers CLIPTextModel state dict (either layout) into ``model`` in place; returns the prefix found."""
    prefix = detect_text_encoder_prefix(state)
    rules = text_encoder_key_map(model, prefix=prefix)
    load_torch_state(model, state, rules, ignore=[prefix + b for b in _BUFFERS])
    return prefix


def load_text_encoder(folder: str, dtype=jnp.float32) -> CLIPTextModel:
    """Build a :class:`CLIPTextModel` from a transformers folder (``config.json`` + weights).

    Weights: ``model.safetensors`` or ``pytorch_model.bin`` (read with ``torch.load(weights_only=True)``),
    or a sharded index. ``dtype`` is the compute dtype; parameters stay float32.
    """
    config_path = os.path.join(folder, "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"no config.json in {folder} (expected a transformers CLIPTextModel folder)")
    config = CLIPTextConfig.from_json_file(config_path)
    state = read_torch_checkpoint(folder)
    # Abstract parameters (shapes only): no random initialisation, the checkpoint fills every one.
    model = nnx.eval_shape(lambda: CLIPTextModel(config, dtype=dtype, rngs=nnx.Rngs(0)))
    load_text_encoder_state(model, state)
    return model


def export_text_encoder_state(model: CLIPTextModel, *, prefix: str = "") -> dict[str, np.ndarray]:
    """The model's parameters as a PyTorch-layout state dict (NumPy, float32).

    ``prefix=''`` matches transformers >= 5.6 ``CLIPTextModel``; ``prefix='text_model.'`` the older layout.
    """
    if prefix not in ("", TEXT_MODEL_PREFIX):
        raise ValueError(f"prefix must be '' or {TEXT_MODEL_PREFIX!r}, got {prefix!r}")
    return export_torch_state(model, text_encoder_key_map(model, prefix=prefix))
