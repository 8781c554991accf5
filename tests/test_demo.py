"""The backbone demo (`python -m facecrafter_jax.demo`) runs end to end and agrees with diffusers."""

import json

from facecrafter_jax.demo import main


def test_demo_runs_and_matches_diffusers(tmp_path):
    rc = main(["--out", str(tmp_path), "--steps", "3", "--num-images", "2", "--seed", "1"])
    summary = json.loads((tmp_path / "demo.json").read_text())
    assert rc == 0
    assert summary["max_abs_latent_diff_vs_diffusers"] < 1e-3
    assert (tmp_path / "grid.png").stat().st_size > 0
    assert (tmp_path / "flax" / "facecrafter.json").exists()
