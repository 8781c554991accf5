"""Schedulers against diffusers 0.42.1 (the PyTorch reference): timesteps, sigmas, every intermediate
sample of full sampling chains, the training-side functions, and config validation.

Both sides are driven by the same synthetic "denoiser" ``m = 0.3 * x + 0.7 * (t / 1000) * base``,
computed independently inside each loop from that loop's own sample, so any divergence compounds.
"""

import inspect
import json
import math

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers

from facecrafter_jax import schedulers as S

SD15 = S.SD15_SCHEDULER_CONFIG
SHAPE = (2, 8, 8, 4)
OURS = {
    "ddim": (S.DDIMScheduler, diffusers.DDIMScheduler),
    "dpm": (S.DPMSolverMultistepScheduler, diffusers.DPMSolverMultistepScheduler),
    "euler": (S.EulerDiscreteScheduler, diffusers.EulerDiscreteScheduler),
}


def _base():
    return np.random.default_rng(0).standard_normal(SHAPE).astype(np.float32)


def _x_T():
    return np.random.default_rng(1).standard_normal(SHAPE).astype(np.float32)


def _denoise_torch(base):
    base_t = torch.from_numpy(base)
    return lambda x, t: 0.3 * x + 0.7 * (float(t) / 1000.0) * base_t


def _denoise_jax(base):
    base_j = jnp.asarray(base)
    return lambda x, t: 0.3 * x + 0.7 * (t.astype(jnp.float32) / 1000.0) * base_j


def _torch_chain(sched, num_steps, x_T, base, eta=None, noises=None, begin=0):
    """Standard diffusers denoising loop; returns the sample after every step."""
    sched.set_timesteps(num_steps)
    fn = _denoise_torch(base)
    x = torch.from_numpy(x_T) * sched.init_noise_sigma
    if begin:
        sched.set_begin_index(begin)
    out = []
    for i, t in enumerate(sched.timesteps[begin:], start=begin):
        m = fn(sched.scale_model_input(x, t), t)
        kw = {}
        if eta is not None:
            kw["eta"] = eta
        if noises is not None:
            kw["variance_noise"] = torch.from_numpy(noises[i])
        x = sched.step(m, t, x, **kw).prev_sample
        out.append(x.numpy().copy())
    return np.stack(out)


def _step_noises(key, n):
    """The noise our sample_loop draws at each step (fold_in(key, i)), to hand to diffusers."""
    draw = jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(key, i), SHAPE, jnp.float32))
    return np.asarray(draw(jnp.arange(n)))


def _assert_chain_close(ours, ref, tol=1e-5):
    assert ours.shape == ref.shape
    for i, (a, b) in enumerate(zip(ours, ref)):
        scale = max(1.0, float(np.abs(b).max()))
        err = float(np.abs(a - b).max()) / scale
        assert np.all(np.isfinite(a)), f"step {i}: non-finite"
        assert err < tol, f"step {i}: max error {err:.3g} (relative to {scale:.3g}) exceeds {tol}"


# --------------------------------------------------------------------------------------------- config


@pytest.mark.parametrize("name", ["DDIMScheduler", "DPMSolverMultistepScheduler", "EulerDiscreteScheduler",
                                  "DDPMScheduler"])
def test_class_defaults_match_diffusers(name):
    sig = inspect.signature(getattr(diffusers, name).__init__)
    ref = {k: p.default for k, p in sig.parameters.items() if k != "self"}
    ours = S.CLASS_DEFAULTS[name]
    assert set(ours) == set(ref)
    for k, v in ref.items():
        if isinstance(v, float) and math.isinf(v):
            assert ours[k] == v, k
        else:
            assert ours[k] == v and type(ours[k]) is type(v), (k, ours[k], v)


def test_known_keys_cover_diffusers_family():
    keys = set()
    for name in [e.name for e in KarrasDiffusionSchedulers] + ["DDPMScheduler", "PNDMScheduler"]:
        for k in inspect.signature(getattr(diffusers, name).__init__).parameters:
            if k not in ("self", "args", "kwargs"):
                keys.add(k)
    assert keys == set(S.KNOWN_DIFFUSERS_KEYS)


