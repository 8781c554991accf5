"""The paper's claims on the toy world: a multi-seed ablation study, ``python -m facecrafter_jax.toy ablation``.

One command from a fresh clone: it first runs the toy pipeline up to stage b (``python train.py``'s stages,
skipped when done), then, for every seed ``s`` of ``configs/toy/ablation.yaml``::

    references   the pipeline's base model (toy Arc2Face) ID-only, stage a ID+LMK, stage b ID+EMO, and the real
                 renders of the targets: sampled / measured on seed s's evaluation conditions
    variants     stage c retrained from the same stages a / b with training seed (and data seed) + s, once per
                 variant (:func:`study_variants`), then sampled ID-only, ID+LMK, ID+EMO and ID+LMK+EMO

Seed ``s`` also moves the evaluation seed (``evaluation.seed + s``: other reference renders, targets and noise), so
the spread across seeds holds both training and sampling noise; within a seed every model is sampled on the same
conditions from the same noise, which is what makes the paired differences of :mod:`~.claims` tight. Each cell
holds ``evaluation.identities x per_identity`` samples (256 by default) measured by the toy analysers
(:mod:`~.measure`), with the per-identity values kept for the paired standard errors.

Resumable per variant and seed: a trained variant leaves ``<out>/ablation/<variant>/seed<s>/done.json`` (an
interrupted training resumes from its checkpoint), a measured cell ``<out>/ablation/cells/seed<s>/<model>.json``;
a re-run skips both and only rebuilds the tables. Writes ``<out>/ablation/results.json``, ``results.md`` (claim
table, variant table, AD choice, time) and three plots (:mod:`~.ablation_report`); ``--docs DIR`` copies the plots
to ``DIR/images/ablation_*.png``.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

__all__ = ["AblationConfig", "Variant", "study_variants", "SETS", "REFERENCES", "run_study", "main"]

DEFAULT_CONFIG = "configs/toy/ablation.yaml"

NO_MIXING = ("conditioning.id_only=0", "conditioning.id_landmark=0", "conditioning.id_emotion=0",
             "conditioning.landmark_emotion=0", "conditioning.landmark_only=0", "conditioning.emotion_only=0",
             "conditioning.id_landmark_emotion=0.95", "conditioning.all_null=0.05")

SETS: tuple[tuple[str, tuple[str, ...]], ...] = (("ID-only", ()), ("ID+LMK", ("landmark",)), ("ID+EMO", ("emotion",)),
                                                 ("ID+LMK+EMO", ("landmark", "emotion")))
"""(set label, controls given) sampled for every variant; absent controls as the variant's :attr:`Variant.absent`."""

REFERENCES: dict[str, tuple[str, str]] = {"base": ("base", "ID-only"), "stage_a": ("landmark", "ID+LMK"),
                                          "stage_b": ("emotion", "ID+EMO")}
"""reference model -> (pipeline stage whose export is sampled, its one set)."""


@dataclass(frozen=True)
class AblationConfig:
    """``configs/toy/ablation.yaml``: which toy pipeline, how many seeds, which variants.

    ``pipeline``: the toy pipeline's ``key=value`` overrides (e.g. ``[out=runs/toy2]``); ``variants``: names of
    :func:`study_variants` (empty: all); ``ad_weights``: the AD weights of the trade-off sweep besides 0
    (``no_ad``) and the configured one (``joint``); ``identity_margin``: "similar identity similarity" means an
    ID top-1 difference within this; ``keep_checkpoints``: keep each variant's training checkpoints after its
    export (off: only the exported model and the metrics log stay)."""

    toy_config: str = "configs/toy/pipeline.yaml"
    pipeline: tuple[str, ...] = ()
    seeds: int = 3
    variants: tuple[str, ...] = ()
    ad_weights: tuple[float, ...] = (0.3, 1.0)
    other_photo_identity: float = 0.5
    identity_margin: float = 0.05
    keep_checkpoints: bool = False

    def __post_init__(self):
        from facecrafter_jax.train.config import ConfigError

        if self.seeds < 1:
            raise ConfigError(f"config key 'seeds' must be >= 1, got {self.seeds}")
        if any(not w > 0 for w in self.ad_weights):
            raise ConfigError(f"config key 'ad_weights' must hold positive weights, got {list(self.ad_weights)}")
        if not 0 < self.other_photo_identity <= 1:
            raise ConfigError(f"config key 'other_photo_identity' must be in (0, 1], got {self.other_photo_identity}")
        if not self.identity_margin > 0:
            raise ConfigError(f"config key 'identity_margin' must be > 0, got {self.identity_margin}")


