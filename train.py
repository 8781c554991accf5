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

Expected failures print one line ``error: ...`` and exit with status 2 (``--debug``: with the traceback);
docs/reliability.md lists the faults training survives. The code is in ``facecrafter_jax.train.cli``.
"""

import sys


def main(argv: list[str] | None = None) -> int:
    """Without ``--config`` (and without ``-h``): the toy pipeline; otherwise one training stage."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv not in (["-h"], ["--help"]) and not any(a == "--config" or a.startswith("--config=") for a in argv):
        from facecrafter_jax.toy.pipeline import main as toy_main

        return toy_main(["--help"] if argv == ["--toy-help"] else argv)
    from facecrafter_jax.train.cli import main as train_main

    return train_main(argv)


if __name__ == "__main__":
    sys.exit(main())
