"""FaceCrafter control modules: adapters, decoupled attention, masks, exposed maps, gradients, mixed conditioning.

Tiny random UNets (tests/tiny_models.TINY_UNET architecture) built directly in Flax; parity with the
PyTorch export is in tests/test_export_adapters.py, the AD-loss readings in tests/test_ad_loss.py.
"""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from facecrafter_jax.conditioning import (MixedConditioningConfig, SETUPS, Setup, active_controls, apply_conditioning,
                                          draw_condition, null_input, sample_conditioning, setup_conditions)
from facecrafter_jax.models.attention import Attention, AttentionProbs, BranchOutputs
from facecrafter_jax.models.control import (FROZEN, AdapterLinear, AdapterParam, ControlTokenEncoder,
                                            add_control_adapters, control_features, count_params)
from facecrafter_jax.models.facecrafter import FaceCrafter, FaceCrafterConfig
from facecrafter_jax.models.unet_2d_condition import UNet2DConditionConfig, UNet2DConditionModel
from tiny_models import TINY_UNET
from conftest import perturb_adapters

SMALL = FaceCrafterConfig(landmark_tokens=3, emotion_tokens=2, landmark_hidden_dim=32, emotion_hidden_dim=16)
T = jnp.asarray([7, 640])




def _model(seed=0, config=SMALL, perturb=True, **unet_kw):
    cfg = UNet2DConditionConfig.from_diffusers_config(TINY_UNET)
    unet = UNet2DConditionModel(cfg, rngs=nnx.Rngs(seed), **unet_kw)
    model = FaceCrafter(unet, config, rngs=nnx.Rngs(seed + 100))
    if perturb:
        perturb_adapters(model, seed + 200, std=0.05)
    return model


def _inputs(seed=0, batch=2):
    r = np.random.default_rng(seed)
    x = jnp.asarray(r.normal(size=(batch, 16, 16, 4)).astype(np.float32))
    ctx = jnp.asarray(r.normal(size=(batch, 77, 64)).astype(np.float32))
    lmk = jnp.asarray(r.uniform(size=(batch, 478, 3)).astype(np.float32))
    emo = jnp.asarray(np.concatenate([r.dirichlet(np.ones(8), size=batch), r.uniform(-1, 1, size=(batch, 2))], 1).astype(np.float32))
    return x, ctx, lmk, emo


@nnx.jit
def _run(model, x, t, ctx, kw):
    return model(x, t, ctx, **kw)


@nnx.jit
def _run_base(unet, x, t, ctx):
    return unet(x, t, ctx)


# --------------------------------------------------------------------------------------------
# Adapter installation and parameter types
# --------------------------------------------------------------------------------------------


def test_adapters_are_copies_with_mirrored_paths_and_typed_params():
    model = _model(perturb=False)
    layers = model.unet.cross_attention_layers()
    assert model.unet.control_names == ("landmark", "emotion")
    for attn in layers:
        for name in ("landmark", "emotion"):
            for kv in ("k", "v"):
                base = getattr(attn, f"to_{kv}").kernel
                ad = getattr(attn, f"to_{kv}_c")[name]
                assert isinstance(ad.kernel, AdapterParam) and ad.bias is None
                np.testing.assert_array_equal(np.asarray(ad.kernel.get_value()), np.asarray(base.get_value()))
                assert ad.kernel.get_value() is not base.get_value()  # own buffer (safe to donate)
    paths = {".".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(model, AdapterParam))}
    assert "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k_c.landmark.kernel" in paths
    assert "unet.up_blocks.1.attentions.1.transformer_blocks.0.attn2.to_v_c.emotion.kernel" in paths
    assert {"landmark_encoder.proj_in.kernel", "landmark_encoder.proj_out.bias", "emotion_encoder.norm.scale"} <= paths
    # No AdapterParam is a frozen parameter and vice versa; the two filters partition nnx.Param.
    frozen = {".".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(model, FROZEN))}
    assert not (paths & frozen) and all(not p.startswith(("landmark_encoder", "emotion_encoder")) for p in frozen)
    assert count_params(model, nnx.Param) == count_params(model, FROZEN) + count_params(model, AdapterParam)
    # Closed-form count: per layer 2 projections x D x width per control, plus the two MLP encoders.
    widths = [a.heads * a.dim_head for a in layers]
    d = 64
    kv = 2 * 2 * d * sum(widths)

    def enc(i, h, n):
        return i * h + h + h * n * d + n * d + 2 * d

    assert count_params(model, AdapterParam) == kv + enc(1434, 32, 3) + enc(10, 16, 2)
    with pytest.raises(ValueError, match="already installed"):
        add_control_adapters(model.unet, ["landmark"])
    with pytest.raises(ValueError, match="identifier"):
        add_control_adapters(model.unet, ["bad name"])


