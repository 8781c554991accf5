"""End-to-end sampling parity with diffusers' StableDiffusionPipeline (tiny random Arc2Face), seeds, guidance chain.

The diffusers pipeline gets the same PyTorch UNet / CLIP / VAE that ours is converted from, the Arc2Face
identity context (computed by the official procedure in PyTorch: the `id` token embedding replaced by
the normalised, zero-padded ArcFace vector) as ``prompt_embeds``, the empty-prompt encoding as
``negative_prompt_embeds``, and the same starting latents.

Measured on this machine (fp32, tiny models; a random UNet drives the latents to |x| ~ 40-75):
max |ours - diffusers| on the final latents: DPM-Solver++ 25 steps 1.5e-4 (1.9e-6 relative to max
|latent|), DDIM 10 steps 8.9e-5 (2.0e-6), Euler 10 steps 1.8e-4 (2.3e-6); decoded images in [0, 1]:
1.5e-6. Tolerances: latents 1e-5 relative to max |latent| (4x margin), images 1e-4 absolute.
"""

import numpy as np
import pytest
import torch
import jax
import jax.numpy as jnp

from facecrafter_jax import schedulers as S
from facecrafter_jax import tokens
from facecrafter_jax.convert import load_text_encoder, load_unet, load_vae
from facecrafter_jax.sampling import (
    Arc2FacePipeline, combine_guidance, concat_conditions, guided_denoiser, initial_noise, make_plan,
    sample_latents,
)
from facecrafter_jax.testing import arc2face_context_torch as arc2face_context
from tiny_models import save_tiny_arc2face

ID_DIM = 48  # < the tiny CLIP width 64, so the zero padding is exercised (ArcFace: 512 in 768)
BATCH = 2
LATENT_REL_TOL = 1e-5
IMAGE_TOL = 1e-4


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    # One torch thread: with OpenMP's busy-waiting threads on a shared 2-core machine the tiny diffusers
    # run is sometimes 50x slower with 2 threads. Restored at the end of the module.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("tiny_arc2face")
    tm = save_tiny_arc2face(root)
    pipe = Arc2FacePipeline(load_unet(str(root / "unet")), load_text_encoder(str(root / "text_encoder")),
                            load_vae(str(root / "vae")))
    sd = StableDiffusionPipeline(vae=tm["vae"], text_encoder=tm["text_encoder"], tokenizer=None, unet=tm["unet"],
                                 scheduler=DPMSolverMultistepScheduler.from_config(S.SD15_SCHEDULER_CONFIG), safety_checker=None, feature_extractor=None,
                                 requires_safety_checker=False)
    sd.set_progress_bar_config(disable=True)

    rng = np.random.default_rng(0)
    arc = (2.0 * rng.standard_normal((BATCH, ID_DIM))).astype(np.float32)  # un-normalised on purpose
    arc_t = torch.from_numpy(arc)
    prompt_embeds = arc2face_context(tm["text_encoder"], arc_t / arc_t.norm(dim=1, keepdim=True))
    with torch.no_grad():
        empty = tm["text_encoder"](torch.from_numpy(tokens.EMPTY_PROMPT_IDS[None].astype(np.int64))).last_hidden_state
    negative = empty.repeat(BATCH, 1, 1)
    g = torch.Generator().manual_seed(0)
    latents_nchw = torch.randn((BATCH, 4, 16, 16), generator=g)
    yield dict(pipe=pipe, sd=sd, arc=arc, prompt_embeds=prompt_embeds, negative=negative,
               latents_nchw=latents_nchw, latents_nhwc=latents_nchw.numpy().transpose(0, 2, 3, 1).copy())
    torch.set_num_threads(threads)


def diffusers_run(setup, scheduler_cls, steps, output_type):
    sd = setup["sd"]
    sd.scheduler = scheduler_cls.from_config(S.SD15_SCHEDULER_CONFIG)
    with torch.no_grad():
        out = sd(prompt_embeds=setup["prompt_embeds"], negative_prompt_embeds=setup["negative"],
                 latents=setup["latents_nchw"].clone(), num_inference_steps=steps, guidance_scale=3.0,
                 output_type=output_type).images
    return out.numpy().transpose(0, 2, 3, 1) if output_type == "latent" else out


def rel_err(ours, ref):
    return float(np.abs(ours - ref).max() / max(1.0, np.abs(ref).max()))


