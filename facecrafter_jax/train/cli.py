"""``python train.py``: argument parsing and the one error path (``facecrafter_jax.errors.run_cli``).

``python train.py --config CONFIG.yaml [key=value ...]`` trains one stage (:func:`facecrafter_jax.train.loop.run`);
``train.py`` without ``--config`` runs the toy pipeline instead (the entry point dispatches; the library never
imports the toy world).
Expected failures (config, data, checkpoint, resources, divergence) print one line ``error: ...`` and exit
with status 2; ``--debug`` (or ``FACECRAFTER_DEBUG=1``) shows their traceback instead. A multi-process run is
supervised (:mod:`facecrafter_jax.train.supervise`) so that a peer lost inside the JAX runtime is one line too.
"""

from __future__ import annotations

import argparse
import os
import sys

from facecrafter_jax.errors import run_cli

__all__ = ["USAGE", "main", "build_parser"]

USAGE = """usage: python train.py                      (the toy pipeline, see --toy-help)
       python train.py --config CONFIG.yaml [key=value ...]
                       [--coordinator HOST:PORT --num-processes N --process-id I] [--print-config] [--debug]

configs: configs/stage_a_landmark.yaml, configs/stage_b_emotion.yaml, configs/stage_c_joint.yaml,
         configs/tiny_cpu.yaml (random-init toy model and synthetic data, no weights needed)
example: python train.py --config configs/tiny_cpu.yaml run_dir=/tmp/toy steps=20
errors:  one line 'error: ...' and exit status 2 for a bad config, damaged data or checkpoints, a diverged
         run or a lost peer process; --debug shows the traceback (docs/reliability.md)
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="train.py", usage=USAGE)
    parser.add_argument("--config", required=True, help="YAML config of the stage")
    parser.add_argument("--coordinator", help="jax.distributed coordinator address HOST:PORT")
    parser.add_argument("--num-processes", type=int)
    parser.add_argument("--process-id", type=int)
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``train.py``; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("FACECRAFTER_DEBUG", "") not in ("", "0")
    return run_cli(lambda a: _main(a, debug=debug), argv)


def _main(argv: list[str], *, debug: bool = False) -> int:
    if argv in (["-h"], ["--help"]):
        sys.stdout.write(USAGE)
        return 0
    args = build_parser().parse_args(argv)

    from .config import load_config, to_yaml

    extra = []
    for flag, key in ((args.coordinator, "distributed.coordinator_address"), (args.num_processes, "distributed.num_processes"),
                      (args.process_id, "distributed.process_id")):
        if flag is not None:
            extra.append(f"{key}={flag}")
    cfg = load_config(args.config, list(args.overrides) + extra)
    if args.print_config:
        sys.stdout.write(to_yaml(cfg))
        return 0
    from .distributed import distributed_settings

    _, num, _ = distributed_settings(cfg.distributed)
    if not debug and ((num is not None and num > 1) or cfg.distributed.auto):
        from .supervise import supervise

        return supervise(lambda: run_cli(lambda _: _train(cfg), []))  # the child reports its own errors too
    return _train(cfg)


def _train(cfg) -> int:
    from facecrafter_jax.runtime import configure_cpu, enable_compilation_cache

    configure_cpu()  # XLA:CPU flag defaults (docs/performance.md); no effect on GPU / TPU, user XLA_FLAGS win
    enable_compilation_cache()  # a restarted / resumed run loads its compiled step from disk (docs/performance.md)
    from .loop import run

    result = run(cfg)
    print(f"[train] {result['status']} at step {result['step']}", flush=True)
    return 0