def test_single_control_stage_and_later_extension():
    cfg = UNet2DConditionConfig.from_diffusers_config(TINY_UNET)
    unet = UNet2DConditionModel(cfg, rngs=nnx.Rngs(0))
    model = FaceCrafter(unet, FaceCrafterConfig(controls=("landmark",), landmark_hidden_dim=8, landmark_tokens=2),
                        rngs=nnx.Rngs(1))
    assert model.emotion_encoder is None and model.unet.control_names == ("landmark",)
    x, ctx, lmk, emo = _inputs()
    with pytest.raises(ValueError, match="no 'emotion' control"):
        model(x, T, ctx, emotion=emo)
    with pytest.raises(ValueError, match="no adapter"):
        model.unet(x, T, ctx, controls={"emotion": (jnp.zeros((2, 2, 64)), None, 1.0)})
    # Stage c: the same (trained) landmark adapters plus new emotion ones.
    both = FaceCrafter(unet, FaceCrafterConfig(landmark_hidden_dim=8, landmark_tokens=2, emotion_hidden_dim=8), rngs=nnx.Rngs(2))
    assert both.unet.control_names == ("landmark", "emotion")


def test_config_round_trips_and_errors():
    cfg = FaceCrafterConfig(controls=("emotion",), emotion_tokens=6, cross_attention_dim=768)
    assert FaceCrafterConfig.from_json(cfg.to_json()) == cfg
    assert json.loads(cfg.to_json())["controls"] == ["emotion"]
    with pytest.raises(ValueError, match="unknown FaceCrafter config key"):
        FaceCrafterConfig.from_dict({"controls": ["landmark"], "tokens": 3})
    with pytest.raises(ValueError, match="unknown control"):
        FaceCrafterConfig(controls=("pose",))
    with pytest.raises(ValueError, match="landmark_tokens"):
        FaceCrafterConfig(landmark_tokens=0)
    unet = UNet2DConditionModel(UNet2DConditionConfig.from_diffusers_config(TINY_UNET), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="cross_attention_dim"):
        FaceCrafter(unet, FaceCrafterConfig(cross_attention_dim=768), rngs=nnx.Rngs(0))
    assert FaceCrafter(unet, SMALL, rngs=nnx.Rngs(0)).config.cross_attention_dim == 64


def test_token_encoder_matches_closed_form():
    enc = ControlTokenEncoder("landmark", num_tokens=3, hidden_dim=5, output_dim=4, rngs=nnx.Rngs(0))
    perturb_adapters(enc, 1, std=0.3)
    lmk = np.random.default_rng(0).uniform(size=(2, 478, 3)).astype(np.float32)
    got = np.asarray(enc(jnp.asarray(lmk)))
    p = {".".join(map(str, k)): np.asarray(v.get_value(), np.float64) for k, v in nnx.to_flat_state(nnx.state(enc))}
    f = (lmk - np.array([0.5, 0.5, 0.0])).reshape(2, -1)
    h = f @ p["proj_in.kernel"] + p["proj_in.bias"]
    h = 0.5 * h * (1 + np.vectorize(math.erf)(h / np.sqrt(2)))
    t = (h @ p["proj_out.kernel"] + p["proj_out.bias"]).reshape(2, 3, 4)
    t = (t - t.mean(-1, keepdims=True)) / np.sqrt(t.var(-1, keepdims=True) + 1e-5) * p["norm.scale"] + p["norm.bias"]
    assert got.shape == (2, 3, 4) and np.abs(got - t).max() < 1e-5
    np.testing.assert_array_equal(np.asarray(control_features("landmark", lmk.reshape(2, -1))), f.astype(np.float32))
    with pytest.raises(ValueError, match="landmarks must be"):
        enc(jnp.zeros((2, 468, 3)))
    with pytest.raises(ValueError, match="emotion must be"):
        control_features("emotion", jnp.zeros((2, 8)))


# --------------------------------------------------------------------------------------------
# Decoupled attention: closed form, masks, all-off == base
# --------------------------------------------------------------------------------------------


def _softmax(z):
    z = z - z.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


