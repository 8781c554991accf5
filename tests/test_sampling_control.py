"""FaceCrafterPipeline: identity + landmark / emotion controls with the two-scale guidance chain.

A tiny random Arc2Face (UNet / CLIP / VAE) converted to ours, plus random FaceCrafter adapters (built with
the control modules' API, then perturbed away from the copy initialisation so the controls matter), saved
as a checkpoint with the ``adapters`` component and exported to diffusers (``to-diffusers``).

* no controls / masks off / ``g_ctl = 0`` with the null branch off: exactly :class:`Arc2FacePipeline`;
* the chain ``e(null) + g_id (e(id) - e(null)) + g_ctl (e(id+ctl) - e(id))`` with controls equals a
  PyTorch reference: diffusers' UNet with the exported FaceCrafter processors, the three branches as
  three separate calls, combined by hand, stepped with diffusers' DDIMScheduler (4 steps);
* changing the landmarks / emotion changes the output (no recompilation); ``g_ctl = 0`` is the ID-only
  result with the same null branch.
"""

import dataclasses

import numpy as np
import pytest
import torch
from flax import nnx

from facecrafter_jax import schedulers as S
from facecrafter_jax import tokens
from facecrafter_jax.convert.cli import main as convert_main
from facecrafter_jax.models.facecrafter import FaceCrafter, FaceCrafterConfig
from facecrafter_jax.face.vocabulary import emotion_table, emotion_vector
from facecrafter_jax.pretrained import load_pretrained, save_pretrained
from facecrafter_jax.sampling import Arc2FacePipeline, FaceCrafterPipeline, guidance_branches
from tiny_models import arc2face_context_torch, save_tiny_arc2face
from conftest import perturb_adapters

ID_DIM = 48  # < the tiny CLIP width 64
BATCH = 2
STEPS = 4
SMALL = FaceCrafterConfig(landmark_tokens=3, emotion_tokens=2, landmark_hidden_dim=32, emotion_hidden_dim=16)
LATENT_REL_TOL = 1e-5




def rel_err(ours, ref):
    return float(np.abs(ours - ref).max() / max(1.0, np.abs(ref).max()))


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # OpenMP busy-waiting on the shared 2-core machine (see test_sampling.py)
    root = tmp_path_factory.mktemp("fc_sampling")
    tm = save_tiny_arc2face(root / "torch")
    assert convert_main(["from-diffusers", "--unet", str(root / "torch/unet"), "--text-encoder",
                         str(root / "torch/text_encoder"), "--vae", str(root / "torch/vae"),
                         "--out", str(root / "base")]) == 0
    m = load_pretrained(str(root / "base"))
    model = FaceCrafter(m.unet, SMALL, rngs=nnx.Rngs(1))
    perturb_adapters(model, 2)
    save_pretrained(str(root / "fc"), unet=model.unet, text_encoder=m.text_encoder, vae=m.vae, adapters=model)
    assert convert_main(["to-diffusers", str(root / "fc"), str(root / "export")]) == 0

    fc = load_pretrained(str(root / "fc"), components=("unet", "text_encoder", "vae", "adapters"))
    pipe = FaceCrafterPipeline(fc.adapters, fc.text_encoder, fc.vae, scheduler="ddim")
    plain = load_pretrained(str(root / "fc"))  # the frozen components alone: a plain Arc2Face
    assert plain.unet.control_names == ()
    arc2face = Arc2FacePipeline(plain.unet, plain.text_encoder, plain.vae, scheduler="ddim")

    rng = np.random.default_rng(0)
    arc = (2.0 * rng.standard_normal((BATCH, ID_DIM))).astype(np.float32)
    lmk = rng.uniform(0.2, 0.8, size=(BATCH, 478, 3)).astype(np.float32)
    lmk[..., 2] -= 0.5
    emo = np.stack([emotion_vector("happy")[0], emotion_vector("anger")[0]])
    noise = rng.standard_normal((BATCH, 16, 16, 4)).astype(np.float32)
    yield dict(root=root, tm=tm, pipe=pipe, arc2face=arc2face, arc=arc, lmk=lmk, emo=emo, noise=noise)
    torch.set_num_threads(threads)


def run(env, **kw):
    kw.setdefault("latents", env["noise"])
    return env["pipe"](env["arc"], num_steps=STEPS, output_type="latent", **kw).latents


@pytest.fixture(scope="module")
def id_only(env):
    return env["arc2face"](env["arc"], num_steps=STEPS, latents=env["noise"], output_type="latent").latents