@pytest.mark.parametrize(
    "cls, bad, key",
    [
        (S.DPMSolverMultistepScheduler, {"beta_strat": 0.001}, "beta_strat"),
        (S.DDIMScheduler, {"timestep_spacing": "uniform"}, "timestep_spacing"),
        (S.DPMSolverMultistepScheduler, {"use_karras_sigmas": True}, "use_karras_sigmas"),
        (S.DPMSolverMultistepScheduler, {"solver_order": 3}, "solver_order"),
        (S.DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver"}, "algorithm_type"),
        (S.EulerDiscreteScheduler, {"interpolation_type": "log_linear"}, "interpolation_type"),
        (S.DDIMScheduler, {"thresholding": True}, "thresholding"),
        (S.DDIMScheduler, {"steps_offset": "1"}, "steps_offset"),
        (S.DDIMScheduler, {"clip_sample": 0}, "clip_sample"),
        (S.DDIMScheduler, {"prediction_type": "flow_prediction"}, "prediction_type"),
        (S.DDIMScheduler, {"trained_betas": [0.1, 0.2]}, "trained_betas"),
        (S.EulerDiscreteScheduler, {"rescale_betas_zero_snr": True}, "rescale_betas_zero_snr"),
    ],
)
def test_bad_config_raises_naming_key(cls, bad, key):
    with pytest.raises(ValueError, match=key):
        cls.from_config({**SD15, **bad})


def test_bad_key_in_noise_schedule_and_file(tmp_path):
    with pytest.raises(ValueError, match="num_train_steps"):
        S.NoiseSchedule.from_config({**SD15, "num_train_steps": 1000})
    (tmp_path / "scheduler_config.json").write_text(json.dumps({**SD15, "stepsoffset": 1}))
    with pytest.raises(ValueError, match="stepsoffset"):
        S.DDIMScheduler.from_config(tmp_path)


def test_foreign_keys_ignored_like_diffusers_and_json_path(tmp_path):
    # set_alpha_to_one / clip_sample / skip_prk_steps are not DPM-Solver keys: accepted, ignored.
    cfg = {**SD15, "_diffusers_version": "0.6.0", "sigma_min": None, "variance_type": None}
    ours = S.DPMSolverMultistepScheduler.from_config(cfg)
    ref = diffusers.DPMSolverMultistepScheduler.from_config(cfg)
    for k, v in ours.config.items():
        assert ref.config[k] == v, k
    (tmp_path / "scheduler_config.json").write_text(json.dumps(SD15))
    for src in (tmp_path, tmp_path / "scheduler_config.json"):
        p = S.DPMSolverMultistepScheduler.from_config(src).set_timesteps(25)
        np.testing.assert_array_equal(np.asarray(p.timesteps), np.asarray(ours.set_timesteps(25).timesteps))


# ------------------------------------------------------------------------------------ timesteps/sigmas


@pytest.mark.parametrize("kind", ["ddim", "dpm", "euler"])
@pytest.mark.parametrize("spacing", ["leading", "linspace", "trailing"])
@pytest.mark.parametrize("n", [10, 25, 50])
def test_timesteps_and_sigmas_match(kind, spacing, n):
    ours_cls, ref_cls = OURS[kind]
    ref = ref_cls.from_config({**SD15, "timestep_spacing": spacing})
    ref.set_timesteps(n)
    plan = ours_cls.from_config({**SD15, "timestep_spacing": spacing}).set_timesteps(n)
    ts = np.asarray(plan.timesteps)
    assert plan.num_steps == len(ref.timesteps)
    np.testing.assert_array_equal(ts, ref.timesteps.numpy().astype(ts.dtype))
    if kind != "ddim":
        # diffusers forms 1 - abar in float32 before the sqrt, which costs it ~1.3e-5 relative at t = 0;
        # hence 3e-5 against diffusers and a tight check against the float64 closed form.
        np.testing.assert_allclose(np.asarray(plan.sigmas), ref.sigmas.numpy(), rtol=3e-5, atol=0)
        ac = np.cumprod(1 - np.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=np.float64) ** 2)
        sig64 = np.interp(ts.astype(np.float64), np.arange(1000), np.sqrt((1 - ac) / ac))
        np.testing.assert_allclose(np.asarray(plan.sigmas)[:-1], sig64, rtol=1e-6)
    np.testing.assert_allclose(plan.init_noise_sigma, float(ref.init_noise_sigma), rtol=1e-6)


def test_default_config_timesteps():
    """Without any key the diffusers class defaults apply (linear betas, per-class spacing)."""
    for kind, (ours_cls, ref_cls) in OURS.items():
        ref = ref_cls()
        ref.set_timesteps(25)
        plan = ours_cls.from_config({}).set_timesteps(25)
        np.testing.assert_array_equal(np.asarray(plan.timesteps), ref.timesteps.numpy().astype(np.asarray(plan.timesteps).dtype))


# ------------------------------------------------------------------------------------- step for step


