"""Multi-host runs: ``jax.distributed`` initialisation and what happens when a peer process is lost.

A run of N processes stops being useful the moment one of them dies (preemption, a lost host, OOM): the
survivors would wait in the next collective. Two mechanisms bound that wait:

* **Collective failure (immediate).** When a peer's process ends, its sockets close and the next
  cross-process collective of every survivor fails at once (gloo on CPU; NCCL / ICI report similarly).
  The trainer turns that exception into :class:`~facecrafter_jax.errors.PeerLostError` (one line, exit 2).
  The process then leaves with ``os._exit``: JAX's exit handlers would wait at a shutdown barrier for the
  dead peer and abort.
* **Heartbeat timeout (bounded).** A peer that vanishes without closing its sockets (host power loss,
  a frozen process) stops sending heartbeats to the coordination service; after
  ``distributed.heartbeat_timeout_s`` the service declares it dead and the JAX runtime terminates every
  survivor itself (a C++ abort). The supervisor of :mod:`facecrafter_jax.train.supervise` reports that as
  the same one line. Losing the coordinator (process 0) is noticed by the others at once the same way.

Restarting every process with the same command resumes from the last checkpoint.
"""

from __future__ import annotations

import os
import re

from facecrafter_jax.errors import ConfigError, PeerLostError

from .config import DistributedConfig

__all__ = ["init_distributed", "distributed_settings", "is_peer_loss", "peer_lost_error", "PEER_LOSS_MARKERS"]

PEER_LOSS_MARKERS = (
    "Connection closed by peer", "Connection reset by peer", "Broken pipe", "Gloo", "gloo",
    "heartbeat", "UNAVAILABLE", "DEADLINE_EXCEEDED", "coordination service", "Barrier timed out",
    "failed to connect", "Socket closed", "NCCL", "unhealthy",
)
"""Substrings of runtime errors that mean another process of the run is gone (collectives, barriers)."""


def distributed_settings(cfg: DistributedConfig) -> tuple[str | None, int | None, int | None]:
    """``(coordinator, num_processes, process_id)`` from the config, else the ``FACECRAFTER_*`` variables."""
    addr = cfg.coordinator_address or os.environ.get("FACECRAFTER_COORDINATOR")
    num = cfg.num_processes if cfg.num_processes is not None else os.environ.get("FACECRAFTER_NUM_PROCESSES")
    pid = cfg.process_id if cfg.process_id is not None else os.environ.get("FACECRAFTER_PROCESS_ID")
    try:
        num = int(num) if num is not None else None
        pid = int(pid) if pid is not None else None
    except ValueError:
        raise ConfigError(f"FACECRAFTER_NUM_PROCESSES / FACECRAFTER_PROCESS_ID must be integers, got {num!r}, "
                          f"{pid!r}") from None
    return addr, num, pid


def init_distributed(cfg: DistributedConfig) -> None:
    """``jax.distributed.initialize`` from the config, else from ``FACECRAFTER_COORDINATOR`` /
    ``FACECRAFTER_NUM_PROCESSES`` / ``FACECRAFTER_PROCESS_ID``; nothing for a single process.
    Must run before anything touches the JAX backend."""
    import jax

    addr, num, pid = distributed_settings(cfg)
    timeouts = dict(heartbeat_timeout_seconds=int(cfg.heartbeat_timeout_s),
                    initialization_timeout=int(cfg.init_timeout_s))
    if addr is None and num is None and pid is None:
        if cfg.auto:
            _initialize(jax, timeouts)
        return
    if num is None or pid is None or addr is None:
        raise ConfigError("distributed training needs coordinator_address, num_processes and process_id "
                          f"(got {addr!r}, {num!r}, {pid!r}); set distributed.* or the FACECRAFTER_* variables")
    if num == 1:
        return
    if not 0 <= pid < num:
        raise ConfigError(f"config key 'distributed.process_id' = {pid} not in [0, {num})")
    _initialize(jax, dict(coordinator_address=addr, num_processes=num, process_id=pid, **timeouts))


def _initialize(jax, kwargs) -> None:
    try:
        jax.distributed.initialize(**kwargs)
    except Exception as e:  # noqa: BLE001 - the runtime raises several types for an unreachable coordinator
        text = " ".join(str(e).split())[:300]
        raise PeerLostError(f"could not start the multi-process run ({kwargs.get('coordinator_address', 'auto')}, "
                            f"process {kwargs.get('process_id')} of {kwargs.get('num_processes')}): {text}. Start every "
                            "process with the same --coordinator within distributed.init_timeout_s") from None


def is_peer_loss(e: BaseException) -> bool:
    """Whether exception ``e`` (from a step, a collective or a checkpoint barrier of a multi-process run) means
    that another process is gone."""
    import jax

    if jax.process_count() <= 1:
        return False
    text = f"{type(e).__name__}: {e}"
    return any(m in text for m in PEER_LOSS_MARKERS)


def peer_lost_error(e: BaseException, *, step: int, last_checkpoint: int | None) -> PeerLostError:
    import jax

    reason = " ".join(str(e).split())
    reason = re.sub(r"\[[^\]]*\.(?:cc|h):\d+\]\s*", "", reason)  # C++ source locations of the runtime
    reason = re.sub(r"\s*\[[\d.:]+\]:\d+", "", reason)  # peer socket addresses
    reason = (reason[:240] + "...") if len(reason) > 240 else reason
    resume = f"from the last checkpoint (step {last_checkpoint})" if last_checkpoint is not None else "from scratch"
    return PeerLostError(f"lost contact with another process of this {jax.process_count()}-process run at step {step} "
                         f"(this is process {jax.process_index()}): {reason}. A peer died or was preempted: restart "
                         f"all processes with the same command to resume {resume}")