# ------------------------------------------------------------------------------------------------
# ID-only: null tokens by default, Arc2Face with the branches switched off
# ------------------------------------------------------------------------------------------------
def test_absent_controls_off_is_arc2face(env, id_only):
    np.testing.assert_array_equal(run(env, absent_controls="switched_off"), id_only)
    # g_ctl = 0 with absent controls off: the control inputs are ignored, Arc2Face's chain e0 + g (e1 - e0)
    np.testing.assert_array_equal(run(env, landmarks=env["lmk"], emotion=env["emo"], guidance_control=0.0,
                                      absent_controls="switched_off"), id_only)


def test_scale_zero_adds_nothing(env):
    """Control branches computed (3 branches, one model call) but weighted 0: the control inputs do not matter."""
    n = len(env["pipe"].compile_log)
    kw = dict(guidance_control=2.0, landmark_scale=0.0, emotion_scale=0.0)
    out = run(env, landmarks=env["lmk"], emotion=env["emo"], **kw)
    assert len(env["pipe"].compile_log) == n + 1 and len(env["pipe"].compile_log[-1]["setups"]) == 3
    np.testing.assert_array_equal(run(env, landmarks=1.0 - env["lmk"], emotion=env["emo"][::-1].copy(), **kw), out)
    assert len(env["pipe"].compile_log) == n + 1


def test_id_only_uses_the_null_tokens_and_matches_pytorch(env, id_only):
    """ID-only sampling of a FaceCrafter model runs its control branches on their null tokens: it differs from
    the base model and equals the PyTorch export (diffusers UNet + exported processors) within 1e-5."""
    lmk, emo = env["lmk"], env["emo"]
    n = len(env["pipe"].compile_log)
    ours = run(env)
    assert np.abs(ours - id_only).max() > 1e-2  # the learned null tokens matter
    ref = torch_chain(env, 3.0, 3.0)
    err = rel_err(ours, ref)
    print(f"ID-only (null tokens) vs PyTorch export: rel err {err:.2e} (max |latent| {np.abs(ref).max():.1f})")
    assert err <= LATENT_REL_TOL
    # g_ctl = 0 with controls given: the ID-only result (the control inputs are dropped, same program)
    np.testing.assert_array_equal(run(env, landmarks=lmk, emotion=emo, guidance_control=0.0), ours)
    np.testing.assert_array_equal(run(env, landmarks=lmk, guidance_control=0.0), ours)
    assert len(env["pipe"].compile_log) == n + 1  # one program for the three calls


def test_zero_initialised_values_id_only_is_the_base(env, id_only):
    """Adapters whose value projections start at zero add exactly nothing: ID-only sampling with the null tokens
    equals Arc2Face's."""
    m = load_pretrained(str(env["root"] / "base"))
    model = FaceCrafter(m.unet, dataclasses.replace(SMALL, adapter_value_init="zeros"), rngs=nnx.Rngs(1))
    pipe = FaceCrafterPipeline(model, m.text_encoder, m.vae, scheduler="ddim")
    out = pipe(env["arc"], num_steps=STEPS, latents=env["noise"], output_type="latent").latents
    print(f"zero-value adapters, ID-only vs Arc2Face: max abs diff {np.abs(out - id_only).max():.2e}")
    np.testing.assert_array_equal(out, id_only)


