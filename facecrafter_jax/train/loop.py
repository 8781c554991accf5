"""The training loop: distributed init, mesh, model, sharded state, data, compiled step, checkpoints, logs.

``run(cfg)`` is what ``python train.py --config ...`` calls. See docs/training.md; the faults it survives
(damaged records, non-finite steps, damaged or unwritable checkpoints, lost peers, preemption) and how are
in docs/reliability.md.
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

from facecrafter_jax.errors import ConfigError, DataError, DivergenceError, MissingDataError, UserError

from .config import TrainConfig, to_dict
from .distributed import init_distributed, is_peer_loss, peer_lost_error

__all__ = ["init_distributed", "resolve_data_dir", "ensure_synthetic_dataset", "Trainer", "run"]

EXIT_OK = 0


# ------------------------------------------------------------------------------------------- data
def resolve_data_dir(cfg: TrainConfig) -> Path:
    """``data.dir``; an empty value with ``data.synthetic`` set means ``<run_dir>/data``, where the synthetic
    dataset is written on first use (only there: a mistyped ``data.dir`` is an error, never random data)."""
    if cfg.data.dir:
        return Path(cfg.data.dir)
    if cfg.data.synthetic is None:
        raise ConfigError("config key 'data.dir' is empty and data.synthetic is not set: give the records folder")
    return Path(cfg.run_dir) / "data"


def ensure_synthetic_dataset(cfg: TrainConfig, data_dir: Path) -> None:
    """Write ``data.synthetic.num_records`` random records to ``data_dir`` unless it already holds a dataset."""
    from facecrafter_jax.data import records as R

    syn = cfg.data.synthetic
    if syn is None or (data_dir / R.INFO_FILE).is_file():
        return
    if data_dir.absolute() != (Path(cfg.run_dir) / "data").absolute():
        what = "does not exist" if not data_dir.exists() else f"holds no {R.INFO_FILE}"
        raise MissingDataError(f"config key 'data.dir': {data_dir} {what}. data.synthetic writes random records only "
                               "into <run_dir>/data (leave data.dir empty for that); otherwise give a records folder "
                               "made by python -m data_prep run")
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
            raise ConfigError(f"config key 'steps' must be positive, got {cfg.steps}")
        if cfg.model.pretrained is not None and not Path(cfg.model.pretrained).is_dir():
            raise ConfigError(f"config key 'model.pretrained': {cfg.model.pretrained} is not a folder (convert Arc2Face "
                              "with facecrafter-convert from-diffusers, docs/training.md)")
        self.mesh = M.make_mesh(cfg.mesh)
        ndev = self.mesh.devices.size
        if cfg.data.global_batch_size % ndev:
            raise ConfigError(f"config key 'data.global_batch_size' = {cfg.data.global_batch_size} must be a multiple "
                              f"of the {ndev} devices (the batch is split over data x fsdp)")

        # data (the synthetic set is written by process 0 before anyone reads it), verified before the model
        # is built: a damaged records folder or one that changed since the checkpoint fails in seconds
        self.data_dir = resolve_data_dir(cfg)
        if self.primary:
            ensure_synthetic_dataset(cfg, self.data_dir)
        _barrier("dataset")
        self.messages: list[str] = []  # lines for the log, written once the logger exists
        self.records = self._verify_records()
        self._records_checked: dict[int, bool] = {}
        peek = _peek_checkpoint(self.run_dir / "checkpoints") if cfg.checkpoint.resume else None
        if peek is not None:
            self._check_records(*peek)
        elif not self.records.ok:
            self._accept_damaged_records()

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
                             device_prefetch=d.device_prefetch, other_photo_identity=d.other_photo_identity,
                             shards=self.records.counts)

    # --------------------------------------------------------------------------------------- records
    def _verify_records(self):
        from facecrafter_jax.data.integrity import verify_dataset

        report = verify_dataset(self.data_dir, hashes=self.cfg.data.verify == "hashes")
        if not report.shards:
            report.raise_if_problems(training=True)
            raise DataError(f"{self.data_dir} holds no complete record shards")
        what = "sizes, record counts" + (f" and SHA-256 of {report.bytes_hashed / 1e9:.2f} GB" if report.hashed else "")
        self.messages.append(f"[train] records: {report.num_records} in {len(report.shards)} shards of {self.data_dir}; "
                             f"{what} verified in {report.seconds:.2f}s"
                             + (" (dataset.json without sizes: counts only)" if report.legacy else ""))
        return report

    def _accept_damaged_records(self) -> None:
        """Damaged shards and no checkpoint to compare with: an error, or (``data.on_change=restart``) train on
        the shards that verify."""
        if self.cfg.data.on_change != "restart":
            self.records.raise_if_problems(training=True)
        if getattr(self, "_left_out_logged", False):
            return
        self._left_out_logged = True
        self.messages.append(f"[train] data.on_change=restart: leaving out {len(self.records.problems)} shard(s) that do "
                             f"not verify: {self.records.problem_text()}")

    def _check_records(self, step: int, saved: Mapping[str, Any] | None) -> bool:
        """Compare the records with those checkpoint ``step`` trained on (its ``meta["data"]``); returns whether
        the data iterator must restart (``data.on_change=restart``), raises :class:`DataError` otherwise."""
        if step not in self._records_checked:
            self._records_checked[step] = self._records_changed(step, saved)
        return self._records_checked[step]

    def _records_changed(self, step: int, saved: Mapping[str, Any] | None) -> bool:
        from facecrafter_jax.data.integrity import describe_changes

        if saved is None or saved.get("fingerprint") == self.records.fingerprint:
            if not self.records.ok:
                self._accept_damaged_records()
            return False
        bad = {p.shard: str(p) for p in self.records.problems}
        gone = {k: v for k, v in saved.get("shards", {}).items() if k not in bad}
        changes = "; ".join([*bad.values(), describe_changes(gone, self.records.shards)]).strip("; ") or \
            "dataset.json describes the shards differently (sizes or hashes recorded since)"
        if self.cfg.data.on_change != "restart":
            raise DataError(
                f"the records in {self.data_dir} changed since the checkpoint at step {step} was written: {changes}. "
                f"The checkpoint is fine. Put the records back as they were, or add data.on_change=restart to resume "
                f"at step {step} with the data iterator restarted on the {self.records.num_records} records that "
                "verify now")
        self.messages.append(f"[train] records changed since step {step} ({changes}); data.on_change=restart: the data "
                             f"iterator restarts on the {self.records.num_records} records in "
                             f"{len(self.records.shards)} shards that verify")
        return True

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
        """Pipeline, checkpointer, state (fresh or restored), compiled step. Returns the start step.

        Resuming tries the newest step first; a step that does not restore (damaged or incomplete files) is
        moved to ``<run_dir>/damaged_checkpoints`` with one log line, and the next older step is tried.
        A checkpoint of another model / config, or of other records, is an error (never skipped)."""
        from .checkpoint import CheckpointCorruptError, Checkpointer

        cfg = self.cfg
        self.pipeline = self.make_pipeline()
        self.checkpointer = Checkpointer(self.run_dir / "checkpoints", cfg.checkpoint, config_dict=to_dict(cfg),
                                         meta={**self.world.meta, "data": self.records.summary()})
        steps = sorted(self.checkpointer.all_steps(), reverse=True)
        if steps and not cfg.checkpoint.resume:
            raise ConfigError(f"{self.checkpointer.directory} already has checkpoints (steps {sorted(steps)}) and "
                              "checkpoint.resume is false: use a new run_dir (or delete them)")
        self.state, self.restored_step = None, None
        for step in steps if cfg.checkpoint.resume else []:
            try:
                meta = self.checkpointer.check_compatible(step)
                pipe = None if self._check_records(step, meta.get("data")) else self.pipeline
                self.state = self.checkpointer.restore(step, self.abstract_state, pipe)
                self.restored_step = step
                break
            except CheckpointCorruptError as e:
                moved = self.checkpointer.quarantine(step)
                self.messages.append(f"[train] checkpoint step {step} does not restore ({e}); moved to "
                                     f"{moved or 'the damaged_checkpoints folder'}; trying the previous step")
        if self.state is None:
            if steps and cfg.checkpoint.resume:
                self.messages.append(f"[train] no checkpoint of {sorted(steps)} restored: starting from step 0")
            self.state = self.fresh_state()
        start = int(np.asarray(self.state["step"]))
        if start < cfg.steps:
            self.compile()
        else:  # a finished run (e.g. re-run by the toy pipeline): nothing to compile
            self.compile_seconds, self.step_flops = 0.0, None
        return start

    def run(self) -> dict:
        import jax

        from .logging import MetricsLogger

        cfg = self.cfg
        logger = None
        stop = _StopFlag()
        self._step = 0
        try:
            start = self.setup()
            self._step = start
            logger = MetricsLogger(self.run_dir, cfg.logging, total_steps=cfg.steps, start_step=start,
                                   primary=self.primary)
            if self.primary:
                self.run_dir.mkdir(parents=True, exist_ok=True)
                (self.run_dir / "config.yaml").write_text(_yaml(cfg))
                (self.run_dir / "sharding.json").write_text(json.dumps(self.sharding_summary(), indent=1))
                for line in self.messages:
                    logger.write(line)
                logger.write(f"[train] {cfg.name}: mesh {dict(self.mesh.shape)} on {jax.device_count()} devices / "
                             f"{jax.process_count()} processes; {_count(self.world.params):,} trainable, "
                             f"{_count(self.world.frozen):,} frozen parameters; compile {self.compile_seconds:.1f}s"
                             + (f"; resumed at step {start}" if self.restored_step is not None else ""))
            stop.install()
            status = self._loop(start, logger, stop)
        except UserError:
            self._shutdown(logger, stop, quiet=True)
            raise
        except Exception as e:  # noqa: BLE001
            if is_peer_loss(e):
                raise peer_lost_error(e, step=self._step, last_checkpoint=self._last_checkpoint()) from None
            self._shutdown(logger, stop, quiet=True)
            raise
        self._shutdown(logger, stop, quiet=False)
        return {"status": status, "step": self._step, "start_step": start, "compile_seconds": self.compile_seconds,
                "step_flops": self.step_flops, "nonfinite_steps": self.nonfinite_total}

    def _loop(self, start: int, logger, stop: "_StopFlag") -> str:
        """Steps ``start .. cfg.steps`` (see :meth:`run`); returns ``finished`` or ``preempted``."""
        from . import samples as SMP

        cfg, ckpt = self.cfg, self.cfg.checkpoint
        status = "finished"
        window: list[float] = []
        step = start
        self._last_saved = self.restored_step
        self._finite_step = start  # newest step known to be finite (the restored state is)
        self.nonfinite_total, self._nonfinite_run = 0, 0
        save_pending = False
        last_log_time, last_log_step = time.perf_counter(), start
        unchecked = None  # (step, metrics) dispatched but not yet checked for non-finite values
        while step < cfg.steps:
            batch = self.next_batch()
            self.state, metrics = self.compiled(self.state, self.frozen, batch)
            step = self._step = step + 1
            logger.advance()
            if unchecked is not None:  # one step behind: the device keeps one step in flight
                self._check_finite(*unchecked, logger)
            unchecked = (step, metrics)
            log_now = step % cfg.logging.every == 0 or step == cfg.steps
            save_now = ckpt.every > 0 and step % ckpt.every == 0
            if log_now or save_now or save_pending:
                unchecked = None
                host = {k: float(np.asarray(v)) for k, v in metrics.items()}
                if log_now:  # logged before the check below, which may stop the run
                    now = time.perf_counter()
                    dt = (now - last_log_time) / max(1, step - last_log_step)
                    host["step_time_s"] = dt
                    host["images_per_s"] = cfg.data.global_batch_size / dt if dt > 0 else float("nan")
                    if self.step_flops is not None and dt > 0:
                        host["tflops_per_s"] = self.step_flops / dt / 1e12
                    host["nonfinite_steps"] = float(self.nonfinite_total + (host["nonfinite"] > 0))
                    logger.log(step, host)
                    last_log_time, last_log_step = time.perf_counter(), step
                self._check_finite(step, metrics, logger)
                if self._finite_step == step:
                    window.append(host["loss"])
                if save_now or save_pending:
                    # Only a step whose loss and gradient norm are finite is saved (a checkpoint never holds a
                    # diverged state); a save due at a non-finite step waits for the next finite one.
                    save_pending = self._finite_step != step
                    if not save_pending:
                        self.checkpointer.save(step, self.state, self.pipeline,
                                               metrics={"loss": float(np.mean(window))} if window else None)
                        self._last_saved = step
                        window = []
            if cfg.sample.every > 0 and step % cfg.sample.every == 0:
                SMP.write_sample_grid(self, step, logger)
            if _agree(stop.signal is not None):
                status = "preempted"
                break
        if unchecked is not None:
            self._check_finite(*unchecked, logger)
        if self._last_saved != step:
            if self._finite_step == step:
                self.checkpointer.save(step, self.state, self.pipeline, force=True)
                self._last_saved = step
            else:
                logger.write(f"[train] step {step} was not finite: no checkpoint written for it "
                             f"({_last_ckpt_text(self._last_checkpoint())})")
        self.checkpointer.wait()
        if status == "preempted":
            logger.write(f"[train] signal {stop.signal}: saved checkpoint at step {self._last_saved}; exiting")
        return status

    def _check_finite(self, step: int, metrics: Mapping[str, Any], logger) -> None:
        """Count a step whose loss / gradient norm was not finite (the step skipped its update); stop the run
        after ``optim.max_nonfinite_steps`` in a row."""
        if getattr(self, "_checked", None) == step:
            return
        self._checked = step
        if float(np.asarray(metrics["nonfinite"])) == 0.0:
            self._finite_step = step
            self._nonfinite_run = 0
            return
        self.nonfinite_total += 1
        self._nonfinite_run += 1
        loss, gnorm = float(np.asarray(metrics["loss"])), float(np.asarray(metrics["grad_norm"]))
        limit = self.cfg.optim.max_nonfinite_steps
        logger.write(f"[train] step {step}: loss {loss}, grad_norm {gnorm}: update skipped ({self._nonfinite_run} in a "
                     f"row, {self.nonfinite_total} in this run; limit {limit})")
        if self._nonfinite_run > limit:
            first = step - self._nonfinite_run + 1
            raise DivergenceError(
                f"training diverged: {self._nonfinite_run} steps in a row ({first}..{step}) had a non-finite loss or "
                f"gradient norm (last: loss {loss}, grad_norm {gnorm}); their updates were skipped and no checkpoint "
                f"was written from them ({_last_ckpt_text(self._last_checkpoint())}). Lower optim.lr or "
                "raise optim.warmup_steps / optim.grad_clip_norm, then run again (optim.max_nonfinite_steps sets the "
                "limit)")

    def _last_checkpoint(self) -> int | None:
        saved = getattr(self, "_last_saved", None)
        return saved if saved is not None else getattr(self, "restored_step", None)

    def _shutdown(self, logger, stop: "_StopFlag", *, quiet: bool) -> None:
        """Restore signal handlers, close the logger, the checkpointer (waiting for its last save) and the
        pipeline. ``quiet``: an error is already on its way out, do not raise another."""
        stop.restore()
        if logger is not None:
            logger.close()
        try:
            if self.checkpointer is not None:
                self.checkpointer.close(quiet=quiet)
        finally:
            if self.pipeline is not None:
                self.pipeline.close()


def run(cfg: TrainConfig) -> dict:
    """Initialise JAX distributed (if configured) and train; returns :meth:`Trainer.run`'s result."""
    init_distributed(cfg.distributed)
    return Trainer(cfg).run()


# ------------------------------------------------------------------------------------------- helpers
def _peek_checkpoint(directory: Path) -> tuple[int, dict | None] | None:
    """``(step, meta["data"])`` of the newest checkpoint step whose ``meta`` reads (no manager, no state
    restored: this runs before the model is built), or None."""
    import orbax.checkpoint as ocp

    steps = sorted((int(p.name) for p in directory.iterdir() if p.name.isdigit() and p.is_dir()), reverse=True) \
        if directory.is_dir() else []
    for step in steps:
        try:
            with ocp.Checkpointer(ocp.JsonCheckpointHandler()) as ck:
                meta = ck.restore((directory / str(step) / "meta").absolute())
        except Exception:  # noqa: BLE001 - a damaged step: setup() moves it aside and tries the next
            continue
        return step, (meta.get("data") if isinstance(meta, Mapping) else None)
    return None


def _last_ckpt_text(step: int | None) -> str:
    return f"the last checkpoint is step {step}" if step is not None else "no checkpoint was written yet"


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
