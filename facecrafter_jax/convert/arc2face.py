"""The Arc2Face hub download (``FoivosPar/Arc2Face``) + SD1.5's VAE -> our converted checkpoint folder.

``facecrafter-convert from-arc2face MODELS --sd15 SD15 --out DIR`` reads the layout users get from the hub::

    MODELS/arc2face/config.json, diffusion_pytorch_model.safetensors   diffusers UNet2DConditionModel
    MODELS/encoder/config.json, pytorch_model.bin                      transformers CLIPTextModel (``text_model.`` keys)
    MODELS/arcface.onnx                                                ArcFace R100: [N, 3, 112, 112] -> [N, 512]
    SD15/vae/config.json, diffusion_pytorch_model.safetensors          SD1.5's AutoencoderKL (SD15 may be the vae/ folder)

and writes ``DIR`` with the ``unet``, ``text_encoder`` and ``vae`` components (:mod:`facecrafter_jax.pretrained`),
the input of ``sample.py --checkpoint`` and of training (``model.pretrained``). ``arcface.onnx`` is not
converted (``sample.py`` and ``data_prep`` run it with onnxruntime): its signature is checked here so that a
wrong file shows up now, not at the first ``--id-image``. Everything is checked before the slow loads:
missing folders / files, the ArcFace signature, and that the encoder's width takes a 512-d ArcFace vector and
equals the UNet's cross-attention width.
"""

from __future__ import annotations

import json
import os
import time

from facecrafter_jax.errors import CheckpointError

__all__ = ["ARC2FACE_LAYOUT", "check_arc2face_layout", "convert_arc2face"]

ARC2FACE_LAYOUT = {"unet": "arc2face", "text_encoder": "encoder", "arcface": "arcface.onnx"}
ARCFACE_DIM = 512
_HUB = "huggingface-cli download FoivosPar/Arc2Face --local-dir MODELS (docs/quickstart.md)"


def _need_folder(path: str, what: str, weights: tuple[str, ...]) -> None:
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: not found; expected {what} ({_HUB})")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise CheckpointError(f"{path}: no config.json; expected {what}")
    if not any(os.path.isfile(os.path.join(path, w)) for w in weights):
        raise CheckpointError(f"{path}: no weights ({' or '.join(weights)}); expected {what}")


def _check_arcface(path: str) -> None:
    import onnxruntime as ort

    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: not found; expected Arc2Face's ArcFace model ({_HUB})")
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    try:
        session = ort.InferenceSession(path, sess_options=opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 - any parse failure means the file is not a usable model
        raise CheckpointError(f"{path}: cannot be opened as an ONNX model ({type(e).__name__}: {e})") from e
    inputs, outputs = session.get_inputs(), session.get_outputs()
    shape = list(inputs[0].shape) if len(inputs) == 1 else None
    if shape is None or len(shape) != 4 or shape[1:] != [3, 112, 112]:
        raise CheckpointError(f"{path}: ArcFace input must be one [N, 3, 112, 112] tensor, got "
                              f"{[(i.name, i.shape) for i in inputs]}")
    out = list(outputs[0].shape)
    if len(out) != 2 or out[1] != ARCFACE_DIM:
        raise CheckpointError(f"{path}: ArcFace output must be [N, {ARCFACE_DIM}], got {out}")


def check_arc2face_layout(models: str, sd15: str) -> dict[str, str]:
    """Check the hub layout without loading weights; returns the paths ``unet``, ``text_encoder``, ``arcface``, ``vae``."""
    if not os.path.isdir(models):
        raise CheckpointError(f"{models}: not a directory; expected the Arc2Face download ({_HUB})")
    paths = {k: os.path.join(models, v) for k, v in ARC2FACE_LAYOUT.items()}
    _need_folder(paths["unet"], "Arc2Face's UNet (diffusers UNet2DConditionModel folder)",
                 ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"))
    _need_folder(paths["text_encoder"], "Arc2Face's encoder (transformers CLIPTextModel folder)",
                 ("pytorch_model.bin", "model.safetensors"))
    _check_arcface(paths["arcface"])
    vae = sd15 if os.path.isfile(os.path.join(sd15, "config.json")) else os.path.join(sd15, "vae")
    _need_folder(vae, "SD1.5's VAE: the stable-diffusion-v1-5 folder with vae/, or that vae/ folder",
                 ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"))
    paths["vae"] = vae
    with open(os.path.join(paths["text_encoder"], "config.json")) as f:
        width = json.load(f).get("hidden_size")
    with open(os.path.join(paths["unet"], "config.json")) as f:
        cross = json.load(f).get("cross_attention_dim")
    if not isinstance(width, int) or width < ARCFACE_DIM:
        raise CheckpointError(f"{paths['text_encoder']}/config.json: hidden_size {width!r} cannot hold a "
                              f"{ARCFACE_DIM}-d ArcFace vector (Arc2Face's encoder has 768)")
    if cross != width:
        raise CheckpointError(f"{paths['unet']}/config.json: cross_attention_dim {cross!r} differs from the "
                              f"encoder's hidden_size {width}; these folders do not belong together")
    return paths


def convert_arc2face(models: str, sd15: str, out: str, *, log=print) -> dict[str, str]:
    """Convert the Arc2Face download + SD1.5 VAE into our folder ``out``; returns the source paths."""
    from facecrafter_jax.convert import load_text_encoder, load_unet, load_vae
    from facecrafter_jax.pretrained import save_pretrained

    paths = check_arc2face_layout(models, sd15)
    parts = {}
    for name, loader in (("unet", load_unet), ("text_encoder", load_text_encoder), ("vae", load_vae)):
        t0 = time.perf_counter()
        parts[name] = loader(paths[name])
        log(f"loaded {name} from {paths[name]} ({time.perf_counter() - t0:.1f}s)")
    save_pretrained(out, **parts)
    log(f"wrote unet, text_encoder, vae to {out}; ArcFace for --id-image / data_prep: {paths['arcface']}")
    return paths
