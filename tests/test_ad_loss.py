"""AD-loss readings on hand-built maps with known answers, masking, config, and one end-to-end case."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from facecrafter_jax.losses import (ADLossConfig, AD_LOSSES, across_setups_loss, ad_loss, diffusion_loss, map_overlap_loss,
                                   orthogonality_loss)
from facecrafter_jax.tokens import ID_TOKEN_POSITION


def _orthogonal_pair(seed, b=3, lq=5, heads=2, d=4):
    """Random x and y with <x, y> = 0 per (sample, position) on the concatenated heads."""
    r = np.random.default_rng(seed)
    x = r.normal(size=(b, lq, heads * d))
    y = r.normal(size=(b, lq, heads * d))
    y -= (np.sum(x * y, -1, keepdims=True) / np.sum(x * x, -1, keepdims=True)) * x
    return x.reshape(b, lq, heads, d).astype(np.float32), y.reshape(b, lq, heads, d).astype(np.float32)


def _out_maps(o_id, controls: dict, layers=(0,)):
    return {l: {"id": {"out": jnp.asarray(o_id)}, **{c: {"out": jnp.asarray(v)} for c, v in controls.items()}}
            for l in layers}


def test_orthogonality_known_values():
    x, y = _orthogonal_pair(0)
    ones = jnp.ones(3)
    assert float(orthogonality_loss(_out_maps(x, {"landmark": y}), {"landmark": ones})) < 1e-10
    assert abs(float(orthogonality_loss(_out_maps(x, {"landmark": x}), {"landmark": ones})) - 1.0) < 1e-6
    assert abs(float(orthogonality_loss(_out_maps(x, {"landmark": -2.5 * x}), {"landmark": ones})) - 1.0) < 1e-6
    # 45 degrees: y' = x/|x| + y/|y| -> cos^2 = 1/2.
    xf, yf = x.reshape(3, 5, -1), y.reshape(3, 5, -1)
    mid = (xf / np.linalg.norm(xf, axis=-1, keepdims=True) + yf / np.linalg.norm(yf, axis=-1, keepdims=True)).reshape(x.shape)
    assert abs(float(orthogonality_loss(_out_maps(x, {"emotion": mid}), {"emotion": ones})) - 0.5) < 1e-6


def test_orthogonality_masking_and_averaging():
    x, y = _orthogonal_pair(1)
    # Samples 0, 1 identical (value 1), sample 2 orthogonal (value 0).
    c = np.concatenate([x[:2], y[2:]])
    maps = _out_maps(x, {"landmark": c, "emotion": y}, layers=(2, 5))
    v = lambda act: float(orthogonality_loss(maps, act))
    assert abs(v({"landmark": jnp.array([1.0, 1.0, 1.0])}) - 2 / 3) < 1e-6
    assert v({"landmark": jnp.array([0.0, 0.0, 1.0])}) < 1e-10  # the identical samples are masked out
    assert abs(v({"landmark": jnp.array([1.0, 0.0, 0.0])}) - 1.0) < 1e-6
    # Pooled over (layer, control, active sample): landmark 3 samples (2 ones), emotion 3 zeros -> 2/6.
    assert abs(v({"landmark": jnp.ones(3), "emotion": jnp.ones(3)}) - 2 / 6) < 1e-6
    assert v({"landmark": jnp.zeros(3)}) == 0.0  # nothing active -> 0, not NaN
    assert abs(float(orthogonality_loss(maps, {"landmark": jnp.ones(3)}, layers=[5])) - 2 / 3) < 1e-6
    # Masked samples do not even enter the gradient.
    g = jax.grad(lambda o: orthogonality_loss(_out_maps(x, {"landmark": o}), {"landmark": jnp.array([1.0, 0.0, 1.0])}))(
        jnp.asarray(c))
    assert not np.any(np.asarray(g[1])) and np.any(np.asarray(g[0]))


def test_orthogonality_per_head():
    """Head 0 parallel, head 1 orthogonal: per head = (1 + 0) / 2; concatenated = |x0|^4 / (|x|^2 |y|^2)."""
    r = np.random.default_rng(2)
    x = r.normal(size=(1, 1, 2, 3)).astype(np.float32)
    y = np.zeros_like(x)
    y[..., 0, :] = x[..., 0, :]
    h1 = r.normal(size=3)
    y[..., 1, :] = h1 - (h1 @ x[0, 0, 1]) / (x[0, 0, 1] @ x[0, 0, 1]) * x[0, 0, 1]
    maps = _out_maps(x, {"landmark": y})
    act = {"landmark": jnp.ones(1)}
    assert abs(float(orthogonality_loss(maps, act, per_head=True)) - 0.5) < 1e-6
    n0 = float(x[0, 0, 0] @ x[0, 0, 0])
    want = n0 ** 2 / (float(np.sum(x * x)) * float(np.sum(y * y)))
    assert abs(float(orthogonality_loss(maps, act)) - want) < 1e-6


def _probs_maps(id_spatial, ctrl_spatial, heads=2, seq=77):
    """Build ID probs [B, h, Lq, seq] whose column ID_TOKEN_POSITION has the given spatial pattern, and
    control probs [B, h, Lq, N]; the other columns are filled so every row still sums to 1."""
    id_spatial = np.asarray(id_spatial, np.float64)  # [B, Lq] values in [0, 1)
    b, lq = id_spatial.shape
    p_id = np.zeros((b, heads, lq, seq))
    p_id[:, :, :, ID_TOKEN_POSITION] = id_spatial[:, None, :]
    p_id[:, :, :, 0] = 1.0 - id_spatial[:, None, :]
    ctrl = np.asarray(ctrl_spatial, np.float64)  # [B, Lq, N]
    p_c = np.broadcast_to(ctrl[:, None], (b, heads) + ctrl.shape[1:])
    return {0: {"id": {"probs": jnp.asarray(p_id, jnp.float32)}, "landmark": {"probs": jnp.asarray(p_c, jnp.float32)}}}


def test_map_overlap_known_values():
    act = {"landmark": jnp.ones(1)}
    # ID attends to positions 0, 1 only; the control token to positions 2, 3 only -> disjoint.
    id_map = [[0.5, 0.5, 0.0, 0.0]]
    ctrl = np.array([[[0.0], [0.0], [0.5], [0.5]]])
    for overlap in ("cosine", "min"):
        assert float(map_overlap_loss(_probs_maps(id_map, ctrl), act, overlap=overlap)) < 1e-7
    # Identical spatial distributions (after normalisation over positions) -> 1, whatever the scale.
    same = np.array([[[0.1], [0.3], [0.2], [0.4]]]) * 0.5
    for overlap in ("cosine", "min"):
        v = float(map_overlap_loss(_probs_maps([[0.1, 0.3, 0.2, 0.4]], same), act, overlap=overlap))
        assert abs(v - 1.0) < 1e-6, overlap
    # Uniform ID map vs a token on one position: cosine = (1/4) / (1/2 * 1) = 1/2, min = 1/4.
    one = np.array([[[0.9], [0.0], [0.0], [0.0]]])
    uni = [[0.2, 0.2, 0.2, 0.2]]
    assert abs(float(map_overlap_loss(_probs_maps(uni, one), act)) - 0.5) < 1e-6
    assert abs(float(map_overlap_loss(_probs_maps(uni, one), act, overlap="min")) - 0.25) < 1e-6
    # Several control tokens: averaged over tokens (token 0 identical -> 1, token 1 disjoint -> 0).
    two = np.array([[[0.5, 0.0], [0.5, 0.0], [0.0, 0.7], [0.0, 0.7]]])
    assert abs(float(map_overlap_loss(_probs_maps([[0.5, 0.5, 0.0, 0.0]], two), act, overlap="min")) - 0.5) < 1e-6


def test_map_overlap_masking_and_id_positions():
    # Sample 0 identical maps (1), sample 1 disjoint (0). The ID column takes all of positions 0, 1.
    id_map = [[1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 0.0, 0.0]]
    ctrl = np.array([[[0.5], [0.5], [0.0], [0.0]], [[0.0], [0.0], [0.5], [0.5]]])
    maps = _probs_maps(id_map, ctrl)
    assert abs(float(map_overlap_loss(maps, {"landmark": jnp.ones(2)})) - 0.5) < 1e-6
    assert abs(float(map_overlap_loss(maps, {"landmark": jnp.array([1.0, 0.0])})) - 1.0) < 1e-6
    assert float(map_overlap_loss(maps, {"landmark": jnp.array([0.0, 1.0])})) < 1e-7
    # Column 0 holds the complement ([0, 0, 1, 1]): it overlaps sample 1's control map perfectly.
    v = float(map_overlap_loss(maps, {"landmark": jnp.array([0.0, 1.0])}, id_token_positions=(0,)))
    assert abs(v - 1.0) < 1e-6
    with pytest.raises(ValueError, match="outside"):
        map_overlap_loss(maps, {"landmark": jnp.ones(2)}, id_token_positions=(80,))
    with pytest.raises(ValueError, match="overlap"):
        map_overlap_loss(maps, {"landmark": jnp.ones(2)}, overlap="kl")


def test_config_weight_layers_and_errors():
    x, _ = _orthogonal_pair(3)
    maps = _out_maps(x, {"landmark": x}, layers=(1, 4))
    act = {"landmark": jnp.ones(3)}
    cfg = ADLossConfig(kind="orthogonality", weight=0.25, layers=[4])
    assert abs(float(ad_loss(cfg, maps, act)) - 0.25) < 1e-6
    assert cfg.explicit_layers() == [4] and ADLossConfig().explicit_layers() == "all"
    assert ADLossConfig.from_dict({"kind": "map_overlap", "options": {"overlap": "min"}}).options == {"overlap": "min"}
    assert set(AD_LOSSES) >= {"orthogonality", "map_overlap"}
    with pytest.raises(ValueError, match="unknown AD loss"):
        ADLossConfig(kind="contrastive")
    with pytest.raises(ValueError, match="unknown option"):
        ADLossConfig(kind="orthogonality", options={"overlap": "min"})
    with pytest.raises(ValueError, match="unknown AD loss config key"):
        ADLossConfig.from_dict({"kind": "orthogonality", "lambda": 1.0})
    with pytest.raises(ValueError, match="no exposed maps"):
        ad_loss(ADLossConfig(layers=[2]), maps, act)
    with pytest.raises(ValueError, match="branch 'emotion'"):
        orthogonality_loss(maps, {"emotion": jnp.ones(3)})
    with pytest.raises(ValueError, match=r"active\['landmark'\]"):
        orthogonality_loss(maps, {"landmark": jnp.ones(2)})


def test_diffusion_loss_closed_form():
    r = np.random.default_rng(4)
    a, b = r.normal(size=(3, 2, 2, 4)).astype(np.float32), r.normal(size=(3, 2, 2, 4)).astype(np.float32)
    per = ((a - b) ** 2).reshape(3, -1).mean(1)
    assert abs(float(diffusion_loss(jnp.asarray(a), jnp.asarray(b))) - per.mean()) < 1e-6
    w = np.array([1.0, 0.0, 2.0], np.float32)
    assert abs(float(diffusion_loss(jnp.asarray(a), jnp.asarray(b), jnp.asarray(w))) - (per * w).sum() / 3) < 1e-6


def test_end_to_end_copy_init_branch_equals_id_branch():
    """Copy-initialised adapters fed the ID context itself as control tokens: the control branch output
    equals the ID branch output in every layer, so the orthogonality reading is exactly 1; masked -> 0."""
    from facecrafter_jax.models.facecrafter import collect_control_maps
    from facecrafter_jax.models.attention import BranchOutputs
    from facecrafter_jax.models.control import add_control_adapters
    from facecrafter_jax.models.unet_2d_condition import UNet2DConditionConfig, UNet2DConditionModel
    from tiny_models import TINY_UNET

    unet = UNet2DConditionModel(UNet2DConditionConfig.from_diffusers_config(TINY_UNET), explicit_cross_attention="all",
                                rngs=nnx.Rngs(0))
    add_control_adapters(unet, ["landmark"])
    r = np.random.default_rng(5)
    x = jnp.asarray(r.normal(size=(2, 16, 16, 4)).astype(np.float32))
    ctx = jnp.asarray(r.normal(size=(2, 9, 64)).astype(np.float32))

    @nnx.jit
    def loss(m, x, ctx, act):
        out, outs = nnx.capture(lambda m: m(x, 5, ctx, controls={"landmark": (ctx, None, 0.5)}), BranchOutputs)(m)
        maps = collect_control_maps(m, [outs])
        return orthogonality_loss(maps, {"landmark": act}), len(maps)

    value, n = loss(unet, x, ctx, jnp.ones(2))
    assert int(n) == 4 and abs(float(value) - 1.0) < 1e-5
    assert float(loss(unet, x, ctx, jnp.zeros(2))[0]) == 0.0


def test_zero_branch_outputs_and_maps_give_finite_gradients():
    """A null-dropped input can give exactly-zero branch outputs; masked or not, no NaN may reach the gradient."""
    x, y = _orthogonal_pair(6)
    y[1] = 0.0  # sample 1: zero control output
    for act in (jnp.array([1.0, 0.0, 1.0]), jnp.ones(3)):
        value, g = jax.value_and_grad(lambda o: orthogonality_loss(_out_maps(x, {"landmark": o}), {"landmark": act}))(
            jnp.asarray(y))
        assert np.isfinite(float(value)) and np.all(np.isfinite(np.asarray(g)))
    assert float(orthogonality_loss(_out_maps(x, {"landmark": y}), {"landmark": jnp.ones(3)})) < 1e-10
    ctrl = np.zeros((1, 4, 1))  # an all-zero control map
    g = jax.grad(lambda c: map_overlap_loss({0: {"id": {"probs": _probs_maps([[0.5, 0.5, 0, 0]], ctrl)[0]["id"]["probs"]},
                                                 "landmark": {"probs": c}}}, {"landmark": jnp.ones(1)}))(
        jnp.zeros((1, 2, 4, 1)))
    assert np.all(np.isfinite(np.asarray(g)))


# --------------------------------------------------------------------------------------------
# Reading C: across setups (own setup vs its ID-only pair, stacked as 2B rows)
# --------------------------------------------------------------------------------------------
def _paired(own_id, own_c, ref_id, ref_c, layers=(0,)):
    """maps with 2B rows: rows [0, B) the own setups, rows [B, 2B) the ID-only pairs (one head, one position)."""
    o_id = np.concatenate([own_id, ref_id])[:, None, None, :].astype(np.float32)
    o_c = np.concatenate([own_c, ref_c])[:, None, None, :].astype(np.float32)
    return _out_maps(o_id, {"landmark": o_c}, layers)


def test_across_setups_known_values():
    """h = o_id + w o_c per row; value = cos^2(h_ref, h_own - h_ref), computed by hand for three samples."""
    own_id = np.array([[1.0, 0.0], [1.0, 0.0], [2.0, 1.0]])
    own_c = np.array([[0.0, 1.0], [1.0, 1.0], [0.0, 0.0]])
    ref_id = np.array([[1.0, 0.0], [1.0, 0.0], [2.0, 1.0]])
    ref_c = np.array([[0.0, 0.0], [0.0, 0.0], [1.0, 0.0]])  # the null tokens' branch output
    w = jnp.array([1.0, 1.0, 0.5, 1.0, 1.0, 2.0])
    maps = _paired(own_id, own_c, ref_id, ref_c)
    # sample 0: h_own (1, 1), h_ref (1, 0), change (0, 1): orthogonal -> 0
    # sample 1: h_own (2, 1), h_ref (1, 0), change (1, 1): cos^2 = 1 / 2
    # sample 2: h_own (2, 1) (w 0.5 * 0), h_ref (4, 1) (w 2 * (1, 0)), change (-2, 0): cos^2 = 64 / (17 * 4) = 16 / 17
    hand = [0.0, 0.5, 16.0 / 17.0]
    loss = lambda act: float(across_setups_loss(maps, {"landmark": act}, weights={"landmark": w}))
    assert loss(jnp.ones(3)) == pytest.approx(np.mean(hand), abs=1e-6)
    assert loss(jnp.array([0.0, 1.0, 0.0])) == pytest.approx(0.5, abs=1e-6)  # only sample 1 active
    assert loss(jnp.zeros(3)) == 0.0
    # any active control counts a sample once; config plumbing
    two = {**maps[0], "emotion": {"out": maps[0]["landmark"]["out"] * 0}}
    both = float(across_setups_loss({0: two}, {"landmark": jnp.array([1.0, 0, 0]), "emotion": jnp.array([0, 1.0, 0])},
                                    weights={"landmark": w, "emotion": jnp.zeros(6)}))
    assert both == pytest.approx(0.25, abs=1e-6)
    cfg = ADLossConfig(kind="across_setups", weight=2.0)
    assert float(ad_loss(cfg, maps, {"landmark": jnp.ones(3)}, weights={"landmark": w})) == pytest.approx(
        2 * np.mean(hand), abs=1e-6)
    with pytest.raises(ValueError, match="needs the branch weights"):
        ad_loss(cfg, maps, {"landmark": jnp.ones(3)})
    with pytest.raises(ValueError, match="2B rows"):
        across_setups_loss(_out_maps(np.ones((3, 1, 1, 2), np.float32), {"landmark": np.ones((3, 1, 1, 2), np.float32)}),
                           {"landmark": jnp.ones(1)}, weights={"landmark": jnp.ones(3)})


def test_across_setups_finite_gradients_at_zero_outputs():
    """Zero branch outputs and a zero change (controls that change nothing) give 0 and finite gradients."""
    z = np.zeros((2, 2))
    own_id = np.array([[1.0, 2.0], [0.0, 0.0]])
    w = jnp.ones(4)

    def f(oc):
        return across_setups_loss({0: {"id": {"out": jnp.asarray(np.concatenate([own_id, own_id])[:, None, None, :],
                                                                jnp.float32)},
                                       "landmark": {"out": oc}}}, {"landmark": jnp.ones(2)}, weights={"landmark": w})

    value, g = jax.value_and_grad(f)(jnp.zeros((4, 1, 1, 2), jnp.float32))
    assert float(value) == 0.0 and np.all(np.isfinite(np.asarray(g)))
    assert np.all(np.isfinite(np.asarray(jax.grad(f)(jnp.asarray(np.concatenate([z, z])[:, None, None, :],
                                                                  jnp.float32)))))
