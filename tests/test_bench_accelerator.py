"""bench/accelerator.py --smoke end to end on CPU, so the GPU / TPU benchmark cannot rot.

One remat setting (off: the smaller program), one timed step, a 2-step sampler and the fast-compile XLA
flags of the train tests keep it to ~25 s of CPU time (two cases in subprocesses); the sampling part compares
our pipeline with diffusers' StableDiffusionPipeline on the same tiny weights (fp32: they must agree).
"""

import json
import math
import os
import subprocess
import sys

from conftest import REPO

from facecrafter_jax.train.testing import FAST_COMPILE_FLAGS


def test_accelerator_smoke(tmp_path):
    out = tmp_path / "acc.json"
    env = {**os.environ, "PYTHONPATH": str(REPO), "FACECRAFTER_COMPILATION_CACHE": "off",
           "XLA_FLAGS": FAST_COMPILE_FLAGS}  # halves XLA:CPU compile time of the tiny programs
    cmd = [sys.executable, str(REPO / "bench" / "accelerator.py"), "--smoke", "--remat", "off", "--max-batch", "1",
           "--steps", "1", "--sample-steps", "2", "--peak-tflops", "0.5", "--json", str(out)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "| remat |" in r.stdout and "| who |" in r.stdout and "peak used for MFU: 0.5 TFLOP/s" in r.stdout
    res = json.loads(out.read_text())
    assert res["device"]["platform"] == "cpu" and res["device"]["peak_tflops"] == 0.5
    (train,) = [row for row in res["rows"] if row["part"] == "train"]
    assert train["remat"] == "off" and train["batch"] == 1 and train["batch_search"].startswith("plan at 1")
    assert train["plan_per_sample_gb"] > 0 and train["plan_gb"] > 0 and train["peak_memory_gb"] > 0
    assert math.isfinite(train["loss"]) and train["trainable"] > 0 and train["frozen"] > train["trainable"]
    assert train["xla_tflop_per_step"] > 0 and train["step_s"] > 0
    assert math.isclose(train["images_per_s"], 1 / train["step_s"], rel_tol=1e-6)
    assert math.isclose(train["tflops_per_s"], train["xla_tflop_per_step"] / train["step_s"], rel_tol=1e-6)
    assert math.isclose(train["mfu"], train["tflops_per_s"] / 0.5, rel_tol=1e-6)
    ours, theirs = [row for row in res["rows"] if row["part"] == "sample"]
    assert ours["who"].startswith("ours") and theirs["who"].startswith("diffusers")
    assert ours["batch"] == theirs["batch"] == 2 and ours["steps"] == 2 and ours["images_per_s"] > 0
    assert ours["final_latent_rel_err"] < 1e-4  # same weights, noise and scheduler as diffusers
    assert math.isclose(ours["ours_over_diffusers"], ours["s_per_call"] / theirs["s_per_call"], rel_tol=1e-6)