CHAINS = [
    # (kind, config overrides, steps)
    ("ddim", {}, 25),
    ("ddim", {"prediction_type": "v_prediction"}, 25),
    ("ddim", {"timestep_spacing": "linspace"}, 10),
    ("ddim", {"timestep_spacing": "trailing", "set_alpha_to_one": True}, 50),
    ("ddim", {"prediction_type": "sample", "clip_sample": True, "clip_sample_range": 1.5}, 10),
    ("dpm", {}, 25),
    ("dpm", {"prediction_type": "v_prediction"}, 25),
    ("dpm", {}, 10),
    ("dpm", {"timestep_spacing": "leading"}, 50),
    ("dpm", {"final_sigmas_type": "sigma_min"}, 10),
    ("dpm", {"final_sigmas_type": "sigma_min"}, 20),
    ("dpm", {"solver_type": "heun", "timestep_spacing": "trailing"}, 25),
    ("dpm", {"solver_order": 1}, 25),
    ("dpm", {"euler_at_final": True, "final_sigmas_type": "sigma_min"}, 20),
    ("dpm", {"beta_schedule": "squaredcos_cap_v2", "prediction_type": "sample"}, 25),
    ("euler", {}, 25),
    ("euler", {"prediction_type": "v_prediction"}, 25),
    ("euler", {"timestep_spacing": "leading"}, 25),
    ("euler", {"timestep_spacing": "trailing", "final_sigmas_type": "sigma_min"}, 10),
    ("euler", {"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02}, 50),
]


@pytest.mark.parametrize("kind, overrides, n", CHAINS, ids=[f"{k}-{o}-{n}" for k, o, n in CHAINS])
def test_chain_matches_diffusers(kind, overrides, n):
    ours_cls, ref_cls = OURS[kind]
    cfg = {**SD15, **overrides}
    base, x_T = _base(), _x_T()
    ref = _torch_chain(ref_cls.from_config(cfg), n, x_T, base)
    plan = ours_cls.from_config(cfg).set_timesteps(n)
    _, inter = jax.jit(lambda p, x: S.sample_loop(p, _denoise_jax(base), x, return_intermediates=True))(
        plan, jnp.asarray(x_T)
    )
    _assert_chain_close(np.asarray(inter), ref)


@pytest.mark.parametrize("kind", ["ddim", "dpm", "euler"])
def test_eager_step_loop_matches_diffusers(kind):
    """The plan's step called eagerly with Python ints (no scan, no jit) is the same function."""
    ours_cls, ref_cls = OURS[kind]
    base, x_T = _base(), _x_T()
    ref = _torch_chain(ref_cls.from_config(SD15), 25, x_T, base)
    plan = ours_cls.from_config(SD15).set_timesteps(25)
    fn = _denoise_jax(base)
    x = jnp.asarray(x_T) * plan.init_noise_sigma
    state = plan.init_state(x)
    outs = []
    for i in range(plan.num_steps):
        res = plan.step(state, fn(plan.scale_model_input(x, i), plan.timesteps[i]), i, x)
        x, state = res.prev_sample, res.state
        outs.append(np.asarray(x))
    _assert_chain_close(np.stack(outs), ref)


def test_ddim_eta_with_key_matches_diffusers():
    base, x_T = _base(), _x_T()
    key = jax.random.key(7)
    n, eta = 25, 0.7
    ref = _torch_chain(diffusers.DDIMScheduler.from_config(SD15), n, x_T, base, eta=eta,
                       noises=_step_noises(key, n))
    plan = S.DDIMScheduler.from_config(SD15).set_timesteps(n, eta=eta)
    _, inter = S.sample_loop(plan, _denoise_jax(base), jnp.asarray(x_T), key=key, return_intermediates=True)
    _assert_chain_close(np.asarray(inter), ref)
    with pytest.raises(ValueError, match="key"):
        S.sample_loop(plan, _denoise_jax(base), jnp.asarray(x_T))


def test_sde_dpmsolver_with_key_matches_diffusers():
    base, x_T = _base(), _x_T()
    key = jax.random.key(3)
    cfg = {**SD15, "algorithm_type": "sde-dpmsolver++"}
    ref = _torch_chain(diffusers.DPMSolverMultistepScheduler.from_config(cfg), 25, x_T, base,
                       noises=_step_noises(key, 25))
    plan = S.DPMSolverMultistepScheduler.from_config(cfg).set_timesteps(25)
    _, inter = S.sample_loop(plan, _denoise_jax(base), jnp.asarray(x_T), key=key, return_intermediates=True)
    _assert_chain_close(np.asarray(inter), ref)


def test_dpm_start_midway_is_first_order_like_diffusers():
    """Starting at step 8 with a fresh state (img2img style) takes a first-order step first, as diffusers'
    ``set_begin_index`` does (its lower_order_nums restarts at 0)."""
    base, x_T = _base(), _x_T()
    begin = 8
    ref = _torch_chain(diffusers.DPMSolverMultistepScheduler.from_config(SD15), 25, x_T, base, begin=begin)
    plan = S.DPMSolverMultistepScheduler.from_config(SD15).set_timesteps(25)
    fn = _denoise_jax(base)
    x = jnp.asarray(x_T)
    state = plan.init_state(x)
    step = jax.jit(plan.step)
    outs = []
    for i in range(begin, plan.num_steps):
        res = step(state, fn(x, plan.timesteps[i]), i, x)
        x, state = res.prev_sample, res.state
        outs.append(np.asarray(x))
    _assert_chain_close(np.stack(outs), ref)


def test_sample_loop_from_scheduler_and_bf16_carry():
    base, x_T = _base(), _x_T()
    sched = S.DPMSolverMultistepScheduler.from_config(SD15)
    ref = _torch_chain(diffusers.DPMSolverMultistepScheduler.from_config(SD15), 25, x_T, base)[-1]
    out = S.sample_loop(sched, _denoise_jax(base), jnp.asarray(x_T), 25)
    _assert_chain_close(np.asarray(out)[None], ref[None])
    # a bf16 sample stays bf16 through the scan carry (the update itself is computed in fp32)
    fn = _denoise_jax(base)
    out16 = S.sample_loop(sched, lambda x, t: fn(x, t).astype(jnp.bfloat16), jnp.asarray(x_T, jnp.bfloat16), 25)
    assert out16.dtype == jnp.bfloat16
    err = float(np.abs(np.asarray(out16, np.float32) - ref).max() / np.abs(ref).max())
    assert err < 3e-2, err
    with pytest.raises(ValueError, match="num_steps"):
        S.sample_loop(sched, fn, jnp.asarray(x_T))


# -------------------------------------------------------------------------------------- training side


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_add_noise_velocity_target_snr(prediction_type):
    cfg = {**SD15, "prediction_type": prediction_type}
    ref = diffusers.DDPMScheduler.from_config(cfg)
    sched = S.NoiseSchedule.from_config(cfg)
    rng = np.random.default_rng(5)
    x0 = rng.standard_normal(SHAPE).astype(np.float32)
    noise = rng.standard_normal(SHAPE).astype(np.float32)
    t = np.array([0, 999], dtype=np.int64)
    tx, tn, tt = torch.from_numpy(x0), torch.from_numpy(noise), torch.from_numpy(t)

    noisy = jax.jit(S.add_noise)(sched, jnp.asarray(x0), jnp.asarray(noise), jnp.asarray(t))
    np.testing.assert_allclose(np.asarray(noisy), ref.add_noise(tx, tn, tt).numpy(), rtol=1e-5, atol=1e-5)
    vel = S.get_velocity(sched, jnp.asarray(x0), jnp.asarray(noise), jnp.asarray(t))
    np.testing.assert_allclose(np.asarray(vel), ref.get_velocity(tx, tn, tt).numpy(), rtol=1e-5, atol=1e-5)

    target = S.training_target(sched, jnp.asarray(x0), jnp.asarray(noise), jnp.asarray(t))
    expected = noise if prediction_type == "epsilon" else ref.get_velocity(tx, tn, tt).numpy()
    np.testing.assert_allclose(np.asarray(target), expected, rtol=1e-5, atol=1e-5)

    ts = np.array([0, 1, 250, 500, 998, 999])
    s = np.asarray(S.snr(sched, jnp.asarray(ts)))
    # diffusers computes 1 - abar in float32, which loses ~1e-4 relative at t = 0; float64 closed form
    # is the tight check.
    # (diffusers.training_utils.compute_snr's formula, inlined: importing training_utils pulls in the UNet)
    ac32 = ref.alphas_cumprod[torch.from_numpy(ts)]
    np.testing.assert_allclose(s, ((ac32**0.5) / ((1.0 - ac32) ** 0.5)).numpy() ** 2, rtol=3e-4)
    b = np.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=np.float64) ** 2
    ac = np.cumprod(1 - b)[ts]
    np.testing.assert_allclose(s, ac / (1 - ac), rtol=2e-6)
    w = np.asarray(S.min_snr_weight(sched, jnp.asarray(ts), gamma=5.0))
    snr64 = ac / (1 - ac)
    denom = snr64 if prediction_type == "epsilon" else snr64 + 1
    np.testing.assert_allclose(w, np.minimum(snr64, 5.0) / denom, rtol=2e-6)


def test_add_noise_scalar_t_and_float_t_rejected():
    sched = S.NoiseSchedule.from_config(SD15)
    ref = diffusers.DDPMScheduler.from_config(SD15)
    x0, noise = _base(), _x_T()
    out = S.add_noise(sched, jnp.asarray(x0), jnp.asarray(noise), 500)
    exp = ref.add_noise(torch.from_numpy(x0), torch.from_numpy(noise), torch.tensor([500] * SHAPE[0])).numpy()
    np.testing.assert_allclose(np.asarray(out), exp, rtol=1e-5, atol=1e-5)
    with pytest.raises(TypeError, match="integers"):
        S.add_noise(sched, jnp.asarray(x0), jnp.asarray(noise), jnp.array([1.5, 2.0]))
