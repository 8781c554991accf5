"""The ``base`` stage (training Arc2Face itself) and ``export_run`` (training run -> converted folder).

* base: every UNet and text-encoder parameter is trainable except the token-embedding table (frozen, with
  no optimiser state, bit-identical after steps); identity dropout: with ``conditioning.all_null`` ~ 1 the
  loss does not depend on the ArcFace input, with 0 it does;
* export: the folder written from a run reproduces the run's own model (EMA weights) exactly, for the base
  stage (Arc2FacePipeline) and for a control stage (FaceCrafter with adapters); bad inputs name the problem.
"""

import logging

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from facecrafter_jax.train.config import ConfigError, load_config
from facecrafter_jax.train.loop import Trainer
from facecrafter_jax.train.testing import REPO

CONFIG = str(REPO / "configs" / "tiny_cpu.yaml")
BASE = ["stage=base", "model.controls=[]", "loss.ad_weight=0", "data.synthetic.num_records=16",
        "optim.warmup_steps=0", "optim.ema_decay=0.9"]


def _cfg(tmp, *extra):
    return load_config(CONFIG, [f"run_dir={tmp}", f"data.dir={tmp / 'data'}", *BASE, *extra])


def _trainer(tmp, *extra):
    t = Trainer(_cfg(tmp, *extra))
    t.pipeline = t.make_pipeline()
    t.compile()
    return t


@pytest.fixture(scope="module")
def trainer(tmp_path_factory):
    t = _trainer(tmp_path_factory.mktemp("base"), "conditioning.all_null=0.0")
    yield t
    t.pipeline.close()


def _host(tree):
    return jax.tree.map(lambda x: np.array(x), tree)


def test_base_trains_unet_and_text_encoder_but_not_token_table(trainer):
    w = trainer.world
    assert w.controls == () and w.facecrafter_config is None
    assert set(w.frozen) == {"text_encoder.embeddings.token_embedding.embedding"}
    assert any(k.startswith("unet.") for k in w.params) and any(k.startswith("text_encoder.") for k in w.params)
    state = trainer.fresh_state()
    keys = set()
    for path, _ in jax.tree_util.tree_flatten_with_path(state["opt_state"])[0]:
        keys |= {k.key for k in path if isinstance(k, jax.tree_util.DictKey)}
    assert keys == set(w.params)
    p0, f0 = _host(state["params"]), _host(trainer.frozen)
    for _ in range(2):
        state, metrics = trainer.compiled(state, trainer.frozen, trainer.next_batch())
    p2, f2 = _host(state["params"]), _host(trainer.frozen)
    assert all(np.array_equal(f0[k], f2[k]) for k in f0)
    unchanged = [k for k in p0 if np.array_equal(p0[k], p2[k])]
    assert not unchanged, unchanged[:5]
    assert float(metrics["id_null_frac"]) == 0.0 and np.isfinite(float(metrics["loss"]))


def _loss_with_arcface(t, batch, arcface):
    b = dict(batch)
    b["arcface"] = jax.device_put(arcface, batch["arcface"].sharding)
    state = t.fresh_state()
    return float(t.compiled(state, t.frozen, b)[1]["diffusion_loss"])


def test_identity_dropout_removes_the_identity(trainer, tmp_path):
    batch = trainer.next_batch()
    a = np.asarray(batch["arcface"])
    other = np.roll(a, 1, axis=0) * -1.0
    # all_null = 0: the identity context is used, a different ArcFace input changes the loss
    assert _loss_with_arcface(trainer, batch, a) != _loss_with_arcface(trainer, batch, other)
    # all_null ~ 1: every sample gets the empty prompt, the ArcFace input cannot matter
    t = _trainer(tmp_path, "conditioning.all_null=0.999999")
    try:
        batch = t.next_batch()
        a = np.asarray(batch["arcface"])
        assert _loss_with_arcface(t, batch, a) == _loss_with_arcface(t, batch, np.roll(a, 1, axis=0) * -1.0)
    finally:
        t.pipeline.close()


def test_base_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="model.controls"):
        _cfg(tmp_path, "model.controls=[landmark]")
    with pytest.raises(ValueError, match="all_null"):
        Trainer(_cfg(tmp_path, "conditioning.id_only=0.5"))
    with pytest.raises(ValueError, match="ad_weight"):
        Trainer(_cfg(tmp_path, "loss.ad_weight=0.1"))


