"""The train step in-process (one CPU device): only AdapterParam parameters get optimiser state and change,
the first update is AdamW's closed form (sign of a finite-difference gradient included), EMA follows its
formula, the loss does not depend on the order of the batch, bf16 + remat + v-prediction + min-SNR run."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp
from flax import nnx

from facecrafter_jax.models.control import AdapterParam
from facecrafter_jax.train.config import load_config
from facecrafter_jax.train.loop import Trainer
from facecrafter_jax.train.state import dotted
from facecrafter_jax.train.testing import REPO

CONFIG = str(REPO / "configs" / "tiny_cpu.yaml")
LR, WD, EMA = 1e-3, 0.01, 0.9


def _trainer(tmp, *extra):
    cfg = load_config(CONFIG, [f"run_dir={tmp}", f"data.dir={tmp / 'data'}", "data.synthetic.num_records=16",
                               "optim.schedule=constant", "optim.warmup_steps=0", f"optim.lr={LR}",
                               f"optim.weight_decay={WD}", f"optim.ema_decay={EMA}", *extra])
    t = Trainer(cfg)
    t.pipeline = t.make_pipeline()
    t.compile()
    return t


@pytest.fixture(scope="module")
def trainer(tmp_path_factory):
    t = _trainer(tmp_path_factory.mktemp("step"))
    yield t
    t.pipeline.close()


def _host(tree):
    return jax.tree.map(lambda x: np.array(x), tree)


def _copy(tree):
    return jax.tree.map(lambda x: jnp.array(x, copy=True), tree)


def test_only_adapter_params_are_trained(trainer):
    w = trainer.world
    model = w.merge(w.params, w.frozen)
    adapters = {dotted(p) for p, _ in nnx.to_flat_state(nnx.state(model, AdapterParam))}
    base = {dotted(p) for p, _ in nnx.to_flat_state(nnx.state(model, nnx.All(nnx.Param, nnx.Not(AdapterParam))))}
    assert adapters and base and not adapters & base
    assert set(w.params) == adapters and set(w.frozen) == base

    state = trainer.fresh_state()
    # The optimiser state holds adapter entries only (the frozen base never enters optax).
    keys = set()
    for path, _ in jax.tree_util.tree_flatten_with_path(state["opt_state"])[0]:
        keys |= {k.key for k in path if isinstance(k, jax.tree_util.DictKey)}
    assert keys == adapters
    assert set(state["ema"]) == adapters

    p0, f0 = _host(state["params"]), _host(trainer.frozen)
    for _ in range(2):
        state, metrics = trainer.compiled(state, trainer.frozen, trainer.next_batch())
    p2, f2 = _host(state["params"]), _host(trainer.frozen)
    assert all(np.array_equal(f0[k], f2[k]) for k in f0)  # base bit-identical (and not donated away)
    changed = [k for k in p0 if not np.array_equal(p0[k], p2[k])]
    assert len(changed) == len(p0), sorted(set(p0) - set(changed))
    assert all(v.dtype == np.float32 for v in p2.values())


def test_first_update_is_adamw_closed_form(trainer):
    state = trainer.fresh_state()
    batch = trainer.next_batch()
    p0 = _host(state["params"])
    probe = "facecrafter.landmark_encoder.proj_out.bias"
    new, metrics = trainer.compiled(_copy(state), trainer.frozen, batch)
    p1, e1 = _host(new["params"]), _host(new["ema"])
    decay_mask = {k: v.ndim >= 2 for k, v in p0.items()}
    unit = 0
    for k in p0:
        # optax.adamw, step 1: m_hat / (sqrt(v_hat) + eps) = g / (|g| + eps), plus decoupled weight decay.
        r = -(p1[k] - p0[k]) / LR - (WD * p0[k] if decay_mask[k] else 0.0)
        near_unit = np.abs(np.abs(r) - 1.0) < 2e-3
        assert np.all(near_unit | (np.abs(r) < 1e-3) | (np.abs(r) < 1.0)), k
        unit += int(near_unit.sum())
        # EMA with diffusers' warm-up: decay_0 = min(EMA, 1 / 10).
        d = min(EMA, 1.0 / 10.0)
        np.testing.assert_allclose(e1[k], d * p0[k] + (1 - d) * p1[k], rtol=1e-6, atol=1e-7, err_msg=k)
    # most entries move by exactly lr; those whose gradient is within a few Adam eps of 0 move less (here the
    # every-combination draw gives 4 of the 16 samples a real emotion, so the emotion K projections see small
    # gradients: measured 87% unit steps)
    assert unit > 0.8 * sum(v.size for v in p0.values())
    assert float(metrics["lr"]) == pytest.approx(LR)

    # Direction: sign of a central finite difference of the step's own loss at the start parameters.
    base_loss = float(metrics["loss"])
    order = np.argsort(-np.abs(p1[probe] - p0[probe]))[:4]
    checked = 0
    for i in order:
        losses = []
        for sgn in (+1, -1):
            s = _copy(state)
            s["params"][probe] = s["params"][probe].at[i].add(sgn * 0.05)
            losses.append(float(trainer.compiled(s, trainer.frozen, batch)[1]["loss"]))
        fd = (losses[0] - losses[1]) / 0.1
        if abs(fd) > 1e-3:
            assert np.sign(fd) == -np.sign(p1[probe][i] - p0[probe][i]), (i, fd)
            checked += 1
    assert checked >= 2 and np.isfinite(base_loss)


def test_id_only_samples_train_the_null_path(tmp_path):
    """With null-token semantics an ID-only sample runs every control branch on its null tokens, so batches of only
    ID-only samples move the null path: the token encoders' biases and norms and the decoupled K/V projections
    (not the emotion encoder's first kernel: its null features are exactly zero). Two steps: at initialisation the
    emotion null tokens are exactly 0 (zero features through zero biases), so its K/V and LayerNorm scale get their
    first gradient once the biases have moved. With absent controls switched off (the ablation) the same batches
    cannot move any trainable parameter (AdamW without weight decay: a zero gradient is a zero update)."""
    only_id = ("conditioning.id_only=1.0", "optim.weight_decay=0")
    for name, setup in (("null_tokens", only_id), ("switched_off", only_id + ("conditioning.absent=switched_off",))):
        t = _trainer(tmp_path / name, *setup)
        try:
            state = t.fresh_state()
            p0 = _host(state["params"])
            for _ in range(2):
                state, metrics = t.compiled(state, t.frozen, t.next_batch())
            p1 = _host(state["params"])
            changed = {k for k in p0 if not np.array_equal(p0[k], p1[k])}
            assert np.isfinite(float(metrics["loss"]))
            assert float(metrics["landmark_active_frac"]) == 0.0 and float(metrics["ad_loss"]) == 0.0
            if name == "switched_off":
                assert changed == set(), sorted(changed)[:5]
                continue
            for c in ("landmark", "emotion"):
                for part in ("proj_in.bias", "proj_out.bias", "norm.scale", "norm.bias"):
                    assert any(k.endswith(f"{c}_encoder.{part}") for k in changed), (c, part, sorted(changed)[:8])
                assert any(f"to_v_c.{c}" in k for k in changed) and any(f"to_k_c.{c}" in k for k in changed)
            assert not any(k.endswith("emotion_encoder.proj_in.kernel") for k in changed)  # zero features: no gradient
        finally:
            t.pipeline.close()


def test_loss_does_not_depend_on_batch_order(trainer):
    state = trainer.fresh_state()
    batch = trainer.next_batch()
    perm = np.random.default_rng(3).permutation(batch["arcface"].shape[0])
    shuffled = {k: jnp.asarray(np.asarray(v)[perm]) for k, v in batch.items()}
    a, ma = trainer.compiled(_copy(state), trainer.frozen, batch)
    b, mb = trainer.compiled(_copy(state), trainer.frozen, shuffled)
    for k in ("loss", "diffusion_loss", "ad_loss", "grad_norm", "timestep_mean"):
        np.testing.assert_allclose(float(ma[k]), float(mb[k]), rtol=2e-6, err_msg=k)
    pa, pb = _host(a["params"]), _host(b["params"])
    # Adam divides by |g| + eps: elements with tiny gradients amplify float-order noise; bound it by 0.5% of lr.
    assert max(float(np.max(np.abs(pa[k] - pb[k]))) for k in pa) < 5e-3 * LR


def test_bf16_remat_vprediction_min_snr(tmp_path, trainer):
    t = _trainer(tmp_path, "model.dtype=bfloat16", "model.remat=true", "loss.prediction_type=v_prediction",
                 "loss.min_snr_gamma=5", "loss.ad_reading=map_overlap")
    try:
        state = t.fresh_state()
        state, m = t.compiled(state, t.frozen, t.next_batch())
        assert np.isfinite(float(m["loss"])) and np.isfinite(float(m["grad_norm"])) and float(m["ad_loss"]) > 0
        assert all(v.dtype == jnp.float32 for v in state["params"].values())  # fp32 parameters, bf16 compute
        assert t.world.frozen["facecrafter.unet.conv_in.kernel"].dtype == jnp.float32
        assert t.world.graphdef is not None and t.cfg.model.remat is True
    finally:
        t.pipeline.close()


def test_sample_grid_columns_are_the_pipelines_samples(trainer, tmp_path):
    """The grid's ID column is FaceCrafter's ID-only sampling (every control on its null tokens) and its ID+LMK
    column the pipeline's landmark-controlled sampling, with the same settings (one condition builder)."""
    import dataclasses

    from facecrafter_jax.sampling import Arc2FacePipeline, FaceCrafterPipeline
    from facecrafter_jax.train import samples as SMP

    trainer.cfg = dataclasses.replace(trainer.cfg, sample=dataclasses.replace(
        trainer.cfg.sample, num_identities=2, num_steps=2, scheduler="ddim", guidance_scale=3.0, seed=5))
    conds = SMP.fixed_conditions(trainer.data_dir, 2)
    latents, images, labels = SMP.generate(trainer, trainer.world.params, conds)
    assert labels == ["ID", "ID+LMK", "ID+EMO", "ID+LMK+EMO"]
    assert latents.shape == (2, 4, 8, 8, 4) and images.shape == (2, 4, 8, 8, 3)
    assert np.abs(latents[:, 1] - latents[:, 0]).max() > 1e-4  # the landmark column really differs
    model = trainer.world.merge(trainer.world.params, trainer.world.frozen)
    pipe = FaceCrafterPipeline(model.facecrafter, model.text_encoder, scheduler="ddim")
    kw = dict(num_steps=2, guidance_scale=3.0, seed=5, output_type="latent")
    np.testing.assert_allclose(latents[:, 0], pipe(conds["arcface"], **kw).latents, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(latents[:, 1], pipe(conds["arcface"], landmarks=conds["landmarks"], **kw).latents,
                               atol=1e-5, rtol=1e-5)
    base = Arc2FacePipeline(model.facecrafter.unet, model.text_encoder, scheduler="ddim")(conds["arcface"], **kw)
    assert np.abs(latents[:, 0] - base.latents).max() > 1e-4  # the null tokens are not the base model


def test_across_setups_reading_runs_the_pairs_in_one_forward(tmp_path):
    """Reading C stacks each sample with its ID-only pair (2B rows, one compiled step): the own rows give the same
    diffusion loss as the unpaired step, and the AD term is finite and positive."""
    runs = {}
    for reading in ("orthogonality", "across_setups"):
        t = _trainer(tmp_path / reading, f"loss.ad_reading={reading}")
        try:
            state = t.fresh_state()
            _, metrics = t.compiled(state, t.frozen, t.next_batch())
            runs[reading] = {k: float(v) for k, v in metrics.items()}
        finally:
            t.pipeline.close()
    a, c = runs["orthogonality"], runs["across_setups"]
    assert c["diffusion_loss"] == pytest.approx(a["diffusion_loss"], rel=1e-5)
    assert np.isfinite(c["ad_loss"]) and c["ad_loss"] > 0 and np.isfinite(c["grad_norm"])
