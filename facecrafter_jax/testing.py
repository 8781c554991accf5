"""Tiny random PyTorch reference models (diffusers / transformers), saved with save_pretrained.

Shared by the conversion, demo and pipeline tests. Every parameter (norms and biases included) is
drawn from a seeded normal so no layer is an identity by accident.
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
