"""The toy study's tables, claim verdicts, AD choice and plots (from the cells of :mod:`~.ablation`).

Every number is a mean over seeds with its standard error (:func:`~.claims.estimate`: the larger of the
seed-to-seed spread and the within-seed sampling error). A comparison of two cells of the same seed is a *paired*
difference (:func:`~.claims.paired_difference`); its within-seed error is the identity-clustered SE of the
per-identity differences where the metric is a mean over identities (accuracies, errors, diversities: both cells
were sampled on the same conditions from the same noise, so shared noise cancels), and the conservative
``sqrt(se_a^2 + se_b^2)`` otherwise (FD, copy slopes).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from .claims import Z_THRESHOLD, ClaimRow, Estimate, claim_table, estimate, paired_difference, verdict

__all__ = ["CLAIMS", "Cells", "claim_rows", "ad_choice", "write_results", "plot_diversity", "plot_controls",
           "plot_ad_tradeoff"]

ID_ONLY_METRICS = (("id_top1", "ID top-1", 3), ("fd_full", "FD", 3), ("pose_div_deg", "pose div°", 2),
                   ("expr_div", "expr div", 3), ("emotion_entropy", "emo div (bits)", 3),
                   ("yaw_copy_slope", "yaw copy slope", 3))
CONTROL_METRICS = (("pose_mae_deg", "pose MAE°", 2), ("landmark_nme", "NME", 4), ("emotion_acc", "emotion acc", 3),
                   ("id_top1", "ID top-1", 3))
VARIANT_COLUMNS = (("ID-only", "pose_div_deg", +1), ("ID-only", "expr_div", +1), ("ID-only", "emotion_entropy", +1),
                   ("ID-only", "id_top1", +1), ("ID-only", "fd_full", -1), ("ID+LMK+EMO", "pose_mae_deg", -1),
                   ("ID+LMK+EMO", "landmark_nme", -1), ("ID+LMK+EMO", "emotion_acc", +1))

CLAIMS: tuple[tuple[str, str, tuple[str, str], tuple[str, str], int], ...] = (
    ("1. ID-only: more diverse poses than Arc2Face", "pose_div_deg", ("joint", "ID-only"), ("base", "ID-only"), +1),
    ("1. ID-only: more diverse expressions than Arc2Face", "expr_div", ("joint", "ID-only"), ("base", "ID-only"), +1),
    ("1. ID-only: more diverse emotions than Arc2Face", "emotion_entropy", ("joint", "ID-only"), ("base", "ID-only"),
     +1),
    ("1. ... at similar identity similarity", "id_top1", ("joint", "ID-only"), ("base", "ID-only"), 0),
    ("2. AD raises ID-only expression diversity", "expr_div", ("joint", "ID-only"), ("no_ad", "ID-only"), +1),
    ("2. AD raises ID-only pose diversity", "pose_div_deg", ("joint", "ID-only"), ("no_ad", "ID-only"), +1),
    ("2. AD raises ID-only emotion diversity", "emotion_entropy", ("joint", "ID-only"), ("no_ad", "ID-only"), +1),
    ("2. without AD the FD is (slightly) better", "fd_full", ("joint", "ID-only"), ("no_ad", "ID-only"), +1),
    ("3. joint beats stage a on pose control", "pose_mae_deg", ("joint", "ID+LMK"), ("stage_a", "ID+LMK"), -1),
    ("3. joint beats stage a on landmark (expression) control", "landmark_nme", ("joint", "ID+LMK"),
     ("stage_a", "ID+LMK"), -1),
    ("3. joint beats stage b on emotion control", "emotion_acc", ("joint", "ID+EMO"), ("stage_b", "ID+EMO"), +1),
    ("4. LMK+EMO: better emotion than landmarks alone", "emotion_acc", ("joint", "ID+LMK+EMO"), ("joint", "ID+LMK"),
     +1),
    ("5. better pose control than the baseline (stage a: Arc2Face + landmarks)", "pose_mae_deg",
     ("joint", "ID+LMK+EMO"), ("stage_a", "ID+LMK"), -1),
    ("5. better expression control than the baseline", "landmark_nme", ("joint", "ID+LMK+EMO"), ("stage_a", "ID+LMK"),
     -1),
    ("5. better emotion control than the baseline", "emotion_acc", ("joint", "ID+LMK+EMO"), ("stage_a", "ID+LMK"), +1),
)
"""(claim, metric, (model, set) of FaceCrafter's side, (model, set) of the reference, direction: +1 higher is
claimed, -1 lower, 0 similar within the study's ``identity_margin``)."""

CLAIMED_PARAMETER_PERCENT = 5.0
PARAMETER_MARGIN = 1.0  # "~5%": 4-6 % of the SD1.5 UNet


class Cells:
    """Seed-indexed cells: ``cells[seed][model]["sets"][set]`` = ``{"metrics": ..., "per_identity": ...}``."""

    def __init__(self, cells: dict):
        self.cells = {int(s): c for s, c in cells.items()}
        self.seeds = sorted(self.cells)

    def has(self, model: str, set_label: str) -> bool:
        return all(set_label in (self.cells[s].get(model) or {}).get("sets", {}) for s in self.seeds)

    def _entry(self, s: int, model: str, set_label: str) -> dict:
        try:
            return self.cells[s][model]["sets"][set_label]
        except (KeyError, TypeError):
            raise KeyError(f"seed {s}: no cell {model!r} / {set_label!r}") from None

    def value(self, model: str, set_label: str, metric: str) -> Estimate:
        """Mean over seeds ± SE (the within-seed SEs of the cells as the floor)."""
        ms = [self._entry(s, model, set_label)["metrics"] for s in self.seeds]
        vals = [m[metric] for m in ms]
        se = [m.get(f"{metric}_se", float("nan")) for m in ms]
        if all(np.isfinite(se)):
            return estimate(vals, se)
        if len(vals) > 1:
            return estimate(vals)
        return Estimate(float(vals[0]), float("nan"), (float(vals[0]),))

    def difference(self, a: tuple[str, str], b: tuple[str, str], metric: str) -> Estimate:
        """Paired per-seed difference a - b with its within-seed SE (module docstring)."""
        va, vb, within = [], [], []
        for s in self.seeds:
            ea, eb = self._entry(s, *a), self._entry(s, *b)
            va.append(ea["metrics"][metric])
            vb.append(eb["metrics"][metric])
            pa, pb = ea.get("per_identity", {}).get(metric), eb.get("per_identity", {}).get(metric)
            if pa is not None and pb is not None and len(pa) == len(pb) > 1:
                d = np.asarray(pa, np.float64) - np.asarray(pb, np.float64)
                d = d[np.isfinite(d)]
                within.append(float(d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else float("nan"))
            else:
                within.append(math.hypot(ea["metrics"].get(f"{metric}_se", float("nan")),
                                         eb["metrics"].get(f"{metric}_se", float("nan"))))
        w = within if all(np.isfinite(within)) else None
        if w is None and len(self.seeds) == 1:
            w = [0.0]
        return paired_difference(va, vb, w)


def claim_rows(cells: Cells, variants: dict, *, identity_margin: float, parameter_percent: float | None) -> list[ClaimRow]:
    """The claim table's rows: :data:`CLAIMS` whose cells exist, claim 2 once more per other AD setting, and the
    parameter count of claim 5 (a closed-form count: no error bar)."""
    rows = []
    for claim, metric, a, b, direction in CLAIMS:
        if not (cells.has(*a) and cells.has(*b)):
            continue
        rows.append(ClaimRow(claim, metric, "/".join(a), "/".join(b), cells.value(*a, metric), cells.value(*b, metric),
                             cells.difference(a, b, metric), direction,
                             margin=identity_margin if direction == 0 else None))
    if cells.has("no_ad", "ID-only"):
        for name, v in variants.items():
            if v["group"] == "ad" and name != "no_ad":
                a, b = (name, "ID-only"), ("no_ad", "ID-only")
                rows.append(ClaimRow(f"2. ({name}: {v['ad']['reading']} x {v['ad']['weight']:g}) AD raises ID-only "
                                     "expression diversity", "expr_div", "/".join(a), "/".join(b),
                                     cells.value(*a, "expr_div"), cells.value(*b, "expr_div"),
                                     cells.difference(a, b, "expr_div"), +1))
    if parameter_percent is not None:
        p = Estimate(parameter_percent, 0.0, (parameter_percent,))
        rows.append(ClaimRow("5. ~5% extra parameters (SD1.5 UNet, closed-form count)", "trainable % of UNet",
                             "FaceCrafterConfig()", "paper", p, Estimate(CLAIMED_PARAMETER_PERCENT, 0.0, (5.0,)),
                             Estimate(parameter_percent - CLAIMED_PARAMETER_PERCENT, 0.0, (0.0,)), 0,
                             margin=PARAMETER_MARGIN, note="a count: no error bar"))
    return rows


def ad_choice(cells: Cells, variants: dict) -> dict | None:
    """The AD setting (reading x weight) with the largest ID-only expression-diversity gain over ``no_ad`` among
    those whose ID+LMK+EMO control (pose MAE, emotion accuracy) is not significantly worse than ``no_ad``'s
    (z > -2), if that gain is significant (z >= 2); otherwise the configured setting (``joint``) is kept, as
    nothing in the study argues for another. With every candidate's numbers; None without ``no_ad``."""
    if not cells.has("no_ad", "ID-only"):
        return None
    cands = []
    for name, v in variants.items():
        if v["ad"].get("weight", 0) <= 0 or v["group"] not in ("joint", "ad"):
            continue
        gain = cells.difference((name, "ID-only"), ("no_ad", "ID-only"), "expr_div")
        pose = cells.difference((name, "ID+LMK+EMO"), ("no_ad", "ID+LMK+EMO"), "pose_mae_deg")
        emo = cells.difference((name, "ID+LMK+EMO"), ("no_ad", "ID+LMK+EMO"), "emotion_acc")
        z_pose, z_emo = verdict(pose, -1)[1], verdict(emo, +1)[1]
        cands.append({"variant": name, **v["ad"], "expr_div_gain": gain.to_dict(),
                      "z_gain": verdict(gain, +1)[1], "pose_mae_change": pose.to_dict(),
                      "emotion_acc_change": emo.to_dict(), "control_ok": bool(z_pose > -2 and z_emo > -2)})
    ok = [c for c in cands if c["control_ok"]]
    if not ok:
        return None
    best = max(ok, key=lambda c: c["expr_div_gain"]["mean"])
    significant = bool(best["z_gain"] >= Z_THRESHOLD)
    if not significant:  # no evidence for any setting: keep the configured one
        best = next((c for c in cands if variants[c["variant"]]["group"] == "joint"), best)
    return {"chosen": best["variant"], "reading": best["reading"], "weight": best["weight"],
            "significant": significant, "candidates": cands}


def _fmt(e: Estimate, digits: int) -> str:
    return f"{e.mean:.{digits}f} ± {e.se:.{digits}f}" if np.isfinite(e.se) else f"{e.mean:.{digits}f}"


def _table(cells: Cells, rows: Sequence[tuple[str, str]], metrics) -> str:
    head = "| model | set | " + " | ".join(m[1] for m in metrics) + " |"
    lines = [head, "|---|---|" + "|".join("---:" for _ in metrics) + "|"]
    for model, set_label in rows:
        if cells.has(model, set_label):
            lines.append(f"| {model} | {set_label} | " + " | ".join(_fmt(cells.value(model, set_label, k), d)
                                                                  for k, _, d in metrics) + " |")
    return "\n".join(lines)


def _variant_table(cells: Cells, variants: dict) -> str:
    head = "| variant vs joint | " + " | ".join(f"{s}: {m} {'↑' if d > 0 else '↓'}" for s, m, d in VARIANT_COLUMNS) + " |"
    lines = [head, "|---|" + "|".join("---:" for _ in VARIANT_COLUMNS) + "|"]
    for name in variants:
        if name == "joint":
            continue
        cols = []
        for s, m, _ in VARIANT_COLUMNS:
            d = cells.difference((name, s), ("joint", s), m)
            z = d.mean / d.se if d.se > 0 else float("nan")
            cols.append(f"{d.mean:+.3g} ± {d.se:.2g} ({z:+.1f})")
        lines.append(f"| {name} | " + " | ".join(cols) + " |")
    return "\n".join(lines)


def _parameter_percent() -> float:
    """Trainable (adapter) parameters as % of the SD1.5 UNet for the default FaceCrafterConfig (built abstractly)."""
    from facecrafter_jax.models.facecrafter import FaceCrafterConfig, parameter_report
    from facecrafter_jax.models.unet_2d_condition import UNet2DConditionConfig

    return float(parameter_report(UNet2DConditionConfig.sd15(), FaceCrafterConfig())["percent_of_unet"])


def write_results(root: Path, data: dict, *, docs: str | None = None, log: Callable[[str], None] = print) -> dict:
    """results.json, results.md and the plots under ``root`` (see :mod:`~.ablation`); returns the results dict."""
    root = Path(root)
    cells = Cells(data["cells"])
    variants = data["variants"]
    margin = data["config"]["identity_margin"]
    rows = claim_rows(cells, variants, identity_margin=margin, parameter_percent=_parameter_percent())
    choice = ad_choice(cells, variants)
    seconds = {"training": sum(t["seconds"] for per in data["training"].values() for t in per.values() if t),
               "cells": sum(c.get("seconds", 0.0) for per in data["cells"].values() for c in per.values() if c)}
    results = {"claims": [r.to_dict() for r in rows], "ad_choice": choice, "seconds": seconds,
               "run_seconds": data.get("run_seconds"), **{k: data[k] for k in ("variants", "config", "evaluation",
                                                                                "joint_config", "training", "cells")}}
    (root / "results.json").write_text(json.dumps(results, indent=1, default=float))
    plot_diversity(cells, variants, root / "ablation_diversity.png")
    plot_controls(cells, root / "ablation_controls.png")
    plot_ad_tradeoff(cells, variants, root / "ablation_ad_tradeoff.png")
    ev, jc = data["evaluation"], data["joint_config"]
    n = ev["identities"] * ev["per_identity"]
    verdicts = {v: sum(r.result == v for r in rows) for v in ("yes", "no", "inconclusive")}
    md = ["# Toy study: the paper's claims", "",
          f"{len(cells.seeds)} seeds (stage c training seed {jc['seed']}+s, evaluation seed {ev['seed']}+s); "
          f"{n} samples per cell ({ev['identities']} identities x {ev['per_identity']}); stage c {jc['steps']} steps, "
          f"configured AD {jc['ad_reading']} x {jc['ad_weight']:g}. Values: mean over seeds ± SE; differences "
          "paired within a seed (facecrafter_jax/toy/ablation_report.py); verdict yes / no at |z| >= 2, "
          f"similarity (≈) within ±{margin:g}. Verdicts: {verdicts['yes']} yes, {verdicts['no']} no, "
          f"{verdicts['inconclusive']} inconclusive.", "", "## Claims", "", claim_table(rows), "",
          "## Variants", ""]
    md += [f"* `{k}`: {v['label']}" + (f" (`{' '.join(v['overrides'])}`)" if v["overrides"] else "")
           for k, v in variants.items()]
    md += ["", "Each variant minus `joint`, paired per seed: difference ± SE (z).", "", _variant_table(cells, variants),
           "", "## ID-only sampling", "",
           _table(cells, [("real", "targets"), ("real", "base split"), ("base", "ID-only")]
                  + [(k, "ID-only") for k in variants], ID_ONLY_METRICS), "", "## Controls", "",
           _table(cells, [("real", "targets"), ("base", "ID-only"), ("stage_a", "ID+LMK"), ("stage_b", "ID+EMO")]
                  + [(k, s) for k in variants for s in ("ID+LMK", "ID+EMO", "ID+LMK+EMO")], CONTROL_METRICS), ""]
    if choice is not None:
        md += ["## AD setting", "",
               "Rule: the largest ID-only expression-diversity gain over `no_ad` among the AD settings whose ID+LMK+EMO "
               "control is not significantly worse, if significant; otherwise the configured setting is kept. Chosen: "
               f"**{choice['chosen']}** ({choice['reading']} x {choice['weight']:g})"
               + ("." if choice["significant"] else ": no setting's gain is significant (z < 2).") , "",
               "| variant | reading | weight | expr div gain ± SE (z) | pose MAE change | emotion acc change | control ok |",
               "|---|---|---:|---:|---:|---:|---|"]
        for c in choice["candidates"]:
            g, pm, ea = c["expr_div_gain"], c["pose_mae_change"], c["emotion_acc_change"]
            md.append(f"| {c['variant']} | {c['reading']} | {c['weight']:g} | {g['mean']:+.4f} ± {g['se']:.4f} "
                      f"({c['z_gain']:+.1f}) | {pm['mean']:+.2f} ± {pm['se']:.2f} | {ea['mean']:+.3f} ± {ea['se']:.3f} "
                      f"| {'yes' if c['control_ok'] else 'no'} |")
        md.append("")
    md += ["## Time", "", f"Training {seconds['training'] / 60:.1f} min, sampling and measuring {seconds['cells'] / 60:.1f} "
           "min (summed over the cells as recorded when each was made)"
           + (f"; the last run of the command {data['run_seconds'] / 60:.1f} min wall (finished cells are not redone)."
              if (data.get("run_seconds") or 0) > 60 else "."), "",
           "![diversity](ablation_diversity.png)", "", "![controls](ablation_controls.png)", "",
           "![AD trade-off](ablation_ad_tradeoff.png)", ""]
    (root / "results.md").write_text("\n".join(md))
    if docs:
        img = Path(docs) / "images"
        img.mkdir(parents=True, exist_ok=True)
        for name in ("diversity", "controls", "ad_tradeoff"):
            shutil.copy(root / f"ablation_{name}.png", img / f"ablation_{name}.png")
    log(f"[ablation] {verdicts['yes']} claims reproduced, {verdicts['no']} contradicted, {verdicts['inconclusive']} "
        f"inconclusive: {root / 'results.md'}")
    return results


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _bar_panel(ax, cells: Cells, items, metric, title):
    vals = [cells.value(m, s, metric) for m, s in items]
    x = np.arange(len(items))
    ax.bar(x, [v.mean for v in vals], yerr=[v.se if np.isfinite(v.se) else 0 for v in vals], capsize=3,
           color=["#888888" if m in ("base", "stage_a", "stage_b") else "#3b75af" if m == "joint" else "#9ecae1"
                  for m, _ in items])
    ax.set_xticks(x, [f"{m}\n{s}" if s != "ID-only" else m for m, s in items], rotation=60, fontsize=7, ha="right")
    ax.set_title(title, fontsize=9)


def plot_diversity(cells: Cells, variants: dict, path: Path) -> None:
    """ID-only diversity (pose, expression, emotion) per model, mean ± SE over seeds; dashed: real renders of the
    full range (the targets) and of the base split."""
    plt = _plt()
    items = [("base", "ID-only")] + [(k, "ID-only") for k in variants]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for ax, (metric, title) in zip(axes, (("pose_div_deg", "ID-only pose diversity (deg)"),
                                          ("expr_div", "ID-only expression diversity"),
                                          ("emotion_entropy", "ID-only emotion diversity (bits)"))):
        _bar_panel(ax, cells, items, metric, title)
        for s, ls in (("targets", "--"), ("base split", ":")):
            if cells.has("real", s):
                ax.axhline(cells.value("real", s, metric).mean, color="k", ls=ls, lw=1, label=f"real renders: {s}")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_controls(cells: Cells, path: Path) -> None:
    """Control accuracy per stage: base ID-only, stage a ID+LMK, stage b ID+EMO, joint with each control set."""
    plt = _plt()
    items = [("base", "ID-only"), ("stage_a", "ID+LMK"), ("stage_b", "ID+EMO"), ("joint", "ID+LMK"),
             ("joint", "ID+EMO"), ("joint", "ID+LMK+EMO")]
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.2))
    for ax, (metric, title) in zip(axes, (("pose_mae_deg", "pose MAE, deg (lower is better)"),
                                          ("landmark_nme", "landmark NME (lower is better)"),
                                          ("emotion_acc", "emotion accuracy (higher is better)"))):
        _bar_panel(ax, cells, items, metric, title)
        if cells.has("real", "targets"):
            ax.axhline(cells.value("real", "targets", metric).mean, color="k", ls="--", lw=1, label="real renders")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_ad_tradeoff(cells: Cells, variants: dict, path: Path) -> None:
    """The AD weight sweep of the configured reading: per weight, the paired change against ``no_ad`` (weight 0)
    of ID-only expression diversity, pose diversity and FD (against full-range renders), ± SE over seeds."""
    plt = _plt()
    reading = next(v["ad"]["reading"] for v in variants.values() if v["group"] == "joint")
    pts = sorted((v["ad"]["weight"], k) for k, v in variants.items()
                 if v["group"] in ("joint", "ad") and v["ad"].get("reading") == reading)
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    x = np.arange(len(pts))
    for ax, (metric, label) in zip(axes, (("expr_div", "Δ ID-only expression diversity"),
                                          ("pose_div_deg", "Δ ID-only pose diversity (deg)"),
                                          ("fd_full", "Δ ID-only FD (lower is better)"))):
        if cells.has("no_ad", "ID-only"):
            d = [cells.difference((k, "ID-only"), ("no_ad", "ID-only"), metric) for _, k in pts]
            ax.errorbar(x, [e.mean for e in d], yerr=[e.se for e in d], fmt="o-", capsize=4)
        ax.axhline(0.0, color="grey", lw=1, ls=":")
        ax.set_xticks(x, [f"{w:g}" for w, _ in pts])
        ax.set_xlabel(f"AD weight ({reading})")
        ax.set_title(label + " vs no AD", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
