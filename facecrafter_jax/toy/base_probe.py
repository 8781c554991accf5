"""A fast probe of the toy base model: ``python -m facecrafter_jax.toy base-probe NAME [train overrides] [--ev k=v]``.

Needs a toy pipeline that has finished its ``records`` stage (``python train.py --until records``). Trains the base
stage (``configs/toy/base.yaml`` plus the given train.py overrides, e.g. ``steps=3000 optim.lr=1e-3``) on that
pipeline's base records into ``<out>/probes/NAME/``, exports it, samples it ID-only on ``--identities`` x
``--per-identity`` conditions of the report's experiment (:func:`~.measure.make_conditions`) and prints one JSON
line with the metrics (value, standard error) of the samples and of fresh base-split renders of the same
identities (the reference row), with the FD per feature group (``fd_parts``: identity, emotion, pose;
:func:`~.measure.fd_parts`), the training wall / CPU seconds and the load average; ``--reference celebrity``
conditions each identity on a celebrity-split photo instead of a full-range one (the base's in-distribution use:
its FD then holds the image quality without the full-range photo's leaked pose and expression), ``--reference
celebrity_each`` / ``full_each`` every sample on its own photo (copying of one photo then averages out of the
FD). The line is appended to ``<out>/probes/log.jsonl`` and a grid (per identity: its reference, then its
samples) is written to ``<out>/probes/NAME/grid.png``. A finished probe is not retrained (``--ev`` changes only the sampling: guidance,
steps). docs/results.md lists the probes behind the pipeline's defaults.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

__all__ = ["ProbeContext", "probe_context", "probe_parser", "run_base_probe", "main"]

KEYS = ("id_top1", "id_cos", "fd", "pose_div_deg", "expr_div", "emotion_entropy", "pose_copy", "yaw_copy_slope",
        "expr_copy", "emotion_copy")


@dataclasses.dataclass
class ProbeContext:
    """What every probe measures against, for ``identities`` x ``per_identity`` conditions of the report's
    experiment: the analysers ``an``, the conditions ``cond`` (:func:`~.measure.make_conditions`), the unit mean
    embedding per identity of the fresh test renders ``centres``, the analysis of the references and decoys
    ``ref``, the FD reference features of the fresh base-split renders ``fd_ref``, and ``real``: base-split
    (celebrity) renders of the conditions' identities, one per condition (the probes' "real" row)."""

    an: object
    cond: dict
    centres: np.ndarray
    ref: dict
    fd_ref: np.ndarray
    real: np.ndarray

    def metrics(self, analysis, *, bootstrap: int, seed: int, fd: bool = True) -> dict:
        """:func:`~.measure.set_metrics` of one image per condition (``analysis``: ``self.an.analyse(images)``),
        plus ``fd_parts`` (:func:`~.measure.fd_parts`) when ``fd``."""
        from . import measure as MS

        ref = None if self.cond.get("reference_each") else self.ref
        out = MS.set_metrics(analysis, self.cond, ref_analysis=ref, id_centres=self.centres,
                             fd_reference=self.fd_ref if fd else None, bootstrap=bootstrap, seed=seed)
        if fd:
            out["fd_parts"] = MS.fd_parts(MS.features(analysis), self.fd_ref)
        return out


REFERENCES = ("full", "celebrity", "full_each", "celebrity_each")
def probe_context(p, identities: int, per_identity: int, seed: int, reference: str = "full") -> ProbeContext:
    """The :class:`ProbeContext` of pipeline ``p`` (its analysers, world and test renders; evaluation ``seed``).
    ``reference``: ``full`` conditions each identity on one full-range photo (the report's experiment: the
    Arc2Face failure shows as copying of it); ``celebrity`` on one photo of the base (celebrity) split, the base
    model's in-distribution use, with celebrity decoys (seeds ``3800 + seed``, ``3900 + seed``); ``full_each`` /
    ``celebrity_each``: every sample on its own photo of its identity (seeds ``4000 + seed`` / ``4100 + seed``),
    so that copying of one photo averages out over the set (no copy metrics then)."""
    from . import measure as MS
    from .splits import sample_split

    if reference not in REFERENCES:
        raise ValueError(f"reference must be one of {list(REFERENCES)}, got {reference!r}")
    an = p.analysers()
    cond = MS.make_conditions(p.world, p.arcface, identities, per_identity, seed)
    split = p.split_of("base") if reference.startswith("celebrity") else "full"

    def draw(n, s, who):
        return sample_split(p.world, split, n, s, p.celebrity, identity=who)
    ids = np.asarray(cond["identities"])
    if reference == "celebrity":
        cond = MS.with_references(cond, p.world, p.arcface, draw(len(ids), 3800 + seed, ids),
                                  draw(len(ids) * cond["decoys"], 3900 + seed, np.repeat(ids, cond["decoys"])))
    elif reference.endswith("_each"):
        cond = MS.own_photo_conditions(p, cond, reference, seed)
    test = p.data("test")
    ta = an.analyse(test["images"])
    centres = np.zeros((p.world.config.num_identities, ta["embedding"].shape[1]))
    for k in np.unique(test["identity"]):
        c = ta["embedding"][test["identity"] == k].mean(0)
        centres[k] = c / np.linalg.norm(c)
    attrs = sample_split(p.world, p.split_of("base"), len(cond["identity"]), 3600 + seed, p.celebrity,
                         identity=cond["identity"])
    return ProbeContext(an=an, cond=cond, centres=centres, ref=an.analyse(MS.reference_images(cond)),
                        fd_ref=MS.features(an.analyse(p.data("test_base")["images"])), real=p.world.render(attrs))


def probe_parser(prog: str, doc: str, name_help: str, overrides_help: str) -> argparse.ArgumentParser:
    """The probes' shared command line: NAME, overrides, ``--toy-config``, ``--pipeline`` (repeatable)."""
    from .pipeline import DEFAULT_CONFIG

    ap = argparse.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("name", help=name_help)
    ap.add_argument("overrides", nargs="*", help=overrides_help)
    ap.add_argument("--toy-config", default=DEFAULT_CONFIG)
    ap.add_argument("--pipeline", action="append", default=[], metavar="KEY=VALUE",
                    help="pipeline overrides (e.g. out=runs/toy2); repeatable")
    return ap


