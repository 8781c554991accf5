"""Training run -> our converted-model folder (the input of ``sample.py`` and ``facecrafter-convert to-diffusers``).

::

    export_run("runs/stage_c", "ckpt/facecrafter")             # unet + text_encoder (+ vae) + adapters
    export_run("runs/toy/base", "runs/toy/base_model", vae="runs/toy/vae")   # a base-stage run

or ``facecrafter-convert from-run RUN OUT [--vae DIR] [--no-ema]``.

The run's config (stored in every checkpoint) rebuilds the model: the frozen base from
``model.pretrained`` (or the inline configs for a ``base``-stage run), then the trained parameters of the
latest checkpoint (the EMA copy when the run kept one) replace the trainable ones; every trained
parameter must exist with its shape and every trainable one must be given, else the error names the key.

* control stages: writes the base's ``unet`` / ``text_encoder`` unchanged, the ``vae`` when the base
  folder has one, and ``adapters`` (the trained control modules);
* ``base`` stage: writes the trained ``unet`` and ``text_encoder``; the VAE that made the records comes
  from ``vae`` (a converted folder with a ``vae`` component; its config must equal the run's
  ``model.vae`` when that is given), else the folder has no VAE.
"""

from __future__ import annotations

import os
from typing import Any

import jax.numpy as jnp
import numpy as np

__all__ = ["export_run"]


def export_run(run: str | os.PathLike, out: str | os.PathLike, *, vae: str | os.PathLike | None = None,
               prefer_ema: bool = True) -> dict[str, Any]:
    """Write ``out`` from the latest checkpoint of ``run``; returns ``{"components", "step_dir", "stage"}``."""
    from facecrafter_jax.pretrained import load_pretrained, read_manifest, save_pretrained

    from .checkpoint import find_step_dir, load_trained_params
    from .config import TrainConfig, from_dict
    from .state import build_world

    step_dir = find_step_dir(run)
    values, config = load_trained_params(step_dir, prefer_ema=prefer_ema)
    _fill_encoder_widths(config, values)
    cfg = from_dict(TrainConfig, config).validate()
    pretrained_has_vae = (cfg.model.pretrained is not None
                          and "vae" in read_manifest(cfg.model.pretrained)["components"])
    world = build_world(cfg, load_vae=pretrained_has_vae)
    unknown = sorted(set(values) - set(world.params))
    missing = sorted(set(world.params) - set(values))
    if unknown or missing:
        raise ValueError(f"{step_dir}: trained parameters do not fit the model of its config "
                         f"(unknown: {unknown[:3]}, missing: {missing[:3]})")
    for k, v in values.items():
        if tuple(v.shape) != tuple(np.shape(world.params[k])):
            raise ValueError(f"{step_dir}: parameter {k} has shape {tuple(v.shape)}, the model expects "
                             f"{tuple(np.shape(world.params[k]))}")
    model = world.merge({k: jnp.asarray(v) for k, v in values.items()}, world.frozen)

    vae_module = world.vae if pretrained_has_vae else None
    if vae is not None:
        vae_module = load_pretrained(str(vae), components=("vae",)).vae
        if cfg.model.vae is not None and cfg.model.pretrained is None:
            from facecrafter_jax.models.vae import AutoencoderKLConfig

            from .state import _plain_dict

            want = AutoencoderKLConfig.from_dict(_plain_dict(cfg.model.vae))
            if vae_module.config != want:
                raise ValueError(f"--vae {vae}: its config differs from the run's model.vae "
                                 f"({vae_module.config} vs {want})")
    if cfg.stage == "base":
        parts = {"unet": model.unet, "text_encoder": model.text_encoder}
    else:
        parts = {"unet": model.facecrafter.unet, "text_encoder": model.text_encoder, "adapters": model.facecrafter}
    if vae_module is not None:
        parts["vae"] = vae_module
    save_pretrained(str(out), **parts)
    return {"components": sorted(parts), "step_dir": str(step_dir), "stage": cfg.stage}


def _fill_encoder_widths(config: dict, values) -> None:
    """Take an encoder width the run's config left at its default from the trained parameters (in place).

    The defaults changed (landmark 1024 -> 1434, emotion 512 -> 510, so the diffusers IP-Adapter export is
    exact); a run that relied on the old defaults still exports with the widths it was trained with.
    """
    model = config.get("model")
    fc = model.get("facecrafter") if isinstance(model, dict) else None
    if not isinstance(fc, dict):
        return
    for name in ("landmark", "emotion"):
        kernel = values.get(f"facecrafter.{name}_encoder.proj_in.kernel")
        if kernel is not None and f"{name}_hidden_dim" not in fc:
            fc[f"{name}_hidden_dim"] = int(np.shape(kernel)[1])
