"""The training loop: distributed init, mesh, model, sharded state, data, compiled step, checkpoints, logs.

``run(cfg)`` is what ``python train.py --config ...`` calls. See docs/training.md.
"""

from __future__ import annotations

import json
import math
import os
import signal
import time
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from .config import DistributedConfig, TrainConfig, to_dict

__all__ = ["init_distributed", "resolve_data_dir", "ensure_synthetic_dataset", "Trainer", "run"]

EXIT_OK = 0


# ------------------------------------------------------------------------------------------- distributed
def init_distributed(cfg: DistributedConfig) -> None:
    """``jax.distributed.initialize`` from the config, else from ``FACECRAFTER_COORDINATOR`` /
    ``FACECRAFTER_NUM_PROCESSES`` / ``FACECRAFTER_PROCESS_ID``; nothing for a single process.
    Must run before anything touches the JAX backend."""
    import jax

    addr = cfg.coordinator_address or os.environ.get("FACECRAFTER_COORDINATOR")
    num = cfg.num_processes if cfg.num_processes is not None else os.environ.get("FACECRAFTER_NUM_PROCESSES")
    pid = cfg.process_id if cfg.process_id is not None else os.environ.get("FACECRAFTER_PROCESS_ID")
    num = int(num) if num is not None else None
    pid = int(pid) if pid is not None else None
    if addr is None and num is None and pid is None:
        if cfg.auto:
            jax.distributed.initialize()
        return
    if num is None or pid is None or addr is None:
        raise ValueError("distributed training needs coordinator_address, num_processes and process_id "
                         f"(got {addr!r}, {num!r}, {pid!r}); set distributed.* or the FACECRAFTER_* variables")
    if num == 1:
        return
    if not 0 <= pid < num:
        raise ValueError(f"distributed.process_id {pid} not in [0, {num})")
    jax.distributed.initialize(coordinator_address=addr, num_processes=num, process_id=pid)


# ------------------------------------------------------------------------------------------- data
def resolve_data_dir(cfg: TrainConfig) -> Path:
    """``data.dir``; an empty value with ``data.synthetic`` set means ``<run_dir>/data``."""
    if cfg.data.dir:
        return Path(cfg.data.dir)
    if cfg.data.synthetic is None:
        raise ValueError("data.dir is empty and data.synthetic is not set")
    return Path(cfg.run_dir) / "data"


def ensure_synthetic_dataset(cfg: TrainConfig, data_dir: Path) -> None:
    """Write ``data.synthetic.num_records`` random records to ``data_dir`` unless it already holds a dataset."""
    from facecrafter_jax.data import records as R

    syn = cfg.data.synthetic
    if syn is None or (data_dir / R.INFO_FILE).is_file():
        return
    rng = np.random.default_rng(syn.seed)
    tmp = data_dir.with_name(data_dir.name + ".tmp")
    if tmp.exists():
        import shutil

        shutil.rmtree(tmp)
    with R.RecordWriter(tmp, resolution=syn.resolution, shard_size=syn.shard_size, latent_dtype=syn.latent_dtype,
                        metadata={"synthetic": to_dict(syn)}) as w:
        for i in range(syn.num_records):
            w.write(R.synthetic_record(rng, syn.resolution, image_id=f"synthetic/{i:06d}.png"))
    os.replace(tmp, data_dir)


def _batch_specs(data_dir: Path, global_batch: int) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    from facecrafter_jax.data import records as R

    from .step import BATCH_FIELDS

    info = R.read_dataset_info(data_dir)
    specs = R.field_specs(info["resolution"], info["latent_dtype"], info.get("latent_side"))
    out = {k: ((global_batch,) + tuple(specs[k][0]), np.dtype(specs[k][1])) for k in BATCH_FIELDS if k != "image_id"}
    out["sample_id"] = ((global_batch, 2), np.dtype(np.uint32))
    return out