@dataclass(frozen=True)
class Variant:
    """A retrained stage c: its label, its train-config overrides and how its samplers feed absent controls."""

    label: str
    overrides: tuple[str, ...] = ()
    absent: str = "null_tokens"
    group: str = "ablation"  # "joint" | "ad" (an AD reading / weight) | "ablation"
    ad: dict = field(default_factory=dict)  # {"reading": ..., "weight": ...} of the variant's AD loss


def study_variants(joint_config, cfg: AblationConfig) -> dict[str, Variant]:
    """The variants, built around the configured stage c (``joint_config``: its resolved TrainConfig):

    ``joint`` the configured stage c (FaceCrafter); ``no_ad`` AD weight 0; ``ad_<reading>`` each other AD reading
    at the configured weight; ``ad_weight_<w>`` the configured reading at each weight of ``cfg.ad_weights``;
    ``no_mixed`` every training sample ID+LMK+EMO (all-null kept for guidance); ``switched_off`` absent controls
    switched off instead of their null tokens, in training and sampling; ``other_photo`` the identity embedding
    from another photo of the same person with probability ``cfg.other_photo_identity``."""
    from facecrafter_jax.losses import AD_LOSSES

    reading, weight = joint_config.loss.ad_reading, float(joint_config.loss.ad_weight)
    v = {"joint": Variant(f"FaceCrafter: the configured stage c (mixed conditioning, AD {reading} x {weight:g})",
                          group="joint", ad={"reading": reading, "weight": weight}),
         "no_ad": Variant("joint without the AD loss", ("loss.ad_weight=0",), group="ad",
                          ad={"reading": reading, "weight": 0.0})}
    for r in AD_LOSSES:
        if r != reading:
            v[f"ad_{r}"] = Variant(f"AD reading {r} (weight {weight:g})", (f"loss.ad_reading={r}",), group="ad",
                                   ad={"reading": r, "weight": weight})
    for w in cfg.ad_weights:
        if float(w) != weight:
            v[f"ad_weight_{w:g}"] = Variant(f"AD {reading} at weight {w:g}", (f"loss.ad_weight={w}",), group="ad",
                                            ad={"reading": reading, "weight": float(w)})
    v["no_mixed"] = Variant("no intra-batch mixed conditioning: every sample ID+LMK+EMO (5% all-null)", NO_MIXING,
                            ad={"reading": reading, "weight": weight})
    v["switched_off"] = Variant("absent controls switched off (training and sampling) instead of null tokens",
                                ("conditioning.absent=switched_off",), absent="switched_off",
                                ad={"reading": reading, "weight": weight})
    v["other_photo"] = Variant(f"identity from another photo of the same person (p = {cfg.other_photo_identity:g})",
                               (f"data.other_photo_identity={cfg.other_photo_identity}",),
                               ad={"reading": reading, "weight": weight})
    if cfg.variants:
        unknown = [n for n in cfg.variants if n not in v]
        if unknown:
            raise ValueError(f"unknown variant(s) {unknown}; choose from {list(v)}")
        if "joint" not in cfg.variants:
            raise ValueError("the variants must include 'joint' (every comparison is against it or its references)")
        v = {n: v[n] for n in v if n in cfg.variants}
    return v


def _seed_overrides(joint_config, s: int) -> tuple[str, ...]:
    return (f"seed={joint_config.seed + s}", f"data.seed={joint_config.data.seed + s}")


def _read(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _write(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=float))
    tmp.replace(path)  # a cell is either complete or absent