def test_export_base_run_reproduces_the_trained_model(tmp_path, caplog):
    from facecrafter_jax.pretrained import load_pretrained
    from facecrafter_jax.sampling import Arc2FacePipeline
    from facecrafter_jax.train.checkpoint import load_trained_params
    from facecrafter_jax.train.export import export_run

    cfg = _cfg(tmp_path / "run", "steps=3", "checkpoint.async_save=false")
    Trainer(cfg).run()
    caplog.clear()
    info = export_run(tmp_path / "run", tmp_path / "out")
    assert info["stage"] == "base" and info["components"] == ["text_encoder", "unet"]
    # reading the checkpoint's items logs nothing (orbax's "Metadata file does not exist" for the item folder
    # is dropped: the metadata sits in the step folder), so the toy pipeline's output stays one line per stage
    assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
    pre = load_pretrained(str(tmp_path / "out"), components=("unet", "text_encoder"))
    ema, _ = load_trained_params(tmp_path / "run")
    t = Trainer(cfg)
    model = t.world.merge({k: jnp.asarray(v) for k, v in ema.items()}, t.world.frozen)
    arc = np.random.default_rng(0).standard_normal((2, 512)).astype(np.float32)
    kw = dict(num_steps=3, guidance_scale=2.0, scheduler="ddim", seed=1, output_type="latent", height=64, width=64)
    ours = Arc2FacePipeline(pre.unet, pre.text_encoder, None)(arc, **kw).latents
    ref = Arc2FacePipeline(model.unet, model.text_encoder, None)(arc, **kw).latents
    np.testing.assert_array_equal(ours, ref)
    # the exported base differs from the random initial model (the EMA weights were written)
    init = Arc2FacePipeline(t.world.merge(t.world.params, t.world.frozen).unet, model.text_encoder, None)(arc, **kw)
    assert not np.array_equal(init.latents, ours)


def test_export_control_run_and_errors(tmp_path, monkeypatch):
    from facecrafter_jax.convert.cli import main as convert_main
    from facecrafter_jax.pretrained import load_pretrained
    from facecrafter_jax.train.checkpoint import load_trained_params
    from facecrafter_jax.train.export import export_run

    cfg = load_config(CONFIG, [f"run_dir={tmp_path / 'run'}", "steps=2",
                               "data.synthetic.num_records=16", "checkpoint.async_save=false"])
    Trainer(cfg).run()
    monkeypatch.chdir(tmp_path)  # relative paths, as the toy pipeline's default runs/toy uses
    assert convert_main(["from-run", "run", "out"]) == 0
    pre = load_pretrained(str(tmp_path / "out"), components=("unet", "text_encoder", "adapters"))
    ema, _ = load_trained_params(tmp_path / "run")
    t = Trainer(cfg)
    model = t.world.merge({k: jnp.asarray(v) for k, v in ema.items()}, t.world.frozen)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 8, 8, 4)), jnp.float32)
    ctx = jnp.asarray(rng.standard_normal((2, 77, 512)), jnp.float32)
    lmk = jnp.asarray(rng.random((2, 478, 3)), jnp.float32)
    emo = jnp.asarray(rng.random((2, 10)), jnp.float32)
    a = pre.adapters(x, jnp.array([10, 500]), ctx, landmarks=lmk, emotion=emo)
    b = model.facecrafter(x, jnp.array([10, 500]), ctx, landmarks=lmk, emotion=emo)
    # the run reads its AD-loss layers with explicit attention, the loaded model uses the fused path
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)
    init = t.world.merge(t.world.params, t.world.frozen).facecrafter(x, jnp.array([10, 500]), ctx, landmarks=lmk,
                                                                    emotion=emo)
    assert np.abs(np.asarray(init) - np.asarray(b)).max() > 100 * np.abs(np.asarray(a) - np.asarray(b)).max()
    # errors: not a run; a VAE whose config differs from the run's
    assert convert_main(["from-run", str(tmp_path / "nothing"), str(tmp_path / "o2")]) == 2
    with pytest.raises(FileNotFoundError, match="no training checkpoint"):
        export_run(tmp_path / "data", tmp_path / "o3")