# ------------------------------------------------------------------------------------------- trainer
class _StopFlag:
    """Set by SIGTERM / SIGINT; the loop saves a checkpoint and exits at the next step boundary."""

    def __init__(self):
        self.signal: int | None = None
        self._old = {}

    def install(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handler)
            except ValueError:  # not the main thread
                pass

    def _handler(self, signum, frame):
        self.signal = signum

    def restore(self):
        for sig, old in self._old.items():
            signal.signal(sig, old)


class Trainer:
    """One training run. ``Trainer(cfg).run()`` returns a result dict (``status``, ``step``, ...).

    The pieces are attributes, so tests and benchmarks can use them separately: ``mesh``, ``world``,
    ``tx``, ``train_step`` (pure), ``compiled`` (the AOT-compiled step), ``state``, ``frozen``,
    ``pipeline``, ``checkpointer``.
    """

    def __init__(self, cfg: TrainConfig):
        import jax

        from . import mesh as M
        from .state import build_world, init_train_state, load_init_params, make_lr_schedule, make_optimizer
        from .step import make_train_step

        self.cfg = cfg.validate()
        self.run_dir = Path(cfg.run_dir)
        self.primary = jax.process_index() == 0
        if cfg.steps <= 0:
            raise ValueError(f"steps must be positive, got {cfg.steps}")
        self.mesh = M.make_mesh(cfg.mesh)
        ndev = self.mesh.devices.size
        if cfg.data.global_batch_size % ndev:
            raise ValueError(f"data.global_batch_size={cfg.data.global_batch_size} must be a multiple of the "
                             f"{ndev} devices (the batch is split over data x fsdp)")

        # data (the synthetic set is written by process 0 before anyone reads it)
        self.data_dir = resolve_data_dir(cfg)
        if self.primary:
            ensure_synthetic_dataset(cfg, self.data_dir)
        _barrier("dataset")

        # model
        t0 = time.perf_counter()
        self.world = build_world(cfg, load_vae=cfg.sample.every > 0)
        self.build_seconds = time.perf_counter() - t0
        self.lr_schedule = make_lr_schedule(cfg.optim, cfg.steps)
        self.tx = make_optimizer(cfg.optim, cfg.steps)
        init_params = dict(self.world.params)
        if cfg.model.init_from:
            loaded = load_init_params(cfg.model.init_from, init_params)
            init_params.update(loaded)
            self.init_from_count = len(loaded)
        self.train_step = make_train_step(self.world, cfg, self.tx, self.lr_schedule)

        # shardings: ONE rule (mesh.py) for frozen params, trainable params, optimiser and EMA state
        min_size = cfg.mesh.min_shard_size
        self.frozen_shardings = M.tree_shardings(self.mesh, self.world.frozen, min_size)
        self.frozen = {k: _place(v, self.frozen_shardings[k]) for k, v in self.world.frozen.items()}
        ema = cfg.optim.ema_decay is not None
        init_fn = lambda p: init_train_state(p, self.tx, seed=cfg.seed, ema=ema)  # noqa: E731
        abstract = jax.eval_shape(init_fn, init_params)
        self.state_shardings = M.tree_shardings(self.mesh, abstract, min_size)
        self.abstract_state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                           abstract, self.state_shardings)
        self.batch_sharding = M.batch_sharding(self.mesh)
        self.replicated = M.replicated(self.mesh)
        self._init_fn = init_fn
        self._init_params = init_params
        self.state = None
        self.pipeline = None
        self.checkpointer = None
        self.compiled = None

    # --------------------------------------------------------------------------------------- pieces
    def make_pipeline(self):
        from facecrafter_jax.data import make_pipeline

        from .step import BATCH_FIELDS

        d = self.cfg.data
        return make_pipeline(self.data_dir, global_batch_size=d.global_batch_size, seed=d.seed, fields=BATCH_FIELDS,
                             worker_count=d.worker_count, read_threads=d.read_threads,
                             read_buffer_size=d.read_buffer_size, sharding=self.batch_sharding,
                             device_prefetch=d.device_prefetch, other_photo_identity=d.other_photo_identity)

    def fresh_state(self) -> dict:
        import jax

        params = {k: _place(v, self.state_shardings["params"][k]) for k, v in self._init_params.items()}
        return jax.jit(self._init_fn, out_shardings=self.state_shardings)(params)

    def compile(self):
        """AOT-compile the step with explicit in/out shardings and the state donated."""
        import jax

        specs = _batch_specs(self.data_dir, self.cfg.data.global_batch_size)
        abstract_batch = {k: jax.ShapeDtypeStruct(s, dt, sharding=self.batch_sharding) for k, (s, dt) in specs.items()}
        abstract_frozen = {k: jax.ShapeDtypeStruct(np.shape(v), v.dtype, sharding=self.frozen_shardings[k])
                           for k, v in self.world.frozen.items()}
        jitted = jax.jit(self.train_step,
                         in_shardings=(self.state_shardings, self.frozen_shardings,
                                       {k: self.batch_sharding for k in abstract_batch}),
                         out_shardings=(self.state_shardings, self.replicated),
                         donate_argnums=(0,))
        t0 = time.perf_counter()
        with _mesh_context(self.mesh):
            self.compiled = jitted.lower(self.abstract_state, abstract_frozen, abstract_batch).compile()
        self.compile_seconds = time.perf_counter() - t0
        from .logging import compiled_flops

        self.step_flops = compiled_flops(self.compiled)
        return self.compiled

    def sharding_summary(self) -> dict:
        """``{"mesh": {...}, "frozen": {name: spec}, "params": {...}, "opt_state": {path: spec}}`` (specs as strings)."""
        import jax

        def spec(s):
            return str(tuple(s.spec))

        opt = {jax.tree_util.keystr(p): spec(s)
               for p, s in jax.tree_util.tree_flatten_with_path(self.state_shardings["opt_state"])[0]}
        return {"mesh": dict(self.mesh.shape), "min_shard_size": self.cfg.mesh.min_shard_size,
                "frozen": {k: spec(s) for k, s in self.frozen_shardings.items()},
                "params": {k: spec(s) for k, s in self.state_shardings["params"].items()},
                "opt_state": opt}

    def next_batch(self) -> dict:
        """The next global batch with ``image_id`` replaced by the ``sample_id`` hash (sharded like the rest)."""
        import jax

        from .step import sample_ids

        batch = next(self.pipeline)
        ids = batch.pop("image_id")
        batch["sample_id"] = jax.make_array_from_process_local_data(self.batch_sharding, sample_ids(ids))
        return batch

    # --------------------------------------------------------------------------------------- run
    def setup(self) -> int:
        """Pipeline, checkpointer, state (fresh or restored), compiled step. Returns the start step."""
        from .checkpoint import Checkpointer

        cfg = self.cfg
        self.pipeline = self.make_pipeline()
        self.checkpointer = Checkpointer(self.run_dir / "checkpoints", cfg.checkpoint, config_dict=to_dict(cfg),
                                         meta=self.world.meta)
        latest = self.checkpointer.latest_step() if cfg.checkpoint.resume else None
        if latest is None and not cfg.checkpoint.resume and self.checkpointer.latest_step() is not None:
            raise FileExistsError(f"{self.checkpointer.directory} already has checkpoints and checkpoint.resume "
                                  "is false: use a new run_dir (or delete them)")
        if latest is not None:
            self.state = self.checkpointer.restore(latest, self.abstract_state, self.pipeline)
            self.restored_step = latest
        else:
            self.state = self.fresh_state()
            self.restored_step = None
        start = int(np.asarray(self.state["step"]))
        if start < cfg.steps:
            self.compile()
        else:  # a finished run (e.g. re-run by the toy pipeline): nothing to compile
            self.compile_seconds, self.step_flops = 0.0, None
        return start

    def run(self) -> dict:
        import jax

        from .logging import MetricsLogger
        from . import samples as SMP

        cfg = self.cfg
        start = self.setup()
        logger = MetricsLogger(self.run_dir, cfg.logging, total_steps=cfg.steps, start_step=start, primary=self.primary)
        if self.primary:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(_yaml(cfg))
            (self.run_dir / "sharding.json").write_text(json.dumps(self.sharding_summary(), indent=1))
            logger.write(f"[train] {cfg.name}: mesh {dict(self.mesh.shape)} on {jax.device_count()} devices / "
                         f"{jax.process_count()} processes; {_count(self.world.params):,} trainable, "
                         f"{_count(self.world.frozen):,} frozen parameters; compile {self.compile_seconds:.1f}s"
                         + (f"; resumed at step {start}" if self.restored_step is not None else ""))
        stop = _StopFlag()
        stop.install()
        status = "finished"
        window: list[float] = []
        step = start
        last_saved = self.restored_step
        last_log_time = time.perf_counter()
        last_log_step = start
        ckpt = cfg.checkpoint
        try:
            while step < cfg.steps:
                batch = self.next_batch()
                self.state, metrics = self.compiled(self.state, self.frozen, batch)
                step += 1
                logger.advance()
                log_now = step % cfg.logging.every == 0 or step == cfg.steps
                save_now = ckpt.every > 0 and step % ckpt.every == 0
                if log_now or save_now:
                    host = {k: float(np.asarray(v)) for k, v in metrics.items()}
                    window.append(host["loss"])
                    if log_now:
                        now = time.perf_counter()
                        dt = (now - last_log_time) / max(1, step - last_log_step)
                        host["step_time_s"] = dt
                        host["images_per_s"] = cfg.data.global_batch_size / dt if dt > 0 else float("nan")
                        if self.step_flops is not None and dt > 0:
                            host["tflops_per_s"] = self.step_flops / dt / 1e12
                        logger.log(step, host)
                        last_log_time, last_log_step = time.perf_counter(), step
                    if save_now:
                        self.checkpointer.save(step, self.state, self.pipeline,
                                               metrics={"loss": float(np.mean(window))})
                        last_saved = step
                        window = []
                if cfg.sample.every > 0 and step % cfg.sample.every == 0:
                    SMP.write_sample_grid(self, step, logger)
                if _agree(stop.signal is not None):
                    status = "preempted"
                    break
            if last_saved != step:
                self.checkpointer.save(step, self.state, self.pipeline, force=True)
            self.checkpointer.wait()
            if status == "preempted":
                logger.write(f"[train] signal {stop.signal}: saved checkpoint at step {step}; exiting")
        finally:
            stop.restore()
            logger.close()
            if self.checkpointer is not None:
                self.checkpointer.close()
            if self.pipeline is not None:
                self.pipeline.close()
        return {"status": status, "step": step, "start_step": start, "compile_seconds": self.compile_seconds,
                "step_flops": self.step_flops}