def _measure(ctx, images: np.ndarray) -> dict:
    per: dict = {}
    m = ctx.measure(images, per_identity=per)
    return {"metrics": m, "per_identity": {k: [float(x) for x in v] for k, v in per.items()}}


class Study:
    """The study's state on disk under ``<pipeline out>/ablation`` (see the module docstring)."""

    def __init__(self, pipeline, cfg: AblationConfig):
        self.p, self.cfg = pipeline, cfg
        self.root = Path(pipeline.out) / "ablation"
        self.joint_config = pipeline.train_config("joint")
        self.variants = study_variants(self.joint_config, cfg)
        self.seeds = list(range(cfg.seeds))

    def cell_path(self, s: int, model: str) -> Path:
        return self.root / "cells" / f"seed{s}" / f"{model}.json"

    def variant_dir(self, name: str, s: int) -> Path:
        return self.root / name / f"seed{s}"

    def _context(self, s: int):
        from .report import EvaluationContext

        ev = self.p.cfg.evaluation
        return EvaluationContext(self.p, dataclasses.replace(ev, seed=ev.seed + s))

    def train_variant(self, name: str, s: int) -> dict:
        d = self.variant_dir(name, s)
        done = _read(d / "done.json")
        if done is not None:
            return done
        t0, c0 = time.perf_counter(), time.process_time()
        overrides = tuple(self.variants[name].overrides) + _seed_overrides(self.joint_config, s)
        result = self.p.train_stage("joint", run_dir=d / "run", export_to=d / "model", extra=overrides)
        if not self.cfg.keep_checkpoints:  # the export holds the weights; the run keeps its config and metrics log
            shutil.rmtree(d / "run" / "checkpoints", ignore_errors=True)
        done = {"seconds": time.perf_counter() - t0, "cpu_seconds": time.process_time() - c0,
                "overrides": list(overrides), "result": result}
        _write(d / "done.json", done)
        return done

    def measure_model(self, ctx, s: int, model: str, folder: Path, sets, absent: str) -> dict:
        from .report import load_pipeline, sample_set

        path = self.cell_path(s, model)
        cell = _read(path)
        if cell is not None:
            return cell
        t0 = time.perf_counter()
        pipe = load_pipeline(folder, self.p.cfg.evaluation.scheduler)
        cell = {"sets": {}, "absent": absent}
        for label, controls in sets:
            kw = {} if absent == "null_tokens" else {"absent_controls": absent}
            images = sample_set(pipe, ctx.cond, controls, ctx.ev, **kw)
            cell["sets"][label] = _measure(ctx, images)
        cell["seconds"] = time.perf_counter() - t0
        _write(path, cell)
        return cell

    def run(self) -> dict:
        from .stages import EXPORTS

        p = self.p
        t_run = time.perf_counter()
        todo = [(s, n) for s in self.seeds for n in self.variants]
        for s in self.seeds:
            ctx = None
            refs = ["real"] + list(REFERENCES)
            if not all(self.cell_path(s, m).is_file() for m in refs + list(self.variants)):
                t0 = time.perf_counter()
                ctx = self._context(s)
                p.log(f"[ablation] seed {s}: evaluation conditions ready ({time.perf_counter() - t0:.0f} s)")
            if not self.cell_path(s, "real").is_file():
                _write(self.cell_path(s, "real"), {"sets": {"targets": _measure(ctx, ctx.cond["images"]),
                                                           "base split": _measure(ctx, ctx.real_base_images)}})
            for model, (stage, set_label) in REFERENCES.items():
                if self.cell_path(s, model).is_file():
                    continue
                cell = self.measure_model(ctx, s, model, Path(p.out) / EXPORTS[stage],
                                          [x for x in SETS if x[0] == set_label], "null_tokens")
                m = cell["sets"][set_label]["metrics"]
                p.log(f"[ablation] seed {s} {model} {set_label}: id top-1 {m['id_top1']:.3f}, pose div "
                      f"{m['pose_div_deg']:.1f}, pose MAE {m['pose_mae_deg']:.1f}, emotion acc {m['emotion_acc']:.3f}")
            for name, var in self.variants.items():
                i = todo.index((s, name)) + 1
                if self.cell_path(s, name).is_file():
                    continue
                trained = (self.variant_dir(name, s) / "done.json").is_file()
                if not trained:
                    p.log(f"[ablation {i}/{len(todo)}] seed {s} {name}: training stage c "
                          f"({' '.join(var.overrides) or 'configured'}) ...")
                info = self.train_variant(name, s)
                p.log(f"[ablation {i}/{len(todo)}] seed {s} {name}: trained {'earlier' if trained else 'in'} "
                      f"{info['seconds']:.0f} s; sampling {len(SETS)} sets ...")
                cell = self.measure_model(ctx, s, name, self.variant_dir(name, s) / "model", SETS, var.absent)
                io, ctl = cell["sets"]["ID-only"]["metrics"], cell["sets"]["ID+LMK+EMO"]["metrics"]
                p.log(f"[ablation {i}/{len(todo)}] seed {s} {name}: ID-only pose div {io['pose_div_deg']:.1f}, expr div "
                      f"{io['expr_div']:.3f}, id top-1 {io['id_top1']:.3f}; ID+LMK+EMO pose MAE "
                      f"{ctl['pose_mae_deg']:.1f}, emotion acc {ctl['emotion_acc']:.3f} ({cell['seconds']:.0f} s)")
        p.log(f"[ablation] all cells measured ({time.perf_counter() - t_run:.0f} s this run)")
        return self.collect()

    def collect(self) -> dict:
        """Every cell and training record, read back from disk (what the report is built from)."""
        cells: dict = {}
        training: dict = {}
        for s in self.seeds:
            cells[s] = {m: _read(self.cell_path(s, m)) for m in ["real", *REFERENCES, *self.variants]}
            missing = [m for m, c in cells[s].items() if c is None]
            if missing:
                raise FileNotFoundError(f"{self.root}: seed {s} has no measured cell for {missing}; run the study")
            training[s] = {n: _read(self.variant_dir(n, s) / "done.json") for n in self.variants}
        return {"cells": cells, "training": training,
                "variants": {n: dataclasses.asdict(v) for n, v in self.variants.items()},
                "config": dataclasses.asdict(self.cfg), "evaluation": dataclasses.asdict(self.p.cfg.evaluation),
                "joint_config": {"steps": self.joint_config.steps, "seed": self.joint_config.seed,
                                 "ad_reading": self.joint_config.loss.ad_reading,
                                 "ad_weight": self.joint_config.loss.ad_weight}}