def test_decoupled_attention_and_exposed_maps_match_hand_computation():
    """One explicit layer: Z = P_id V_id + sum_c w_c P_c V_c, then to_out; sown maps/outputs = hand values."""
    b, lq, s, n, dim, heads, dh = 2, 6, 5, 3, 12, 2, 4
    attn = Attention(16, dim, heads=heads, dim_head=dh, implementation="explicit", rngs=nnx.Rngs(0))
    attn.layer_name = "test.attn2"
    r = np.random.default_rng(1)
    attn.to_k_c = nnx.Dict({"landmark": AdapterLinear(dim, heads * dh, use_bias=False, rngs=nnx.Rngs(1))})
    attn.to_v_c = nnx.Dict({"landmark": AdapterLinear(dim, heads * dh, use_bias=False, rngs=nnx.Rngs(2))})
    x = r.normal(size=(b, lq, 16)).astype(np.float32)
    ctx = r.normal(size=(b, s, dim)).astype(np.float32)
    tok = r.normal(size=(b, n, dim)).astype(np.float32)
    w = np.array([0.7, -1.3], np.float32)

    fn = nnx.capture(lambda m, *a, **k: m(*a, **k), AttentionProbs, BranchOutputs)
    y, probs, outs = fn(attn, jnp.asarray(x), jnp.asarray(ctx),
                        controls={"landmark": (jnp.asarray(tok), jnp.asarray(w))})
    P = {k: np.asarray(v.get_value(), np.float64) for k, v in nnx.to_flat_state(nnx.state(attn, nnx.Param))}
    kern = {".".join(map(str, k)): v for k, v in P.items()}

    def split(t):
        return t.reshape(b, -1, heads, dh)

    q = split(x @ kern["to_q.kernel"])
    def branch(c, kk, vk):
        k, v = split(c @ kk), split(c @ vk)
        p = _softmax(np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(dh))
        return p, np.einsum("bhqk,bkhd->bqhd", p, v)

    p_id, o_id = branch(ctx, kern["to_k.kernel"], kern["to_v.kernel"])
    p_c, o_c = branch(tok, kern["to_k_c.landmark.kernel"], kern["to_v_c.landmark.kernel"])
    z = (o_id + w[:, None, None, None] * o_c).reshape(b, lq, heads * dh)
    want = z @ kern["to_out.0.kernel"] + kern["to_out.0.bias"]
    assert np.abs(np.asarray(y) - want).max() < 1e-5
    probs = {p[-1]: np.asarray(v.get_value()[0]) for p, v in nnx.to_flat_state(probs)}
    outs = {p[-1]: np.asarray(v.get_value()[0]) for p, v in nnx.to_flat_state(outs)}
    assert set(probs) == {"probs", "probs_landmark"} and set(outs) == {"out_id", "out_landmark"}
    assert np.abs(probs["probs"] - p_id).max() < 1e-6 and np.abs(probs["probs_landmark"] - p_c).max() < 1e-6
    assert np.abs(outs["out_id"] - o_id).max() < 1e-5 and np.abs(outs["out_landmark"] - o_c).max() < 1e-5
    # Same layer on the fused path: same output, nothing sown.
    attn.implementation = "xla"
    y2, probs2, outs2 = fn(attn, jnp.asarray(x), jnp.asarray(ctx), controls={"landmark": (jnp.asarray(tok), jnp.asarray(w))})
    assert np.abs(np.asarray(y2) - np.asarray(y)).max() < 1e-5
    assert not nnx.to_flat_state(probs2) and not nnx.to_flat_state(outs2)


def test_all_off_is_exactly_the_base_unet():
    model = _model()
    x, ctx, lmk, emo = _inputs()
    base = np.asarray(_run_base(model.unet, x, T, ctx))
    zeros = jnp.zeros(2)
    for kw in ({"landmarks": lmk, "emotion": emo, "landmark_mask": zeros, "emotion_mask": zeros},
               {"emotion": emo, "emotion_scale": 0.0, "landmark_mask": zeros},
               {"landmark_mask": zeros, "emotion_mask": zeros}):
        np.testing.assert_array_equal(np.asarray(_run(model, x, T, ctx, kw)), base)
    # Eager too, and the plain UNet call without the keyword.
    eager = model(x, T, ctx, landmarks=lmk, emotion=emo, landmark_mask=zeros, emotion_mask=zeros)
    np.testing.assert_array_equal(np.asarray(eager), np.asarray(model.unet(x, T, ctx)))


