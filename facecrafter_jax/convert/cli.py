"""``facecrafter-convert``: PyTorch (diffusers / transformers) <-> our Flax checkpoints.

Sub-commands::

    facecrafter-convert from-arc2face MODELS --sd15 DIR --out DIR
    facecrafter-convert from-diffusers --unet DIR [--text-encoder DIR] [--vae DIR] --out DIR
    facecrafter-convert to-diffusers CHECKPOINT OUT [--no-ip-adapter]
    facecrafter-convert from-run RUN OUT [--vae DIR] [--no-ema]
    facecrafter-convert params [--unet-config sd15|PATH] [--controls landmark,emotion] [--landmark-tokens N] ...

``from-arc2face`` reads the Arc2Face hub download (``MODELS/arc2face``, ``MODELS/encoder``,
``MODELS/arcface.onnx``) and SD1.5's ``vae/`` (:mod:`facecrafter_jax.convert.arc2face`). ``from-diffusers`` reads a diffusers UNet folder, a transformers CLIPTextModel folder (Arc2Face's
``encoder/``; both key layouts) and a diffusers VAE folder, and writes our converted folder (see
:mod:`facecrafter_jax.pretrained`). ``to-diffusers`` writes ``OUT/unet`` (a diffusers folder that
stock ``UNet2DConditionModel.from_pretrained`` loads), ``OUT/text_encoder`` (transformers
``CLIPTextModel``) and ``OUT/vae`` when present, and, when the checkpoint has FaceCrafter adapters,
``OUT/facecrafter_adapters.safetensors`` (PyTorch layout, for
:func:`facecrafter_jax.torch_facecrafter.load_facecrafter_adapters`) with its config
``OUT/facecrafter_adapters.json``, and one stock diffusers IP-Adapter file per control,
``OUT/ip_adapters/facecrafter_<control>.safetensors`` (:mod:`facecrafter_jax.convert.ip_adapter`). ``from-run`` turns a training run's latest checkpoint into our converted
folder (:func:`facecrafter_jax.train.export.export_run`). ``params`` prints FaceCrafter's trainable (AdapterParam) and frozen
parameter counts for a UNet architecture, built abstractly (no memory).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from facecrafter_jax.errors import UserError, run_cli


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


def _from_arc2face(args) -> None:
    from facecrafter_jax.convert.arc2face import convert_arc2face

    convert_arc2face(args.models, args.sd15, args.out)


def export_to_diffusers(checkpoint: str, out: str, *, ip_adapter: bool = True) -> list[str]:
    """Write diffusers / transformers folders for every component of a converted checkpoint.

    With adapters: ``OUT/facecrafter_adapters.safetensors`` (+ ``.json``) for
    :mod:`facecrafter_jax.torch_facecrafter` and, unless ``ip_adapter=False``, one stock diffusers IP-Adapter
    per control in ``OUT/ip_adapters/`` (:mod:`facecrafter_jax.convert.ip_adapter`). A model that has no
    IP-Adapter form raises :class:`~facecrafter_jax.convert.ip_adapter.IPAdapterExportError` before anything
    is written.
    """
    from safetensors.numpy import save_file

    from facecrafter_jax.convert.clip import export_text_encoder_state
    from facecrafter_jax.convert.unet import export_unet_state
    from facecrafter_jax.convert.vae import save_vae_diffusers
    from facecrafter_jax.pretrained import load_pretrained, read_manifest

    components = read_manifest(checkpoint)["components"]
    models = load_pretrained(checkpoint, components=components)
    if models.adapters is not None and ip_adapter:
        from facecrafter_jax.convert.ip_adapter import check_ip_adapter_export

        check_ip_adapter_export(models.adapters)
    written = []
    if models.unet is not None:
        d = os.path.join(out, "unet")
        os.makedirs(d, exist_ok=True)
        # export_unet_state writes the frozen base only, also when the unet carries adapters.
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
    if models.adapters is not None:
        from facecrafter_jax.convert.adapters import export_adapters

        written.extend(export_adapters(models.adapters, out))
        if ip_adapter:
            from facecrafter_jax.convert.ip_adapter import export_ip_adapters

            written.extend(export_ip_adapters(models.adapters, out))
    return written


def _unet_config_arg(value: str):
    from facecrafter_jax.models.unet_2d_condition import UNet2DConditionConfig

    if value == "sd15":
        return UNet2DConditionConfig.sd15()
    path = os.path.join(value, "config.json") if os.path.isdir(value) else value
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--unet-config {value}: expected 'sd15', a diffusers UNet folder or its config.json")
    with open(path) as f:
        return UNet2DConditionConfig.from_diffusers_config(json.load(f))


def _params(args) -> None:
    from facecrafter_jax.models.facecrafter import FaceCrafterConfig, parameter_report

    controls = tuple(c.strip() for c in args.controls.split(",") if c.strip())
    config = FaceCrafterConfig(controls=controls, landmark_tokens=args.landmark_tokens, emotion_tokens=args.emotion_tokens,
                               landmark_hidden_dim=args.landmark_hidden_dim, emotion_hidden_dim=args.emotion_hidden_dim)
    report = parameter_report(_unet_config_arg(args.unet_config), config)
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(f"UNet architecture: {args.unet_config}; controls: {', '.join(controls)}")
    print(f"frozen (UNet, nnx.Param):      {report['unet']:>14,d}")
    print(f"trainable (AdapterParam):      {report['trainable']:>14,d}  ({report['percent_of_unet']:.2f}% of the UNet)")
    for name, n in report["breakdown"].items():
        print(f"  {name + ':':<28}{n:>14,d}")
    print(f"total:                         {report['total']:>14,d}")


def _to_diffusers(args) -> None:
    for d in export_to_diffusers(args.checkpoint, args.out, ip_adapter=not args.no_ip_adapter):
        print(f"wrote {d}")


def _from_run(args) -> None:
    from facecrafter_jax.train.export import export_run

    result = export_run(args.run, args.out, vae=args.vae, prefer_ema=not args.no_ema)
    print(f"wrote {args.out} ({', '.join(result['components'])}) from {result['step_dir']}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="facecrafter-convert", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    a = sub.add_parser("from-arc2face", help="Arc2Face hub download + SD1.5 VAE -> our Flax checkpoint folder")
    a.add_argument("models", help="the Arc2Face download: arc2face/ (UNet), encoder/ (CLIPTextModel), arcface.onnx")
    a.add_argument("--sd15", required=True, help="Stable Diffusion 1.5 folder with vae/ (or the vae/ folder itself)")
    a.add_argument("--out", required=True, help="output folder (created): unet, text_encoder, vae")
    a.set_defaults(func=_from_arc2face)

    f = sub.add_parser("from-diffusers", help="diffusers / transformers folders -> our Flax checkpoint folder")
    f.add_argument("--unet", required=True, help="diffusers UNet2DConditionModel folder (config.json + weights)")
    f.add_argument("--text-encoder", help="transformers CLIPTextModel folder (Arc2Face's encoder/)")
    f.add_argument("--vae", help="diffusers AutoencoderKL folder")
    f.add_argument("--out", required=True, help="output folder (created)")
    f.set_defaults(func=_from_diffusers)

    t = sub.add_parser("to-diffusers", help="our checkpoint folder -> diffusers / transformers folders")
    t.add_argument("checkpoint", help="folder written by from-diffusers (or by training)")
    t.add_argument("out", help="output folder: OUT/unet, OUT/text_encoder, OUT/vae; with adapters also "
                   "OUT/facecrafter_adapters.safetensors and OUT/ip_adapters/facecrafter_<control>.safetensors")
    t.add_argument("--no-ip-adapter", action="store_true",
                   help="do not write the diffusers IP-Adapter files (OUT/ip_adapters/)")
    t.set_defaults(func=_to_diffusers)

    r = sub.add_parser("from-run", help="training run (latest checkpoint) -> our checkpoint folder for sample.py")
    r.add_argument("run", help="run directory (or its checkpoints folder, or one step folder)")
    r.add_argument("out", help="output folder (created)")
    r.add_argument("--vae", help="converted folder whose vae component made the records (base-stage runs)")
    r.add_argument("--no-ema", action="store_true", help="export the raw trained parameters, not the EMA copy")
    r.set_defaults(func=_from_run)

    q = sub.add_parser("params", help="FaceCrafter trainable vs frozen parameter counts (abstract build, no memory)")
    q.add_argument("--unet-config", default="sd15", help="'sd15' (default), a diffusers UNet folder or its config.json")
    q.add_argument("--controls", default="landmark,emotion", help="comma-separated controls (default: landmark,emotion)")
    from facecrafter_jax.models.facecrafter import FaceCrafterConfig

    d = FaceCrafterConfig()
    q.add_argument("--landmark-tokens", type=int, default=d.landmark_tokens)
    q.add_argument("--emotion-tokens", type=int, default=d.emotion_tokens)
    q.add_argument("--landmark-hidden-dim", type=int, default=d.landmark_hidden_dim)
    q.add_argument("--emotion-hidden-dim", type=int, default=d.emotion_hidden_dim)
    q.add_argument("--json", action="store_true", help="print the report as JSON")
    q.set_defaults(func=_params)
    return p


def _main(argv) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except UserError:
        raise
    except (FileNotFoundError, ValueError) as e:  # bad paths and checkpoints that do not fit: one line, status 2
        raise UserError(str(e)) from e
    return 0


def main(argv=None) -> int:
    """Entry point: ``error: <one line>`` on stderr and exit status 2 for expected failures (``--debug``: traceback)."""
    return run_cli(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
