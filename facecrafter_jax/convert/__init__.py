"""Importers from PyTorch checkpoints (diffusers / transformers folders) and exporters back to them.

Public API::

    from facecrafter_jax.convert import load_unet, load_text_encoder, load_vae

Each loader reads a diffusers / transformers folder (``config.json`` + safetensors or ``.bin``),
builds our Flax NNX model from the config and copies the weights through the explicit key map in
:mod:`facecrafter_jax.convert.weights`. ``convert_arc2face`` reads the Arc2Face hub download
(:mod:`~facecrafter_jax.convert.arc2face`); the FaceCrafter adapters go out in our PyTorch layout
(:mod:`~facecrafter_jax.convert.adapters`) and as stock diffusers IP-Adapters
(``export_ip_adapters``, :mod:`~facecrafter_jax.convert.ip_adapter`). Submodules are imported lazily so that
importing this package does not pull in every model.
"""

import importlib

_LAZY = {
    "load_unet": "facecrafter_jax.convert.unet",
    "load_text_encoder": "facecrafter_jax.convert.clip",
    "load_vae": "facecrafter_jax.convert.vae",
    "load_emonet": "facecrafter_jax.convert.emonet",
    "convert_arc2face": "facecrafter_jax.convert.arc2face",
    "export_ip_adapters": "facecrafter_jax.convert.ip_adapter",
}

__all__ = list(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'facecrafter_jax.convert' has no attribute {name!r}")
