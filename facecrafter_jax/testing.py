"""PyTorch reference helpers: tiny random Arc2Face-shaped models and Arc2Face's identity procedure.

Used by the tests, the benchmarks and the demo (needs the ``torch`` extra). Every parameter (norms and
biases included) is drawn from a seeded normal so no layer is an identity by accident.
"""

from __future__ import annotations

import torch

TINY_UNET = dict(
    sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=64, attention_head_dim=2, norm_num_groups=8,
)
TINY_CLIP = dict(
    vocab_size=49408, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    max_position_embeddings=77, hidden_act="quick_gelu", bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
)
TINY_VAE = dict(
    in_channels=3, out_channels=3, block_out_channels=(16, 32), down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, latent_channels=4, norm_num_groups=8, sample_size=32,
)


def randomize_(module: torch.nn.Module, seed: int, std: float = 0.1) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("weight") and p.ndim == 1:  # norm scales around 1
                p.copy_(1.0 + std * torch.randn(p.shape, generator=g))
            else:
                p.copy_(std * torch.randn(p.shape, generator=g))
    return module.eval()


def tiny_unet(seed: int = 0, **overrides):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return randomize_(UNet2DConditionModel(**{**TINY_UNET, **overrides}), seed)


def tiny_clip(seed: int = 1, **overrides):
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    return randomize_(CLIPTextModel(CLIPTextConfig(**{**TINY_CLIP, **overrides})), seed, std=0.05)


def tiny_vae(seed: int = 2, **overrides):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return randomize_(AutoencoderKL(**{**TINY_VAE, **overrides}), seed, std=0.05)


def save_tiny_arc2face(root, seed: int = 0) -> dict:
    """Write unet/, text_encoder/ and vae/ folders under ``root``; returns the PyTorch models."""
    models = {"unet": tiny_unet(seed), "text_encoder": tiny_clip(seed + 1), "vae": tiny_vae(seed + 2)}
    for name, m in models.items():
        m.save_pretrained(str(root / name))
    return models


def arc2face_context_torch(text_encoder, arcface: torch.Tensor) -> torch.Tensor:
    """Arc2Face's identity context computed the official way, one identity at a time, in PyTorch.

    ``text_encoder`` is a transformers ``CLIPTextModel``; ``arcface`` [B, D] must already be
    L2-normalised (Arc2Face normalises in the caller). The embedding of the ``id`` token of
    "photo of a id person" is replaced by the vector zero-padded to the hidden size, then position
    embeddings, the causal encoder and the final LayerNorm run as usual.
    """
    import numpy as np
    import torch.nn.functional as F

    from facecrafter_jax import tokens

    te = text_encoder.text_model if hasattr(text_encoder, "text_model") else text_encoder
    ids = torch.from_numpy(tokens.ARC2FACE_PROMPT_IDS[None].astype(np.int64))
    hidden = te.config.hidden_size
    outs = []
    with torch.no_grad():
        for emb in arcface:
            tok = te.embeddings.token_embedding(ids)
            tok[ids == tokens.ID_TOKEN_ID] = F.pad(emb[None].to(tok.dtype), (0, hidden - emb.shape[-1]))
            h = te.embeddings(input_ids=ids, inputs_embeds=tok)
            n = ids.shape[-1]
            causal = torch.full((n, n), torch.finfo(h.dtype).min).triu(1)[None, None]
            h = te.encoder(inputs_embeds=h, attention_mask=causal).last_hidden_state
            outs.append(te.final_layer_norm(h))
    return torch.cat(outs)
