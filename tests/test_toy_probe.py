"""The control probe (facecrafter_jax/toy/probe.py): exact zeros for a zero-initialised branch, and the losses
against a hand computation of the forward noising and the model calls."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from facecrafter_jax import schedulers as S
from facecrafter_jax.models.clip_text import CLIPTextConfig, CLIPTextModel
from facecrafter_jax.models.control import AdapterParam
from facecrafter_jax.models.facecrafter import FaceCrafter, FaceCrafterConfig
from facecrafter_jax.models.unet_2d_condition import UNet2DConditionConfig, UNet2DConditionModel
from facecrafter_jax.models.vae import AutoencoderKL, AutoencoderKLConfig
from facecrafter_jax.toy.probe import control_probe, probe_table
from tiny_models import TINY_UNET, TINY_VAE

N = 6


def _models(value_init):
    unet = UNet2DConditionModel(UNet2DConditionConfig.from_diffusers_config(TINY_UNET), rngs=nnx.Rngs(0))
    cfg = FaceCrafterConfig(landmark_tokens=3, emotion_tokens=2, landmark_hidden_dim=16, emotion_hidden_dim=8,
                            adapter_value_init=value_init)
    model = FaceCrafter(unet, cfg, rngs=nnx.Rngs(1))
    text = CLIPTextModel(CLIPTextConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                        num_attention_heads=4, max_position_embeddings=8), rngs=nnx.Rngs(2))
    vae = AutoencoderKL(AutoencoderKLConfig.from_dict({**TINY_VAE, "scaling_factor": 0.5}), rngs=nnx.Rngs(3))
    return model, text, vae


def _data():
    r = np.random.default_rng(0)
    images = r.integers(0, 256, (N, 32, 32, 3)).astype(np.uint8)
    feats = {"arcface": r.normal(size=(N, 48)).astype(np.float32),
             "landmarks": r.uniform(0.2, 0.8, (N, 478, 3)).astype(np.float32),
             "emotion": np.concatenate([r.dirichlet(np.ones(8), N), r.uniform(-1, 1, (N, 2))], 1).astype(np.float32)}
    return images, feats


def test_zero_initialised_branches_carry_nothing():
    model, text, vae = _models("zeros")
    images, feats = _data()
    pr = control_probe(model, text, vae, images, feats, controls=("landmark", "emotion"), timesteps=(200, 800),
                       batch_size=4)
    for c in ("landmark", "emotion"):
        assert pr[c]["with"] == pr[c]["null"] == pr["id_only"]
        assert pr[c]["gain"] == [0.0, 0.0]
    assert "| landmark | 0.0 | 0.0 |" in probe_table({"m": pr})


def test_losses_match_a_hand_computation():
    model, text, vae = _models("copy")
    state = nnx.state(model, AdapterParam)  # move the adapters so that with / null / ID-only all differ
    for i, (_, var) in enumerate(nnx.to_flat_state(state)):
        v = var.get_value()
        var.set_value(v + 0.05 * jax.random.normal(jax.random.key(i), v.shape))
    nnx.update(model, state)
    images, feats = _data()
    t, seed = 600, 3
    pr = control_probe(model, text, vae, images, feats, controls=("landmark",), timesteps=(t,), seed=seed)
    # by hand: x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps with a_t from the SD1.5 betas (float64 closed form)
    betas = np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=np.float64) ** 2
    a_t = np.cumprod(1.0 - betas)[t]
    x0 = np.asarray(vae.encode(jnp.asarray(images, jnp.float32) / 127.5 - 1.0))
    eps = np.asarray(jax.random.normal(jax.random.key(seed * 100003 + t), x0.shape, jnp.float32))
    xt = jnp.asarray(np.sqrt(a_t) * x0 + np.sqrt(1.0 - a_t) * eps, jnp.float32)
    ctx = text.encode_id(feats["arcface"])
    tt = jnp.full((N,), t)

    def loss(**kw):
        return float(np.mean((np.asarray(model(xt, tt, ctx, **kw)) - eps) ** 2))

    ref_with = loss(landmarks=feats["landmarks"])
    ref_null = loss(landmarks=np.zeros_like(feats["landmarks"]))
    ref_id = float(np.mean((np.asarray(model.unet(xt, tt, ctx)) - eps) ** 2))
    np.testing.assert_allclose([pr["id_only"][0], pr["landmark"]["with"][0], pr["landmark"]["null"][0]],
                               [ref_id, ref_with, ref_null], rtol=1e-4)
    assert len({round(v, 6) for v in (ref_id, ref_with, ref_null)}) == 3
    assert pr["landmark"]["gain"][0] == pytest.approx((ref_null - ref_with) / ref_null, rel=1e-3, abs=1e-6)
    assert S.SD15_SCHEDULER_CONFIG["beta_schedule"] == "scaled_linear"  # the schedule the hand computation assumes


def test_bad_inputs_are_named():
    model, text, vae = _models("zeros")
    images, feats = _data()
    with pytest.raises(ValueError, match="unknown control"):
        control_probe(model, text, vae, images, feats, controls=("pose",))
    with pytest.raises(ValueError, match="uint8"):
        control_probe(model, text, vae, images.astype(np.float32), feats, controls=("landmark",))
    with pytest.raises(ValueError, match="lack"):
        control_probe(model, text, vae, images, {"arcface": feats["arcface"]}, controls=("emotion",))
