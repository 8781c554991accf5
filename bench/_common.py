"""Shared helpers for the benchmarks: timing, peak-memory sampling, thread setup and markdown tables.

Memory method (used by every bench that reports "peak MB"): :class:`PeakRSS` samples the process
resident set size (``/proc/self/statm``) from a background thread every ``interval`` seconds while a
call runs, after asking glibc to return freed heap pages (``malloc_trim(0)``); the reported number is
``max(RSS during the call) - RSS just before the call``, i.e. the extra memory the call needed on top of
what was already resident (weights, inputs, allocator caches). It works the same way for JAX and
PyTorch CPU, but it is a lower bound when an allocator reuses memory it already holds (XLA's
preallocated buffers, PyTorch's cached blocks), so JAX benches also report XLA's own buffer plan
(``compiled.memory_analysis()``), which is exact for the compiled program.
"""

from __future__ import annotations

import ctypes
import os
import statistics
import threading
import time
from typing import Callable, Sequence

__all__ = ["rss_bytes", "malloc_trim", "PeakRSS", "time_call", "interleaved_timings", "markdown_table", "mb",
           "available_bytes", "median", "CLOCKS", "load_average", "pin_to_one_cpu", "prepare_process", "run_pinned_child"]

_PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_bytes() -> int:
    """Resident set size of this process in bytes (Linux ``/proc/self/statm``)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


def available_bytes() -> int:
    """Memory the kernel reports as available to new allocations (``MemAvailable`` in ``/proc/meminfo``)."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("MemAvailable not found in /proc/meminfo")


def malloc_trim() -> None:
    """Return free glibc heap memory to the OS so that RSS deltas measure what a call really needs."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # pragma: no cover - not glibc
        pass


def mb(nbytes: float) -> float:
    return nbytes / 2**20


class PeakRSS:
    """Context manager: ``with PeakRSS() as p: f()`` then ``p.delta`` = peak RSS during ``f`` minus RSS before."""

    def __init__(self, interval: float = 0.002):
        self.interval = interval
        self.base = self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(self.interval)

    def __enter__(self):
        malloc_trim()
        self.base = self.peak = rss_bytes()
        self._stop.clear()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self.peak = max(self.peak, rss_bytes())
        self._stop.set()
        self._thread.join()
        return False

    @property
    def delta(self) -> int:
        return self.peak - self.base


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def time_call(fn: Callable[[], object], clock: str = "wall") -> float:
    """Seconds of ``fn()`` (``fn`` must block until its result is ready).

    ``clock="wall"``: elapsed time. ``clock="cpu"``: CPU time of the whole process (all threads), which
    other processes' load barely affects; compare frameworks this way only single-threaded, since idle
    worker threads that spin-wait count as busy.
    """
    now = CLOCKS[clock]
    t0 = now()
    fn()
    return now() - t0


def interleaved_timings(fns: dict[str, Callable[[], object]], repeats: int, clock: str = "wall") -> dict[str, list[float]]:
    """Time every function ``repeats`` times, interleaved (A B A B ...), so background load hits all alike.

    The order alternates between rounds (A B, B A, ...) to cancel systematic first/second effects.
    Returns ``name -> list of seconds``; take the median.
    """
    names = list(fns)
    out: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        for n in (names if r % 2 == 0 else names[::-1]):
            out[n].append(time_call(fns[n], clock))
    return out


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub-flavoured markdown table (values are ``str()``-ed)."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def load_average() -> str:
    """``os.getloadavg()`` as ``"1.2 / 0.9 / 0.7"`` (1, 5, 15 minutes): print it beside every timing."""
    return " / ".join(f"{v:.1f}" for v in os.getloadavg())


def pin_to_one_cpu() -> int:
    """Restrict this process to one CPU (the lowest it may use) before JAX / PyTorch start their thread pools.

    XLA:CPU sizes its intra-op pool from the CPU affinity, so both frameworks then run single-threaded
    and ``time.process_time()`` is a load-robust measure (no spin-waiting threads). Returns the CPU.
    """
    cpu = min(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cpu})
    os.environ["OMP_NUM_THREADS"] = "1"
    return cpu


def prepare_process(argv: Sequence[str]) -> None:
    """What every bench does before JAX / PyTorch start their thread pools: pin to one CPU when ``--pin`` is in
    ``argv``, and make OpenMP's worker threads sleep at once after each parallel region (Intel OpenMP spins for
    200 ms by default, stealing the cores from XLA's thread pool when two frameworks interleave in one process;
    an explicit environment setting wins)."""
    if "--pin" in argv:
        pin_to_one_cpu()
    os.environ.setdefault("KMP_BLOCKTIME", "0")
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def run_pinned_child(script: str, argv: Sequence[str], json_path: str) -> list[dict]:
    """Run ``python script argv --clock cpu --pin --json json_path`` (one CPU, CPU time) and return its rows.

    Used by the benches' ``--clock both`` so one command gives the all-core wall-clock table and the
    single-thread CPU-time table (each measured interleaved within its own process). The child's output
    streams through, so its progress lines show.
    """
    import json
    import subprocess
    import sys

    cmd = [sys.executable, script, *argv, "--clock", "cpu", "--pin", "--json", json_path]
    r = subprocess.run(cmd)
    if r.returncode != 0:
        raise RuntimeError(f"single-thread run failed (exit {r.returncode}): {' '.join(cmd)}")
    with open(json_path) as f:
        return json.load(f)