def test_zero_value_init_starts_as_the_base_unet_and_learns():
    """adapter_value_init=zeros: to_v_c = 0, to_k_c still copies; with every control on, the output is
    exactly the base UNet's; the value projections get a non-zero gradient (the branch can grow)."""
    cfg = FaceCrafterConfig(landmark_tokens=3, emotion_tokens=2, landmark_hidden_dim=32, emotion_hidden_dim=16,
                            adapter_value_init="zeros")
    assert FaceCrafterConfig.from_json(cfg.to_json()) == cfg
    model = _model(config=cfg, perturb=False)
    x, ctx, lmk, emo = _inputs()
    np.testing.assert_array_equal(np.asarray(_run(model, x, T, ctx, {"landmarks": lmk, "emotion": emo})),
                                  np.asarray(_run_base(model.unet, x, T, ctx)))
    attn = model.unet.cross_attention_layers()[0]
    assert not np.any(np.asarray(attn.to_v_c["landmark"].kernel[...]))
    np.testing.assert_array_equal(np.asarray(attn.to_k_c["landmark"].kernel[...]), np.asarray(attn.to_k.kernel[...]))

    def loss(m):
        return jnp.mean(m(x, T, ctx, landmarks=lmk, emotion=emo) ** 2)

    grads = nnx.grad(loss, argnums=nnx.DiffState(0, AdapterParam))(model)
    g = nnx.to_flat_state(grads)
    gv = [float(jnp.abs(v.get_value()).max()) for k, v in g if "to_v_c" in k]
    assert gv and min(gv) > 0
    with pytest.raises(ValueError, match="adapter_value_init"):
        FaceCrafterConfig(adapter_value_init="ones")


def test_masks_remove_a_condition_per_sample():
    model = _model()
    x, ctx, lmk, emo = _inputs()
    lmk2, emo2 = _inputs(seed=5)[2:]
    on = np.asarray(_run(model, x, T, ctx, {"landmarks": lmk, "emotion": emo}))
    base = np.asarray(_run_base(model.unet, x, T, ctx))
    assert np.abs(on - base).max() > 1e-2  # the controls do something
    # Emotion off for every sample: equal to the landmark-only call, whatever the emotion input.
    emo_off = {"landmarks": lmk, "emotion_mask": jnp.zeros(2), "landmark_mask": jnp.ones(2)}
    a = np.asarray(_run(model, x, T, ctx, dict(emo_off, emotion=emo)))
    b = np.asarray(_run(model, x, T, ctx, dict(emo_off, emotion=emo2)))
    c = np.asarray(_run(model, x, T, ctx, {"landmarks": lmk, "emotion_mask": jnp.zeros(2)}))
    np.testing.assert_array_equal(a, b)  # same program: bit-identical
    assert np.abs(a - c).max() < 1e-5  # different programs (XLA may fuse differently)
    # Mixed per sample: sample 0 landmark only, sample 1 emotion only.
    mixed = np.asarray(_run(model, x, T, ctx, {"landmarks": lmk, "emotion": emo, "landmark_mask": jnp.array([1.0, 0.0]),
                                               "emotion_mask": jnp.array([0.0, 1.0])}))
    lmk_only = np.asarray(_run(model, x, T, ctx, {"landmarks": lmk, "emotion_mask": jnp.zeros(2)}))
    emo_only = np.asarray(_run(model, x, T, ctx, {"emotion": emo, "landmark_mask": jnp.zeros(2)}))
    assert np.abs(mixed[0] - lmk_only[0]).max() < 1e-5 and np.abs(mixed[1] - emo_only[1]).max() < 1e-5
    # A changed landmark input only moves the samples whose landmark mask is on.
    moved = np.asarray(_run(model, x, T, ctx, {"landmarks": lmk2, "emotion": emo, "landmark_mask": jnp.array([1.0, 0.0]),
                                               "emotion_mask": jnp.array([0.0, 1.0])}))
    np.testing.assert_array_equal(moved[1], mixed[1])
    assert np.abs(moved[0] - mixed[0]).max() > 1e-3
    # Scale 1 given per sample == the default scale.
    s1 = np.asarray(_run(model, x, T, ctx, {"landmarks": lmk, "landmark_scale": jnp.ones(2), "emotion_mask": jnp.zeros(2)}))
    assert np.abs(s1 - lmk_only).max() < 1e-5  # a traced scale vs the constant 1.0: different programs


