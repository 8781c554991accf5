"""FaceCrafter adapter weights in PyTorch layout: the key map, export / import, and the adapter files.

The adapters of a :class:`~facecrafter_jax.models.facecrafter.FaceCrafter` model are every
:class:`~facecrafter_jax.models.control.AdapterParam`: per cross-attention layer ``to_k_c.<name>`` /
``to_v_c.<name>`` and the token encoders ``<name>_encoder.{proj_in,proj_out,norm}``. Their PyTorch keys
follow the diffusers processor path, so the same file feeds this package's own PyTorch processors
(:mod:`facecrafter_jax.torch_facecrafter`)::

    unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k_c.landmark.kernel
        <-> down_blocks.0.attentions.0.transformer_blocks.0.attn2.processor.to_k_c.landmark.weight
    landmark_encoder.proj_in.kernel  <-> landmark_encoder.proj_in.weight     (norm ``scale`` -> ``weight``)

``facecrafter-convert to-diffusers`` writes them as ``OUT/facecrafter_adapters.safetensors`` with the
config ``OUT/facecrafter_adapters.json`` (:func:`export_adapters`), and additionally as one stock diffusers
IP-Adapter file per control (:mod:`facecrafter_jax.convert.ip_adapter`).
"""

from __future__ import annotations

import json
import os
from typing import Mapping

from facecrafter_jax.convert.weights import KeyRule, build_key_map, export_torch_state, load_torch_state
from facecrafter_jax.models.control import AdapterParam

__all__ = ["ADAPTERS_FILE", "ADAPTERS_CONFIG_FILE", "ADAPTERS_FORMAT", "adapter_key_map", "export_adapter_state",
           "load_adapter_state", "export_adapters"]

# Names of the PyTorch export (mirrored in torch_facecrafter.py, which imports no JAX).
ADAPTERS_FILE = "facecrafter_adapters.safetensors"
ADAPTERS_CONFIG_FILE = "facecrafter_adapters.json"
ADAPTERS_FORMAT = "facecrafter-adapters"


def _adapter_rename(module_path: str) -> str:
    # unet.<...>.attn2.to_k_c.<name> -> <...>.attn2.processor.to_k_c.<name> (diffusers' processor path)
    if module_path.startswith("unet."):
        head, sep, tail = module_path[len("unet."):].partition(".attn2.")
        if not sep:
            raise ValueError(f"unexpected adapter parameter outside a cross-attention layer: {module_path}")
        return f"{head}.attn2.processor.{tail}"
    return module_path


def adapter_key_map(model) -> list[KeyRule]:
    """One rule per :class:`~facecrafter_jax.models.control.AdapterParam` of ``model`` (a FaceCrafter):
    Flax path <-> PyTorch key (see the module docstring)."""
    return build_key_map(model, variable_type=AdapterParam, rename=_adapter_rename)


def export_adapter_state(model) -> dict:
    """The adapters as a PyTorch-layout state dict of float32 NumPy arrays (see :func:`adapter_key_map`)."""
    return export_torch_state(model, adapter_key_map(model), variable_type=AdapterParam)


def load_adapter_state(model, state: Mapping) -> None:
    """Inverse of :func:`export_adapter_state` (strict: missing / unused / mis-shaped keys raise, naming the key)."""
    load_torch_state(model, state, adapter_key_map(model), variable_type=AdapterParam)


def export_adapters(model, out: str) -> list[str]:
    """Write ``OUT/facecrafter_adapters.safetensors`` (PyTorch layout) and ``OUT/facecrafter_adapters.json``."""
    from safetensors.numpy import save_file

    os.makedirs(out, exist_ok=True)
    weights, config = os.path.join(out, ADAPTERS_FILE), os.path.join(out, ADAPTERS_CONFIG_FILE)
    save_file(export_adapter_state(model), weights, metadata={"format": "pt"})
    with open(config, "w") as f:
        json.dump({"format": ADAPTERS_FORMAT, "version": 1, "config": model.config.to_dict()}, f, indent=2)
    return [weights, config]