# ------------------------------------------------------------------------------------------------
# Parity with diffusers
# ------------------------------------------------------------------------------------------------
def test_dpm_solver_25_steps_matches_diffusers_latents_and_images(setup):
    from diffusers import DPMSolverMultistepScheduler

    pipe = setup["pipe"]
    assert pipe.default_size() == (32, 32)  # tiny UNet sample_size 16 x tiny VAE factor 2, like diffusers
    ours = pipe(setup["arc"], latents=setup["latents_nhwc"], num_steps=25, guidance_scale=3.0,
                scheduler="dpm++2m", output_type="float")
    ref_lat = diffusers_run(setup, DPMSolverMultistepScheduler, 25, "latent")
    err = rel_err(ours.latents, ref_lat)
    assert err <= LATENT_REL_TOL, err
    assert np.abs(ref_lat).max() > 1.0  # the chain really moved the latents

    ref_img = diffusers_run(setup, DPMSolverMultistepScheduler, 25, "np")  # [B, H, W, 3] in [0, 1]
    assert ours.images.shape == ref_img.shape == (BATCH, 32, 32, 3)
    img_err = np.abs(ours.images - ref_img).max()
    print(f"dpm++2m: latents max abs err {np.abs(ours.latents - ref_lat).max():.3g} (rel {err:.3g}), images {img_err:.3g}")
    assert img_err <= IMAGE_TOL, img_err
    assert np.mean((ref_img > 0.01) & (ref_img < 0.99)) > 0.5  # not a saturated, trivially equal image
    # uint8 output is diffusers' numpy_to_pil rounding of the same floats
    u8 = pipe(setup["arc"], latents=setup["latents_nhwc"], output_type="uint8").images
    assert u8.dtype == np.uint8
    assert np.abs(u8.astype(int) - (ref_img * 255).round().astype(int)).max() <= 1


@pytest.mark.parametrize("name", ["ddim", "euler"])
def test_ddim_and_euler_match_diffusers(setup, name):
    from diffusers import DDIMScheduler, EulerDiscreteScheduler

    cls = {"ddim": DDIMScheduler, "euler": EulerDiscreteScheduler}[name]
    ours = setup["pipe"](setup["arc"], latents=setup["latents_nhwc"], num_steps=10, scheduler=name,
                         output_type="latent")
    assert ours.images is None
    ref = diffusers_run(setup, cls, 10, "latent")
    err = rel_err(ours.latents, ref)
    print(f"{name}: latents max abs err {np.abs(ours.latents - ref).max():.3g} (rel {err:.3g}), max |ref| {np.abs(ref).max():.3g}")
    assert err <= LATENT_REL_TOL, (name, err)


# ------------------------------------------------------------------------------------------------
# Seeds and compilation
# ------------------------------------------------------------------------------------------------
def test_initial_noise_derivation_is_per_image():
    shape = (4, 6, 4)
    five = np.asarray(initial_noise(123, 5, shape))
    for i in range(5):  # the documented derivation, image by image
        want = jax.random.normal(jax.random.fold_in(jax.random.key(123), i), shape, jnp.float32)
        np.testing.assert_array_equal(five[i], np.asarray(want))
    np.testing.assert_array_equal(np.asarray(initial_noise(123, 2, shape, first_index=3)), five[3:5])
    assert np.abs(np.asarray(initial_noise(124, 5, shape)) - five).mean() > 0.5
    assert abs(five.std() - 1.0) < 0.15


def test_seed_determinism_chunking_and_single_compile(setup):
    pipe = setup["pipe"]
    arc = setup["arc"]
    n_compiled = len(pipe.compile_log)
    a = pipe(arc, seed=7, output_type="float")
    b = pipe(arc, seed=7, output_type="float")
    np.testing.assert_array_equal(a.latents, b.latents)
    np.testing.assert_array_equal(a.images, b.images)
    np.testing.assert_array_equal(a.noise, np.asarray(initial_noise(7, BATCH, (16, 16, 4))))
    c = pipe(arc, seed=8, output_type="float")
    assert np.abs(c.latents - a.latents).max() > 1e-2
    # image 1 of a run equals image 0 of a run starting at index 1 (same identity), so splitting a long
    # run into batches does not change it
    d = pipe(np.stack([arc[1], arc[0]]), seed=7, first_index=1, output_type="float")
    assert rel_err(d.latents[0], a.latents[1]) <= 1e-6
    # a different guidance value is a traced argument: no recompilation
    e = pipe(arc, seed=7, guidance_scale=2.0, output_type="float")
    assert np.abs(e.latents - a.latents).max() > 1e-2
    assert len(pipe.compile_log) == n_compiled  # all of the above reused the DPM program of the first test


def test_weights_are_arguments_not_constants(setup):
    pipe = setup["pipe"]
    out = pipe(setup["arc"], latents=setup["latents_nhwc"], output_type="float")
    program = next(p for k, p in pipe._compiled.items() if k[-1] and k[-2])  # the DPM, guided, decoded program
    st = pipe._states
    plan = make_plan("dpm++2m", 25)
    args = (jnp.asarray(setup["arc"]), jnp.asarray(setup["latents_nhwc"]), plan, jnp.asarray([3.0], jnp.float32))
    same, _ = program(st["unet"], st["text_encoder"], st["vae"], *args)
    np.testing.assert_array_equal(np.asarray(same), out.latents)
    scaled = jax.tree.map(lambda x: x * 0.9, st["unet"])
    other, _ = program(scaled, st["text_encoder"], st["vae"], *args)
    assert np.abs(np.asarray(other) - out.latents).max() > 1e-3


