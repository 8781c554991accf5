"""User-facing errors and the one error path every entry point shares.

An *expected* failure (a bad config, a missing file, damaged data, a checkpoint that cannot be used, a
resource that ran out) raises a :class:`UserError` subclass with a message that names the file, key,
shard or step and says what to do. Entry points run through :func:`run_cli`, which prints such an error
as one line ``error: <message>`` on stderr and returns exit status 2. Anything else is a bug and keeps
its traceback. ``--debug`` (or ``FACECRAFTER_DEBUG=1``) re-raises user errors too, with their traceback.

Usage in an entry point::

    def main(argv=None) -> int:
        return run_cli(_main, argv)          # _main(argv) -> int, raises UserError subclasses
"""

from __future__ import annotations

import os
import sys
from typing import Callable, Sequence

__all__ = ["UserError", "ConfigError", "DataError", "MissingDataError", "CheckpointError", "CheckpointNotFoundError",
           "ResourceError", "PeerLostError", "DivergenceError", "one_line", "run_cli", "EXIT_USER_ERROR"]

EXIT_USER_ERROR = 2


class UserError(Exception):
    """An expected failure caused by the user's input or environment: reported as one line, exit status 2.

    ``hard_exit = True`` (class or instance attribute) makes :func:`run_cli` leave with ``os._exit`` after
    printing the line: for a process whose runtime can no longer shut down cleanly (a JAX distributed client
    that lost a peer aborts in its exit handlers, with a C++ stack dump)."""

    hard_exit = False


class ConfigError(UserError, ValueError):
    """A config file or override is invalid (unknown key, wrong type, bad value, unreadable YAML)."""


class DataError(UserError, ValueError):
    """Input data is missing, damaged or inconsistent (records, shards, images, target files)."""


class MissingDataError(DataError, FileNotFoundError):
    """A data file or folder does not exist (also a ``FileNotFoundError``)."""


class CheckpointError(UserError, RuntimeError):
    """A checkpoint cannot be written, read or used for this run."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """No checkpoint where one is expected (also a ``FileNotFoundError``)."""


class ResourceError(UserError, RuntimeError):
    """A resource ran out or went away (disk, memory, a peer process of a multi-host run)."""


class PeerLostError(ResourceError):
    """Another process of a multi-host run died or stopped answering; the run cannot continue."""

    hard_exit = True


class DivergenceError(UserError, RuntimeError):
    """Training diverged: too many consecutive steps with a non-finite loss or gradient norm."""


def one_line(message: object) -> str:
    """``message`` with every run of whitespace (newlines included) collapsed to one space."""
    return " ".join(str(message).split())


def run_cli(main: Callable[[list[str]], int], argv: Sequence[str] | None = None, *,
            debug_flag: str = "--debug") -> int:
    """Run ``main(argv)`` and turn a :class:`UserError` into ``error: <one line>`` on stderr, exit status 2.

    ``debug_flag`` in ``argv`` is removed before ``main`` sees it and makes user errors re-raise (as does
    the environment variable ``FACECRAFTER_DEBUG=1``). Other exceptions always propagate.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = os.environ.get("FACECRAFTER_DEBUG", "") not in ("", "0")
    if debug_flag in argv:
        argv = [a for a in argv if a != debug_flag]
        debug = True
    try:
        return int(main(argv) or 0)
    except UserError as e:
        if debug:
            raise
        sys.stderr.write(f"error: {one_line(e)}\n")
        sys.stderr.flush()
        if getattr(e, "hard_exit", False):
            sys.stdout.flush()
            os._exit(EXIT_USER_ERROR)
        return EXIT_USER_ERROR
