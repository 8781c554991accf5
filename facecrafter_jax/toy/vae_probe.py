"""A probe of the toy VAE: ``python -m facecrafter_jax.toy vae-probe NAME [VAE key=value ...] [--pipeline k=v]``.

The VAE bounds what the toy Arc2Face can reach: a sample is a decoded latent, so the identity and FD of the
VAE's reconstructions of real renders are a ceiling for those of the base model's samples (docs/toy_world.md,
"Base model quality"). Needs a toy pipeline that has finished its ``analysers`` stage (``python train.py --until
analysers``). With overrides, trains a VAE from the pipeline's VAE settings plus the overrides
(:class:`~.vae_training.VAETrainConfig` keys, e.g. ``steps=5000 decoder_noise=0.25``) on the same images as the
pipeline's ``vae`` stage and saves it to ``<out>/probes/vae_NAME/``; without overrides it measures the
pipeline's own VAE (``<out>/vae``, the stage must be done). It then reconstructs the celebrity (base-split)
renders of the report's conditioning identities (``--identities`` x ``--per-identity``; the base probe's
"real" row) and prints one JSON line: PSNR, and identity top-1 / FD against fresh base-split renders of the real
renders and of their reconstructions (``fd_parts``: the FD per feature group, :func:`~.measure.fd_parts`), with
``fd_ratio`` = FD(reconstructions) / FD(real) (the quality target of
the base model is FD(samples) / FD(real) <= 1.3), the training seconds and the load average. The line is
appended to ``<out>/probes/vae_log.jsonl``; ``<out>/probes/vae_NAME/reconstructions.png`` shows real renders
(odd rows) above their reconstructions. A trained probe is not retrained.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np

__all__ = ["run_vae_probe", "main"]


def _parse_overrides(overrides) -> dict:
    import yaml

    out = {}
    for kv in overrides:
        if "=" not in kv:
            raise ValueError(f"VAE override {kv!r} is not key=value")
        k, v = kv.split("=", 1)
        out[k] = yaml.safe_load(v)
    return out


def run_vae_probe(p, name: str, overrides=(), *, identities: int = 32, per_identity: int = 8) -> dict:
    """Train (if ``overrides``, unless done) or load (no overrides: the pipeline's VAE) and measure one VAE of
    pipeline ``p`` (see the module docstring). Returns the JSON row."""
    from facecrafter_jax.image_grid import image_grid, save_png
    from facecrafter_jax.pretrained import load_pretrained, save_pretrained

    from .base_probe import probe_context
    from .vae_training import VAETrainConfig, psnr, reconstruct, train_vae

    if p.done("analysers") is None:
        raise FileNotFoundError(f"{p.out}: the toy pipeline has not finished stage 'analysers'; run "
                                f"`python train.py --until analysers out={p.out}` first")
    extra = _parse_overrides(overrides)
    root = Path(p.out) / "probes" / f"vae_{name}"
    train_s = 0.0
    if extra:
        vcfg = VAETrainConfig.from_dict({"seed": p.cfg.seed, **dict(p.cfg.vae), **extra})  # unknown keys: error
        if not (root / "vae").is_dir():
            images = np.concatenate([p.data("base")["images"], p.data("adapter")["images"]])
            t0 = time.perf_counter()
            vae, _ = train_vae(images, vcfg, progress=True)
            train_s = time.perf_counter() - t0
            tmp = root / "vae.tmp"
            save_pretrained(str(tmp), vae=vae)
            os.replace(tmp, root / "vae")
        source, config = root / "vae", vcfg.to_dict()
    else:
        if p.done("vae") is None:
            raise FileNotFoundError(f"{p.out}: no VAE overrides given and the pipeline's 'vae' stage is not done")
        source, config = p.stage_dir("vae"), p.done("vae")["result"]["config"]
    vae = load_pretrained(str(source), components=("vae",)).vae

    ctx = probe_context(p, identities, per_identity, p.cfg.evaluation.seed)
    real = ctx.real
    recon = reconstruct(vae, real)
    row = {"name": name, "overrides": list(overrides), "vae": str(source), "config": config,
           "train_s": train_s, "load_average": os.getloadavg()[0], "samples": len(real), "psnr": psnr(real, recon)}
    for label, imgs in (("real", real), ("recon", recon)):
        m = ctx.metrics(ctx.an.analyse(imgs), bootstrap=0, seed=0)
        row[label] = {"id_top1": m["id_top1"], "fd": m["fd_parts"]["all"], "fd_parts": m["fd_parts"]}
    row["fd_ratio"] = row["recon"]["fd"] / max(row["real"]["fd"], 1e-12)
    root.mkdir(parents=True, exist_ok=True)
    k = min(16, len(real))
    save_png(image_grid(np.concatenate([real[:8], recon[:8], real[8:k], recon[8:k]]), min(8, k)),
             root / "reconstructions.png")
    with open(Path(p.out) / "probes" / "vae_log.jsonl", "a") as f:
        f.write(json.dumps(row, default=float) + "\n")
    return row


def main(argv=None) -> int:
    from facecrafter_jax.train.config import ConfigError

    from .base_probe import probe_parser
    from .pipeline import ToyPipeline, load_pipeline_config

    ap = probe_parser("python -m facecrafter_jax.toy vae-probe", __doc__, "probe name (folder <out>/probes/vae_NAME)",
                      "VAETrainConfig overrides, e.g. steps=5000 decoder_noise=0.25 (none: measure the pipeline's own VAE)")
    ap.add_argument("--identities", type=int, default=32)
    ap.add_argument("--per-identity", type=int, default=8)
    args = ap.parse_args(argv)
    try:
        p = ToyPipeline(load_pipeline_config(args.toy_config, args.pipeline))
        row = run_vae_probe(p, args.name, args.overrides, identities=args.identities,
                            per_identity=args.per_identity)
    except (ConfigError, FileNotFoundError, ValueError, TypeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(row, default=float))
    return 0
