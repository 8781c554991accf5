"""Helpers to launch ``train.py`` in subprocesses (tests, benchmarks): fake CPU devices, several
processes on localhost, killing at a given step.

Every launch runs ``python train.py --config <config> key=value ...`` from the repository root with
``JAX_PLATFORMS=cpu``, ``XLA_FLAGS=--xla_force_host_platform_device_count=N`` and, when given, a shared
persistent compilation cache (identical programs compile once per test session).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

REPO = Path(__file__).resolve().parents[2]
FAST_COMPILE_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
"""XLA CPU flags that halve compile time of the tiny test model (same numerics in every run that uses them)."""

__all__ = ["REPO", "FAST_COMPILE_FLAGS", "train_env", "train_command", "run_train", "start_train", "wait_for_step",
           "free_port", "run_multiprocess", "session_cache_dir"]


def train_env(devices: int = 1, cache_dir: str | os.PathLike | None = None, fast_compile: bool = True,
              extra: dict | None = None) -> dict:
    env = dict(os.environ)
    flags = [f"--xla_force_host_platform_device_count={devices}"]
    if fast_compile:
        flags.append(FAST_COMPILE_FLAGS)
    env["XLA_FLAGS"] = " ".join(flags)
    env["JAX_PLATFORMS"] = "cpu"
    env.pop("FACECRAFTER_COORDINATOR", None)
    if cache_dir is not None:
        env["JAX_COMPILATION_CACHE_DIR"] = str(cache_dir)
        env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    env.update(extra or {})
    return env


def train_command(config: str | os.PathLike, overrides: Sequence[str]) -> list[str]:
    return [sys.executable, str(REPO / "train.py"), "--config", str(config), *overrides]


def run_train(config, overrides: Sequence[str], *, devices: int = 1, cache_dir=None, timeout: float = 600,
              check: bool = True, fast_compile: bool = True) -> subprocess.CompletedProcess:
    """Run one training process to completion; raises with its output if it fails (``check``)."""
    r = subprocess.run(train_command(config, overrides), cwd=REPO, env=train_env(devices, cache_dir, fast_compile),
                       capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise RuntimeError(f"train.py failed ({r.returncode}):\n{r.stdout[-4000:]}\n{r.stderr[-8000:]}")
    return r


def start_train(config, overrides: Sequence[str], *, devices: int = 1, cache_dir=None, log_path=None,
                extra_env: dict | None = None) -> subprocess.Popen:
    out = open(log_path, "w") if log_path is not None else subprocess.DEVNULL
    return subprocess.Popen(train_command(config, overrides), cwd=REPO, env=train_env(devices, cache_dir, extra=extra_env),
                            stdout=out, stderr=subprocess.STDOUT)


def wait_for_step(proc: subprocess.Popen, run_dir, step: int, timeout: float = 600) -> None:
    """Block until ``metrics.jsonl`` of ``run_dir`` holds ``step`` lines (or the process ends / times out)."""
    path = Path(run_dir) / "metrics.jsonl"
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if path.exists() and len([l for l in path.read_text().splitlines() if l.strip()]) >= step:
            return
        if proc.poll() is not None:
            raise RuntimeError(f"training process exited with {proc.returncode} before step {step}")
        time.sleep(0.05)
    raise TimeoutError(f"step {step} not reached in {timeout}s")


def session_cache_dir(tmp_path_factory) -> Path:
    """A persistent compilation cache shared by every test module of one pytest session, pytest-xdist workers
    included (their base temp folders share a parent): a program compiled by one module is reused by the others."""
    base = Path(tmp_path_factory.getbasetemp())
    path = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "jax_compilation_cache"
    path.mkdir(parents=True, exist_ok=True)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_multiprocess(config, overrides: Sequence[str], *, num_processes: int, devices_per_process: int,
                     cache_dir=None, timeout: float = 600, log_dir=None) -> list[int]:
    """Run ``num_processes`` cooperating processes on localhost (jax.distributed); returns exit codes."""
    port = free_port()
    procs = []
    for i in range(num_processes):
        args = list(overrides) + ["--coordinator", f"127.0.0.1:{port}", "--num-processes", str(num_processes),
                                  "--process-id", str(i)]
        log = Path(log_dir) / f"process_{i}.log" if log_dir is not None else None
        procs.append(start_train(config, args, devices=devices_per_process, cache_dir=cache_dir, log_path=log))
    codes = []
    t0 = time.monotonic()
    try:
        for p in procs:
            codes.append(p.wait(timeout=max(1.0, timeout - (time.monotonic() - t0))))
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGKILL)
                p.wait()
    return codes
