"""Attention paths against each other and against closed forms; the spatial transformer against diffusers."""

import numpy as np
import pytest
import torch
import jax.numpy as jnp
from flax import nnx

from facecrafter_jax.convert.weights import build_key_map, load_torch_state
from facecrafter_jax.models.attention import Attention, AttentionProbs, Transformer2DModel, attend

from conftest import nchw_to_nhwc, nhwc_to_nchw


def _qkv(seed, b=2, lq=12, lk=7, h=3, d=8, dtype=np.float32):
    r = np.random.default_rng(seed)
    return tuple(jnp.asarray(r.normal(size=s).astype(np.float32), dtype=dtype)
                 for s in ((b, lq, h, d), (b, lk, h, d), (b, lk, h, d)))


def _softmax_attention_numpy(q, k, v):
    q, k, v = (np.asarray(t, np.float64) for t in (q, k, v))
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
    logits -= logits.max(-1, keepdims=True)
    p = np.exp(logits)
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bhqk,bkhd->bqhd", p, v), p


def test_explicit_matches_hand_softmax_and_xla():
    q, k, v = _qkv(0)
    out, probs = attend(q, k, v, implementation="explicit", return_probs=True)
    ref_out, ref_p = _softmax_attention_numpy(q, k, v)
    assert probs.shape == (2, 3, 12, 7) and probs.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(probs).sum(-1), 1.0, atol=1e-6)
    assert np.abs(np.asarray(probs) - ref_p).max() < 1e-6
    assert np.abs(np.asarray(out) - ref_out).max() < 1e-5
    fused = attend(q, k, v, implementation="xla")
    assert np.abs(np.asarray(fused) - np.asarray(out)).max() < 1e-5


def test_custom_scale_and_bf16_keeps_float32_softmax():
    q, k, v = _qkv(1, dtype=jnp.bfloat16)
    out, probs = attend(q, k, v, implementation="explicit", return_probs=True, scale=0.3)
    assert out.dtype == jnp.bfloat16 and probs.dtype == jnp.float32
    qf, kf = (np.asarray(t, np.float64) for t in (q, k))
    logits = np.einsum("bqhd,bkhd->bhqk", qf, kf) * 0.3
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    assert np.abs(np.asarray(probs) - p).max() < 1e-5  # bf16 inputs are exact in f64; only the f32 softmax rounds
    fused = attend(q, k, v, implementation="xla", scale=0.3)
    assert np.abs(np.asarray(fused, np.float32) - np.asarray(out, np.float32)).max() < 3e-2


@pytest.mark.parametrize("budget", [None, 64])  # one block; query blocks per batch element, last block padded
def test_cpu_attention_gradients_match_torch(monkeypatch, budget):
    import jax

    from facecrafter_jax.models import attention as A

    if budget is not None:
        monkeypatch.setattr(A, "CPU_LOGITS_BUDGET", budget)  # per batch element, 37 queries -> 3 blocks of 13 (+ 2 pad)
    q, k, v = _qkv(3, lq=37 if budget else 12)
    g = jnp.asarray(np.random.default_rng(4).normal(size=q.shape).astype(np.float32))
    out, grads = jax.value_and_grad(lambda q, k, v: jnp.sum(attend(q, k, v, implementation="xla") * g),
                                    argnums=(0, 1, 2))(q, k, v)
    tq, tk, tv = (torch.from_numpy(np.asarray(t).transpose(0, 2, 1, 3).copy()).requires_grad_(True) for t in (q, k, v))
    ref = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv)
    tg = torch.from_numpy(np.asarray(g).transpose(0, 2, 1, 3).copy())
    ref_grads = torch.autograd.grad(ref, (tq, tk, tv), tg)
    assert abs(float(out) - float((ref * tg).sum())) < 1e-4
    for mine, r in zip(grads, ref_grads):
        r = r.numpy().transpose(0, 2, 1, 3)
        assert np.abs(np.asarray(mine) - r).max() < 1e-5 * max(1.0, np.abs(r).max())


def test_bad_arguments_are_named():
    q, k, v = _qkv(2)
    with pytest.raises(ValueError, match="flash"):
        attend(q, k, v, implementation="flash")
    with pytest.raises(ValueError, match="explicit"):
        attend(q, k, v, implementation="xla", return_probs=True)
    with pytest.raises(ValueError, match="heads"):
        attend(q[:, :, 0], k, v)