def run_base_probe(p, name: str, overrides=(), *, identities: int = 32, per_identity: int = 4,
                   evaluation: dict | None = None, export_ema: bool = True, reference: str = "full") -> dict:
    """Train (unless done) and measure one base-model variant of pipeline ``p`` (see the module docstring)."""

    from . import measure as MS
    from facecrafter_jax.image_grid import image_grid, save_png
    from .report import load_pipeline

    root = Path(p.out) / "probes" / name
    root.mkdir(parents=True, exist_ok=True)
    t0, c0 = time.perf_counter(), time.process_time()
    result = {}
    model = root / ("model" if export_ema else "model_raw")
    if not (root / "model").is_dir():
        result = p.train_stage("base", run_dir=root / "run", export_to=root / "model", extra=tuple(overrides))
    train_s, train_cpu = time.perf_counter() - t0, time.process_time() - c0
    if not model.is_dir():
        from facecrafter_jax.train.export import export_run

        export_run(root / "run", model, vae=p.stage_dir("vae"), prefer_ema=False)
    ev = dataclasses.replace(p.cfg.evaluation, identities=identities, per_identity=per_identity,
                             **{k: type(getattr(p.cfg.evaluation, k))(v) for k, v in (evaluation or {}).items()})
    ctx = probe_context(p, ev.identities, ev.per_identity, ev.seed, reference)
    cond = ctx.cond
    t1 = time.perf_counter()
    images = MS.sample_set(load_pipeline(model, ev.scheduler), cond, (), ev)
    sample_s = time.perf_counter() - t1
    rows = {}
    for label, imgs in (("samples", images), ("real", ctx.real)):
        m = ctx.metrics(ctx.an.analyse(imgs), bootstrap=ev.bootstrap, seed=ev.seed)
        rows[label] = {k: m[k] for k in KEYS + ("fd_parts",) if k in m}
    per = ev.per_identity
    idk = np.arange(min(16, len(cond["identities"])))
    cols = [cond["ref_images"][idk]] + [images[idk * per + j] for j in range(min(per, 4))]
    grid = np.stack(cols, 1).reshape((-1,) + images.shape[1:])
    tag = ("".join(f"_{k}{v}" for k, v in (evaluation or {}).items()) + ("" if export_ema else "_raw")
           + ("" if reference == "full" else f"_{reference}"))
    save_png(image_grid(np.repeat(np.repeat(grid, 2, 1), 2, 2), 2 * len(cols)), root / f"grid{tag}.png")
    row = {"name": name, "overrides": list(overrides), "evaluation": evaluation or {}, "ema": export_ema,
           "reference": reference,
           "train_s": train_s, "train_cpu_s": train_cpu, "sample_s": sample_s, "load_average": os.getloadavg()[0],
           "final_diffusion_loss": result.get("final_diffusion_loss"), **rows["samples"], "real": rows["real"],
           "fd_real_vs_reference": rows["real"]["fd_parts"]["all"]}
    with open(Path(p.out) / "probes" / "log.jsonl", "a") as f:
        f.write(json.dumps(row, default=float) + "\n")
    return row


def main(argv=None) -> int:
    from facecrafter_jax.train.config import ConfigError

    from .pipeline import ToyPipeline, load_pipeline_config

    ap = probe_parser("python -m facecrafter_jax.toy base-probe", __doc__, "probe name (folder under <out>/probes)",
                      "train.py overrides of the base stage, e.g. steps=3000")
    ap.add_argument("--ev", action="append", default=[], metavar="KEY=VALUE",
                    help="evaluation overrides for sampling (guidance_id, num_steps, ...); repeatable")
    ap.add_argument("--identities", type=int, default=32)
    ap.add_argument("--per-identity", type=int, default=4)
    ap.add_argument("--no-ema", action="store_true", help="sample the raw weights instead of the EMA copy")
    ap.add_argument("--reference", choices=REFERENCES, default="full",
                    help="the photo each identity is conditioned on: one full-range photo (the report's experiment), "
                         "one celebrity-split photo (the base model's in-distribution use), or with _each every "
                         "sample its own photo of that kind (no copy metrics)")
    args = ap.parse_args(argv)
    try:
        cfg = load_pipeline_config(args.toy_config, args.pipeline)
        p = ToyPipeline(cfg)
        if p.done("records") is None:
            raise FileNotFoundError(f"{cfg.out}: the toy pipeline has not finished stage 'records'; run "
                                    f"`python train.py --until records out={cfg.out}` first")
        row = run_base_probe(p, args.name, args.overrides, identities=args.identities,
                             per_identity=args.per_identity, evaluation=dict(kv.split("=", 1) for kv in args.ev),
                             export_ema=not args.no_ema, reference=args.reference)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(row, default=float))
    return 0
