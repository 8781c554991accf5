"""facecrafter-convert: diffusers/transformers -> our folder -> diffusers/transformers, bit for bit."""

import numpy as np
import pytest
import torch
import jax.numpy as jnp

from facecrafter_jax.convert.cli import main
from facecrafter_jax.pretrained import load_pretrained
from facecrafter_jax import tokens
from tiny_models import save_tiny_arc2face


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("conv")
    models = save_tiny_arc2face(root / "torch")
    rc = main(["from-diffusers", "--unet", str(root / "torch/unet"), "--text-encoder", str(root / "torch/text_encoder"),
               "--vae", str(root / "torch/vae"), "--out", str(root / "flax")])
    assert rc == 0
    return root, models


def test_round_trip_bit_identical(converted):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    root, models = converted
    assert main(["to-diffusers", str(root / "flax"), str(root / "back")]) == 0
    reloaded = {
        "unet": UNet2DConditionModel.from_pretrained(str(root / "back/unet")),
        "text_encoder": CLIPTextModel.from_pretrained(str(root / "back/text_encoder")),
        "vae": AutoencoderKL.from_pretrained(str(root / "back/vae")),
    }
    for name, ref in models.items():
        a, b = ref.state_dict(), reloaded[name].state_dict()
        assert set(a) == set(b), name
        for k in a:
            assert torch.equal(a[k], b[k]), f"{name}: {k}"


def test_converted_folder_runs_like_pytorch(converted):
    """The folder written by from-diffusers gives PyTorch's outputs for all three components."""
    root, models = converted
    pre = load_pretrained(str(root / "flax"))
    rng = np.random.default_rng(0)
    ids = np.stack([tokens.ARC2FACE_PROMPT_IDS, tokens.EMPTY_PROMPT_IDS])
    ctx = np.asarray(pre.text_encoder.encode_ids(jnp.asarray(ids)))
    with torch.no_grad():
        ref_ctx = models["text_encoder"](torch.tensor(ids)).last_hidden_state.numpy()
    assert np.abs(ctx - ref_ctx).max() < 1e-4

    lat = rng.normal(size=(2, 16, 16, 4)).astype(np.float32)
    t = np.array([10, 700])
    out = np.asarray(pre.unet(jnp.asarray(lat), jnp.asarray(t), jnp.asarray(ctx)))
    with torch.no_grad():
        ref = models["unet"](torch.tensor(lat.transpose(0, 3, 1, 2)), torch.tensor(t), torch.tensor(ref_ctx)).sample.numpy()
    assert np.abs(out - ref.transpose(0, 2, 3, 1)).max() < 1e-4

    img = rng.uniform(-1, 1, size=(1, 32, 32, 3)).astype(np.float32)
    moments = np.asarray(pre.vae.encode_moments(jnp.asarray(img)))
    with torch.no_grad():
        ref_mean = models["vae"].encode(torch.tensor(img.transpose(0, 3, 1, 2))).latent_dist.mean.numpy()
    assert np.abs(moments[..., :4] - ref_mean.transpose(0, 2, 3, 1)).max() < 1e-4


def test_cli_errors(tmp_path, capsys):
    with pytest.raises(SystemExit, match="not a directory"):
        main(["from-diffusers", "--unet", str(tmp_path / "missing"), "--out", str(tmp_path / "o")])
    assert main(["to-diffusers", str(tmp_path), str(tmp_path / "o")]) == 2
    assert "not a converted facecrafter checkpoint" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="vae"):
        save_only_unet = tmp_path / "u"
        from facecrafter_jax.pretrained import save_pretrained
        from facecrafter_jax.models.unet_2d_condition import UNet2DConditionConfig, UNet2DConditionModel
        from flax import nnx
        from tiny_models import TINY_UNET
        cfg = UNet2DConditionConfig.from_diffusers_config(TINY_UNET)
        save_pretrained(str(save_only_unet), unet=UNet2DConditionModel(cfg, rngs=nnx.Rngs(0)))
        load_pretrained(str(save_only_unet), components=("unet", "vae"))