def test_attention_module_decomposes_into_query_once_steps():
    """project_query / project_key_value / attend / project_out compose to __call__, and an extra (k, v) set
    reuses the query: the IP-Adapter extension point."""
    attn = Attention(16, 12, heads=2, dim_head=8, implementation="explicit", rngs=nnx.Rngs(0))
    r = np.random.default_rng(3)
    x = jnp.asarray(r.normal(size=(2, 10, 16)).astype(np.float32))
    ctx = jnp.asarray(r.normal(size=(2, 5, 12)).astype(np.float32))
    extra = jnp.asarray(r.normal(size=(2, 4, 12)).astype(np.float32))

    def decoupled(attn, x, ctx, extra):
        q = attn.project_query(x)
        main = attn.attend(q, *attn.project_key_value(ctx))
        side = attn.attend(q, *attn.project_key_value(extra), probs_name="probs_extra")
        return attn.project_out(main + 0.5 * side)

    out, inter = nnx.capture(decoupled, AttentionProbs)(attn, x, ctx, extra)
    probs, probs_extra = inter["probs"].get_value()[0], inter["probs_extra"].get_value()[0]
    assert probs.shape == (2, 2, 10, 5) and probs_extra.shape == (2, 2, 10, 4)
    # Reference from the raw weights in NumPy.
    wq, wk, wv = (np.asarray(m.kernel.get_value()) for m in (attn.to_q, attn.to_k, attn.to_v))
    wo, bo = np.asarray(attn.to_out[0].kernel.get_value()), np.asarray(attn.to_out[0].bias.get_value())
    split = lambda t: t.reshape(t.shape[0], t.shape[1], 2, 8)
    q = split(np.asarray(x) @ wq)
    o1, p1 = _softmax_attention_numpy(q, split(np.asarray(ctx) @ wk), split(np.asarray(ctx) @ wv))
    o2, p2 = _softmax_attention_numpy(q, split(np.asarray(extra) @ wk), split(np.asarray(extra) @ wv))
    ref = (o1 + 0.5 * o2).reshape(2, 10, 16) @ wo + bo
    assert np.abs(np.asarray(out) - ref).max() < 1e-5
    assert np.abs(np.asarray(probs) - p1).max() < 1e-6 and np.abs(np.asarray(probs_extra) - p2).max() < 1e-6
    # Plain call: identical output, nothing stored on the module.
    plain = attn(x, ctx)
    direct = attn.project_out(attn.attend(attn.project_query(x), *attn.project_key_value(ctx)))
    assert np.abs(np.asarray(plain) - np.asarray(direct)).max() == 0
    assert not any(isinstance(v, AttentionProbs) for _, v in nnx.to_flat_state(nnx.state(attn)))


@pytest.mark.parametrize("linear", [False, True])
def test_transformer2d_matches_diffusers(linear):
    from diffusers.models.transformers.transformer_2d import Transformer2DModel as TorchT2D

    torch.manual_seed(4 + linear)
    ref = TorchT2D(num_attention_heads=2, attention_head_dim=8, in_channels=16, num_layers=2, cross_attention_dim=12,
                   norm_num_groups=4, use_linear_projection=linear).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.2 * torch.randn_like(p))
    ours = Transformer2DModel(2, 8, 16, num_layers=2, cross_attention_dim=12, norm_num_groups=4,
                              use_linear_projection=linear, rngs=nnx.Rngs(0))
    sd = {k: v.numpy() for k, v in ref.state_dict().items()}
    load_torch_state(ours, sd, build_key_map(ours))
    r = np.random.default_rng(5)
    x = r.normal(size=(2, 16, 6, 5)).astype(np.float32)
    ctx = r.normal(size=(2, 7, 12)).astype(np.float32)
    with torch.no_grad():
        want = ref(torch.tensor(x), encoder_hidden_states=torch.tensor(ctx)).sample.numpy()
    got = nhwc_to_nchw(nnx.jit(lambda m, a, c: m(a, c))(ours, jnp.asarray(nchw_to_nhwc(x)), jnp.asarray(ctx)))
    assert np.abs(got - want).max() < 1e-4