def run_study(pipeline, cfg: AblationConfig, *, docs: str | None = None) -> dict:
    """Run (or resume) the toy pipeline up to stage b, every cell of the study, then write the results."""
    from .ablation_report import write_results

    t0 = time.perf_counter()
    pipeline.run(until="emotion")
    study = Study(pipeline, cfg)
    data = study.run()
    data["run_seconds"] = time.perf_counter() - t0
    return write_results(study.root, data, docs=docs, log=pipeline.log)


def load_ablation_config(path: str | None = DEFAULT_CONFIG, overrides=()) -> AblationConfig:
    from facecrafter_jax.train.config import load_config

    return load_config(path, list(overrides), cls=AblationConfig)


def main(argv=None) -> int:
    import argparse

    from facecrafter_jax.train.config import ConfigError

    from .pipeline import ToyPipeline, load_pipeline_config

    ap = argparse.ArgumentParser(prog="python -m facecrafter_jax.toy ablation", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=DEFAULT_CONFIG, help="the study's config (default: %(default)s)")
    ap.add_argument("--docs", default=None, help="also copy the plots to DOCS/images/ablation_*.png")
    ap.add_argument("overrides", nargs="*", help="key=value overrides of the study config, e.g. seeds=2 "
                    "variants=[joint,no_ad] 'pipeline=[out=runs/toy2]'")
    args = ap.parse_args(argv)
    try:
        cfg = load_ablation_config(args.config, args.overrides)
        pipeline = ToyPipeline(load_pipeline_config(cfg.toy_config, cfg.pipeline))
        run_study(pipeline, cfg, docs=args.docs)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
