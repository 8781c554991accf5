"""Training checkpoints: orbax ``CheckpointManager`` under ``<run_dir>/checkpoints/<step>/``.

Each step folder holds four items of one ``ocp.args.Composite``:

``state``     the train state pytree: ``step``, trainable adapter ``params`` (flat ``{dotted path: array}``),
              optimiser state, ``ema`` (empty when off) and the ``rng`` key data (StandardSave, sharded
              arrays; restored directly into the current mesh's shardings, so a run may resume on another
              mesh shape).
``data_iter`` the grain pipeline position, one JSON per process (:func:`facecrafter_jax.data.iterator_save_args`).
``config``    the resolved training config (JSON).
``meta``      format version, parameter names and shapes of the trainable state, the frozen-base summary.

Saves are asynchronous (``checkpoint.async_save``); a killed process leaves at most an uncommitted
temporary folder, which orbax ignores and removes. Retention: the last ``keep_last`` steps plus the
``keep_best`` best by ``best_metric`` (orbax ``LatestN`` + ``BestN`` preservation policies); older steps
are removed only after a newer save committed, so a save that fails (disk full, read-only directory)
leaves every earlier checkpoint intact and is a :class:`CheckpointSaveError` naming the step, the reason
and the steps that remain.

On resume the checkpoint's ``meta`` and ``config`` are compared with the current run first:
a different architecture (parameter names / shapes), or a change of a setting that changes the
optimisation (``model``, ``loss``, ``optim``, ``conditioning``, ``seed``, data order) is a
:class:`CheckpointMismatchError` listing the differences; an unreadable step is a
:class:`CheckpointCorruptError`, which the trainer answers by moving the step aside
(:meth:`Checkpointer.quarantine`, into ``<run_dir>/damaged_checkpoints``) and resuming from the newest
older step that restores.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Any, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp

from facecrafter_jax.errors import CheckpointError, CheckpointNotFoundError

from .config import CheckpointConfig

__all__ = ["FORMAT_VERSION", "CheckpointError", "CheckpointMismatchError", "CheckpointCorruptError",
           "CheckpointSaveError", "Checkpointer", "RESUME_KEYS", "config_differences", "load_trained_params",
           "find_step_dir", "DAMAGED_DIR"]

DAMAGED_DIR = "damaged_checkpoints"
"""Folder (beside ``checkpoints``) that receives step folders that failed to restore."""

FORMAT_VERSION = 1
RESUME_KEYS = ("seed", "stage", "model", "loss", "optim", "conditioning", "data.global_batch_size", "data.seed",
               "data.synthetic")
"""Config sections / keys that must not change when a run resumes (dotted prefixes)."""
_IGNORED_ON_RESUME = ("model.pretrained", "model.init_from",  # paths may move; checked by meta instead
                      "optim.max_nonfinite_steps")  # a stopping rule, not part of the optimisation


class CheckpointMismatchError(CheckpointError):
    """The checkpoint belongs to a different architecture or configuration."""


class CheckpointCorruptError(CheckpointError):
    """The checkpoint cannot be read (missing or damaged files)."""


class CheckpointSaveError(CheckpointError):
    """A checkpoint could not be written (disk full, read-only or vanished directory); earlier ones are intact."""


_OS_REASONS = ("No space left on device", "File too large", "Read-only file system", "Permission denied",
               "Disk quota exceeded", "No such file or directory", "Input/output error")


def _short_reason(e: BaseException) -> str:
    text = f"{type(e).__name__}: {e}"
    for reason in _OS_REASONS:
        if reason in text:
            m = re.search(r'(?:to|writing:?|file) "?(/[^"\s:]+)', text)
            return f"{reason}" + (f" ({m.group(1)})" if m else "")
    return " ".join(text.split())[:300]


class _QuietOrbaxThreads(logging.Filter):
    """orbax logs failed background saves with a traceback before the error reaches us; keep only the line."""

    def filter(self, record: logging.LogRecord) -> bool:
        if "orbax" in (record.pathname or "") and record.levelno >= logging.ERROR:
            record.msg = " ".join(record.getMessage().split())[:500]
            record.args = None
            record.exc_info = None
            record.exc_text = None
        return True


_QUIET = _QuietOrbaxThreads()


class _QuietAsyncioEchoes(logging.Filter):
    """After a failed save, asyncio may also report orbax's unretrieved write futures ("... exception was never
    retrieved", with a traceback each) when they are garbage-collected; the failure itself is reported once as a
    :class:`CheckpointSaveError`. Drop exactly these echoes (a write failure with an OS reason); keep the rest."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        text = record.getMessage() + (f" {exc}" if exc is not None else "")
        return not ("never retrieved" in text and any(r in text for r in _OS_REASONS))