def test_bad_control_inputs_are_named():
    model = _model()
    x, ctx, lmk, emo = _inputs()
    with pytest.raises(ValueError, match="tokens must be"):
        model.unet(x, T, ctx, controls={"landmark": (jnp.zeros((2, 3, 32)), None, 1.0)})
    with pytest.raises(ValueError, match="mask must be"):
        model(x, T, ctx, landmarks=lmk, landmark_mask=jnp.ones(3))
    with pytest.raises(ValueError, match="scale must be"):
        model(x, T, ctx, emotion=emo, emotion_scale=jnp.ones((2, 2)))
    # an absent control runs on its null tokens: the same as passing the all-zero raw input
    np.testing.assert_allclose(np.asarray(model(x, T, ctx, emotion=emo)),
                               np.asarray(model(x, T, ctx, emotion=emo, landmarks=jnp.zeros_like(lmk))), atol=1e-6)
    with pytest.raises(ValueError, match=r"\(tokens"):
        model.unet(x, T, ctx, controls={"landmark": jnp.zeros((2, 3, 64))})
    plain = UNet2DConditionModel(UNet2DConditionConfig.from_diffusers_config(TINY_UNET), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="no adapter"):
        plain(x, T, ctx, controls={"landmark": (jnp.zeros((2, 3, 64)), None, 1.0)})


# --------------------------------------------------------------------------------------------
# Exposed maps from the full model
# --------------------------------------------------------------------------------------------


def test_forward_with_maps_inside_jit_with_and_without_remat():
    x, ctx, lmk, emo = _inputs()
    results = []
    fn = nnx.jit(lambda m, x, t, c, l, e: m.forward_with_maps(x, t, c, landmarks=l, emotion=e,
                                                              emotion_mask=jnp.array([1.0, 0.0])))
    for remat in (False, True):
        model = _model(explicit_cross_attention=[0, 3], remat=remat)
        out, maps = fn(model, x, T, ctx, lmk, emo)
        results.append((out, maps))
        assert sorted(maps) == [0, 3]
        for layer in (0, 3):
            assert set(maps[layer]) == {"id", "landmark", "emotion"}
            assert maps[layer]["id"]["probs"].shape[-1] == 77
            assert maps[layer]["landmark"]["probs"].shape[-1] == 3 and maps[layer]["emotion"]["probs"].shape[-1] == 2
            for br in maps[layer].values():
                np.testing.assert_allclose(np.asarray(br["probs"]).sum(-1), 1.0, atol=1e-5)
                assert br["out"].shape[:2] == br["probs"].shape[:1] + br["probs"].shape[2:3]
    (o1, m1), (o2, m2) = results
    plain = _run(model, x, T, ctx, {"landmarks": lmk, "emotion": emo, "emotion_mask": jnp.array([1.0, 0.0])})
    assert np.abs(np.asarray(o2) - np.asarray(plain)).max() < 1e-5
    assert np.abs(np.asarray(o1) - np.asarray(o2)).max() < 1e-5
    assert np.abs(np.asarray(m1[3]["emotion"]["out"]) - np.asarray(m2[3]["emotion"]["out"])).max() < 1e-5
    # The first layer's input does not depend on the controls: its ID maps equal the plain UNet's.
    model = _model(explicit_cross_attention=[0])
    _, maps = model.forward_with_maps(x, T, ctx, landmarks=lmk, capture=("probs",))
    _, ref = model.unet.forward_with_attention_probs(x, T, ctx)
    np.testing.assert_array_equal(np.asarray(maps[0]["id"]["probs"]), np.asarray(ref[0]))
    assert "out" not in maps[0]["id"] and set(maps[0]) == {"id", "landmark", "emotion"}  # emotion: null tokens
    with pytest.raises(ValueError, match="capture entries"):
        model.forward_with_maps(x, T, ctx, capture=("maps",))


# --------------------------------------------------------------------------------------------
# Gradients flow only into AdapterParam
# --------------------------------------------------------------------------------------------


