"""Supervision of a multi-process training process: a lost peer is one line, not a C++ abort.

When another process of a ``jax.distributed`` run dies, the JAX runtime of every survivor may terminate its
own process from a C++ thread (``LOG(FATAL)`` "Terminating process because the JAX distributed service
detected fatal errors", then ``abort()`` with a stack dump): at once when the coordinator (process 0) is
gone, after ``distributed.heartbeat_timeout_s`` when a peer stops sending heartbeats. Python never sees it.

:func:`supervise` therefore runs the training in a forked child whose stderr goes through this process:
ordinary output is passed through unchanged (byte for byte, progress bars included); from the first line of
the runtime's fatal report on, the child's stderr is kept in a log file instead, and when the child has died
this process prints one line ``error: lost contact with another process ...`` and exits with status 2.
SIGTERM / SIGINT sent to this process are forwarded to the child (which saves a checkpoint and stops);
if this process is killed, the child is killed with it (``PR_SET_PDEATHSIG``).

Only multi-process runs are supervised (``--num-processes > 1`` or ``distributed.auto``); ``--debug`` runs
unsupervised with the raw runtime output.
"""

from __future__ import annotations

import ctypes
import os
import re
import signal
import sys
import tempfile
import traceback
from typing import Callable

from facecrafter_jax.errors import EXIT_USER_ERROR, one_line

__all__ = ["supervise", "RUNTIME_FATAL_MARKERS"]

RUNTIME_FATAL_MARKERS = (
    b"Terminating process because the JAX distributed service",
    b"Polled an error from coordination service",
    b"coordination_service_agent.cc",
    b"coordination_service.cc",
    b"*** Check failure stack trace",
    b"client.h:",
)
"""Bytes that start the JAX runtime's report of a lost peer (absl log lines of the coordination service)."""

_ABSL_PREFIX = re.compile(rb"^[IWEF]\d{4} \d\d:\d\d:\d\d")
_PR_SET_PDEATHSIG = 1


def _die_with_parent(parent: int) -> None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the child may outlive a killed supervisor
        pass
    if os.getppid() != parent:  # the supervisor died before prctl took effect
        os._exit(EXIT_USER_ERROR)


def _reason(text: bytes) -> str:
    if re.search(rb"heartbeat timeout|stopped sending heartbeats", text):
        tasks = sorted(set(re.findall(rb"Task (\d+) heartbeat timeout", text)))
        who = f"process {', '.join(t.decode() for t in tasks)}" if tasks else "a peer"
        return f"{who} sent no heartbeat within distributed.heartbeat_timeout_s"
    if re.search(rb"coordination service|leader task", text) and re.search(rb"UNAVAILABLE|Failed to send RPC", text):
        return "the coordinator (process 0) is gone"
    m = re.search(rb"(?:Connection (?:closed|reset)|Socket closed|DEADLINE_EXCEEDED)[^\n.]{0,80}", text)
    return one_line(m.group(0).decode("utf-8", "replace")) if m else "the coordination service reported a failed task"


def supervise(fn: Callable[[], int]) -> int:
    """Run ``fn()`` in a forked child (see the module docstring); returns the exit status to use."""
    parent = os.getpid()
    sys.stdout.flush()
    sys.stderr.flush()
    read_fd, write_fd = os.pipe()
    child = os.fork()
    if child == 0:  # ---------------------------------------------------------------------------- child
        try:
            os.close(read_fd)
            os.dup2(write_fd, 2)
            os.close(write_fd)
            _die_with_parent(parent)
            code = int(fn() or 0)
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        except BaseException:  # noqa: BLE001 - a real bug: its traceback, as unsupervised
            traceback.print_exc()
            code = 1
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)

    # ------------------------------------------------------------------------------------------- parent
    os.close(write_fd)

    def forward(signum, frame):
        try:
            os.kill(child, signum)
        except ProcessLookupError:
            pass

    old = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    out = sys.stderr.buffer if hasattr(sys.stderr, "buffer") else None
    held = b""          # an unfinished absl log line (decided once complete)
    fatal = b""         # the runtime's report, kept instead of shown
    child_error = False
    try:
        while True:
            try:
                chunk = os.read(read_fd, 65536)
            except InterruptedError:
                continue
            if not chunk:
                break
            if fatal:
                fatal += chunk
                continue
            data = held + chunk
            held = b""
            shown = bytearray()
            offset = 0
            for line in data.splitlines(keepends=True):
                start, offset = offset, offset + len(line)
                if any(m in line for m in RUNTIME_FATAL_MARKERS):
                    fatal = data[start:]  # from here on the runtime's report goes to the log file
                    break
                if not line.endswith((b"\n", b"\r")) and _ABSL_PREFIX.match(line):
                    held = line  # an unfinished log line: decide when it is complete
                    continue
                child_error |= line.startswith(b"error: ")
                shown += line
            if shown and out is not None:
                out.write(bytes(shown))
                out.flush()
        if held and not fatal and out is not None:
            out.write(held)
            out.flush()
        _, status = os.waitpid(child, 0)
    finally:
        os.close(read_fd)
        for s, h in old.items():
            signal.signal(s, h)
    code = os.waitstatus_to_exitcode(status)
    if not fatal:
        return code if code >= 0 else 128 - code
    log = tempfile.NamedTemporaryFile("wb", prefix="facecrafter-runtime-", suffix=".log", delete=False)
    with log:
        log.write(fatal)
    if not child_error and code != 0:
        sys.stderr.write(f"error: lost contact with another process of this multi-process run: the JAX distributed "
                         f"runtime stopped this process ({_reason(fatal)}). A peer died, was preempted or stopped "
                         f"answering: restart all processes with the same command to resume from the last checkpoint "
                         f"(runtime log: {log.name})\n")
        sys.stderr.flush()
        return EXIT_USER_ERROR
    return code if code >= 0 else 128 - code
