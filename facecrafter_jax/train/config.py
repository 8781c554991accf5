"""Training configuration: nested frozen dataclasses loaded from YAML plus dotted ``key=value`` overrides.

::

    cfg = load_config("configs/stage_a_landmark.yaml", ["optim.lr=1e-4", "mesh.fsdp=4"])
    cfg.optim.lr                      # 0.0001 (float: the type of the field, not of the YAML literal)
    to_dict(cfg) / to_yaml(cfg)       # round-trip: from_dict(TrainConfig, to_dict(cfg)) == cfg

Rules:

* Files are read with ``yaml.safe_load``. Every key must be a field of the dataclass it lands in;
  an unknown key is a :class:`ConfigError` naming its full dotted path (and the valid keys).
* Values are coerced to the field's annotated type: ``"1e-4"`` becomes a float for a float field
  (YAML 1.1 reads ``1e-4`` as a string), ``"8"`` an int, ``"true"``/``"false"`` a bool, ``"null"``
  None for optional fields, ``"a,b"`` or ``"[a, b]"`` a tuple. A value that cannot be coerced is an
  error naming the key and the expected type.
* Fields typed ``dict`` hold free-form sub-configs (an inline diffusers UNet config, say); an override
  ``model.unet.block_out_channels=[32,64]`` sets one key inside them (the value is parsed as YAML and
  takes the type of the existing value when there is one). Their content is checked by the consumer.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence, Union

import yaml

__all__ = [
    "ConfigError", "STAGES", "ModelConfig", "DataConfig", "SyntheticDataConfig", "LossConfig", "OptimConfig", "MeshConfig",
    "CheckpointConfig", "LoggingConfig", "SampleConfig", "DistributedConfig", "TrainConfig",
    "from_dict", "to_dict", "to_yaml", "to_json", "load_config", "apply_overrides", "parse_overrides",
]


class ConfigError(ValueError):
    """A configuration problem; the message names the dotted key."""


# ------------------------------------------------------------------------------------------- the schema
STAGES = ("base", "landmark", "emotion", "joint")


def _choice(key: str, value, allowed) -> None:
    if value not in allowed:
        raise ConfigError(f"config key '{key}' must be one of {list(allowed)}, got {value!r}")


def _positive(key: str, value) -> None:
    if not value > 0:
        raise ConfigError(f"config key '{key}' must be positive, got {value!r}")


@dataclass(frozen=True)
class ModelConfig:
    """What is trained and on which frozen base.

    Attributes:
      pretrained: our converted Arc2Face folder (``facecrafter-convert from-diffusers``); None: random
        initialisation from the inline ``unet`` / ``text_encoder`` / ``vae`` configs (tests, toy runs).
      unet, text_encoder, vae: inline architecture configs (diffusers / transformers key names) used when
        ``pretrained`` is None; ``vae`` is optional (only needed to decode sample grids).
      controls: the control modules of the FaceCrafter model (``landmark``, ``emotion``); empty for the
        ``base`` stage, which trains the Arc2Face base itself (UNet + identity encoder, see docs/training.md).
      facecrafter: extra FaceCrafter options (token counts, encoder widths; see docs/method.md).
      init_from: ``{control: run directory or checkpoint step folder}`` whose trained adapter parameters
        initialise this model's (stage c from stages a and b).
      dtype: compute dtype, ``float32`` or ``bfloat16`` (parameters stay float32).
      remat: UNet gradient checkpointing: ``true`` (every block), ``false``, or block names.
      attention_implementation: fused attention path of the layers not read by the AD loss.
    """

    pretrained: str | None = None
    unet: dict | None = None
    text_encoder: dict | None = None
    vae: dict | None = None
    controls: tuple[str, ...] = ("landmark", "emotion")
    facecrafter: dict = field(default_factory=dict)
    init_from: dict = field(default_factory=dict)
    dtype: str = "float32"
    remat: bool | tuple[str, ...] = False
    attention_implementation: str = "xla"
    init_seed: int = 0

    def __post_init__(self):
        _choice("model.dtype", self.dtype, ("float32", "bfloat16"))
        _choice("model.attention_implementation", self.attention_implementation, ("xla", "cudnn", "auto"))
        if any(c not in ("landmark", "emotion") for c in self.controls) or len(set(self.controls)) != len(self.controls):
            raise ConfigError(f"config key 'model.controls' must be a subset of [landmark, emotion] (empty only "
                              f"for stage 'base'), got {list(self.controls)}")


@dataclass(frozen=True)
class SyntheticDataConfig:
    """A random dataset (``synthetic_record``) written to ``data.dir`` when that folder has no dataset."""

    num_records: int = 64
    resolution: int = 64
    seed: int = 0
    latent_dtype: str = "float32"
    shard_size: int = 32

    def __post_init__(self):
        _positive("data.synthetic.num_records", self.num_records)
        _positive("data.synthetic.shard_size", self.shard_size)
        _choice("data.synthetic.latent_dtype", self.latent_dtype, ("float16", "float32"))


@dataclass(frozen=True)
class DataConfig:
    """Record shards and the input pipeline (see docs/data.md)."""

    dir: str = "data/ffhq512"
    synthetic: SyntheticDataConfig | None = None
    global_batch_size: int = 8
    seed: int = 0
    worker_count: int = 0
    read_threads: int = 4
    read_buffer_size: int = 4
    device_prefetch: int = 2
    other_photo_identity: float = 0.0

    def __post_init__(self):
        _positive("data.global_batch_size", self.global_batch_size)
        _positive("data.device_prefetch", self.device_prefetch)
        if self.worker_count < 0:
            raise ConfigError(f"config key 'data.worker_count' must be >= 0, got {self.worker_count}")
        if not 0.0 <= self.other_photo_identity <= 1.0:
            raise ConfigError(f"config key 'data.other_photo_identity' must be a probability in [0, 1], "
                              f"got {self.other_photo_identity}")


@dataclass(frozen=True)
class LossConfig:
    """Diffusion loss and attention-disentanglement (AD) loss.

    Attributes:
      prediction_type: ``epsilon`` (SD1.5 / Arc2Face) or ``v_prediction``.
      min_snr_gamma: Min-SNR-gamma weighting (Hang et al. 2023); None = plain MSE.
      ad_weight: weight of the AD loss (0 turns it off and no attention maps are computed).
      ad_reading: name of the AD loss reading in ``facecrafter_jax.losses``.
      ad_layers: cross-attention layer indices read by the AD loss, or ``all``.
      ad_options: keyword options of the reading (``per_head``, ``overlap``, ``id_token_positions``).
      scheduler: overrides of SD1.5's noise-schedule keys (diffusers names), normally empty.
    """

    prediction_type: str = "epsilon"
    min_snr_gamma: float | None = None
    ad_weight: float = 0.0
    ad_reading: str = "orthogonality"
    ad_layers: str | tuple[int, ...] = "all"
    ad_options: dict = field(default_factory=dict)
    scheduler: dict = field(default_factory=dict)

    def __post_init__(self):
        _choice("loss.prediction_type", self.prediction_type, ("epsilon", "v_prediction"))
        if self.ad_weight < 0:
            raise ConfigError(f"config key 'loss.ad_weight' must be >= 0, got {self.ad_weight}")
        if self.min_snr_gamma is not None and self.min_snr_gamma <= 0:
            raise ConfigError(f"config key 'loss.min_snr_gamma' must be positive or null, got {self.min_snr_gamma}")
        if isinstance(self.ad_layers, str) and self.ad_layers != "all":
            raise ConfigError(f"config key 'loss.ad_layers' must be 'all' or layer indices, got {self.ad_layers!r}")


@dataclass(frozen=True)
class OptimConfig:
    """AdamW with linear warm-up then cosine decay (to ``lr * end_lr_ratio``) or constant; global-norm clipping."""

    lr: float = 1e-4
    schedule: str = "cosine"
    warmup_steps: int = 500
    decay_steps: int | None = None
    end_lr_ratio: float = 0.0
    weight_decay: float = 0.01
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    grad_clip_norm: float | None = 1.0
    ema_decay: float | None = None

    def __post_init__(self):
        _choice("optim.schedule", self.schedule, ("cosine", "constant"))
        if not self.lr > 0:
            raise ConfigError(f"config key 'optim.lr' must be positive, got {self.lr}")
        if self.warmup_steps < 0:
            raise ConfigError(f"config key 'optim.warmup_steps' must be >= 0, got {self.warmup_steps}")
        if self.ema_decay is not None and not 0 < self.ema_decay < 1:
            raise ConfigError(f"config key 'optim.ema_decay' must be in (0, 1) or null, got {self.ema_decay}")
        if self.grad_clip_norm is not None and self.grad_clip_norm <= 0:
            raise ConfigError(f"config key 'optim.grad_clip_norm' must be positive or null, got {self.grad_clip_norm}")


@dataclass(frozen=True)
class MeshConfig:
    """Device mesh ``(data, fsdp)``; one size may be -1 (all remaining devices).

    ``min_shard_size``: parameters (and their optimiser / EMA state) with fewer elements are replicated;
    larger ones are split over ``fsdp`` along their largest dimension divisible by the ``fsdp`` size.
    """

    data: int = -1
    fsdp: int = 1
    min_shard_size: int = 2 ** 18


@dataclass(frozen=True)
class CheckpointConfig:
    """Orbax checkpoints under ``<run_dir>/checkpoints``."""

    every: int = 1000
    keep_last: int = 3
    keep_best: int = 1
    best_metric: str = "loss"
    best_mode: str = "min"
    async_save: bool = True
    resume: bool = True

    def __post_init__(self):
        _choice("checkpoint.best_mode", self.best_mode, ("min", "max"))
        if self.every < 0 or self.keep_last < 1 or self.keep_best < 0:
            raise ConfigError("config keys 'checkpoint.every' >= 0, 'checkpoint.keep_last' >= 1, "
                              f"'checkpoint.keep_best' >= 0 required, got {self.every}, {self.keep_last}, {self.keep_best}")


@dataclass(frozen=True)
class LoggingConfig:
    """JSON lines (``<run_dir>/metrics.jsonl``), TensorBoard (``<run_dir>/tb``) and a tqdm bar."""

    every: int = 10
    tensorboard: bool = True
    progress: bool = True

    def __post_init__(self):
        _positive("logging.every", self.every)


@dataclass(frozen=True)
class SampleConfig:
    """Periodic sample grids (``<run_dir>/samples/step_XXXXXXX.png``); ``every: 0`` turns them off."""

    every: int = 0
    num_identities: int = 4
    num_steps: int = 25
    guidance_scale: float = 3.0
    scheduler: str = "dpm++2m"
    seed: int = 0

    def __post_init__(self):
        _choice("sample.scheduler", self.scheduler, ("dpm++2m", "ddim", "euler"))
        if self.every < 0:
            raise ConfigError(f"config key 'sample.every' must be >= 0, got {self.every}")
        _positive("sample.num_identities", self.num_identities)
        _positive("sample.num_steps", self.num_steps)


@dataclass(frozen=True)
class DistributedConfig:
    """``jax.distributed.initialize`` arguments; unset fields fall back to the environment
    (``FACECRAFTER_COORDINATOR``, ``FACECRAFTER_NUM_PROCESSES``, ``FACECRAFTER_PROCESS_ID``), then to a
    single process (or to JAX's own cluster auto-detection with ``auto: true``)."""

    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    auto: bool = False


@dataclass(frozen=True)
class TrainConfig:
    """One training run (one stage).

    ``stage``: ``landmark`` / ``emotion`` (pre-train one control module), ``joint`` (both, disentanglement
    training), or ``base``: train the Arc2Face base model itself (every UNet and text-encoder parameter
    except the token-embedding table; no control modules) with the identity dropped to the empty prompt
    with probability ``conditioning.all_null`` (default 0.1) for classifier-free guidance. The toy
    pipeline uses ``base`` to make its Arc2Face from scratch.
    """

    name: str = "facecrafter"
    stage: str = "joint"
    run_dir: str = "runs/facecrafter"
    seed: int = 0
    steps: int = 1000
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    conditioning: dict = field(default_factory=dict)
    optim: OptimConfig = field(default_factory=OptimConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)

    def __post_init__(self):
        _choice("stage", self.stage, STAGES)
        _positive("steps", self.steps)

    def validate(self) -> "TrainConfig":
        """Checks across sections (run after all overrides): controls fit the stage, init_from the controls."""
        expected = {"joint": ("landmark", "emotion"), "base": ()}.get(self.stage, (self.stage,))
        if tuple(sorted(self.model.controls)) != tuple(sorted(expected)):
            raise ConfigError(f"config key 'model.controls' = {list(self.model.controls)} does not fit stage "
                              f"{self.stage!r} (expected {list(expected)})")
        unknown = sorted(set(self.model.init_from) - set(self.model.controls))
        if unknown:
            raise ConfigError(f"config key 'model.init_from' names control(s) {unknown} not in model.controls")
        return self


# ------------------------------------------------------------------------------------------- coercion
_NONE_STRINGS = {"null", "none", "~", ""}
_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _is_dataclass_type(tp) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _union_args(tp) -> tuple | None:
    origin = typing.get_origin(tp)
    if origin is Union or origin is types.UnionType:
        return typing.get_args(tp)
    return None


def _parse_scalar_string(s: str):
    try:
        return yaml.safe_load(s)
    except yaml.YAMLError:
        return s


def _coerce(value, tp, key: str):
    """Coerce ``value`` to annotated type ``tp`` or raise ConfigError naming ``key``."""
    args = _union_args(tp)
    if args is not None:
        non_none = [a for a in args if a is not type(None)]
        if type(None) in args and (value is None or (isinstance(value, str) and value.strip().lower() in _NONE_STRINGS)):
            return None
        if len(non_none) == 1:
            return _coerce(value, non_none[0], key)
        parsed = _parse_scalar_string(value) if isinstance(value, str) else value
        for a in non_none:  # non-string members first, on the YAML-parsed value
            if a is str:
                continue
            try:
                return _coerce(parsed, a, key)
            except ConfigError:
                pass
        if str in non_none and isinstance(value, str):
            return value
        raise ConfigError(f"config key '{key}': cannot read {value!r} as {' or '.join(_type_name(a) for a in args)}")
    if value is None:
        raise ConfigError(f"config key '{key}' may not be null (expected {_type_name(tp)})")
    if _is_dataclass_type(tp):
        if isinstance(value, str):
            value = _parse_scalar_string(value)
        if dataclasses.is_dataclass(value) and isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"config key '{key}' must be a mapping (section {tp.__name__}), got {value!r}")
        return from_dict(tp, value, prefix=key)
    origin = typing.get_origin(tp)
    if origin is tuple:
        inner = typing.get_args(tp)
        if isinstance(value, str):
            parsed = _parse_scalar_string(value)
            if isinstance(parsed, list):
                value = parsed
            else:
                value = [v.strip() for v in value.strip().strip("[]()").split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            value = [value]
        elem = inner[0] if inner else Any
        return tuple(_coerce(v, elem, f"{key}[{i}]") for i, v in enumerate(value))
    if tp is dict or origin is dict:
        if isinstance(value, str):
            value = _parse_scalar_string(value)
        if not isinstance(value, Mapping):
            raise ConfigError(f"config key '{key}' must be a mapping, got {value!r}")
        return _freeze_dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        raise ConfigError(f"config key '{key}': expected a bool, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"config key '{key}': expected an int, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                try:
                    f = float(value)
                except ValueError:
                    f = None
                if f is not None and f.is_integer():
                    return int(f)
        raise ConfigError(f"config key '{key}': expected an int, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"config key '{key}': expected a float, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value.strip())
            except ValueError:
                pass
        raise ConfigError(f"config key '{key}': expected a float, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"config key '{key}': expected a string, got {value!r}")
    raise ConfigError(f"config key '{key}': unsupported field type {tp!r}")


class FrozenDict(dict):
    """A read-only, hashable dict (free-form sub-configs inside the frozen dataclasses)."""

    def _ro(self, *a, **k):
        raise TypeError("config dicts are read-only; use apply_overrides / dataclasses.replace")

    __setitem__ = __delitem__ = clear = pop = popitem = setdefault = update = _ro  # type: ignore[assignment]

    def __hash__(self):  # type: ignore[override]
        return hash(json.dumps(_plain(self), sort_keys=True))


def _freeze_dict(d: Mapping) -> FrozenDict:
    def freeze(v):
        if isinstance(v, Mapping):
            return FrozenDict({str(k): freeze(x) for k, x in v.items()})
        if isinstance(v, (list, tuple)):
            return tuple(freeze(x) for x in v)
        return v

    return freeze(d)


def _plain(v):
    """Dataclasses / frozen dicts / tuples -> plain dicts and lists (YAML / JSON)."""
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        return {f.name: _plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
    if isinstance(v, Mapping):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v


# ------------------------------------------------------------------------------------------- public API
def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def from_dict(cls, d: Mapping[str, Any] | None, *, prefix: str = ""):
    """Build dataclass ``cls`` from a (YAML) mapping; unknown keys and bad values raise :class:`ConfigError`."""
    d = {} if d is None else d
    if not isinstance(d, Mapping):
        raise ConfigError(f"config section '{prefix or '<root>'}' must be a mapping, got {type(d).__name__}")
    hints = _hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in d if k not in names]
    if unknown:
        where = f"'{prefix}.{unknown[0]}'" if prefix else f"'{unknown[0]}'"
        raise ConfigError(f"unknown config key {where}; valid keys{' of ' + repr(prefix) if prefix else ''}: {names}")
    kwargs = {}
    for name in names:
        if name in d:
            kwargs[name] = _coerce(d[name], hints[name], f"{prefix}.{name}" if prefix else name)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"config section '{prefix or '<root>'}': {e}") from e


def to_dict(cfg) -> dict:
    """Plain nested dict (lists for tuples) of a config dataclass; ``from_dict(type(cfg), to_dict(cfg)) == cfg``."""
    return _plain(cfg)


def to_yaml(cfg) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def to_json(cfg) -> str:
    return json.dumps(to_dict(cfg), sort_keys=True)


def parse_overrides(items: Sequence[str]) -> list[tuple[str, str]]:
    """``["a.b=1", ...]`` -> ``[("a.b", "1"), ...]`` (error for an item without ``=``)."""
    out = []
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        k, v = item.split("=", 1)
        k = k.strip()
        if not k:
            raise ConfigError(f"override {item!r} has an empty key")
        out.append((k, v))
    return out


def _set_in_dict(d: Mapping, parts: list[str], raw: str, key: str) -> FrozenDict:
    d = dict(d)
    head = parts[0]
    if len(parts) == 1:
        parsed = _parse_scalar_string(raw)
        if head in d and d[head] is not None and parsed is not None:
            old = d[head]
            tp = (tuple if isinstance(old, (list, tuple)) else dict if isinstance(old, Mapping) else type(old))
            if tp is tuple:
                parsed = _coerce(raw, tuple[Any, ...], key)
            elif tp in (bool, int, float, str, dict):
                parsed = _coerce(raw, tp, key)
        d[head] = parsed
    else:
        sub = d.get(head)
        if sub is None:
            sub = {}
        if not isinstance(sub, Mapping):
            raise ConfigError(f"config key '{key}': '{head}' holds {sub!r}, not a mapping")
        d[head] = _set_in_dict(sub, parts[1:], raw, key)
    return _freeze_dict(d)


def _override(cfg, parts: list[str], raw: str, key: str, done: str):
    name = parts[0]
    names = [f.name for f in dataclasses.fields(cfg)]
    if name not in names:
        where = f"{done}.{name}" if done else name
        raise ConfigError(f"unknown config key '{where}' in override '{key}'; valid keys"
                          f"{' of ' + repr(done) if done else ''}: {names}")
    tp = _hints(type(cfg))[name]
    path = f"{done}.{name}" if done else name
    current = getattr(cfg, name)
    if len(parts) == 1:
        new = _coerce(raw, tp, path)
    elif dataclasses.is_dataclass(current):
        new = _override(current, parts[1:], raw, key, path)
    elif current is None and _union_args(tp) and any(_is_dataclass_type(a) for a in _union_args(tp)):
        sub_cls = next(a for a in _union_args(tp) if _is_dataclass_type(a))
        new = _override(sub_cls(), parts[1:], raw, key, path)
    elif isinstance(current, Mapping) or (current is None and _union_args(tp) and dict in _union_args(tp)) or tp is dict:
        new = _set_in_dict(current or {}, parts[1:], raw, key)
    else:
        raise ConfigError(f"config key '{path}' is a {_type_name(tp)}, it has no sub-key '{parts[1]}' (override '{key}')")
    return dataclasses.replace(cfg, **{name: new})


def apply_overrides(cfg, overrides: Sequence[str] | Sequence[tuple[str, str]]):
    """Apply ``key=value`` overrides (strings or pairs) to a config dataclass; returns a new config."""
    pairs = parse_overrides(overrides) if overrides and isinstance(overrides[0], str) else list(overrides)
    for key, raw in pairs:
        cfg = _override(cfg, key.split("."), raw, key, "")
    return cfg


def load_config(path: str | None = None, overrides: Sequence[str] = (), cls=TrainConfig):
    """Read a YAML file (``yaml.safe_load``) into ``cls`` and apply overrides."""
    data = {}
    if path is not None:
        with open(path) as f:
            data = yaml.safe_load(f)
        if data is None:
            data = {}
        if not isinstance(data, Mapping):
            raise ConfigError(f"{path}: the top level must be a mapping, got {type(data).__name__}")
    try:
        cfg = from_dict(cls, data)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}" if path else str(e)) from None
    cfg = apply_overrides(cfg, list(overrides))
    return cfg.validate() if hasattr(cfg, "validate") else cfg
