"""Our converted-model folder: the Flax checkpoint that ``facecrafter-convert from-diffusers`` writes.

Layout (plain safetensors, no orbax needed to read it)::

    DIR/facecrafter.json            {"format": "facecrafter-flax", "version": 1, "components": [...]}
    DIR/unet/config.json            diffusers-style UNet config
    DIR/unet/model.safetensors      parameters keyed by dotted Flax paths (e.g. "down_blocks.0.resnets.0.conv1.kernel")
    DIR/text_encoder/config.json    transformers-style CLIPTextConfig
    DIR/text_encoder/model.safetensors
    DIR/vae/config.json             diffusers-style AutoencoderKL config (optional component)
    DIR/vae/model.safetensors
    DIR/adapters/config.json        FaceCrafterConfig (optional component: the trained control modules)
    DIR/adapters/model.safetensors  every AdapterParam of the FaceCrafter model, keyed by its Flax path
                                    (e.g. "unet.down_blocks.0...attn2.to_k_c.landmark.kernel", "landmark_encoder.proj_in.kernel")

Tensors are stored in our layout (HWIO conv kernels, [in, out] linear kernels), float32. Training
checkpoints (orbax) are a different thing: they hold the trainable adapters, optimiser and data state
and refer to a folder like this one for the frozen base.

The ``unet`` component always holds only the frozen base (``nnx.Param`` that are not ``AdapterParam``),
so it stays a plain Arc2Face UNet; ``adapters`` needs ``unet`` and is loaded only when asked for
(``components=(..., "adapters")``): :attr:`Pretrained.adapters` is then the
:class:`~facecrafter_jax.models.facecrafter.FaceCrafter` model built around :attr:`Pretrained.unet`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import jax.numpy as jnp
from flax import nnx

from facecrafter_jax.convert.weights import load_flax_params, save_flax_params

FORMAT = "facecrafter-flax"
VERSION = 1
COMPONENTS = ("unet", "text_encoder", "vae")
OPTIONAL_COMPONENTS = ("adapters",)  # never loaded by default
ALL_COMPONENTS = COMPONENTS + OPTIONAL_COMPONENTS


@dataclass
class Pretrained:
    """The frozen Arc2Face components (any may be None when the folder lacks it) and, when loaded, the
    FaceCrafter model (``adapters``: the ``unet`` with its control adapters installed, plus the encoders)."""

    unet: nnx.Module | None = None
    text_encoder: nnx.Module | None = None
    vae: nnx.Module | None = None
    adapters: nnx.Module | None = None


def _config_of(name: str, model) -> dict:
    return model.config.to_dict()


def save_pretrained(directory: str, *, unet=None, text_encoder=None, vae=None, adapters=None) -> None:
    """Write the given components in our Flax format (see the module docstring).

    ``adapters``: a :class:`~facecrafter_jax.models.facecrafter.FaceCrafter` model; its ``AdapterParam``
    state is written to ``DIR/adapters`` and needs ``unet`` (its base, e.g. ``unet=model.unet``) too.
    The ``unet`` component never includes adapter parameters.
    """
    from facecrafter_jax.models.control import FROZEN, AdapterParam

    parts = {"unet": unet, "text_encoder": text_encoder, "vae": vae, "adapters": adapters}
    present = [k for k, v in parts.items() if v is not None]
    if not present:
        raise ValueError("save_pretrained: nothing to save (give at least one of unet, text_encoder, vae)")
    if adapters is not None and unet is None:
        raise ValueError("save_pretrained: the adapters component needs the unet component (pass unet=model.unet)")
    os.makedirs(directory, exist_ok=True)
    filters = {"unet": FROZEN, "adapters": AdapterParam}
    for name in present:
        save_flax_params(parts[name], os.path.join(directory, name), _config_of(name, parts[name]),
                         variable_type=filters.get(name, nnx.Param))
    with open(os.path.join(directory, "facecrafter.json"), "w") as f:
        json.dump({"format": FORMAT, "version": VERSION, "components": present}, f, indent=2)


def read_manifest(directory: str) -> dict:
    path = os.path.join(directory, "facecrafter.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{directory} is not a converted facecrafter checkpoint (no facecrafter.json); "
                                "create one with `facecrafter-convert from-diffusers`")
    with open(path) as f:
        manifest = json.load(f)
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{path}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    if manifest.get("version") != VERSION:
        raise ValueError(f"{path}: version {manifest.get('version')!r}, this code reads version {VERSION}")
    unknown = set(manifest.get("components", [])) - set(ALL_COMPONENTS)
    if unknown:
        raise ValueError(f"{path}: unknown component(s) {sorted(unknown)}")
    return manifest


def _build(name: str, config: dict, dtype, options: dict):
    if name == "unet":
        from facecrafter_jax.models.unet_2d_condition import UNet2DConditionConfig, UNet2DConditionModel

        cfg = UNet2DConditionConfig.from_diffusers_config(config)
        if cfg.dropout > 0:  # dropout RNG state must be real
            return UNet2DConditionModel(cfg, dtype=dtype, rngs=nnx.Rngs(0), **options)
        return UNet2DConditionModel.create_abstract(cfg, dtype=dtype, **options)  # shapes only, filled below
    if name == "text_encoder":
        from facecrafter_jax.models.clip_text import CLIPTextConfig, CLIPTextModel

        cfg = CLIPTextConfig.from_dict(config)
        return nnx.eval_shape(lambda: CLIPTextModel(cfg, dtype=dtype, rngs=nnx.Rngs(0), **options))
    if name == "vae":
        from facecrafter_jax.models.vae import AutoencoderKL, AutoencoderKLConfig

        cfg = AutoencoderKLConfig.from_dict(config)
        return nnx.eval_shape(lambda: AutoencoderKL(cfg, dtype=dtype, rngs=nnx.Rngs(0), **options))
    raise ValueError(f"unknown component {name!r}")


def load_pretrained(directory: str, *, dtype=jnp.float32, components=COMPONENTS, unet_options: dict | None = None) -> Pretrained:
    """Load the components of a converted folder that are both present and asked for.

    ``dtype`` is the compute dtype (parameters stay float32); ``unet_options`` go to the UNet
    constructor (``attention_implementation``, ``explicit_cross_attention``, ``remat``). Asking for a
    component the folder does not have is an error naming it. ``"adapters"`` (never loaded by default)
    needs ``"unet"``: it installs the adapters into that UNet and sets ``out.adapters`` to the FaceCrafter model.
    """
    manifest = read_manifest(directory)
    out = Pretrained()
    components = tuple(components)
    for name in components:
        if name not in ALL_COMPONENTS:
            raise ValueError(f"unknown component {name!r}; choose from {ALL_COMPONENTS}")
        if name not in manifest["components"]:
            raise FileNotFoundError(f"{directory} has no {name!r} component (it has {manifest['components']})")
    if "adapters" in components and "unet" not in components:
        raise ValueError("load_pretrained: the 'adapters' component needs the 'unet' component too")
    for name in sorted(components, key=lambda n: n == "adapters"):  # adapters last: they wrap the unet
        with open(os.path.join(directory, name, "config.json")) as f:
            config = json.load(f)
        if name == "adapters":
            setattr(out, name, _load_adapters(directory, config, out.unet, dtype))
            continue
        model = _build(name, config, dtype, (unet_options or {}) if name == "unet" else {})
        load_flax_params(model, os.path.join(directory, name))
        setattr(out, name, model)
    return out


def _load_adapters(directory: str, config: dict, unet, dtype):
    from facecrafter_jax.models.control import AdapterParam
    from facecrafter_jax.models.facecrafter import FaceCrafter, FaceCrafterConfig

    model = FaceCrafter(unet, FaceCrafterConfig.from_dict(config), dtype=dtype, rngs=nnx.Rngs(0))
    load_flax_params(model, os.path.join(directory, "adapters"), variable_type=AdapterParam)
    return model