_QUIET_ASYNCIO = _QuietAsyncioEchoes()


class _QuietItemMetadataWarning(logging.Filter):
    """Reading one item of a checkpoint (``<step>/state``) directly makes orbax warn on the ``absl`` logger that
    the item folder has no ``_CHECKPOINT_METADATA``: that file sits one level up, in the step folder, where the
    checkpoint manager wrote it. Drop exactly that warning for ``step_dir``; keep everything else."""

    def __init__(self, step_dir: str | os.PathLike):
        super().__init__()
        self.step_dir = str(step_dir)

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not (msg.startswith("Metadata file does not exist") and self.step_dir in msg)


def _is_closed_loop_noise(exc: BaseException | None) -> bool:
    return isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed"


def _install_closed_loop_filter() -> None:
    """After a failed asynchronous save, tensorstore's write callbacks still try to reach orbax's (closed)
    asyncio loop from C++ threads, and each prints ``RuntimeError: Event loop is closed`` with a traceback.
    The failure itself is reported as a :class:`CheckpointSaveError`; drop exactly this echo (any other
    exception still reaches the previous hooks)."""
    if getattr(sys.excepthook, "_facecrafter", False):
        return
    prev_except, prev_unraisable = sys.excepthook, sys.unraisablehook

    def excepthook(tp, value, tb):
        if not _is_closed_loop_noise(value):
            prev_except(tp, value, tb)

    def unraisablehook(unraisable):
        if not _is_closed_loop_noise(unraisable.exc_value):
            prev_unraisable(unraisable)

    excepthook._facecrafter = True
    sys.excepthook, sys.unraisablehook = excepthook, unraisablehook

def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, Mapping):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out if out or not prefix else {prefix: {}}
    return {prefix: d}


def config_differences(saved: Mapping[str, Any], current: Mapping[str, Any], keys=RESUME_KEYS) -> list[str]:
    """Dotted keys under ``keys`` whose values differ between two config dicts (``to_dict`` form)."""
    a, b = _flatten(saved), _flatten(current)
    diffs = []
    for k in sorted(set(a) | set(b)):
        if not any(k == p or k.startswith(p + ".") for p in keys):
            continue
        if any(k == p or k.startswith(p + ".") for p in _IGNORED_ON_RESUME):
            continue
        if a.get(k, "<absent>") != b.get(k, "<absent>"):
            diffs.append(f"{k}: checkpoint {a.get(k, '<absent>')!r}, now {b.get(k, '<absent>')!r}")
    return diffs