def test_gradients_only_reach_adapter_params():
    model = _model()
    x, ctx, lmk, emo = _inputs()
    target = jnp.asarray(np.random.default_rng(9).normal(size=x.shape).astype(np.float32))
    base_before = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, FROZEN)))
    out_before = np.asarray(_run_base(model.unet, x, T, ctx))

    def loss(m):
        return jnp.mean((m(x, T, ctx, landmarks=lmk, emotion=emo) - target) ** 2)

    opt = nnx.Optimizer(model, optax.sgd(1e-2), wrt=AdapterParam)
    adapters_before = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, AdapterParam)))

    @nnx.jit
    def step(m, o):
        g = nnx.grad(loss, argnums=nnx.DiffState(0, AdapterParam))(m)
        o.update(m, g)
        return g

    grads = step(model, opt)
    flat = nnx.to_flat_state(grads)
    adapter_paths = [p for p, _ in nnx.to_flat_state(nnx.state(model, AdapterParam))]
    assert [p for p, _ in flat] == adapter_paths  # the gradient has exactly the adapter leaves
    assert all(isinstance(v, AdapterParam) for _, v in flat)
    zero = [".".join(map(str, p)) for p, v in flat if not np.any(np.asarray(v.get_value()) != 0)]
    assert not zero, zero  # every encoder / K/V parameter of every layer receives gradient
    base_after = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, FROZEN)))
    jax.tree.map(np.testing.assert_array_equal, base_before, base_after)
    np.testing.assert_array_equal(np.asarray(_run_base(model.unet, x, T, ctx)), out_before)
    changed = jax.tree.leaves(jax.tree.map(lambda a, b: bool(np.any(a != b)), adapters_before,
                                           jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, AdapterParam)))))
    assert all(changed)


# --------------------------------------------------------------------------------------------
# Intra-batch mixed conditioning
# --------------------------------------------------------------------------------------------


PROBS = dict(id_landmark_emotion=0.3, id_landmark=0.15, id_emotion=0.2, id_only=0.1, landmark_emotion=0.05,
             landmark_only=0.07, emotion_only=0.05, all_null=0.08)


@pytest.mark.parametrize("absent", ["null_tokens", "switched_off"])
def test_mixed_conditioning_frequencies_match_config(absent):
    """Every combination's frequency within 5 sigma; masks / nulls / id_null follow the setup in closed form."""
    cfg = MixedConditioningConfig(absent=absent, **PROBS)
    n = 200_000
    s = jax.jit(sample_conditioning, static_argnums=(1, 2))(jax.random.key(3), n, cfg)
    counts = np.bincount(np.asarray(s.setup), minlength=len(SETUPS))
    for (name, p), c in zip(zip(SETUPS, cfg.probabilities()), counts):
        sigma = math.sqrt(n * p * (1 - p))
        assert abs(c - n * p) < 5 * sigma, (name, c, n * p)
    setup = np.asarray(s.setup)
    names = np.array(list(SETUPS))[setup]
    real = {c: np.array([c in SETUPS[nm][1] for nm in names]) for c in ("landmark", "emotion")}
    np.testing.assert_array_equal(np.asarray(s.id_null), [0.0 if SETUPS[nm][0] else 1.0 for nm in names])
    for c in ("landmark", "emotion"):
        np.testing.assert_array_equal(np.asarray(s.nulls[c]), (~real[c]).astype(np.float32))
        want_mask = np.ones(n) if absent == "null_tokens" else (real[c] | (names == "all_null"))
        np.testing.assert_array_equal(np.asarray(s.masks[c]), want_mask.astype(np.float32))
        np.testing.assert_array_equal(np.asarray(active_controls(s)[c]), real[c].astype(np.float32))
    # an ID-only sample: identity kept, every control branch on its null tokens (absent "null_tokens")
    i = int(np.flatnonzero(names == "id_only")[0])
    assert float(s.id_null[i]) == 0.0 and all(float(s.nulls[c][i]) == 1.0 for c in ("landmark", "emotion"))
    assert all(float(s.masks[c][i]) == (1.0 if absent == "null_tokens" else 0.0) for c in ("landmark", "emotion"))
    # closed-form marginal: P(landmark real) = sum of the setups where it is real
    p_l = PROBS["id_landmark_emotion"] + PROBS["id_landmark"] + PROBS["landmark_emotion"] + PROBS["landmark_only"]
    assert abs(real["landmark"].mean() - p_l) < 5 * math.sqrt(p_l * (1 - p_l) / n)


