"""Sharded training on fake CPU devices (subprocesses): data x fsdp layouts and 2 processes x 4 devices
give the same losses as one device (fp32 tolerance), and big parameters really are split over fsdp."""

import json
import math

import numpy as np
import pytest

from facecrafter_jax.train.checkpoint import load_trained_params
from facecrafter_jax.train.logging import read_metrics
from facecrafter_jax.train.testing import REPO, run_multiprocess, run_train, session_cache_dir

CONFIG = REPO / "configs" / "tiny_cpu.yaml"
STEPS = 3


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    cache = session_cache_dir(tmp_path_factory)
    done = {}

    def get(name, devices, data_axis, fsdp_axis, processes=1):
        if name not in done:
            run_dir = root / name
            common = [f"run_dir={run_dir}", f"steps={STEPS}", f"mesh.data={data_axis}",
                      f"mesh.fsdp={fsdp_axis}", "checkpoint.every=0", "data.synthetic.num_records=32"]
            if processes == 1:
                run_train(CONFIG, common, devices=devices, cache_dir=cache)
            else:
                codes = run_multiprocess(CONFIG, common, num_processes=processes, devices_per_process=devices,
                                         cache_dir=cache, log_dir=root)
                logs = "\n".join((root / f"process_{i}.log").read_text()[-3000:] for i in range(processes))
                assert codes == [0] * processes, logs
            done[name] = run_dir
        return done[name]

    return get


def _assert_same_run(a, b, rtol=2e-5):
    ma, mb = read_metrics(a), read_metrics(b)
    assert sorted(ma) == sorted(mb) == list(range(1, STEPS + 1))
    for s in ma:
        for key in ("loss", "diffusion_loss", "ad_loss", "grad_norm"):
            np.testing.assert_allclose(ma[s][key], mb[s][key], rtol=rtol, atol=1e-7, err_msg=f"step {s} {key}")
    pa, _ = load_trained_params(a, prefer_ema=False)
    pb, _ = load_trained_params(b, prefer_ema=False)
    assert sorted(pa) == sorted(pb)
    worst = max(float(np.max(np.abs(pa[k] - pb[k]))) for k in pa)
    assert worst < 1e-5, worst


@pytest.mark.parametrize("data_axis, fsdp_axis", [(2, 4), (4, 2)])
def test_mesh_layouts_match_one_device(runs, data_axis, fsdp_axis):
    ref = runs("single", 1, 1, 1)
    sharded = runs(f"mesh_{data_axis}x{fsdp_axis}", 8, data_axis, fsdp_axis)
    _assert_same_run(ref, sharded)

    # The one sharding rule: big arrays split over fsdp on their largest divisible dim, moments alike.
    summary = json.loads((sharded / "sharding.json").read_text())
    assert summary["mesh"] == {"data": data_axis, "fsdp": fsdp_axis}
    params, _ = load_trained_params(sharded, prefer_ema=False)
    n_sharded = 0
    for name, value in params.items():
        spec = summary["params"][name]
        big = math.prod(value.shape) >= summary["min_shard_size"] and any(d % fsdp_axis == 0 for d in value.shape)
        assert ("'fsdp'" in spec) == big, (name, value.shape, spec)
        n_sharded += big
        mu = [s for p, s in summary["opt_state"].items() if "mu" in p and f"'{name}'" in p]
        assert mu == [spec], (name, mu, spec)
    assert n_sharded > 10
    assert any("'fsdp'" in s for s in summary["frozen"].values())
    assert not any("'data'" in s for s in summary["params"].values())  # parameters are never split over data


def test_two_processes_match_one_process(runs):
    one = runs("mesh_2x4", 8, 2, 4)
    two = runs("two_processes", 4, 2, 4, processes=2)
    _assert_same_run(one, two)