def _meta_differences(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    diffs = []
    if saved.get("format_version") != current.get("format_version"):
        diffs.append(f"format_version: checkpoint {saved.get('format_version')!r}, this code {current.get('format_version')!r}")
    sp, cp = saved.get("params", {}), current.get("params", {})
    missing = sorted(set(cp) - set(sp))
    extra = sorted(set(sp) - set(cp))
    if missing:
        diffs.append(f"{len(missing)} trainable parameter(s) not in the checkpoint, e.g. {missing[:3]}")
    if extra:
        diffs.append(f"{len(extra)} checkpoint parameter(s) not in this model, e.g. {extra[:3]}")
    for k in sorted(set(sp) & set(cp)):
        if list(sp[k]) != list(cp[k]):
            diffs.append(f"parameter {k}: checkpoint shape {tuple(sp[k])}, model shape {tuple(cp[k])}")
    if saved.get("base") != current.get("base"):
        diffs.append(f"frozen base: checkpoint {saved.get('base')!r}, now {current.get('base')!r}")
    return diffs


class Checkpointer:
    """The run's ``CheckpointManager`` plus the consistency checks (see the module docstring).

    Args:
      directory: ``<run_dir>/checkpoints``.
      cfg: the ``checkpoint`` config section.
      config_dict: the resolved run config (``to_dict``), saved with every step and compared on resume.
      meta: ``{"params": {name: shape}, "base": ...}`` of the current model (``format_version`` is added).
    """

    def __init__(self, directory: str | os.PathLike, cfg: CheckpointConfig, *, config_dict: Mapping[str, Any],
                 meta: Mapping[str, Any]):
        from orbax.checkpoint import checkpoint_managers as cm

        self.directory = Path(directory).absolute()
        self.cfg = cfg
        self.config_dict = dict(config_dict)
        self.meta = {"format_version": FORMAT_VERSION, **meta}
        policies = [cm.LatestN(n=max(1, cfg.keep_last))]
        if cfg.keep_best > 0:
            if cfg.best_mode not in ("min", "max"):
                raise ValueError(f"checkpoint.best_mode must be 'min' or 'max', got {cfg.best_mode!r}")
            metric = cfg.best_metric
            policies.append(cm.BestN(get_metric_fn=lambda m: m[metric], reverse=cfg.best_mode == "min",
                                     n=cfg.keep_best, keep_checkpoints_without_metrics=False))
        options = ocp.CheckpointManagerOptions(
            enable_async_checkpointing=cfg.async_save, create=True, cleanup_tmp_directories=True,
            preservation_policy=cm.AnyPreservationPolicy(policies))
        absl_logger = logging.getLogger("absl")
        if _QUIET not in absl_logger.filters:
            absl_logger.addFilter(_QUIET)
        asyncio_logger = logging.getLogger("asyncio")
        if _QUIET_ASYNCIO not in asyncio_logger.filters:
            asyncio_logger.addFilter(_QUIET_ASYNCIO)
        _install_closed_loop_filter()
        try:
            self.manager = ocp.CheckpointManager(self.directory, options=options)
        except OSError as e:
            raise CheckpointSaveError(f"cannot use checkpoint directory {self.directory}: {_short_reason(e)}") from None
        self._pending: int | None = None  # step of an asynchronous save not yet known to be committed

    # ------------------------------------------------------------------------------------------ save
    def save(self, step: int, state: Mapping[str, Any], pipeline=None, *, metrics: Mapping[str, float] | None = None,
             force: bool = False) -> bool:
        """Start saving ``state`` (and the pipeline position) as step ``step``; returns whether it saved."""
        from facecrafter_jax.data import iterator_save_args

        items = dict(state=ocp.args.StandardSave(dict(state)), config=ocp.args.JsonSave(self.config_dict),
                     meta=ocp.args.JsonSave(self.meta))
        if pipeline is not None:
            items["data_iter"] = iterator_save_args(pipeline)
        if metrics is not None and self.cfg.keep_best > 0 and self.cfg.best_metric not in metrics:
            raise KeyError(f"checkpoint.best_metric {self.cfg.best_metric!r} is not a logged metric "
                           f"(have {sorted(metrics)})")
        clean = None if metrics is None else {k: float(v) for k, v in metrics.items()}
        with self._save_errors(int(step)):
            saved = self.manager.save(int(step), args=ocp.args.Composite(**items), metrics=clean, force=force)
        if saved:
            self._pending = int(step)
        return saved

    def wait(self) -> None:
        """Block until the last save committed; a failure is a :class:`CheckpointSaveError`."""
        with self._save_errors(None):
            self.manager.wait_until_finished()
        self._pending = None

    def close(self, *, quiet: bool = False) -> None:
        """Wait for the last save and release the manager; ``quiet``: swallow a failed save (used while
        another error is already propagating)."""
        error = None
        try:
            self.wait()
        except CheckpointSaveError as e:
            error = e
        try:
            with self._save_errors(None):
                self.manager.close()
        except CheckpointSaveError as e:  # closing after a failed save reports the same failure again
            error = error or e
        if error is not None and not quiet:
            raise error

    def _save_errors(self, step: int | None) -> "_SaveErrors":
        return _SaveErrors(self, step)

    # ------------------------------------------------------------------------------------------ restore
    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def read_json_items(self, step: int) -> tuple[dict, dict]:
        """(config, meta) saved at ``step``."""
        try:
            r = self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore(),
                                                                   meta=ocp.args.JsonRestore()))
        except Exception as e:  # noqa: BLE001 - orbax raises many types for damaged folders
            raise CheckpointCorruptError(f"checkpoint step {step} in {self.directory} is unreadable "
                                         f"(config/meta): {type(e).__name__}: {e}") from e
        if not isinstance(r.config, Mapping) or not isinstance(r.meta, Mapping):
            raise CheckpointCorruptError(f"checkpoint step {step} in {self.directory}: config/meta items are not JSON objects")
        return dict(r.config), dict(r.meta)

    def check_compatible(self, step: int) -> dict:
        """Raise :class:`CheckpointMismatchError` if step ``step`` does not belong to this run's model/config;
        returns the step's ``meta``."""
        config, meta = self.read_json_items(step)
        diffs = _meta_differences(meta, self.meta) + config_differences(config, self.config_dict)
        if diffs:
            raise CheckpointMismatchError(
                f"checkpoint step {step} in {self.directory} does not match this run: " + "; ".join(diffs)
                + ". Use a new run_dir (or checkpoint.resume=false to start over in this one).")
        return meta

    def restore(self, step: int, abstract_state: Mapping[str, Any], pipeline=None) -> dict:
        """Check compatibility, then restore the state (into ``abstract_state``'s shardings) and the
        pipeline position (in place; ``pipeline=None`` leaves the data iterator where it is)."""
        from facecrafter_jax.data import iterator_restore_args
        from facecrafter_jax.data.pipeline import IteratorStateMismatch

        self.check_compatible(step)
        items = dict(state=ocp.args.StandardRestore(dict(abstract_state)))
        if pipeline is not None:
            items["data_iter"] = iterator_restore_args(pipeline)
        try:
            r = self.manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as e:  # noqa: BLE001
            cause = _find_cause(e, IteratorStateMismatch)
            if cause is not None:
                raise CheckpointMismatchError(f"checkpoint step {step} in {self.directory}: the data iterator was "
                                              f"saved by a different input pipeline ({cause}); use the same data "
                                              "settings as the run that wrote it") from None
            raise CheckpointCorruptError(f"checkpoint step {step} in {self.directory} could not be restored "
                                         f"(damaged or incomplete): {_short_reason(e)}") from e
        return dict(r.state)

    def quarantine(self, step: int) -> Path | None:
        """Move step ``step`` out of the checkpoint folder into ``<run_dir>/damaged_checkpoints/<step>[-N]``
        (never deleted); returns the new path (primary process; others wait and return None)."""
        target = None
        if jax.process_index() == 0:
            src = self.directory / str(step)
            base = self.directory.parent / DAMAGED_DIR
            base.mkdir(parents=True, exist_ok=True)
            target = base / str(step)
            n = 1
            while target.exists():
                target = base / f"{step}-{n}"
                n += 1
            if src.exists():
                shutil.move(str(src), str(target))
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"quarantine_{step}")
        self.manager.reload()
        return target


