"""FaceCrafter training.

``python train.py`` (no arguments)
    the toy pipeline: renders the toy face world, trains toy analysers, a toy VAE and a toy Arc2Face from
    scratch, then FaceCrafter's stages a, b, c, samples and evaluates; writes ``runs/toy/report.md``
    (``configs/toy/pipeline.yaml``; ``facecrafter_jax/toy/pipeline.py``; docs/toy_world.md). Resumable:
    run it again after an interruption. Options: ``--toy-config F``, ``--until STAGE``, ``key=value``.

``python train.py --config configs/NAME.yaml [key=value ...]``
    one training stage. Stages (one YAML each): ``stage_a_landmark`` (landmark module alone),
    ``stage_b_emotion`` (emotion module alone), ``stage_c_joint`` (both, initialised from a and b, mixed
    conditioning + AD loss); ``tiny_cpu`` is a random-init toy for tests; ``configs/toy/*`` are the toy
    pipeline's. Overrides are dotted keys (``optim.lr=1e-4 mesh.fsdp=4``); unknown keys are errors.
    Multi-host: ``--coordinator HOST:PORT --num-processes N --process-id I`` (or ``distributed.*`` / the
    ``FACECRAFTER_*`` environment variables) on every process. See docs/training.md.
"""

from __future__ import annotations

import argparse
import sys

USAGE = """usage: python train.py                      (the toy pipeline, see --toy-help)
       python train.py --config CONFIG.yaml [key=value ...]
                       [--coordinator HOST:PORT --num-processes N --process-id I] [--print-config]

configs: configs/stage_a_landmark.yaml, configs/stage_b_emotion.yaml, configs/stage_c_joint.yaml,
         configs/tiny_cpu.yaml (random-init toy model and synthetic data, no weights needed)
example: python train.py --config configs/tiny_cpu.yaml run_dir=/tmp/toy steps=20
"""


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv in (["-h"], ["--help"]):
        sys.stdout.write(USAGE)
        return 0
    if not any(a == "--config" or a.startswith("--config=") for a in argv):
        from facecrafter_jax.toy.pipeline import main as toy_main

        return toy_main(["--help"] if argv == ["--toy-help"] else argv)
    parser = argparse.ArgumentParser(prog="train.py", usage=USAGE)
    parser.add_argument("--config", required=True, help="YAML config of the stage")
    parser.add_argument("--coordinator", help="jax.distributed coordinator address HOST:PORT")
    parser.add_argument("--num-processes", type=int)
    parser.add_argument("--process-id", type=int)
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    args = parser.parse_args(argv)

    from facecrafter_jax.train.config import ConfigError, load_config, to_yaml

    extra = []
    for flag, key in ((args.coordinator, "distributed.coordinator_address"), (args.num_processes, "distributed.num_processes"),
                      (args.process_id, "distributed.process_id")):
        if flag is not None:
            extra.append(f"{key}={flag}")
    try:
        cfg = load_config(args.config, list(args.overrides) + extra)
    except (ConfigError, FileNotFoundError) as e:
        sys.stderr.write(f"error: {e}\n")
        return 2
    if args.print_config:
        sys.stdout.write(to_yaml(cfg))
        return 0
    from facecrafter_jax.runtime import configure_cpu, enable_compilation_cache

    configure_cpu()  # XLA:CPU flag defaults (docs/performance.md); no effect on GPU / TPU, user XLA_FLAGS win
    enable_compilation_cache()  # a restarted / resumed run loads its compiled step from disk
    from facecrafter_jax.train.loop import run

    result = run(cfg)
    print(f"[train] {result['status']} at step {result['step']}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