def test_mixed_conditioning_default_deterministic_and_applied():
    cfg = MixedConditioningConfig()
    assert cfg.probabilities() == (0.25, 0.2, 0.2, 0.225, 0.025, 0.025, 0.025, 0.05)
    a = sample_conditioning(jax.random.key(0), 64)
    b = sample_conditioning(jax.random.key(0), 64)
    c = sample_conditioning(jax.random.key(1), 64)
    jax.tree.map(np.testing.assert_array_equal, a, b)
    assert not np.array_equal(np.asarray(a.setup), np.asarray(c.setup))

    s = a._replace(setup=jnp.array([0, 1, 2, 3, 4]), id_null=jnp.array([0, 0, 0, 0, 1.0]),
                   masks={"landmark": jnp.array([0, 1, 0, 1, 1.0]), "emotion": jnp.array([0, 0, 1, 1, 1.0])},
                   nulls={"landmark": jnp.array([0, 0, 0, 0, 1.0]), "emotion": jnp.array([0, 0, 0, 0, 1.0])})
    r = np.random.default_rng(0)
    ctx = r.normal(size=(5, 77, 8)).astype(np.float32)
    empty = r.normal(size=(77, 8)).astype(np.float32)
    lmk = r.uniform(size=(5, 478, 3)).astype(np.float32)
    emo = r.uniform(size=(5, 10)).astype(np.float32)
    context, inputs = apply_conditioning(s, ctx, empty, landmarks=lmk, emotion=emo)
    np.testing.assert_array_equal(np.asarray(context[:4]), ctx[:4])
    np.testing.assert_array_equal(np.asarray(context[4]), empty)
    np.testing.assert_array_equal(np.asarray(inputs["landmarks"][:4]), lmk[:4])
    assert not np.any(np.asarray(inputs["landmarks"][4])) and not np.any(np.asarray(inputs["emotion"][4]))
    np.testing.assert_array_equal(np.asarray(inputs["landmark_mask"]), [0, 1, 0, 1, 1])
    assert set(inputs) == {"landmarks", "emotion", "landmark_mask", "emotion_mask"}
    with pytest.raises(ValueError, match="no emotion input"):
        apply_conditioning(s, ctx, empty, landmarks=lmk)


def test_draw_condition_equals_the_keyword_call():
    """draw_condition + predict == FaceCrafter(x, t, ctx, landmarks=zeroed, landmark_mask=...)."""
    model = _model(3)
    x, ctx, lmk, emo = _inputs(4, batch=5)
    empty = ctx[0] * 0.5
    s = sample_conditioning(jax.random.key(0), 5)._replace(
        setup=jnp.array([0, 1, 2, 3, 4]), id_null=jnp.array([0, 0, 0, 0, 1.0]),
        masks={"landmark": jnp.array([0, 1, 0, 1, 1.0]), "emotion": jnp.array([0, 0, 1, 1, 1.0])},
        nulls={"landmark": jnp.array([0, 0, 0, 0, 1.0]), "emotion": jnp.array([0, 0, 0, 0, 1.0])})
    t = jnp.asarray([7, 100, 300, 640, 900])
    cond = draw_condition(model, s, ctx, empty, {"landmark": lmk, "emotion": emo})
    assert set(cond.controls) == {"landmark", "emotion"}
    got = nnx.jit(lambda m, x, t, c: m.predict(x, t, c))(model, x, t, cond)
    context, kw = apply_conditioning(s, ctx, empty, landmarks=lmk, emotion=emo)
    want = _run(model, x, t, context, kw)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)  # eager vs jitted token encoding
    # the all-null sample ran both branches on their null tokens: encoder(zeros)
    np.testing.assert_allclose(np.asarray(cond.controls["landmark"][0][4]),
                               np.asarray(model.encoder("landmark")(null_input("landmark", 1))[0]), atol=1e-5)