class _SaveErrors:
    """Turns an exception of a (possibly earlier, asynchronous) save into a :class:`CheckpointSaveError` that
    names the failed step, the reason and the steps still on disk."""

    def __init__(self, ck: "Checkpointer", step: int | None):
        self.ck, self.step = ck, step

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc is None or not isinstance(exc, Exception) or isinstance(exc, CheckpointError):
            return False
        ck = self.ck
        failed = ck._pending if ck._pending is not None else self.step
        ck._pending = None
        kept = sorted(int(p.name) for p in ck.directory.iterdir() if p.name.isdigit() and p.is_dir()) \
            if ck.directory.is_dir() else []
        kept = [k for k in kept if k != failed]
        where = f"step {failed}" if failed is not None else "a checkpoint"
        raise CheckpointSaveError(
            f"could not save checkpoint {where} to {ck.directory}: {_short_reason(exc)}. The earlier checkpoints "
            f"are intact (steps {kept if kept else 'none'}): free disk space or fix the directory's permissions, "
            "then run the same command again to resume" + (f" from step {kept[-1]}" if kept else "")) from None


def _find_cause(e: BaseException | None, kind: type) -> BaseException | None:
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, kind):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def find_step_dir(path: str | os.PathLike) -> Path:
    """A run directory, its ``checkpoints`` folder, or one step folder -> the step folder to read
    (the latest committed step)."""
    p = Path(path).resolve()  # orbax reads metadata only through absolute paths
    if (p / "state").is_dir() and (p / "meta").is_dir():
        return p
    if (p / "checkpoints").is_dir():
        p = p / "checkpoints"
    steps = sorted((int(c.name) for c in p.iterdir() if c.name.isdigit() and (c / "state").is_dir()), reverse=True) \
        if p.is_dir() else []
    if not steps:
        raise CheckpointNotFoundError(f"no training checkpoint found at {path}")
    return p / str(steps[0])


def load_trained_params(path: str | os.PathLike, *, prefer_ema: bool = True) -> tuple[dict[str, np.ndarray], dict]:
    """Trainable parameters (``{dotted path: numpy array}``; the EMA copy when the run kept one and
    ``prefer_ema``) and the config of a finished run / checkpoint step (used by ``model.init_from``)."""
    step_dir = find_step_dir(path)
    with ocp.Checkpointer(ocp.JsonCheckpointHandler()) as ck:
        config = ck.restore(step_dir / "config")
    quiet = _QuietItemMetadataWarning(step_dir)
    absl_logger = logging.getLogger("absl")
    absl_logger.addFilter(quiet)
    try:
        with ocp.StandardCheckpointer() as ck:
            tree = ck.metadata(step_dir / "state").item_metadata.tree
            # Restore onto this process's first device whatever mesh wrote it.
            one = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
            abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one), tree)
            state = ck.restore(step_dir / "state", abstract)
    except Exception as e:  # noqa: BLE001
        raise CheckpointCorruptError(f"cannot read trained parameters from {step_dir}: {type(e).__name__}: {e}") from e
    finally:
        absl_logger.removeFilter(quiet)
    want = "ema" if prefer_ema and state.get("ema") else "params"
    return {k: np.asarray(v) for k, v in state[want].items()}, dict(config)