def run(cfg: TrainConfig) -> dict:
    """Initialise JAX distributed (if configured) and train; returns :meth:`Trainer.run`'s result."""
    init_distributed(cfg.distributed)
    return Trainer(cfg).run()


# ------------------------------------------------------------------------------------------- helpers
def _place(x, sharding):
    """A global array with ``sharding`` from a value every process holds in full (no cross-host transfer)."""
    import jax

    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])


def _barrier(name: str) -> None:
    import jax

    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def _agree(flag: bool) -> bool:
    """True on every process if it is True on any (a signal may reach only some processes)."""
    import jax

    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils

    return bool(np.max(multihost_utils.process_allgather(np.asarray([int(flag)], np.int32))))


class _mesh_context:
    """``jax.set_mesh(mesh)`` as a context manager where available (sharded NNX variables need it)."""

    def __init__(self, mesh):
        self.mesh = mesh
        self._cm = None

    def __enter__(self):
        import jax

        if hasattr(jax, "set_mesh"):
            self._cm = jax.set_mesh(self.mesh)
            self._cm.__enter__()
        return self.mesh

    def __exit__(self, *exc):
        if self._cm is not None:
            self._cm.__exit__(*exc)


def _count(params: Mapping[str, Any]) -> int:
    return int(sum(math.prod(np.shape(v)) for v in params.values()))


def _yaml(cfg: TrainConfig) -> str:
    from .config import to_yaml

    return to_yaml(cfg)
