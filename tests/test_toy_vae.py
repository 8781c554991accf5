"""Toy VAE training (facecrafter_jax.toy.vae_training): a tiny seeded run on 32 px renders learns (loss falls,
beats the mean-image baseline), is bit-reproducible per seed, carries scaling_factor = 1 / std(latent means)
(checked against NumPy on encode_dataset output), encodes / decodes with the right shapes and scaling, and
rejects bad input by name.
"""

import numpy as np
import pytest
from flax import nnx

from facecrafter_jax.toy.vae_training import (VAETrainConfig, decode_latents, encode_dataset, psnr, reconstruct,
                                              train_vae)
from facecrafter_jax.toy.world import ToyWorld, WorldConfig

# trains on 16 px crops of 32 px renders, like the default config on 64 px renders (32 px crops)
TINY = dict(block_out_channels=(8, 16), norm_num_groups=4, latent_channels=4, steps=60, batch_size=8, lr=3e-3,
            warmup=5, crop_size=16, stats_images=64)
N = 48


@pytest.fixture(scope="module")
def images():
    return ToyWorld(WorldConfig(num_identities=8, seed=3)).generate(N, seed=1, resolution=32, batch_size=N).images


@pytest.fixture(scope="module")
def runs(images):
    out = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        out[name] = train_vae(images, VAETrainConfig(**TINY, seed=seed))
    return out


def _params(vae):
    return {".".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(vae, nnx.Param))}


def test_loss_falls_and_beats_mean_image(images, runs):
    vae, info = runs["a"]
    h = np.asarray(info["history"])
    assert len(h) == TINY["steps"] and info["steps"] == TINY["steps"] and np.all(np.isfinite(h))
    assert h[-10:].mean() < 0.6 * h[:5].mean(), h
    assert info["loss"] == pytest.approx(h[-1])
    # the reconstructions are better than predicting the per-pixel mean image of the set
    rec = reconstruct(vae, images, batch_size=16)
    base = np.broadcast_to(np.round(images.astype(np.float64).mean(0)), images.shape)
    assert psnr(rec, images) > psnr(base, images) + 3.0
    assert info["psnr"] == pytest.approx(psnr(rec, images), abs=0.05)
    assert info["stats_images"] == N and info["crop_size"] == 16


def test_same_seed_identical_different_seed_differs(runs):
    pa, pb, pc = (_params(runs[k][0]) for k in "abc")
    assert pa.keys() == pb.keys() == pc.keys() and len(pa) > 10
    for k in pa:
        np.testing.assert_array_equal(pa[k], pb[k], err_msg=k)
    assert runs["a"][1]["history"] == runs["b"][1]["history"]
    assert runs["a"][1]["scaling_factor"] == runs["b"][1]["scaling_factor"]
    differing = [k for k in pa if not np.array_equal(pa[k], pc[k])]
    assert len(differing) > 0.5 * len(pa)  # biases / norms start equal, but every kernel moves differently
    assert runs["a"][1]["history"] != runs["c"][1]["history"]


def test_scaling_factor_is_inverse_std_of_latent_means(images, runs):
    vae, info = runs["a"]
    moments = encode_dataset(vae, images, batch_size=20)  # padded last chunk
    assert moments.shape == (N, 16, 16, 8) and moments.dtype == np.float32
    means = moments[..., :4].astype(np.float64)
    expected = 1.0 / np.sqrt(np.mean((means - means.mean()) ** 2))
    assert info["scaling_factor"] == pytest.approx(expected, rel=1e-5)
    assert vae.config.scaling_factor == info["scaling_factor"]
    # the architecture is the configured one, and encode() applies the scaling factor
    assert vae.config.block_out_channels == (8, 16) and vae.config.downsample_factor == 2
    latents = np.asarray(vae.encode(images[:6].astype(np.float32) / 127.5 - 1.0))
    np.testing.assert_allclose(latents, moments[:6, ..., :4] * expected, rtol=1e-4, atol=1e-5)
    assert np.std(moments[..., :4] * info["scaling_factor"]) == pytest.approx(1.0, rel=1e-4)
    # encode_dataset is batch-size independent
    np.testing.assert_allclose(encode_dataset(vae, images, batch_size=N), moments, atol=1e-5)


