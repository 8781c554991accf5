"""The config engine (facecrafter_jax/config.py): safe YAML with one-line errors, typed coercion, unknown keys
named with the valid ones, and every config of the project (train, toy, conditioning, AD loss) on top of it."""

from dataclasses import dataclass, field

import pytest

from facecrafter_jax import config as E
from facecrafter_jax.errors import ConfigError, UserError


@dataclass(frozen=True)
class Inner:
    rate: float = 0.5
    names: tuple[str, ...] = ("a",)


@dataclass(frozen=True)
class Outer:
    steps: int = 3
    flag: bool = False
    maybe: float | None = None
    inner: Inner = field(default_factory=Inner)
    free: dict = field(default_factory=dict)


def test_invalid_yaml_is_one_line_naming_file_line_and_column(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("steps: 3\ninner:\n  rate: [1, 2\n")
    with pytest.raises(ConfigError) as e:
        E.load_yaml(p)
    msg = str(e.value)
    assert "\n" not in msg and str(p) in msg and "invalid YAML" in msg
    assert "line 4" in msg or "line 3" in msg  # the unclosed bracket is reported where the parser gives up
    assert isinstance(e.value, UserError) and isinstance(e.value, ValueError)


def test_python_tags_are_refused_and_never_run(tmp_path):
    marker = tmp_path / "pwned"
    p = tmp_path / "evil.yaml"
    p.write_text(f"steps: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(ConfigError, match=r"refused the YAML tag '!!python/object/apply:os.system'") as e:
        E.load_config(p, cls=Outer)
    assert "\n" not in str(e.value) and "line 1, column 8" in str(e.value)
    assert not marker.exists()
    p.write_text("steps: !custom 3\n")
    with pytest.raises(ConfigError, match="unsupported YAML tag '!custom'"):
        E.load_yaml(p)
    with pytest.raises(ConfigError, match="not found"):
        E.load_yaml(tmp_path / "missing.yaml")


def test_unknown_keys_name_the_key_and_the_valid_ones(tmp_path):
    with pytest.raises(ConfigError) as e:
        E.from_dict(Outer, {"inner": {"rat": 1}})
    assert str(e.value) == "unknown config key 'inner.rat'; valid keys of 'inner': ['rate', 'names']"
    with pytest.raises(ConfigError, match=r"unknown widget config key 'x' \(and 1 more: \['y'\]\); valid keys: "):
        E.from_dict(Outer, {"x": 1, "y": 2}, what="widget")
    with pytest.raises(ConfigError, match=r"unknown config key 'inner.rat' in override 'inner.rat'; valid keys of 'inner'"):
        E.apply_overrides(Outer(), ["inner.rat=1"])


def test_values_take_the_field_type():
    cfg = E.apply_overrides(Outer(), ["steps=1e3", "flag=yes", "maybe=1e-4", "inner.rate=2", "inner.names=b,c",
                                      "free.k=[1, 2]", "free.sub.x=1e-3"])
    assert cfg.steps == 1000 and type(cfg.steps) is int
    assert cfg.flag is True and cfg.maybe == 1e-4 and type(cfg.inner.rate) is float
    assert cfg.inner.names == ("b", "c") and cfg.free["k"] == (1, 2) and cfg.free["sub"]["x"] == "1e-3"
    assert E.apply_overrides(cfg, ["maybe=null"]).maybe is None
    assert E.from_dict(Outer, E.to_dict(cfg)) == cfg
    for bad, key in (("steps=1.5", "'steps'"), ("flag=maybe", "'flag'"), ("inner.rate=fast", "'inner.rate'"),
                     ("steps.x=1", "'steps'"), ("steps", "key=value")):
        with pytest.raises(ConfigError, match=key):
            E.apply_overrides(Outer(), [bad])


def test_every_project_config_uses_the_engine():
    """The four validators (train config, mixed conditioning, AD loss, toy world / analysers / VAE) give the
    engine's message for an unknown key and coerce values to the field type."""
    from facecrafter_jax.conditioning import MixedConditioningConfig
    from facecrafter_jax.losses import ADLossConfig
    from facecrafter_jax.toy.analysers import AnalyserConfig
    from facecrafter_jax.toy.vae_training import VAETrainConfig
    from facecrafter_jax.toy.world import WorldConfig
    from facecrafter_jax.train.config import TrainConfig

    cases = [(lambda d: E.from_dict(TrainConfig, d), "config key 'nme'"),
             (MixedConditioningConfig.from_dict, "mixed-conditioning config key 'nme'"),
             (ADLossConfig.from_dict, "AD loss config key 'nme'"),
             (WorldConfig.from_dict, "toy world config key 'nme'"),
             (AnalyserConfig.from_dict, "analyser config key 'nme'"),
             (VAETrainConfig.from_dict, "VAE training config key 'nme'")]
    for build, needle in cases:
        with pytest.raises(ConfigError, match=f"^unknown {needle}; valid keys"):
            build({"nme": 1})
    # YAML 1.1 reads "1e-2" as a string; the engine gives the field's type
    mc = MixedConditioningConfig.from_dict({"id_only": "0.99", "id_landmark": 0, "id_emotion": 0,
                                            "id_landmark_emotion": 0, "all_null": "1e-2"})
    assert mc.all_null == 0.01 and type(mc.id_landmark) is float
    assert ADLossConfig.from_dict({"layers": [3, "4"]}).layers == (3, 4)
    assert WorldConfig.from_dict({"num_identities": "8", "emotion_weights": [1] * 8}).num_identities == 8
    with pytest.raises(ConfigError, match="sum to 1"):  # the dataclass's own check, as a ConfigError
        MixedConditioningConfig.from_dict({"all_null": 0.5})
