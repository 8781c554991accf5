"""Training config: YAML + dotted overrides, type coercion, unknown keys, round trips."""

import json
import pathlib
import subprocess
import sys

import pytest
import yaml

from facecrafter_jax.train import config as C

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


def test_shipped_configs_load_and_round_trip():
    assert {p.stem for p in CONFIGS} >= {"stage_a_landmark", "stage_b_emotion", "stage_c_joint", "tiny_cpu"}
    for path in CONFIGS:
        cfg = C.load_config(str(path))
        assert C.from_dict(C.TrainConfig, C.to_dict(cfg)) == cfg, path
        assert C.from_dict(C.TrainConfig, json.loads(C.to_json(cfg))) == cfg, path
        assert C.from_dict(C.TrainConfig, yaml.safe_load(C.to_yaml(cfg))) == cfg, path


def test_override_types_follow_the_field():
    cfg = C.load_config(str(REPO / "configs" / "tiny_cpu.yaml"), [
        "optim.lr=1e-4",               # YAML 1.1 reads this as a string; the field is a float
        "mesh.fsdp=4", "steps=7", "optim.ema_decay=null", "checkpoint.async_save=false",
        "loss.ad_layers=3,12", "model.remat=true", "model.controls=[landmark]", "stage=landmark", "name=123",
        "loss.min_snr_gamma=5",
    ])
    assert cfg.optim.lr == 1e-4 and type(cfg.optim.lr) is float
    assert cfg.mesh.fsdp == 4 and type(cfg.mesh.fsdp) is int
    assert cfg.steps == 7
    assert cfg.optim.ema_decay is None
    assert cfg.checkpoint.async_save is False
    assert cfg.loss.ad_layers == (3, 12)
    assert cfg.model.remat is True
    assert cfg.model.controls == ("landmark",)
    assert cfg.name == "123" and type(cfg.name) is str
    assert cfg.loss.min_snr_gamma == 5.0 and type(cfg.loss.min_snr_gamma) is float
    assert C.apply_overrides(cfg, ["loss.ad_layers=all"]).loss.ad_layers == "all"
    assert C.apply_overrides(cfg, ["model.remat=[mid_block, up_blocks.1]"]).model.remat == ("mid_block", "up_blocks.1")


def test_overrides_inside_free_form_sections():
    cfg = C.load_config(str(REPO / "configs" / "tiny_cpu.yaml"), [
        "model.unet.block_out_channels=[16,32]", "model.unet.layers_per_block=2", "model.facecrafter.landmark_tokens=3",
        "data.synthetic.num_records=10"])
    assert cfg.model.unet["block_out_channels"] == (16, 32)
    assert cfg.model.unet["layers_per_block"] == 2 and type(cfg.model.unet["layers_per_block"]) is int
    assert cfg.model.facecrafter["landmark_tokens"] == 3
    assert cfg.data.synthetic.num_records == 10
    with pytest.raises(TypeError):
        cfg.model.unet["x"] = 1  # frozen


@pytest.mark.parametrize("override, needle", [
    ("optim.lrr=1", "'optim.lrr'"),
    ("optimizer.lr=1", "'optimizer'"),
    ("data.synthetic.num_recs=3", "'data.synthetic.num_recs'"),
    ("mesh.fsdp=1.5", "'mesh.fsdp'"),
    ("optim.lr=fast", "'optim.lr'"),
    ("checkpoint.async_save=maybe", "'checkpoint.async_save'"),
    ("steps", "key=value"),
    ("optim.lr.x=1", "'optim.lr'"),
])
def test_bad_overrides_name_the_key(override, needle):
    with pytest.raises(C.ConfigError) as e:
        C.load_config(str(REPO / "configs" / "tiny_cpu.yaml"), [override])
    assert needle in str(e.value)


@pytest.mark.parametrize("overrides, needle", [
    (["optim.schedule=linear"], "'optim.schedule' must be one of ['cosine', 'constant'], got 'linear'"),
    (["model.dtype=float16"], "'model.dtype'"),
    (["loss.prediction_type=sample"], "'loss.prediction_type'"),
    (["optim.ema_decay=1.5"], "'optim.ema_decay'"),
    (["data.global_batch_size=0"], "'data.global_batch_size'"),
    (["stage=landmark"], "does not fit stage 'landmark'"),
    (["model.controls=[landmark, pose]"], "'model.controls'"),
    (["stage=landmark", "model.controls=[landmark]", "model.init_from.emotion=runs/b"], "'model.init_from'"),
])
def test_bad_values_name_the_key(overrides, needle):
    with pytest.raises(C.ConfigError) as e:
        C.load_config(str(REPO / "configs" / "tiny_cpu.yaml"), overrides)
    assert needle in str(e.value)


def test_unknown_yaml_key_is_an_error(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("name: x\noptim:\n  lr: 1.0e-4\n  warmup: 3\n")
    with pytest.raises(C.ConfigError, match=r"'optim\.warmup'"):
        C.load_config(str(p))
    p.write_text("- a\n- b\n")
    with pytest.raises(C.ConfigError, match="mapping"):
        C.load_config(str(p))


def test_train_py_usage_and_errors(tmp_path):
    r = subprocess.run([sys.executable, str(REPO / "train.py"), "--help"], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0 and "--config CONFIG.yaml" in r.stdout and "toy pipeline" in r.stdout
    # without --config, arguments go to the toy pipeline: its unknown keys are errors too
    r = subprocess.run([sys.executable, str(REPO / "train.py"), "stages.base.stepz=3"], capture_output=True, text=True,
                       cwd=REPO)
    assert r.returncode == 2 and "'stages.base.stepz'" in r.stderr
    r = subprocess.run([sys.executable, str(REPO / "train.py"), "--config", "configs/tiny_cpu.yaml", "optim.lrr=1"],
                       capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 2 and "'optim.lrr'" in r.stderr
    r = subprocess.run([sys.executable, str(REPO / "train.py"), "--config", "configs/tiny_cpu.yaml", "--print-config",
                        "optim.lr=3e-4", "--num-processes", "2"], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stderr
    printed = yaml.safe_load(r.stdout)
    assert printed["optim"]["lr"] == 3e-4 and printed["distributed"]["num_processes"] == 2