# ------------------------------------------------------------------------------------------------
# The guidance chain against PyTorch (diffusers UNet + exported FaceCrafter processors + DDIMScheduler)
# ------------------------------------------------------------------------------------------------
def torch_chain(env, g_id, g_ctl, *, landmarks=None, emotion=None, scales=None):
    """Reference sampler: every branch's absent controls on their null tokens (zeros input, mask on)."""
    from diffusers import DDIMScheduler, UNet2DConditionModel

    from facecrafter_jax import torch_facecrafter as tfc

    root, tm = env["root"], env["tm"]
    unet = UNet2DConditionModel.from_pretrained(str(root / "export/unet")).eval()
    enc = tfc.load_facecrafter_adapters(unet, str(root / "export"))
    B = BATCH
    arc = torch.from_numpy(env["arc"])
    ctx = arc2face_context_torch(tm["text_encoder"], arc / arc.norm(dim=1, keepdim=True))
    with torch.no_grad():
        empty = tm["text_encoder"](torch.from_numpy(tokens.EMPTY_PROMPT_IDS[None].astype(np.int64))).last_hidden_state
        empty = empty.repeat(B, 1, 1)
        zl, ze = torch.zeros(B, 478, 3), torch.zeros(B, 10)
        on = {"landmark": torch.ones(B), "emotion": torch.ones(B)}
        c0 = tfc.encode_controls(enc, landmarks=zl, emotion=ze, masks=on)
        c1 = tfc.encode_controls(enc, landmarks=zl, emotion=ze, masks=on)
        scales = scales or {}
        c2 = tfc.encode_controls(
            enc, landmarks=zl if landmarks is None else torch.from_numpy(landmarks),
            emotion=ze if emotion is None else torch.from_numpy(emotion), masks=on,
            scales={k: torch.as_tensor(v, dtype=torch.float32) for k, v in scales.items()})
        sched = DDIMScheduler.from_config(S.SD15_SCHEDULER_CONFIG)
        sched.set_timesteps(STEPS)
        lat = torch.from_numpy(env["noise"].transpose(0, 3, 1, 2).copy()) * sched.init_noise_sigma
        for t in sched.timesteps:
            e = [unet(lat, t, c, cross_attention_kwargs={"controls": k}).sample
                 for c, k in ((empty, c0), (ctx, c1), (ctx, c2))]
            eps = e[0] + g_id * (e[1] - e[0]) + g_ctl * (e[2] - e[1])
            lat = sched.step(eps, t, lat).prev_sample
    return lat.numpy().transpose(0, 2, 3, 1)


def test_chain_with_controls_matches_pytorch(env):
    lmk, emo = env["lmk"], env["emo"]
    scales = {"landmark": np.array([1.0, 0.6], np.float32), "emotion": np.array([1.3, 0.8], np.float32)}
    ours = run(env, landmarks=lmk, emotion=emo, guidance_id=3.0, guidance_control=1.7,
               landmark_scale=scales["landmark"], emotion_scale=scales["emotion"])
    assert len(env["pipe"]._setup(env["arc"], lmk, emo, 3.0, 1.7, 1.0, 1.0, "null_tokens")[4]) == 3  # the branches run
    ref = torch_chain(env, 3.0, 1.7, landmarks=lmk, emotion=emo, scales=scales)
    err = rel_err(ours, ref)
    print(f"chain with controls vs PyTorch: rel err {err:.2e} (max |latent| {np.abs(ref).max():.1f})")
    assert err <= LATENT_REL_TOL
    assert np.abs(ref - run(env)).max() > 1e-2  # the controls change the result

    # default g_ctl = g_id: two branches (e0 + g (e2 - e0)), landmark only, same numbers as the chain
    ours2 = run(env, landmarks=lmk, guidance_id=2.5)
    assert len(env["pipe"]._setup(env["arc"], lmk, None, 2.5, None, 1.0, 1.0, "null_tokens")[4]) == 2
    ref2 = torch_chain(env, 2.5, 2.5, landmarks=lmk)
    print(f"two-branch chain (g_ctl = g_id) vs PyTorch: rel err {rel_err(ours2, ref2):.2e}")
    assert rel_err(ours2, ref2) <= LATENT_REL_TOL


def test_changing_controls_changes_output_without_recompiling(env):
    lmk, emo = env["lmk"], env["emo"]
    base = run(env, landmarks=lmk, emotion=emo, guidance_control=1.7)
    n = len(env["pipe"].compile_log)
    moved = lmk.copy()
    moved[..., 0] = 1.0 - moved[..., 0]  # mirrored face
    other_lmk = run(env, landmarks=moved, emotion=emo, guidance_control=1.7)
    other_emo = run(env, landmarks=lmk, emotion=emo[::-1].copy(), guidance_control=1.7)
    other_scale = run(env, landmarks=lmk, emotion=emo, guidance_control=1.7, landmark_scale=0.3)
    other_g = run(env, landmarks=lmk, emotion=emo, guidance_control=1.2)
    for other in (other_lmk, other_emo, other_scale, other_g):
        assert np.abs(other - base).max() > 1e-3
    # the emotion swap swaps which sample gets which emotion: per-sample conditions are independent
    assert np.abs(other_emo - base).min() < np.abs(other_emo - base).max()
    assert len(env["pipe"].compile_log) == n  # inputs, scales and guidance are traced arguments
    # a shared [478, 3] / [10] target is broadcast to the batch
    shared = run(env, landmarks=lmk[0], emotion=emo[0], guidance_control=1.7)
    both = run(env, landmarks=np.stack([lmk[0], lmk[0]]), emotion=np.stack([emo[0], emo[0]]), guidance_control=1.7)
    np.testing.assert_array_equal(shared, both)