# ------------------------------------------------------------------------------------------------
# Guidance chain
# ------------------------------------------------------------------------------------------------
def test_guidance_chain_closed_form_one_model_call():
    rng = np.random.default_rng(3)
    B, shape = 2, (4, 4, 3)
    x = rng.standard_normal((B,) + shape).astype(np.float32)
    conds = [{"a": rng.standard_normal((B, 1, 1, 3)).astype(np.float32),
              "b": rng.standard_normal((1, 4, 4, 3)).astype(np.float32)} for _ in range(3)]  # "b" broadcasts
    calls = []

    def model_fn(xx, t, cond):
        calls.append(xx.shape[0])
        return cond["a"] * xx + cond["b"] + 0.01 * t

    g1, g2 = 3.0, 1.7
    out = np.asarray(guided_denoiser(model_fn, conds, [g1, g2])(jnp.asarray(x), jnp.float32(5.0)))
    assert calls == [3 * B]  # all three conditions in one call
    e = [c["a"] * x + c["b"] + 0.05 for c in conds]
    want = e[0] + g1 * (e[1] - e[0]) + g2 * (e[2] - e[1])
    np.testing.assert_allclose(out, want, rtol=1e-6, atol=1e-5)
    # c_2 == c_1: the control term vanishes, standard CFG with g1 whatever g2 is
    same = [conds[0], conds[1], conds[1]]
    out2 = np.asarray(guided_denoiser(model_fn, same, [g1, 9.0])(jnp.asarray(x), jnp.float32(5.0)))
    cfg = np.asarray(guided_denoiser(model_fn, conds[:2], [g1])(jnp.asarray(x), jnp.float32(5.0)))
    np.testing.assert_allclose(out2, e[0] + g1 * (e[1] - e[0]), rtol=1e-6, atol=1e-5)
    np.testing.assert_allclose(out2, cfg, rtol=1e-6, atol=1e-5)
    # single condition: unguided
    one = np.asarray(guided_denoiser(model_fn, conds[1:2], [])(jnp.asarray(x), jnp.float32(5.0)))
    np.testing.assert_allclose(one, e[1], rtol=1e-6, atol=1e-6)


def test_guidance_chain_on_the_unet_reduces_to_cfg(setup):
    """conds [empty, id, id] with any g2 == the pipeline's standard CFG run (== diffusers, tested above)."""
    pipe = setup["pipe"]
    te, unet = pipe.text_encoder, pipe.unet
    ctx = te.encode_id(setup["arc"])
    empty = te.encode_ids(tokens.EMPTY_PROMPT_IDS[None])
    plan = make_plan("dpm++2m", 25)
    run = jax.jit(lambda noise, scales: sample_latents(lambda x, t, c: unet(x, t, c), plan, noise,
                                                       [empty, ctx, ctx], scales))
    chain = np.asarray(run(jnp.asarray(setup["latents_nhwc"]), jnp.asarray([3.0, 6.0], jnp.float32)))
    ref = pipe(setup["arc"], latents=setup["latents_nhwc"], output_type="float").latents
    assert rel_err(chain, ref) <= LATENT_REL_TOL  # measured 1.3e-6 (batch 6 vs 4: float reassociation)


def test_combine_and_concat_errors():
    with pytest.raises(ValueError, match="need 1 guidance scales"):
        combine_guidance([jnp.zeros(2), jnp.ones(2)], [])
    with pytest.raises(ValueError, match="tree structure"):
        concat_conditions([{"a": jnp.zeros((2, 3))}, {"b": jnp.zeros((2, 3))}], 2)
    with pytest.raises(ValueError, match=r"\['a'\] has batch 3, expected 2 or 1"):
        concat_conditions([{"a": jnp.zeros((3, 3))}], 2)
    with pytest.raises(ValueError, match="unknown scheduler 'pndm'"):
        make_plan("pndm", 10)


def test_pipeline_input_errors(setup):
    pipe = setup["pipe"]
    with pytest.raises(ValueError, match=r"must be \[batch, dim\]"):
        pipe(np.zeros(ID_DIM, np.float32))
    with pytest.raises(ValueError, match="identity dimension 65 exceeds"):
        pipe(np.ones((1, 65), np.float32))
    with pytest.raises(ValueError, match="NaN or Inf"):
        pipe(np.full((1, ID_DIM), np.nan, np.float32))
    with pytest.raises(ValueError, match="multiples of 4"):
        pipe(setup["arc"], height=30, width=32)
    with pytest.raises(ValueError, match=r"latents must be NHWC \[2, h, w, 4\]"):
        pipe(setup["arc"], latents=setup["latents_nchw"].numpy())
    with pytest.raises(ValueError, match="unknown scheduler"):
        pipe(setup["arc"], scheduler="heun")
    with pytest.raises(ValueError, match="output_type"):
        pipe(setup["arc"], output_type="pil")
