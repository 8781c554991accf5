"""``facecrafter-convert``: PyTorch (diffusers / transformers) <-> our Flax checkpoints.

Sub-commands::

    facecrafter-convert from-diffusers --unet DIR [--text-encoder DIR] [--vae DIR] --out DIR
    facecrafter-convert to-diffusers CHECKPOINT OUT

``from-diffusers`` reads a diffusers UNet folder, a transformers CLIPTextModel folder (Arc2Face's
``encoder/``; both key layouts) and a diffusers VAE folder, and writes our converted folder (see
:mod:`facecrafter_jax.pretrained`). ``to-diffusers`` writes ``OUT/unet`` (a diffusers folder that
stock ``UNet2DConditionModel.from_pretrained`` loads), ``OUT/text_encoder`` (transformers
``CLIPTextModel``) and ``OUT/vae`` when present.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def _from_diffusers(args) -> None:
    from facecrafter_jax.convert import load_text_encoder, load_unet, load_vae
    from facecrafter_jax.pretrained import save_pretrained

    parts = {}
    for name, folder, loader in (("unet", args.unet, load_unet), ("text_encoder", args.text_encoder, load_text_encoder),
                                 ("vae", args.vae, load_vae)):
        if folder is None:
            continue
        if not os.path.isdir(folder):
            raise SystemExit(f"error: --{name.replace('_', '-')} {folder}: not a directory")
        t0 = time.perf_counter()
        parts[name] = loader(folder)
        print(f"loaded {name} from {folder} ({time.perf_counter() - t0:.1f}s)")
    save_pretrained(args.out, **parts)
    print(f"wrote {', '.join(parts)} to {args.out}")


def export_to_diffusers(checkpoint: str, out: str) -> list[str]:
    """Write diffusers / transformers folders for every component of a converted checkpoint."""
    from safetensors.numpy import save_file

    from facecrafter_jax.convert.clip import export_text_encoder_state
    from facecrafter_jax.convert.unet import export_unet_state
    from facecrafter_jax.convert.vae import save_vae_diffusers
    from facecrafter_jax.pretrained import load_pretrained, read_manifest

    components = read_manifest(checkpoint)["components"]
    models = load_pretrained(checkpoint, components=components)
    written = []
    if models.unet is not None:
        d = os.path.join(out, "unet")
        os.makedirs(d, exist_ok=True)
        save_file(export_unet_state(models.unet), os.path.join(d, "diffusion_pytorch_model.safetensors"), metadata={"format": "pt"})
        with open(os.path.join(d, "config.json"), "w") as f:
            json.dump(models.unet.config.to_dict(), f, indent=2)
        written.append(d)
    if models.text_encoder is not None:
        d = os.path.join(out, "text_encoder")
        os.makedirs(d, exist_ok=True)
        save_file(export_text_encoder_state(models.text_encoder), os.path.join(d, "model.safetensors"), metadata={"format": "pt"})
        with open(os.path.join(d, "config.json"), "w") as f:
            json.dump(models.text_encoder.config.to_dict(), f, indent=2)
        written.append(d)
    if models.vae is not None:
        d = os.path.join(out, "vae")
        save_vae_diffusers(models.vae, d)
        written.append(d)
    return written


def _to_diffusers(args) -> None:
    for d in export_to_diffusers(args.checkpoint, args.out):
        print(f"wrote {d}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="facecrafter-convert", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    f = sub.add_parser("from-diffusers", help="diffusers / transformers folders -> our Flax checkpoint folder")
    f.add_argument("--unet", required=True, help="diffusers UNet2DConditionModel folder (config.json + weights)")
    f.add_argument("--text-encoder", help="transformers CLIPTextModel folder (Arc2Face's encoder/)")
    f.add_argument("--vae", help="diffusers AutoencoderKL folder")
    f.add_argument("--out", required=True, help="output folder (created)")
    f.set_defaults(func=_from_diffusers)

    t = sub.add_parser("to-diffusers", help="our checkpoint folder -> diffusers / transformers folders")
    t.add_argument("checkpoint", help="folder written by from-diffusers (or by training)")
    t.add_argument("out", help="output folder: OUT/unet, OUT/text_encoder, OUT/vae")
    t.set_defaults(func=_to_diffusers)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
