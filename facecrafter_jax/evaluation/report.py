"""The evaluation report: ``OUT.json`` (everything, per-image values included) and ``OUT.md`` (one table row per
sample set, one column per metric, a legend and notes)."""

from __future__ import annotations

import json
import math
import os

from .evaluate import METRIC_COLUMNS

__all__ = ["report_markdown", "write_report"]


def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    if isinstance(v, int) and not isinstance(v, bool):
        return str(v)
    a = abs(v)
    if a != 0 and (a < 1e-3 or a >= 1e5):
        return f"{v:.3e}"
    return f"{v:.4g}" if a >= 1 else f"{v:.4f}"


def report_markdown(report: dict) -> str:
    """The markdown report: one table row per sample set, one column per metric present in any set,
    then a legend of the columns and notes (faces not found, skipped metrics)."""
    sets = report["sets"]
    keys = [k for k in METRIC_COLUMNS if any(k in s["metrics"] for s in sets)]
    lines = ["# Evaluation report", "", f"Created {report.get('created', '')} by `facecrafter_jax.evaluation`; "
             f"analysers: {report.get('analysers', {}).get('backend', '?')}; identity threshold "
             f"{report.get('settings', {}).get('id_threshold', '?')}.", ""]
    lines.append("| set | " + " | ".join(keys) + " |")
    lines.append("|---|" + "|".join("---:" for _ in keys) + "|")
    for s in sets:
        lines.append(f"| {s['name'].replace('|', '/')} | " + " | ".join(_fmt(s["metrics"].get(k)) for k in keys) + " |")
    lines += ["", "Columns (higher / lower = better):", ""]
    for k in keys:
        desc, better = METRIC_COLUMNS[k]
        lines.append(f"- `{k}`: {desc}" + (f" ({better})" if better else ""))
    notes = []
    for s in sets:
        if s["no_face"]:
            shown = ", ".join(s["no_face_files"][:10]) + (" ..." if len(s["no_face_files"]) > 10 else "")
            notes.append(f"- {s['name']}: no face in {s['no_face']} of {s['num_images']} images ({shown})")
        for msg in s["skipped"]:
            notes.append(f"- {s['name']}: skipped {msg}")
    if report.get("reference"):
        r = report["reference"]
        notes.append(f"- reference images: {r['images']} from {r['dir']} (no face in {r['no_face']})")
    if notes:
        lines += ["", "Notes:", ""] + notes
    return "\n".join(lines) + "\n"


def write_report(report: dict, out: str) -> tuple[str, str]:
    """Write ``out``.json and ``out``.md (a trailing .json / .md of ``out`` is dropped). Returns both paths."""
    base = out[:-5] if out.endswith(".json") else out[:-3] if out.endswith(".md") else out
    parent = os.path.dirname(os.path.abspath(base))
    os.makedirs(parent, exist_ok=True)
    jp, mp = base + ".json", base + ".md"
    for path, text in ((jp, json.dumps(report, indent=2, allow_nan=False) + "\n"), (mp, report_markdown(report))):
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    return jp, mp
