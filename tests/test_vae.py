"""Flax AutoencoderKL against diffusers' PyTorch AutoencoderKL (tiny random models, CPU, fp32)."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import save_file

from conftest import nchw_to_nhwc, nhwc_to_nchw
from facecrafter_jax.convert import load_vae
from facecrafter_jax.convert.vae import (
    convert_legacy_vae_keys, export_vae_state, load_vae_config, save_vae_diffusers, vae_key_map,
)
from facecrafter_jax.convert.weights import WeightConversionError, read_torch_checkpoint
from facecrafter_jax.models.vae import AutoencoderKLConfig, sample_latents_from_moments

diffusers = pytest.importorskip("diffusers")

TINY = dict(
    in_channels=3, out_channels=3,
    down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
    block_out_channels=[32, 64], layers_per_block=1, latent_channels=4, norm_num_groups=8, sample_size=32,
)
# SD3-like variant: no quant convs, a shift factor, no mid-block attention.
TINY_SHIFT = dict(TINY, use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609,
                  scaling_factor=1.5305, mid_block_add_attention=False)
TOL = 1e-4


def _torch_vae(cfg: dict, seed: int):
    torch.manual_seed(seed)
    vae = diffusers.AutoencoderKL(**cfg).eval()
    with torch.no_grad():  # non-trivial norm affine params so a swapped scale/bias cannot pass
        for name, p in vae.named_parameters():
            if "norm" in name:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.2 * torch.randn_like(p))
    return vae


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vae")
    vae = _torch_vae(TINY, 0)
    vae.save_pretrained(folder)
    return vae, str(folder)


@pytest.fixture(scope="module")
def ref_shift(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vae_shift")
    vae = _torch_vae(TINY_SHIFT, 1)
    vae.save_pretrained(folder)
    return vae, str(folder)


@pytest.fixture(scope="module")
def model(ref):
    return load_vae(ref[1])


def _images(seed=0, b=2, hw=32):
    return np.random.default_rng(seed).uniform(-1, 1, size=(b, 3, hw, hw)).astype(np.float32)


def _maxerr(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------


def test_config_from_diffusers_json_and_round_trip(ref):
    vae, folder = ref
    with open(os.path.join(folder, "config.json")) as f:
        raw = json.load(f)
    cfg = load_vae_config(folder)
    assert cfg.block_out_channels == (32, 64) and cfg.norm_num_groups == 8 and cfg.scaling_factor == 0.18215
    assert cfg.shift_factor is None and cfg.downsample_factor == 2
    # JSON round trip is exact, and diffusers builds the same architecture from our dict.
    d = json.loads(json.dumps(cfg.to_dict()))
    assert AutoencoderKLConfig.from_dict(d) == cfg
    theirs = diffusers.AutoencoderKL.from_config(d)
    for k, v in raw.items():
        if not k.startswith("_"):
            assert theirs.config[k] == v or list(theirs.config[k]) == v, k
    # SD1.5 preset matches diffusers' own SD-VAE defaults for the fields it sets.
    sd = AutoencoderKLConfig.sd15()
    assert sd.block_out_channels == (128, 256, 512, 512) and sd.downsample_factor == 8


@pytest.mark.parametrize("patch, message", [
    ({"not_a_key": 1}, "not_a_key"),
    ({"down_block_types": ["DownEncoderBlock2D", "AttnDownEncoderBlock2D"]}, r"down_block_types\[1\]"),
    ({"up_block_types": ["UpDecoderBlock2D"]}, "up_block_types"),
    ({"act_fn": "gelu"}, "act_fn"),
    ({"latents_mean": [0.0] * 4}, "latents_mean"),
    ({"_class_name": "UNet2DConditionModel"}, "_class_name"),
    ({"norm_num_groups": 12}, "norm_num_groups"),
])
def test_config_errors_name_the_key(patch, message):
    with pytest.raises(ValueError, match=message):
        AutoencoderKLConfig.from_dict({**TINY, **patch})


def test_config_ignores_bookkeeping_keys():
    cfg = AutoencoderKLConfig.from_dict({**TINY, "_class_name": "AutoencoderKL", "_diffusers_version": "0.6.0",
                                         "_name_or_path": "x", "force_upcast": False})
    assert cfg.force_upcast is False and cfg.block_out_channels == (32, 64)


# ---------------------------------------------------------------------------------------------
# Numerical parity
# ---------------------------------------------------------------------------------------------


def test_encode_moments_and_encode_match_diffusers(ref, model):
    vae, _ = ref
    x = _images(0)
    with torch.no_grad():
        dist = vae.encode(torch.from_numpy(x)).latent_dist
    moments = np.asarray(model.encode_moments(jnp.asarray(nchw_to_nhwc(x))))
    assert moments.shape == (2, 16, 16, 8) and moments.dtype == np.float32
    err_mean = _maxerr(moments[..., :4], nchw_to_nhwc(dist.mean.numpy()))
    err_logvar = _maxerr(np.clip(moments[..., 4:], -30, 20), nchw_to_nhwc(dist.logvar.numpy()))
    err_raw = _maxerr(moments, nchw_to_nhwc(dist.parameters.numpy()))
    assert max(err_mean, err_logvar, err_raw) <= TOL, (err_mean, err_logvar, err_raw)
    # encode() = what diffusers' training scripts feed the UNet in deterministic mode.
    lat = np.asarray(model.encode(jnp.asarray(nchw_to_nhwc(x))))
    assert _maxerr(lat, nchw_to_nhwc(dist.mean.numpy() * vae.config.scaling_factor)) <= TOL * vae.config.scaling_factor


def test_decode_matches_diffusers(ref, model):
    vae, _ = ref
    z = np.random.default_rng(1).normal(size=(2, 4, 16, 16)).astype(np.float32)
    with torch.no_grad():
        expect = vae.decode(torch.from_numpy(z)).sample.numpy()
    # Pipelines call vae.decode(latents / scaling_factor): our decode takes the scaled latents.
    out = np.asarray(model.decode(jnp.asarray(nchw_to_nhwc(z * vae.config.scaling_factor))))
    assert out.shape == (2, 32, 32, 3) and out.dtype == np.float32
    err = _maxerr(out, nchw_to_nhwc(expect))
    assert err <= TOL, err
    # Jitted round trip equals diffusers' decode(encode(x).mean).
    x = _images(2)
    with torch.no_grad():
        rec = vae.decode(vae.encode(torch.from_numpy(x)).latent_dist.mean).sample.numpy()
    ours = nnx.jit(lambda m, im: m(im))(model, jnp.asarray(nchw_to_nhwc(x)))
    assert _maxerr(ours, nchw_to_nhwc(rec)) <= TOL


def test_shift_factor_no_quant_conv_no_attention(ref_shift):
    vae, folder = ref_shift
    model = load_vae(folder)
    assert model.quant_conv is None and model.post_quant_conv is None
    assert not any("attentions" in r.torch_key for r in vae_key_map(model))
    sf, shift = vae.config.scaling_factor, vae.config.shift_factor
    x = _images(3)
    with torch.no_grad():
        mean = vae.encode(torch.from_numpy(x)).latent_dist.mean.numpy()
        z = np.random.default_rng(4).normal(size=mean.shape).astype(np.float32)
        dec = vae.decode(torch.from_numpy(z)).sample.numpy()
    # SD3-style pipelines: latents = (mean - shift) * sf;  decode(latents / sf + shift).
    lat = np.asarray(model.encode(jnp.asarray(nchw_to_nhwc(x))))
    assert _maxerr(lat, nchw_to_nhwc((mean - shift) * sf)) <= TOL * sf
    out = np.asarray(model.decode(jnp.asarray(nchw_to_nhwc((z - shift) * sf))))
    assert _maxerr(out, nchw_to_nhwc(dec)) <= TOL


def test_sample_latents_closed_form_and_diffusers_distribution():
    rng = np.random.default_rng(5)
    mean = rng.normal(size=(2, 4, 4, 4)).astype(np.float32)
    logvar = rng.normal(scale=3.0, size=(2, 4, 4, 4)).astype(np.float32)
    logvar[0, 0, 0, :2] = [-50.0, 40.0]  # exercise the clip
    moments = np.concatenate([mean, logvar], axis=-1)
    key = jax.random.key(7)
    eps = np.asarray(jax.random.normal(key, mean.shape, jnp.float32))
    sf = 0.18215
    got = np.asarray(jax.jit(lambda m, k: sample_latents_from_moments(m, k, scaling_factor=sf))(moments, key))
    closed = (mean + np.exp(0.5 * np.clip(logvar, -30, 20)) * eps) * sf
    np.testing.assert_allclose(got, closed, rtol=1e-6, atol=1e-6)
    # diffusers' DiagonalGaussianDistribution with the same noise: mean + std * eps.
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
    dist = DiagonalGaussianDistribution(torch.from_numpy(np.ascontiguousarray(nhwc_to_nchw(moments))))
    ref = (dist.mean + dist.std * torch.from_numpy(np.ascontiguousarray(nhwc_to_nchw(eps)))).numpy() * sf
    np.testing.assert_allclose(got, nchw_to_nhwc(ref), rtol=1e-5, atol=1e-6)
    other = np.asarray(sample_latents_from_moments(moments, jax.random.key(8), scaling_factor=sf))
    assert np.abs(other - got).max() > 1e-3
    with pytest.raises(ValueError, match="even number of channels"):
        sample_latents_from_moments(moments[..., :7], key, scaling_factor=sf)


def test_encode_with_key_samples_posterior(model):
    x = jnp.asarray(nchw_to_nhwc(_images(6)))
    key = jax.random.key(3)
    moments = model.encode_moments(x)
    a = np.asarray(model.encode(x, key=key))
    b = np.asarray(model.sample_latents(moments, key))
    np.testing.assert_array_equal(a, b)
    mean, logvar = np.split(np.asarray(moments), 2, axis=-1)
    eps = np.asarray(jax.random.normal(key, mean.shape))
    np.testing.assert_allclose(a, (mean + np.exp(0.5 * np.clip(logvar, -30, 20)) * eps) * 0.18215, rtol=1e-5, atol=1e-6)


def test_bad_inputs_are_named(model):
    with pytest.raises(ValueError, match=r"images must be NHWC .*\(2, 3, 32, 32\)"):
        model.encode_moments(jnp.zeros((2, 3, 32, 32)))
    with pytest.raises(ValueError, match=r"latents must be NHWC \[B, H, W, 4\]"):
        model.decode(jnp.zeros((2, 8, 16, 16)))


def test_bf16_compute_runs_and_is_close(ref, model):
    vae, folder = ref
    m16 = load_vae(folder, dtype=jnp.bfloat16)
    assert all(v.get_value().dtype == jnp.float32 for _, v in nnx.to_flat_state(nnx.state(m16, nnx.Param)))
    x = jnp.asarray(nchw_to_nhwc(_images(9)))
    m32, m16o = np.asarray(model.encode_moments(x)), np.asarray(m16.encode_moments(x))
    assert m16o.dtype == np.float32
    rel = np.abs(m16o - m32).max() / np.abs(m32).max()
    assert rel < 5e-2, rel
    z = model.encode(x)
    d32, d16 = np.asarray(model.decode(z)), np.asarray(m16.decode(z))
    rel = np.abs(d16 - d32).max() / np.abs(d32).max()
    assert rel < 5e-2, rel
    assert np.abs(d16 - d32).max() > 0  # it really computed in bf16


# ---------------------------------------------------------------------------------------------
# Checkpoint layout
# ---------------------------------------------------------------------------------------------


def _write_folder(path, state: dict, folder_with_config: str):
    os.makedirs(path, exist_ok=True)
    save_file({k: np.ascontiguousarray(v) for k, v in state.items()}, os.path.join(path, "diffusion_pytorch_model.safetensors"))
    with open(os.path.join(folder_with_config, "config.json")) as f, open(os.path.join(path, "config.json"), "w") as g:
        g.write(f.read())
    return str(path)


def test_key_errors_name_the_key(ref, tmp_path):
    _, folder = ref
    sd = read_torch_checkpoint(folder)
    missing = {k: v for k, v in sd.items() if k != "decoder.up_blocks.1.resnets.1.norm2.bias"}
    with pytest.raises(WeightConversionError, match=r"missing.*decoder\.up_blocks\.1\.resnets\.1\.norm2\.bias"):
        load_vae(_write_folder(tmp_path / "missing", missing, folder))
    extra = {**sd, "encoder.mid_block.attentions.0.extra.weight": np.zeros(3, np.float32)}
    with pytest.raises(WeightConversionError, match=r"unused.*encoder\.mid_block\.attentions\.0\.extra\.weight"):
        load_vae(_write_folder(tmp_path / "extra", extra, folder))
    bad = {**sd, "quant_conv.weight": np.zeros((8, 8, 3, 3), np.float32)}
    with pytest.raises(WeightConversionError, match=r"shape mismatch for 'quant_conv\.weight'"):
        load_vae(_write_folder(tmp_path / "shape", bad, folder))
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_vae(str(tmp_path / "nowhere"))


def test_legacy_attention_keys_load_to_identical_outputs(ref, model, tmp_path):
    _, folder = ref
    sd = read_torch_checkpoint(folder)
    legacy = {}
    names = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    for k, v in sd.items():
        for new, old in names.items():
            tag = f".mid_block.attentions.0.{new}."
            if tag in k:
                k = k.replace(tag, f".mid_block.attentions.0.{old}.")
                if k.endswith("weight") and k.startswith("decoder"):
                    v = v[:, :, None, None]  # stored as a 1x1 conv
                break
        legacy[k] = v
    assert "encoder.mid_block.attentions.0.query.weight" in legacy
    assert legacy["decoder.mid_block.attentions.0.proj_attn.weight"].shape == (64, 64, 1, 1)
    old = load_vae(_write_folder(tmp_path / "legacy", legacy, folder))
    x = jnp.asarray(nchw_to_nhwc(_images(10)))
    np.testing.assert_array_equal(np.asarray(old(x)), np.asarray(model(x)))
    # diffusers itself accepts the (linear-shaped) legacy names the same way.
    linear_legacy = {k: (v[:, :, 0, 0] if v.ndim == 4 and "attentions" in k else v) for k, v in legacy.items()}
    theirs = diffusers.AutoencoderKL.from_pretrained(_write_folder(tmp_path / "legacy_lin", linear_legacy, folder))
    with torch.no_grad():
        rec = theirs(torch.from_numpy(np.ascontiguousarray(nhwc_to_nchw(np.asarray(x))))).sample.numpy()
    assert _maxerr(model(x), nchw_to_nhwc(rec)) <= TOL
    # Both layouts of the same parameter, or a non-1x1 conv, are errors naming the keys.
    with pytest.raises(WeightConversionError, match=r"encoder\.mid_block\.attentions\.0\.query\.weight"):
        convert_legacy_vae_keys({**legacy, "encoder.mid_block.attentions.0.to_q.weight": sd["encoder.mid_block.attentions.0.to_q.weight"]})
    with pytest.raises(WeightConversionError, match=r"decoder\.mid_block\.attentions\.0\.key\.weight"):
        convert_legacy_vae_keys({"decoder.mid_block.attentions.0.key.weight": np.zeros((64, 64, 3, 3), np.float32)})


def test_export_round_trip_is_exact(ref, model, tmp_path):
    vae, _ = ref
    sd = {k: v.numpy() for k, v in vae.state_dict().items()}
    back = export_vae_state(model)
    assert set(back) == set(sd)
    for k, v in sd.items():
        assert back[k].shape == v.shape and np.array_equal(back[k], v), k
    # save_vae_diffusers writes a folder diffusers loads strictly, with identical weights.
    save_vae_diffusers(model, str(tmp_path / "out"))
    again = diffusers.AutoencoderKL.from_pretrained(str(tmp_path / "out"))
    for k, v in again.state_dict().items():
        assert np.array_equal(v.numpy(), sd[k]), k
