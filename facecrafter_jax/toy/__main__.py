"""Command line for the toy world.

``python -m facecrafter_jax.toy sheets --out docs/images``
    renders the documentation contact sheets (random samples; one identity across emotions, yaw, pitch;
    several identities with the same pose and emotion).

``python -m facecrafter_jax.toy analysers --out runs/toy_analysers [--identities 256] [--train 6000]
[--test 1000] [--steps 1500] [--seed 0]``
    renders a training set and a fresh test set, trains the toy analysers, prints and stores their
    accuracy on the fresh renders (``config.json`` next to ``model.safetensors``).

``python -m facecrafter_jax.toy base-probe NAME [train.py overrides] [--pipeline out=runs/toy] [--ev guidance_id=3]``
    after ``python train.py --until records``: trains a variant of the base model on the pipeline's base records
    and measures its ID-only samples (:mod:`facecrafter_jax.toy.base_probe`; the probes of docs/results.md).

``python -m facecrafter_jax.toy vae-probe NAME [VAE key=value ...] [--pipeline out=runs/toy]``
    after ``python train.py --until analysers``: trains a VAE variant (or, with no overrides, takes the pipeline's
    VAE) and measures its reconstructions of real renders: PSNR, identity top-1, FD ratio, the ceiling of the base
    model's samples (:mod:`facecrafter_jax.toy.vae_probe`; the VAE table of docs/toy_world.md).

``python -m facecrafter_jax.toy ablation [--config configs/toy/ablation.yaml] [--docs docs] [key=value ...]``
    the study of the paper's claims: runs the toy pipeline up to stage b if needed, retrains stage c per variant
    and seed, samples every cell and writes the claim table (:mod:`facecrafter_jax.toy.ablation`, docs/study.md).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np


def _sheets(args) -> None:
    import dataclasses

    from facecrafter_jax.image_grid import image_grid, save_png
    from .world import ToyWorld, WorldConfig

    os.makedirs(args.out, exist_ok=True)
    world = ToyWorld(WorldConfig(num_identities=args.identities, seed=args.seed))
    samples = world.generate(32, seed=args.seed + 1).images
    save_png(image_grid(samples, 8), os.path.join(args.out, "toy_world_samples.png"), palette=True)
    res, ident = 80, args.identity
    rows = []
    a = world.sample(8, seed=2, identity=ident, emotion=np.arange(8), intensity=1.0, head_pose=[0.0, 0.0, 0.0])
    rows.append(world.render(a, res))
    yaws = np.linspace(-40, 40, 8)
    a = world.sample(8, seed=3, identity=ident, emotion=0, head_pose=np.stack([yaws, 0 * yaws, 0 * yaws], 1))
    a = dataclasses.replace(a, **{k: getattr(a, k)[[0] * 8] for k in ("bg_top", "bg_bottom", "clothing", "light_dir")})
    rows.append(world.render(a, res))
    pitches = np.linspace(-25, 25, 4)
    rolls = np.linspace(-18, 18, 4)
    pose = np.concatenate([np.stack([0 * pitches, pitches, 0 * pitches], 1), np.stack([0 * rolls, 0 * rolls, rolls], 1)])
    a = dataclasses.replace(world.sample(8, seed=4, identity=ident, emotion=1, intensity=1.0, head_pose=pose),
                            **{k: getattr(a, k) for k in ("bg_top", "bg_bottom", "clothing", "light_dir")})
    rows.append(world.render(a, res))
    a = world.sample(8, seed=5, identity=np.arange(8) + ident + 1, emotion=3, intensity=1.0,
                     head_pose=[15.0, 5.0, 0.0])
    rows.append(world.render(a, res))
    save_png(image_grid(np.concatenate(rows), 8), os.path.join(args.out, "toy_world_controls.png"), palette=True)
    print(json.dumps({"written": sorted(f for f in os.listdir(args.out) if f.startswith("toy_world_"))}))


def _analysers(args) -> None:
    from .analysers import AnalyserConfig, evaluate_analysers, train_analysers
    from .world import ToyWorld, WorldConfig

    world = ToyWorld(WorldConfig(num_identities=args.identities, seed=args.seed))
    t0 = time.time()
    train = world.generate(args.train, seed=1000 + args.seed)
    test = world.generate(args.test, seed=2000 + args.seed)
    t_render = time.time() - t0
    cfg = AnalyserConfig(num_identities=args.identities, steps=args.steps, seed=args.seed)
    t0 = time.time()
    analysers, _ = train_analysers(train.images, {"identity": train.attributes.identity, **train.features}, cfg,
                                   log_every=max(args.steps // 10, 1), logger=lambda s: print(s, file=sys.stderr))
    t_train = time.time() - t0
    metrics = evaluate_analysers(analysers, test.images, {"identity": test.attributes.identity, **test.features})
    out = {"metrics": metrics, "render_seconds": t_render, "train_seconds": t_train,
           "world": world.config.to_dict(), "train_images": args.train, "test_images": args.test}
    if args.out:
        analysers.save(args.out, extra=out)
    print(json.dumps(out, indent=1))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m facecrafter_jax.toy", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("sheets", help="render the documentation contact sheets")
    s.add_argument("--out", default="docs/images")
    s.add_argument("--identities", type=int, default=64)
    s.add_argument("--identity", type=int, default=1, help="identity shown in the control rows")
    s.add_argument("--seed", type=int, default=0)
    a = sub.add_parser("analysers", help="train and evaluate the toy analysers")
    a.add_argument("--out", default="")
    a.add_argument("--identities", type=int, default=256)
    a.add_argument("--train", type=int, default=6000)
    a.add_argument("--test", type=int, default=1000)
    a.add_argument("--steps", type=int, default=1500)
    a.add_argument("--seed", type=int, default=0)
    sub.add_parser("ablation", help="the multi-seed study of the paper's claims (see facecrafter_jax.toy.ablation)",
                   add_help=False)
    sub.add_parser("base-probe", help="train and measure a base-model variant (see facecrafter_jax.toy.base_probe)",
                   add_help=False)
    sub.add_parser("vae-probe", help="train and measure a VAE variant (see facecrafter_jax.toy.vae_probe)",
                   add_help=False)
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "ablation":
        from .ablation import main as ablation_main

        sys.exit(ablation_main(argv[1:]))
    if argv and argv[0] == "base-probe":
        from .base_probe import main as probe_main

        sys.exit(probe_main(argv[1:]))
    if argv and argv[0] == "vae-probe":
        from .vae_probe import main as vae_probe_main

        sys.exit(vae_probe_main(argv[1:]))
    args = p.parse_args(argv)
    {"sheets": _sheets, "analysers": _analysers}[args.cmd](args)


if __name__ == "__main__":
    main()