# ------------------------------------------------------------------------------------------------
# Helpers and errors
# ------------------------------------------------------------------------------------------------
def test_guidance_branches_closed_form():
    rng = np.random.default_rng(1)
    e = rng.standard_normal((3, 5))
    for g1, g2, has in [(3.0, 1.7, True), (3.0, 0.0, True), (1.0, 2.0, True), (2.5, 2.5, True), (1.0, 1.0, True),
                        (3.0, 2.0, False), (1.0, 0.0, False), (0.0, 0.0, False), (0.0, 2.0, True)]:
        branches, scales = guidance_branches(g1, g2, has)
        got = e[branches[0]]
        for k, s in zip(branches[1:], scales):
            prev = branches[branches.index(k) - 1]
            got = got + s * (e[k] - e[prev])
        want = e[0] + g1 * (e[1] - e[0]) + (g2 * (e[2] - e[1]) if has else 0.0)
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12, err_msg=str((g1, g2, has)))
    assert guidance_branches(3.0, 1.7, True)[0] == (0, 1, 2)
    assert guidance_branches(3.0, 3.0, True)[0] == (0, 2)
    assert guidance_branches(1.0, 1.0, True)[0] == (2,)
    assert guidance_branches(3.0, 5.0, False)[0] == (0, 1)


def test_emotion_vector_table():
    from facecrafter_jax.face.vocabulary import EMOTION_CLASSES, VALENCE_AROUSAL
    from facecrafter_jax.toy.world import emotion_vectors

    table = emotion_table()
    assert tuple(table) == tuple(EMOTION_CLASSES)
    for i, name in enumerate(EMOTION_CLASSES):
        vec, desc = emotion_vector(name)
        assert vec.shape == (10,) and vec[:8].sum() == 1.0 and vec[i] == 1.0
        np.testing.assert_array_equal(vec[8:], VALENCE_AROUSAL[i])
        # the toy world's full-intensity record has the same valence / arousal
        np.testing.assert_allclose(vec[8:], emotion_vectors([i], [1.0])[0, 8:], atol=1e-7)
        assert desc == {"name": name, "index": i, "valence": float(VALENCE_AROUSAL[i, 0]),
                        "arousal": float(VALENCE_AROUSAL[i, 1]), "class_from": "name"}
    vec, desc = emotion_vector("Happy", valence=0.1, arousal=-0.2)
    np.testing.assert_allclose(vec[8:], [0.1, -0.2])
    assert vec[1] == 1.0
    vec, desc = emotion_vector(valence=-0.65, arousal=0.75)  # between fear (-0.6, 0.7) and anger (-0.6, 0.8)
    d = ((VALENCE_AROUSAL - np.array([-0.65, 0.75])) ** 2).sum(1)
    assert desc["index"] == int(np.argmin(d)) and desc["class_from"] == "nearest valence/arousal"
    with pytest.raises(ValueError, match="unknown emotion 'joy'"):
        emotion_vector("joy")
    with pytest.raises(ValueError, match=r"valence 1.5 must be in \[-1, 1\]"):
        emotion_vector("sad", valence=1.5, arousal=0.0)
    with pytest.raises(ValueError, match="go together"):
        emotion_vector("sad", valence=0.5)


def test_pipeline_input_errors(env):
    with pytest.raises(ValueError, match=r"landmarks must be \[478, 3\] or \[2, 478, 3\], got shape \(2, 468, 3\)"):
        run(env, landmarks=np.zeros((2, 468, 3), np.float32))
    with pytest.raises(ValueError, match=r"emotion must be \[10\] or \[2, 10\]"):
        run(env, emotion=np.zeros((3, 10), np.float32))
    with pytest.raises(ValueError, match="emotion contain NaN"):
        run(env, emotion=np.full(10, np.nan, np.float32))
    with pytest.raises(ValueError, match=r"landmark_scale must be a number or \[2\]"):
        run(env, landmarks=env["lmk"], landmark_scale=np.ones(3))
    with pytest.raises(ValueError, match="absent_controls must be one of"):
        run(env, absent_controls="zero")
    only_arc2face = FaceCrafterPipeline(env["arc2face"].unet, env["arc2face"].text_encoder)
    with pytest.raises(ValueError, match="has no landmark module"):
        only_arc2face(env["arc"], landmarks=env["lmk"], output_type="latent")