def test_setup_conditions_uniform_structure_and_semantics():
    """Every setup gets the same controls (so they concatenate); given / null / off have the documented tokens and
    weights, and each condition's prediction equals the keyword API's."""
    model = _model(4)
    x, ctx, lmk, emo = _inputs(5, batch=2)
    empty = ctx[:1] * 0.5
    setups = [Setup(identity=False), Setup(absent="switched_off"), Setup(controls=("landmark",))]
    conds = setup_conditions(model, setups, ctx, empty, inputs={"landmark": lmk}, weights={"landmark": 0.7})
    assert [set(c.controls) for c in conds] == [{"landmark", "emotion"}] * 3
    null_l = model.encoder("landmark")(null_input("landmark"))
    np.testing.assert_array_equal(np.asarray(conds[0].context), np.asarray(empty))
    np.testing.assert_array_equal(np.asarray(conds[0].controls["landmark"][0]), np.asarray(null_l))
    assert float(conds[0].controls["emotion"][1][0]) == 1.0  # null tokens, branch on
    assert float(conds[1].controls["landmark"][1][0]) == 0.0  # absent = off: weight 0
    np.testing.assert_allclose(np.asarray(conds[2].controls["landmark"][1]), [0.7])
    zeros_l, zeros_e = jnp.zeros_like(lmk), jnp.zeros((2, 10))
    refs = [_run(model, x, T, jnp.broadcast_to(empty, ctx.shape), {"landmarks": zeros_l, "emotion": zeros_e}),
            _run(model, x, T, ctx, {"landmark_mask": jnp.zeros(2), "emotion_mask": jnp.zeros(2)}),
            _run(model, x, T, ctx, {"landmarks": lmk, "landmark_scale": 0.7})]  # emotion absent: null tokens
    for c, ref in zip(conds, refs):
        c = c._replace(context=jnp.broadcast_to(c.context, ctx.shape),
                       controls={k: (jnp.broadcast_to(tok, (2,) + tok.shape[1:]), jnp.broadcast_to(w, (2,)))
                                 for k, (tok, w) in c.controls.items()})
        np.testing.assert_allclose(np.asarray(model.predict(x, T, c)), np.asarray(ref), atol=2e-6)
    with pytest.raises(ValueError, match="no input was passed"):
        setup_conditions(model, [Setup(controls=("emotion",))], ctx, empty)
    with pytest.raises(ValueError, match="absent must be one of"):
        Setup(absent="maybe")


def test_mixed_conditioning_config_errors_and_single_stage():
    with pytest.raises(ValueError, match="sum to 1"):
        MixedConditioningConfig(all_null=0.2)
    with pytest.raises(ValueError, match="id_landmark_emotion"):
        MixedConditioningConfig(controls=("landmark",))
    with pytest.raises(ValueError, match="unknown mixed-conditioning config key"):
        MixedConditioningConfig.from_dict({"drop_rate": 0.1})
    with pytest.raises(ValueError, match="absent must be one of"):
        MixedConditioningConfig(absent="skip")
    # a section that gives probabilities gives all non-zero ones: the setups it leaves out get 0
    part = MixedConditioningConfig.from_dict({"id_only": 0.5, "id_landmark": 0.5, "controls": ("landmark",)})
    assert part.probabilities() == (0.0, 0.5, 0.0, 0.5, 0.0, 0.0, 0.0, 0.0)
    single = MixedConditioningConfig.single("landmark")
    assert single.probabilities() == pytest.approx((0.0, 0.45, 0.0, 0.4, 0.0, 0.1, 0.0, 0.05))
    s = sample_conditioning(jax.random.key(0), 4000, single)
    assert set(s.masks) == {"landmark"}
    setup = np.asarray(s.setup)
    names = list(SETUPS)
    assert set(np.unique(setup)) <= {names.index(n) for n in ("id_landmark", "id_only", "landmark_only", "all_null")}
    assert abs((setup == names.index("id_landmark")).mean() - 0.45) < 0.04


def test_bf16_compute_keeps_float32_params_and_stats():
    """bf16 compute dtype: float32 AdapterParams, bf16 activations, close to the float32 result."""
    r = np.random.default_rng(3)
    lmk = jnp.asarray(r.uniform(size=(2, 478, 3)).astype(np.float32))
    x = jnp.asarray(r.normal(size=(2, 6, 16)).astype(np.float32))
    ctx = jnp.asarray(r.normal(size=(2, 5, 12)).astype(np.float32))
    results = []
    for dt in (jnp.float32, jnp.bfloat16):
        enc = ControlTokenEncoder("landmark", num_tokens=2, hidden_dim=8, output_dim=12, dtype=dt, rngs=nnx.Rngs(0))
        attn = Attention(16, 12, heads=2, dim_head=4, dtype=dt, rngs=nnx.Rngs(1))
        attn.to_k_c = nnx.Dict({"landmark": AdapterLinear(12, 8, use_bias=False, dtype=dt, rngs=nnx.Rngs(2))})
        attn.to_v_c = nnx.Dict({"landmark": AdapterLinear(12, 8, use_bias=False, dtype=dt, rngs=nnx.Rngs(3))})
        assert {v.get_value().dtype for _, v in nnx.to_flat_state(nnx.state((enc, attn), nnx.Param))} == {jnp.dtype(jnp.float32)}
        tokens = enc(lmk)
        y = attn(x.astype(dt), ctx.astype(dt), controls={"landmark": (tokens, jnp.ones(2))})
        assert tokens.dtype == dt and y.dtype == dt
        results.append(np.asarray(y, np.float32))
    assert np.abs(results[0] - results[1]).max() < 0.05 * np.abs(results[0]).max()
