"""Preemption and resume (subprocesses): SIGKILL at a random step then resume repeats an uninterrupted run
bit for bit (data order included); SIGTERM saves and exits cleanly; mismatched checkpoints are refused;
stage c starts from the adapters trained in stages a and b."""

import random
import signal

import numpy as np
import pytest

from facecrafter_jax.train.checkpoint import find_step_dir, load_trained_params
from facecrafter_jax.train.logging import read_metrics
from facecrafter_jax.train.testing import REPO, run_train, session_cache_dir, start_train, wait_for_step

CONFIG = REPO / "configs" / "tiny_cpu.yaml"
STEPS = 8
KEYS = ("loss", "diffusion_loss", "ad_loss", "grad_norm", "lr", "timestep_mean", "id_null_frac")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    return {"root": root, "cache": session_cache_dir(tmp_path_factory)}


def _overrides(env, run_dir, *extra):
    return [f"run_dir={run_dir}", f"steps={STEPS}", "checkpoint.every=2",
            "checkpoint.keep_last=2", "data.synthetic.num_records=20", *extra]


@pytest.fixture(scope="module")
def reference(env):
    run_dir = env["root"] / "uninterrupted"
    run_train(CONFIG, _overrides(env, run_dir), cache_dir=env["cache"])
    return run_dir


def _assert_identical(a, b):
    ma, mb = read_metrics(a), read_metrics(b)
    assert sorted(ma) == sorted(mb) == list(range(1, STEPS + 1))
    for s in ma:
        for k in KEYS:
            assert ma[s][k] == mb[s][k], (s, k, ma[s][k], mb[s][k])  # bit-identical (JSON keeps every float bit)
    for prefer_ema in (False, True):
        pa, _ = load_trained_params(a, prefer_ema=prefer_ema)
        pb, _ = load_trained_params(b, prefer_ema=prefer_ema)
        for k in pa:
            assert np.array_equal(pa[k], pb[k]), k


def test_sigkill_then_resume_is_bit_identical(env, reference):
    kill_at = random.Random(20251126).randint(3, STEPS - 1)
    run_dir = env["root"] / "killed"
    proc = start_train(CONFIG, _overrides(env, run_dir), cache_dir=env["cache"], log_path=env["root"] / "killed.log")
    wait_for_step(proc, run_dir, kill_at)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    lines_before = len((run_dir / "metrics.jsonl").read_text().splitlines())
    r = run_train(CONFIG, _overrides(env, run_dir), cache_dir=env["cache"])
    resumed = "resumed at step" in r.stdout
    lines_after = len((run_dir / "metrics.jsonl").read_text().splitlines())
    # Resumed from the last committed checkpoint (<= kill step), so some steps were run twice, or (if the
    # kill came before the first commit) from scratch: both must reproduce the uninterrupted run.
    assert lines_after > STEPS if resumed else lines_after == lines_before + STEPS
    _assert_identical(reference, run_dir)


def test_sigterm_saves_and_exits_cleanly(env, reference):
    run_dir = env["root"] / "terminated"
    proc = start_train(CONFIG, _overrides(env, run_dir, "checkpoint.every=100"), cache_dir=env["cache"],
                       log_path=env["root"] / "terminated.log")
    wait_for_step(proc, run_dir, 3)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=300) == 0, (env["root"] / "terminated.log").read_text()[-3000:]
    stopped = max(read_metrics(run_dir))
    assert 3 <= stopped < STEPS
    assert find_step_dir(run_dir).name == str(stopped)  # saved exactly where it stopped
    r = run_train(CONFIG, _overrides(env, run_dir, "checkpoint.every=100"), cache_dir=env["cache"])
    assert f"resumed at step {stopped}" in r.stdout
    _assert_identical(reference, run_dir)


@pytest.mark.parametrize("override, needle", [
    ("optim.lr=0.5", "optim.lr: checkpoint 0.001, now 0.5"),
    ("model.facecrafter.landmark_tokens=3", "landmark_encoder.proj_out.kernel: checkpoint shape"),
    ("data.seed=7", "data.seed"),
])
def test_mismatched_checkpoint_is_refused(env, reference, override, needle):
    r = run_train(CONFIG, _overrides(env, reference, override), cache_dir=env["cache"], check=False)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "does not match this run" in errors[0] and needle in errors[0], r.stderr[-3000:]


def test_stage_c_starts_from_stages_a_and_b(env):
    from facecrafter_jax.train.config import load_config
    from facecrafter_jax.train.state import build_world, load_init_params

    runs = {}
    for control in ("landmark", "emotion"):
        runs[control] = env["root"] / f"stage_{control}"
        run_train(CONFIG, [f"run_dir={runs[control]}", "steps=2", "checkpoint.every=0",
                           f"model.controls=[{control}]", "loss.ad_weight=0", f"stage={control}",
                           "data.synthetic.num_records=20"], cache_dir=env["cache"])
    cfg = load_config(str(CONFIG), [f"run_dir={env['root'] / 'stage_c'}",
                                    f"model.init_from.landmark={runs['landmark']}",
                                    f"model.init_from.emotion={runs['emotion']}"])
    world = build_world(cfg)
    loaded = load_init_params(cfg.model.init_from, world.params)
    assert sorted(loaded) == sorted(world.params)  # a and b together cover every stage-c adapter
    for control, run_dir in runs.items():
        trained, _ = load_trained_params(run_dir)  # EMA copy (the tiny config keeps one)
        assert trained and all(np.array_equal(loaded[k], v) for k, v in trained.items())
        assert all(f".to_k_c.{control}." in k or k.startswith(f"facecrafter.{control}_encoder.")
                   for k in trained if ".to_k_c." in k or "_encoder." in k)
    bad = dict(cfg.model.init_from)
    bad["landmark"] = str(runs["emotion"])
    with pytest.raises(ValueError, match=r"trained controls \['emotion'\], expected \['landmark'\]"):
        load_init_params(bad, world.params)
