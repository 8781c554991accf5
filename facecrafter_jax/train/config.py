"""The training configuration schema: nested frozen dataclasses (``TrainConfig`` and its sections).

::

    cfg = load_config("configs/stage_a_landmark.yaml", ["optim.lr=1e-4", "mesh.fsdp=4"])
    cfg.optim.lr                      # 0.0001 (float: the type of the field, not of the YAML literal)
    to_dict(cfg) / to_yaml(cfg)       # round-trip: from_dict(TrainConfig, to_dict(cfg)) == cfg

Loading, coercion, unknown-key errors and dotted overrides are the general engine's
(:mod:`facecrafter_jax.config`, re-exported here): safe YAML only, every key must be a field of the
dataclass it lands in, override values take the field's type, and every problem is a one-line
:class:`~facecrafter_jax.errors.ConfigError` naming the dotted key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from facecrafter_jax.config import (ConfigError, FrozenDict, apply_overrides, from_dict, parse_overrides, to_dict,
                                    to_json, to_yaml)
from facecrafter_jax.config import load_config as _load_config

__all__ = [
    "ConfigError", "STAGES", "ModelConfig", "DataConfig", "SyntheticDataConfig", "LossConfig", "OptimConfig", "MeshConfig",
    "CheckpointConfig", "LoggingConfig", "SampleConfig", "DistributedConfig", "TrainConfig",
    "from_dict", "to_dict", "to_yaml", "to_json", "load_config", "apply_overrides", "parse_overrides", "FrozenDict",
]


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
    """Record shards and the input pipeline (see docs/data.md).

    ``verify``: what is checked against ``dataset.json`` before training: ``sizes`` (every shard present, of the
    stored size and record count: milliseconds) or ``hashes`` (also the SHA-256 of every byte: ~6 s per 5 GB per
    process here, docs/reliability.md). ``on_change``: ``error`` (default) stops when shards are damaged or
    differ from the resumed checkpoint's; ``restart`` trains on the shards that verify and, on resume, restarts
    the data iterator on them.
    """

    dir: str = "data/ffhq512"
    synthetic: SyntheticDataConfig | None = None
    global_batch_size: int = 8
    seed: int = 0
    worker_count: int = 0
    read_threads: int = 4
    read_buffer_size: int = 4
    device_prefetch: int = 2
    other_photo_identity: float = 0.0
    verify: str = "sizes"
    on_change: str = "error"

    def __post_init__(self):
        _choice("data.verify", self.verify, ("sizes", "hashes"))
        _choice("data.on_change", self.on_change, ("error", "restart"))
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
    """AdamW with linear warm-up then cosine decay (to ``lr * end_lr_ratio``) or constant; global-norm clipping.

    A step whose loss or gradient norm is not finite changes no parameter (it is counted and logged); more
    than ``max_nonfinite_steps`` such steps in a row stop the run with an error (0: the first one stops it).
    """

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
    max_nonfinite_steps: int = 10

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
        if self.max_nonfinite_steps < 0:
            raise ConfigError(f"config key 'optim.max_nonfinite_steps' must be >= 0, got {self.max_nonfinite_steps}")


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
    single process (or to JAX's own cluster auto-detection with ``auto: true``).

    ``heartbeat_timeout_s``: a process that sends no heartbeat for this long is declared dead and every other
    process stops (a peer whose sockets close is noticed at the next collective, at once).
    ``init_timeout_s``: how long a process waits for all the others to join at start.
    """

    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    auto: bool = False
    heartbeat_timeout_s: int = 60
    init_timeout_s: int = 300

    def __post_init__(self):
        _positive("distributed.heartbeat_timeout_s", self.heartbeat_timeout_s)
        _positive("distributed.init_timeout_s", self.init_timeout_s)


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


def load_config(path: str | None = None, overrides: Sequence[str] = (), cls=TrainConfig):
    """Read a YAML file (safe loader) into ``cls`` (default :class:`TrainConfig`), apply ``key=value``
    overrides and validate; every problem is a :class:`ConfigError`."""
    return _load_config(path, overrides, cls=cls)
