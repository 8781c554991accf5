"""The paper's comparisons at toy scale: ``python -m facecrafter_jax.toy ablation [--out runs/toy]``.

Needs a finished toy pipeline in ``--out`` (``python train.py``): it reuses its renders, analysers, VAE,
records, base model and stages a / b, and retrains stage c (same steps, seed and initialisation from a
and b) once per variant::

    joint           the pipeline's own stage c: mixed conditioning + AD loss (orthogonality reading)
    no_ad           loss.ad_weight = 0
    ad_map_overlap  AD loss with the map-overlap reading (ID-token map vs control-token maps)
    no_mixed        no intra-batch mixed conditioning: every sample ID+LMK+EMO (5% all-null kept)

Every variant is sampled on the pipeline's evaluation conditions (same noise) in the joint sets of
:data:`~facecrafter_jax.toy.report.JOINT_SETS`; the base and stage a / b rows come from the pipeline's
report. Writes ``<out>/ablation/results.json`` and ``results.md``, and the plot ``ablation.png``
(``--docs DIR`` also copies the plot and the pipeline's image grids to ``DIR/images/results_*.png``).
Finished variants are skipped on a re-run (``<out>/ablation/<variant>/done.json``).
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np

__all__ = ["VARIANTS", "run_ablation", "plot_ablation", "main"]

NO_MIXING = ("conditioning.id_only=0", "conditioning.id_landmark=0", "conditioning.id_emotion=0",
             "conditioning.landmark_emotion=0", "conditioning.landmark_only=0", "conditioning.emotion_only=0",
             "conditioning.id_landmark_emotion=0.95", "conditioning.all_null=0.05")

VARIANTS: dict[str, tuple[str, tuple[str, ...] | None]] = {
    "joint": ("joint: mixed conditioning + AD (orthogonality)", None),
    "no_ad": ("joint without AD loss", ("loss.ad_weight=0",)),
    "ad_map_overlap": ("joint, AD map-overlap reading", ("loss.ad_reading=map_overlap",)),
    "no_mixed": ("joint without mixed conditioning", NO_MIXING),
}
"""name -> (label, stage-c overrides; None = the pipeline's own stage c)."""

PLOT_METRICS = (("emotion_acc", "emotion accuracy (higher is better)"), ("pose_mae_deg", "pose MAE, deg (lower is better)"),
                ("id_top1", "identity top-1 (higher is better)"))


def run_ablation(pipeline, variants: Sequence[str] = tuple(VARIANTS), *, docs: str | None = None) -> dict:
    """Train (or reuse) every variant, evaluate, write the results (see the module docstring)."""
    from .stages import EXPORTS
    from .report import JOINT_SETS, evaluation_context, load_pipeline, markdown_table, sample_set

    p = pipeline
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown variant(s) {unknown}; choose from {list(VARIANTS)}")
    for stage in ("joint", "evaluate"):
        if p.done(stage) is None:
            raise FileNotFoundError(f"{p.out}: the toy pipeline has not finished stage {stage!r}; run `python train.py"
                                    f"{'' if str(p.out) == 'runs/toy' else ' out=' + str(p.out)}` first")
    root = Path(p.out) / "ablation"
    root.mkdir(parents=True, exist_ok=True)
    ev = p.cfg.evaluation
    models: dict[str, Path] = {}
    train_info: dict[str, dict] = {}
    for v in variants:
        label, overrides = VARIANTS[v]
        if overrides is None:
            models[v] = Path(p.out) / EXPORTS["joint"]
            train_info[v] = p.done("joint")["result"]
            continue
        d = root / v
        done = d / "done.json"
        if not done.is_file():
            p.log(f"[ablation] training variant {v}: {label} ({' '.join(overrides)})")
            t0 = time.perf_counter()
            result = p.train_stage("joint", run_dir=d / "run", export_to=d / "model", extra=tuple(overrides))
            done.write_text(json.dumps({"seconds": time.perf_counter() - t0, "result": result}, indent=1, default=float))
        models[v] = d / "model"
        train_info[v] = json.loads(done.read_text())["result"]

    ctx = evaluation_context(p)
    rows = []
    main_report = json.loads((Path(p.out) / "report.json").read_text())
    for r in main_report["rows"]:
        if not r["set"].startswith("joint"):  # real renders, base ID-only, stages a / b
            rows.append({"variant": "-", **r})
    for v in variants:
        pipe = load_pipeline(models[v], ev.scheduler)
        for label, _, controls in JOINT_SETS:
            images = sample_set(pipe, ctx.cond, controls, ev)
            m = ctx.measure(images)
            rows.append({"variant": v, **m, "set": label})
            p.log(f"[ablation] {v} / {label}: emotion {m['emotion_acc']:.3f}, pose {m['pose_mae_deg']:.2f}, "
                  f"id {m['id_top1']:.3f}")
    results = {"variants": {v: VARIANTS[v][0] for v in variants}, "overrides": {v: VARIANTS[v][1] for v in variants},
               "training": train_info, "rows": rows, "evaluation": main_report["evaluation"]}
    (root / "results.json").write_text(json.dumps(results, indent=1, default=float))
    table = markdown_table([(r["set"] if r["variant"] == "-" else f"{r['variant']}: {r['set'].split(': ', 1)[1]}", r)
                            for r in rows])
    plot_ablation(results, root / "ablation.png")
    md = ["# Toy ablation", "", "Variants (stage c retrained from the same stages a / b, same seed and steps):", ""]
    md += [f"* `{v}`: {VARIANTS[v][0]}" + (f" (`{' '.join(VARIANTS[v][1])}`)" if VARIANTS[v][1] else "")
           for v in variants]
    md += ["", table, "", "![ablation](ablation.png)", ""]
    (root / "results.md").write_text("\n".join(md))
    if docs:
        img = Path(docs) / "images"
        img.mkdir(parents=True, exist_ok=True)
        shutil.copy(root / "ablation.png", img / "results_ablation.png")
        for name in ("comparison", "emotion_sweep", "pose_sweep"):
            src = Path(p.out) / "images" / f"{name}.png"
            if src.is_file():
                shutil.copy(src, img / f"results_{name}.png")
    return results


def plot_ablation(results: dict, path: str | Path) -> None:
    """Grouped bars: one panel per metric, one group per joint set, one bar per variant; dashed lines: the
    real renders (analysers' reference) and the base model's ID-only value."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .report import JOINT_SETS

    rows = results["rows"]
    variants = list(results["variants"])
    sets = [label for label, _, _ in JOINT_SETS]
    ref = {r["set"]: r for r in rows if r["variant"] == "-"}
    real = next((r for k, r in ref.items() if k.startswith("real")), None)
    base = ref.get("base: ID")
    fig, axes = plt.subplots(1, len(PLOT_METRICS), figsize=(5.2 * len(PLOT_METRICS), 4.2))
    width = 0.8 / max(1, len(variants))
    x = np.arange(len(sets))
    for ax, (key, title) in zip(axes, PLOT_METRICS):
        for i, v in enumerate(variants):
            vals = [next((r[key] for r in rows if r["variant"] == v and r["set"] == s), np.nan) for s in sets]
            ax.bar(x + (i - (len(variants) - 1) / 2) * width, vals, width, label=v)
        if real is not None:
            ax.axhline(real[key], color="k", ls="--", lw=1, label="real renders")
        if base is not None:
            ax.axhline(base[key], color="grey", ls=":", lw=1.5, label="base, ID only")
        ax.set_xticks(x, [s.split(": ", 1)[1] for s in sets], fontsize=8)
        ax.set_title(title, fontsize=10)
    axes[0].legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    import argparse

    from facecrafter_jax.train.config import ConfigError

    from .pipeline import DEFAULT_CONFIG, ToyPipeline, load_pipeline_config

    ap = argparse.ArgumentParser(prog="python -m facecrafter_jax.toy ablation", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--toy-config", default=DEFAULT_CONFIG)
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated (default: all)")
    ap.add_argument("--docs", default=None, help="also copy the plot and image grids to DOCS/images")
    ap.add_argument("overrides", nargs="*", help="the pipeline's key=value overrides (e.g. out=runs/toy2)")
    args = ap.parse_args(argv)
    try:
        cfg = load_pipeline_config(args.toy_config, args.overrides)
        run_ablation(ToyPipeline(cfg), [v for v in args.variants.split(",") if v], docs=args.docs)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