def test_decode_shapes_and_range(images, runs):
    vae, info = runs["a"]
    latents = np.asarray(vae.encode(images[:5].astype(np.float32) / 127.5 - 1.0))
    assert latents.shape == (5, 16, 16, 4)
    raw = np.asarray(vae.decode(latents))
    assert raw.shape == (5, 32, 32, 3) and raw.dtype == np.float32
    assert -1.6 < raw.min() and raw.max() < 1.6  # about [-1, 1] before clipping
    dec = decode_latents(vae, latents, batch_size=2)
    assert dec.shape == (5, 32, 32, 3) and dec.dtype == np.uint8
    # decode_latents is (raw + 1) * 127.5 rounded and clipped; its batches of 2 may differ from one batch of 5 in
    # the last float bits, which moves a value that sits on a rounding boundary (x.5) by one step, nothing else
    scaled = (raw + 1) * 127.5
    expected = np.clip(np.round(scaled), 0, 255).astype(np.uint8)
    on_boundary = np.abs(scaled - np.floor(scaled) - 0.5) < 1e-3
    np.testing.assert_array_equal(dec[~on_boundary], expected[~on_boundary])
    assert np.abs(dec.astype(int) - expected.astype(int)).max() <= 1
    # decode(encode) through decode_latents equals reconstruct() (up to a rounding step here and there)
    diff = np.abs(dec.astype(int) - reconstruct(vae, images[:5]).astype(int))
    assert diff.max() <= 1


def test_config_round_trip_and_errors():
    cfg = VAETrainConfig(**TINY, seed=4)
    d = cfg.to_dict()
    assert d["block_out_channels"] == [8, 16] and VAETrainConfig.from_dict(d) == cfg
    with pytest.raises(ValueError, match="'kl_wieght'"):
        VAETrainConfig.from_dict({"kl_wieght": 1.0})
    v = VAETrainConfig().vae_config()
    assert (v.block_out_channels, v.layers_per_block, v.latent_channels, v.norm_num_groups,
            v.mid_block_add_attention, v.downsample_factor) == ((16, 32, 64), 1, 4, 8, False, 4)
    with pytest.raises(ValueError, match="norm_num_groups"):
        VAETrainConfig(block_out_channels=(8, 12), norm_num_groups=8)
    with pytest.raises(ValueError, match="steps"):
        VAETrainConfig(steps=0)
    with pytest.raises(ValueError, match="crop_size 30 is not divisible by the downsample factor 4"):
        VAETrainConfig(crop_size=30)


def test_bad_inputs_name_the_problem(images, runs):
    vae, _ = runs["a"]
    cfg = VAETrainConfig(**TINY)
    with pytest.raises(ValueError, match="uint8"):
        train_vae(images.astype(np.float32), cfg)
    with pytest.raises(ValueError, match=r"\[N, H, W, 3\]"):
        train_vae(images[..., 0], cfg)
    with pytest.raises(ValueError, match="divisible by the VAE's downsample factor 2"):
        train_vae(images[:, :31, :31], cfg)
    with pytest.raises(ValueError, match="fewer than batch_size 8"):
        train_vae(images[:5], cfg)
    with pytest.raises(ValueError, match="divisible"):
        encode_dataset(vae, images[:2, :31, :31])
    with pytest.raises(ValueError, match="uint8"):
        encode_dataset(vae, images[:2] / 255.0)
    with pytest.raises(ValueError, match="latent_channels=4"):
        decode_latents(vae, np.zeros((2, 16, 16, 8), np.float32))
