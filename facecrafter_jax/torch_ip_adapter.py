"""FaceCrafter with stock diffusers: inputs for the exported IP-Adapters and Arc2Face's identity context.

PyTorch only (imports no JAX). ``facecrafter-convert to-diffusers CHECKPOINT OUT`` writes one diffusers
IP-Adapter per control (``OUT/ip_adapters/facecrafter_<control>.safetensors``,
:mod:`facecrafter_jax.convert.ip_adapter`); diffusers loads them itself, this module only builds the inputs::

    import torch
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel, AutoencoderKL
    from transformers import CLIPTextModel
    from facecrafter_jax.torch_ip_adapter import arc2face_prompt_embeds, empty_prompt_embeds, ip_adapter_image_embeds

    pipe = StableDiffusionPipeline(vae=AutoencoderKL.from_pretrained("OUT/vae"), text_encoder=None, tokenizer=None,
                                   unet=UNet2DConditionModel.from_pretrained("OUT/unet"), scheduler=...,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.load_ip_adapter("OUT", subfolder="ip_adapters", image_encoder_folder=None,
                         weight_name=["facecrafter_landmark.safetensors", "facecrafter_emotion.safetensors"])
    pipe.set_ip_adapter_scale([1.0, 1.0])
    encoder = CLIPTextModel.from_pretrained("OUT/text_encoder")
    images = pipe(prompt_embeds=arc2face_prompt_embeds(encoder, arcface),          # [1, 512] ArcFace
                  negative_prompt_embeds=empty_prompt_embeds(encoder),
                  ip_adapter_image_embeds=ip_adapter_image_embeds(landmarks=lmk, emotion=emo),
                  guidance_scale=3.0).images

Conventions (``docs/method.md``): an IP-Adapter's input is the *raw* condition, flattened (landmarks
``[478, 3]`` as data_prep stores them -> 1434 values; emotion ``[10]``), and the **null** input is zeros. A
control that is not given gets the null input in both halves of classifier-free guidance; the negative half
always gets the null input (Arc2Face's expression adapter and IP-Adapter use ``zeros_like`` the same way).
Switch a control off with ``pipe.set_ip_adapter_scale`` 0 for it.

diffusers' pipelines repeat each embedding for every prompt and image (``num_images_per_prompt``), so a
pipeline call takes one control set (batch 1). For different controls per sample call the UNet directly:
``unet(x, t, ctx, added_cond_kwargs={"image_embeds": ip_adapter_image_embeds(..., do_classifier_free_guidance=False)})``
with inputs of batch B.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from facecrafter_jax.face.vocabulary import CONTROL_INPUT_DIMS, NUM_LANDMARKS

__all__ = ["CONTROLS", "NUM_LANDMARKS", "CONTROL_INPUT_DIMS", "raw_control_input", "ip_adapter_image_embeds",
           "arc2face_prompt_embeds", "empty_prompt_embeds"]

CONTROLS = ("landmark", "emotion")


def raw_control_input(kind: str, condition) -> torch.Tensor:
    """A raw condition as the IP-Adapter input ``[B, CONTROL_INPUT_DIMS[kind]]`` (float32, not normalised).

    ``landmark``: ``[478, 3]``, ``[B, 478, 3]`` or ``[B, 1434]``; ``emotion``: ``[10]`` or ``[B, 10]``.
    """
    if kind not in CONTROL_INPUT_DIMS:
        raise ValueError(f"unknown control {kind!r}; known controls: {list(CONTROLS)}")
    x = torch.as_tensor(np.asarray(condition) if not torch.is_tensor(condition) else condition, dtype=torch.float32)
    if kind == "landmark":
        if x.ndim == 2 and tuple(x.shape) == (NUM_LANDMARKS, 3):
            x = x[None]
        if x.ndim == 3 and tuple(x.shape[1:]) == (NUM_LANDMARKS, 3):
            x = x.reshape(x.shape[0], NUM_LANDMARKS * 3)
        if x.ndim != 2 or x.shape[1] != NUM_LANDMARKS * 3:
            raise ValueError(f"landmarks must be [478, 3], [B, 478, 3] or [B, 1434], got shape {tuple(x.shape)}")
        return x
    if x.ndim == 1:
        x = x[None]
    if x.ndim != 2 or x.shape[1] != CONTROL_INPUT_DIMS[kind]:
        raise ValueError(f"emotion must be [10] or [B, 10] (8 class probabilities, valence, arousal), got shape {tuple(x.shape)}")
    return x


def ip_adapter_image_embeds(landmarks=None, emotion=None, *, controls: Sequence[str] = CONTROLS,
                            do_classifier_free_guidance: bool = True, batch_size: int | None = None,
                            dtype=torch.float32, device=None) -> list[torch.Tensor]:
    """``ip_adapter_image_embeds`` for FaceCrafter IP-Adapters loaded in the order ``controls``.

    One tensor per control, ``[B, 1, input_dim]``; with ``do_classifier_free_guidance`` ``[2B, 1, input_dim]``,
    the null input (zeros) first, as diffusers' pipelines split it (``.chunk(2)``: negative, positive). A
    control given as None gets the null input. ``B`` is the batch of the given inputs (1 for a single
    ``[478, 3]`` / ``[10]``), else ``batch_size`` (default 1).
    """
    raw = {"landmark": landmarks, "emotion": emotion}
    controls = list(controls)
    unknown = [c for c in controls if c not in CONTROL_INPUT_DIMS]
    if unknown or len(set(controls)) != len(controls) or not controls:
        raise ValueError(f"controls must be distinct names from {list(CONTROLS)}, got {controls}")
    for name, x in raw.items():
        if x is not None and name not in controls:
            raise ValueError(f"a {name} input was given but {name!r} is not among the loaded controls {controls}")
    given = {name: raw_control_input(name, x) for name, x in raw.items() if x is not None}
    batches = {name: int(x.shape[0]) for name, x in given.items()}
    if len(set(batches.values())) > 1:
        raise ValueError(f"control inputs have different batch sizes {batches}")
    batch = next(iter(batches.values())) if batches else int(batch_size or 1)
    if batch_size is not None and batch_size != batch:
        raise ValueError(f"batch_size={batch_size} but the control inputs have batch {batch}")
    out = []
    for name in controls:
        null = torch.zeros((batch, CONTROL_INPUT_DIMS[name]), dtype=torch.float32)
        x = given.get(name, null)
        x = torch.cat([null, x]) if do_classifier_free_guidance else x
        out.append(x[:, None, :].to(device=device, dtype=dtype))
    return out


def _text_model(text_encoder):
    return text_encoder.text_model if hasattr(text_encoder, "text_model") else text_encoder


def _encode(text_encoder, ids: torch.Tensor, token_embeds: torch.Tensor) -> torch.Tensor:
    te = _text_model(text_encoder)
    h = te.embeddings(input_ids=ids, inputs_embeds=token_embeds)
    n = ids.shape[-1]
    causal = torch.full((n, n), torch.finfo(h.dtype).min, dtype=h.dtype, device=h.device).triu(1)[None, None]
    h = te.encoder(inputs_embeds=h, attention_mask=causal).last_hidden_state
    return te.final_layer_norm(h)


@torch.no_grad()
def arc2face_prompt_embeds(text_encoder, arcface, *, normalize: bool = True) -> torch.Tensor:
    """Arc2Face's identity context ``[B, 77, D]`` (the UNet's ``prompt_embeds``) from ArcFace vectors ``[B, d <= D]``.

    As the official code (``project_face_embs`` + ``CLIPTextModelWrapper``): the prompt ``photo of a id person``;
    the token embedding of ``id`` is replaced by the (L2-normalised, ``normalize``) vector zero-padded to the
    encoder width; position embeddings, the causal encoder (no padding mask) and the final LayerNorm follow.
    ``text_encoder`` is Arc2Face's ``CLIPTextModel`` (``encoder/``; ``OUT/text_encoder`` after ``to-diffusers``).
    """
    from facecrafter_jax import tokens

    te = _text_model(text_encoder)
    param = next(te.parameters())
    x = torch.as_tensor(np.asarray(arcface) if not torch.is_tensor(arcface) else arcface, dtype=torch.float32)
    if x.ndim == 1:
        x = x[None]
    hidden = te.config.hidden_size
    if x.ndim != 2 or x.shape[1] > hidden:
        raise ValueError(f"arcface must be [B, d] with d <= {hidden}, got shape {tuple(x.shape)}")
    if normalize:
        x = x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)
    ids = torch.from_numpy(tokens.ARC2FACE_PROMPT_IDS.astype(np.int64))[None].repeat(x.shape[0], 1).to(param.device)
    tok = te.embeddings.token_embedding(ids)
    pos = int(np.flatnonzero(tokens.ARC2FACE_PROMPT_IDS == tokens.ID_TOKEN_ID)[0])
    tok[:, pos] = F.pad(x, (0, hidden - x.shape[1])).to(device=param.device, dtype=tok.dtype)
    return _encode(text_encoder, ids, tok)


@torch.no_grad()
def empty_prompt_embeds(text_encoder, batch_size: int = 1) -> torch.Tensor:
    """The empty prompt through the same encoder ``[batch_size, 77, D]``: Arc2Face's unconditional context."""
    from facecrafter_jax import tokens

    te = _text_model(text_encoder)
    param = next(te.parameters())
    ids = torch.from_numpy(tokens.EMPTY_PROMPT_IDS.astype(np.int64))[None].to(param.device)
    out = _encode(text_encoder, ids, te.embeddings.token_embedding(ids))
    return out.repeat(batch_size, 1, 1)
