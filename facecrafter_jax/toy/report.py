"""The toy pipeline's evaluation: sample every model under every conditioning setup, measure with the toy
analysers (:mod:`facecrafter_jax.toy.measure`), write ``report.md`` / ``report.json`` and image grids.

The experiment (``evaluation`` section of ``configs/toy/pipeline.yaml``; :func:`~.measure.make_conditions`)::

    conditions   identities x per_identity: per identity ONE full-range reference render, whose toy ArcFace is
                 the identity condition of all that identity's samples (as sample.py --id-image), and
                 per_identity fresh full-range targets (pose, landmarks, emotion)
    real rows    renders of the targets (the adapter split's distribution: what the controlled sets are asked
                 for, and the diversity a generator could have) and fresh base-split renders of the same
                 identities (what the base model was trained on: the reference of its FD)
    sets         :data:`SETS`: base ID-only | joint ID-only (null tokens) | stage a ID+LMK | stage b ID+EMO |
                 joint ID+LMK | joint ID+EMO | joint ID+LMK+EMO | joint ID+LMK0+EMO, plus
                 :data:`BASE_OWN`: base ID-only with every sample on its own base-split photo (image quality)
    noise        condition i starts from initial_noise(seed, i) in every set

Two tables: **ID-only sampling** (group ``id_only``: identity, FD against fresh base-split and full-range
renders, diversity of pose / expression / emotion among an identity's samples, copying of the reference) and
**controls** (group ``controls``: accuracy against the targets). Every number has a standard error clustered
by identity (:mod:`~.measure`).
"""

from __future__ import annotations

import functools
import json
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from . import measure as MS
from .measure import Conditions, make_conditions, sample_set  # noqa: F401  (re-exported)

__all__ = ["SETS", "JOINT_SETS", "Conditions", "make_conditions", "sample_set", "evaluate_pipeline", "write_report",
           "markdown_table", "evaluation_context", "load_pipeline", "load_model", "ID_ONLY_COLUMNS",
           "CONTROL_COLUMNS", "BASE_OWN"]

SETS: tuple[tuple[str, str, tuple[str, ...], dict, str], ...] = (
    ("base: ID", "base", (), {}, "id_only"),
    ("joint: ID-only (null tokens)", "joint", (), {"absent_controls": "null_tokens"}, "id_only"),
    ("stage a: ID+LMK", "landmark", ("landmark",), {}, "controls"),
    ("stage b: ID+EMO", "emotion", ("emotion",), {}, "controls"),
    ("joint: ID+LMK", "joint", ("landmark",), {}, "controls"),
    ("joint: ID+EMO", "joint", ("emotion",), {}, "controls"),
    ("joint: ID+LMK+EMO", "joint", ("landmark", "emotion"), {}, "controls"),
    ("joint: ID+LMK0+EMO", "joint", ("neutral_landmark", "emotion"), {}, "controls"),
)
"""(row label, model (pipeline stage whose export is sampled), controls given, extra pipeline keywords,
table). ``neutral_landmark``: the landmarks of the target pose with a neutral expression, so pose must come
from the landmark module and the emotion from the emotion module. ``joint: ID-only (null tokens)`` is FaceCrafter's
default ID-only sampling (every control on its null tokens, docs/method.md), next to the base model's (Arc2Face's)
ID-only row: the comparison of the paper's ID-only diversity claim."""
JOINT_SETS = tuple((label, stage, controls) for label, stage, controls, _, _ in SETS if stage == "joint")

REAL_TARGETS = "real renders: targets (adapter split)"
REAL_BASE = "real renders: base split"
BASE_OWN = "base: ID, its own celebrity photo per sample"
"""The base model ID-only with every sample conditioned on its own base-split photo of its identity
(:attr:`EvaluationContext.cond_own`): its FD is the image quality without the copying of one photo that the
one-photo rows show (docs/toy_world.md, "Where the samples' FD goes")."""

ID_ONLY_COLUMNS = (("id_top1", "ID top-1 ↑", 3), ("id_cos", "ID cos ↑", 3), ("fd_base", "FD base split ↓", 2),
                   ("fd_full", "FD full range ↓", 2), ("pose_div_deg", "pose div°", 1),
                   ("expr_div", "expr div", 3), ("emotion_entropy", "emo div (bits)", 2),
                   ("pose_copy", "pose copy (1 = none)", 2), ("yaw_copy_slope", "yaw copy slope (0 = none)", 2),
                   ("expr_copy", "expr copy (1 = none)", 2), ("emotion_copy", "emotion copy (0 = none)", 2))
CONTROL_COLUMNS = (("id_top1", "ID top-1 ↑", 3), ("id_cos", "ID cos ↑", 3), ("pose_mae_deg", "pose MAE° ↓", 1),
                   ("landmark_nme", "NME ↓", 3), ("emotion_acc", "emotion acc ↑", 3),
                   ("valence_rmse", "V RMSE ↓", 3), ("arousal_rmse", "A RMSE ↓", 3), ("fd_full", "FD ↓", 2))


def load_model(folder: str | Path):
    """(denoiser for FaceCrafterPipeline, text encoder, vae) of a converted folder."""
    from facecrafter_jax.pretrained import load_pretrained, read_manifest

    comps = read_manifest(str(folder))["components"]
    want = ("unet", "text_encoder", "vae") + (("adapters",) if "adapters" in comps else ())
    pre = load_pretrained(str(folder), components=want)
    return (pre.adapters if pre.adapters is not None else pre.unet), pre.text_encoder, pre.vae


def load_pipeline(folder: str | Path, scheduler: str):
    """A :class:`~facecrafter_jax.sampling.FaceCrafterPipeline` on a converted folder (base or with adapters)."""
    from facecrafter_jax.sampling import FaceCrafterPipeline

    model, text, vae = load_model(folder)
    return FaceCrafterPipeline(model, text, vae, scheduler=scheduler)


def _fmt(m: dict, key: str, digits: int) -> str:
    v = m.get(key)
    if v is None or not np.isfinite(v):
        return "-"
    se = m.get(f"{key}_se")
    return f"{v:.{digits}f}" + (f" ± {se:.{digits}f}" if se is not None and np.isfinite(se) else "")


def markdown_table(rows: Sequence[tuple[str, dict]], columns=CONTROL_COLUMNS) -> str:
    """One row per (name, metrics); a metric ``k`` is printed with its standard error ``k_se`` when present."""
    head = "| set | " + " | ".join(c[1] for c in columns) + " |"
    lines = [head, "|---|" + "|".join("---:" for _ in columns) + "|"]
    for name, m in rows:
        lines.append(f"| {name} | " + " | ".join(_fmt(m, key, d) for key, _, d in columns) + " |")
    return "\n".join(lines)


class EvaluationContext:
    """What every evaluated set shares (:func:`evaluation_context`): ``analysers``, ``cond``, the references'
    analysis, the identity centres and the FD references; :meth:`measure` turns images into a flat metric
    dict (``k`` and ``k_se``)."""

    def __init__(self, p, ev):
        self.ev = ev
        self.analysers = p.analysers()
        test, test_base = p.data("test"), p.data("test_base")
        ta = self.analysers.analyse(test["images"])
        num_ids = p.world.config.num_identities
        self.centres = np.zeros((num_ids, ta["embedding"].shape[1]), np.float32)
        for k in range(num_ids):
            sel = test["identity"] == k
            if sel.any():
                c = ta["embedding"][sel].mean(0)
                self.centres[k] = c / max(np.linalg.norm(c), 1e-8)
        self.cond = make_conditions(p.world, p.arcface, ev.identities, ev.per_identity, ev.seed)
        self.ref_analysis = self.analysers.analyse(MS.reference_images(self.cond))
        self.fd_full = MS.features(ta)
        self.fd_base = MS.features(self.analysers.analyse(test_base["images"]))
        from .splits import sample_split

        base_attrs = sample_split(p.world, p.split_of("base"), len(self.cond["identity"]), 3600 + ev.seed,
                                  p.celebrity, identity=self.cond["identity"])
        self.real_base_images = p.world.render(base_attrs)
        self._pipeline = p

    @functools.cached_property
    def cond_own(self) -> Conditions:
        """The same conditions with every sample on its own base-split (celebrity) photo of its identity: the base
        model's in-distribution use, where copying of one photo averages out of the FD (the photos of base-probe's
        ``--reference celebrity_each``); built on first use."""
        return MS.own_photo_conditions(self._pipeline, self.cond, "celebrity_each", self.ev.seed)

    def measure(self, images: np.ndarray, per_identity: dict | None = None, cond: Conditions | None = None
                ) -> dict[str, float]:
        """Metrics of ``images`` (one per condition of ``cond``, default the context's ``cond``); no copy metrics
        when every sample had its own photo (``cond_own``)."""
        cond = self.cond if cond is None else cond
        a = self.analysers.analyse(images)
        ref = None if cond.get("reference_each") else self.ref_analysis
        m = MS.set_metrics(a, cond, ref_analysis=ref, id_centres=self.centres,
                           fd_reference=self.fd_full, bootstrap=self.ev.bootstrap, seed=self.ev.seed,
                           per_identity=per_identity)
        m["fd_full"] = m.pop("fd")
        f = MS.features(a)
        k, per = len(self.cond["identities"]), self.ev.per_identity
        from facecrafter_jax import metrics as M

        def fd(g):
            return M.frechet_distance(np.concatenate([f[i * per:(i + 1) * per] for i in g]), self.fd_base)
        m["fd_base"] = (fd(np.arange(k)), MS.cluster_bootstrap(fd, k, resamples=self.ev.bootstrap, seed=self.ev.seed))
        out = {"n": float(len(images))}
        for key, (v, se) in m.items():
            out[key], out[f"{key}_se"] = v, se
        return out


def evaluation_context(p) -> EvaluationContext:
    """The shared part of an evaluation of pipeline ``p`` (its ``evaluation`` config)."""
    return EvaluationContext(p, p.cfg.evaluation)


def evaluate_folder(ctx: EvaluationContext, folder: str | Path, controls: Sequence[str] = (), **kwargs) -> dict:
    """Sample a converted model folder on the context's conditions with ``controls`` (none: ID-only) and return
    its metrics with standard errors (``k`` and ``k_se``) plus ``images`` and ``sampling_seconds``."""
    pipe = load_pipeline(folder, ctx.ev.scheduler)
    t0 = time.perf_counter()
    images = sample_set(pipe, ctx.cond, controls, ctx.ev, **kwargs)
    return {**ctx.measure(images), "images": images, "sampling_seconds": time.perf_counter() - t0}


def _row_noise(pipe, seed: int, n: int) -> np.ndarray:
    """One seeded starting noise repeated ``n`` times (a sweep row differs only by its conditions)."""
    from facecrafter_jax.sampling import initial_noise

    return np.repeat(np.asarray(initial_noise(seed, 1, pipe.latent_shape(None, None))), n, axis=0)


def _upscale(images: np.ndarray, k: int = 2) -> np.ndarray:
    return np.repeat(np.repeat(images, k, axis=1), k, axis=2)


def evaluate_pipeline(p) -> dict[str, Any]:
    """The ``evaluate`` stage of :class:`~facecrafter_jax.toy.pipeline.ToyPipeline`; returns the report dict."""
    from .stages import EXPORTS
    from facecrafter_jax.image_grid import image_grid, save_png
    from .world import emotion_vectors

    ev = p.cfg.evaluation
    out = Path(p.out)
    img_dir = out / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    t_ctx = time.perf_counter()
    ctx = evaluation_context(p)
    analysers, cond = ctx.analysers, ctx.cond
    rows: list[tuple[str, dict, str]] = [(REAL_TARGETS, ctx.measure(cond["images"]), "both"),
                                         (REAL_BASE, ctx.measure(ctx.real_base_images), "id_only")]
    images: dict[str, np.ndarray] = {}
    timings: dict[str, float] = {"conditions": time.perf_counter() - t_ctx}
    pipes = {}
    for label, stage, controls, kwargs, group in SETS:
        if stage not in pipes:
            pipes[stage] = load_pipeline(out / EXPORTS[stage], ev.scheduler)
        t0 = time.perf_counter()
        images[label] = sample_set(pipes[stage], cond, controls, ev, **kwargs)
        timings[label] = time.perf_counter() - t0
        rows.append((label, ctx.measure(images[label]), group))
        p.log(f"[toy] {label}: " + ", ".join(f"{k} {rows[-1][1][k]:.3f}" for k in ("id_top1", "pose_mae_deg",
                                                                                      "emotion_acc", "pose_copy")))
    t0 = time.perf_counter()
    images[BASE_OWN] = sample_set(pipes["base"], ctx.cond_own, (), ev)
    timings[BASE_OWN] = time.perf_counter() - t0
    own = ctx.measure(images[BASE_OWN], cond=ctx.cond_own)
    rows.insert([r[0] for r in rows].index(SETS[0][0]) + 1, (BASE_OWN, own, "id_only"))  # after the base's row
    p.log(f"[toy] {BASE_OWN}: id_top1 {own['id_top1']:.3f}, fd_base {own['fd_base']:.3f}")
    # image grids: conditions x (reference, target render, sets)
    per = ev.per_identity
    pick = np.arange(0, len(cond["identity"]), max(1, len(cond["identity"]) // 8))[:8]
    cols = [cond["ref_images"][pick // per], cond["images"][pick]] + [images[s[0]][pick] for s in SETS]
    grid = np.stack(cols, 1).reshape((-1,) + cond["images"].shape[1:])
    save_png(image_grid(_upscale(grid), len(cols)), img_dir / "comparison.png")
    # ID-only grid: per identity its reference, then its samples from the base model
    idk = np.arange(min(8, len(cond["identities"])))
    cols = [cond["ref_images"][idk]] + [images[SETS[0][0]][idk * per + j] for j in range(min(per, 8))]
    grid = np.stack(cols, 1).reshape((-1,) + cond["images"].shape[1:])
    save_png(image_grid(_upscale(grid), len(cols)), img_dir / "id_only.png")

    # emotion sweep of the joint model (ID+EMO): 4 identities x 8 emotions at full intensity
    t0 = time.perf_counter()
    joint = pipes["joint"]
    ids4 = np.arange(min(4, len(cond["identities"])))  # the first evaluation identities, with their reference's toy ArcFace
    sweep = Conditions(identity=np.repeat(cond["identities"][ids4], 8).astype(np.int32),
                       arcface=np.repeat(cond["arcface"][ids4 * per], 8, axis=0),
                       emotion=np.tile(emotion_vectors(np.arange(8), np.ones(8)), (len(ids4), 1)).astype(np.float32))
    sweep_imgs = []
    for i, k in enumerate(ids4):  # same noise across a row: only the emotion changes
        c = Conditions(identity=sweep["identity"][i * 8:(i + 1) * 8], arcface=sweep["arcface"][i * 8:(i + 1) * 8])
        res = joint(c["arcface"], emotion=sweep["emotion"][i * 8:(i + 1) * 8], guidance_id=ev.guidance_id,
                    guidance_control=ev.guidance_control, num_steps=ev.num_steps, scheduler=ev.scheduler,
                    latents=_row_noise(joint, ev.seed + 100 + i, 8))
        sweep_imgs.append(np.asarray(res.images))
    sweep_imgs = np.concatenate(sweep_imgs)
    sweep_pred = analysers.analyse(sweep_imgs)["emotion_probs"].argmax(-1)
    sweep_acc = float((sweep_pred == np.tile(np.arange(8), len(ids4))).mean())
    save_png(image_grid(_upscale(sweep_imgs), 8), img_dir / "emotion_sweep.png")

    # pose sweep of the joint model (ID+LMK): landmarks of renders at yaw -40..40, neutral, same noise per row
    yaws = np.linspace(-40, 40, 7)
    pose_imgs, pose_real = [], []
    for i in ids4:
        attrs = p.world.sample(7, seed=4000 + int(i), identity=int(cond["identities"][i]), emotion=0,
                               head_pose=np.stack([yaws, np.zeros(7), np.zeros(7)], 1))
        f = p.world.features(attrs)
        noise = _row_noise(joint, ev.seed + 200 + int(i), 7)
        res = joint(np.repeat(cond["arcface"][i * per][None], 7, axis=0), landmarks=f["landmarks"], guidance_id=ev.guidance_id,
                    guidance_control=ev.guidance_control, num_steps=ev.num_steps, scheduler=ev.scheduler, latents=noise)
        pose_imgs.append(np.asarray(res.images))
        pose_real.append(p.world.render(attrs))
    pose_imgs = np.concatenate(pose_imgs)
    yaw_pred = analysers.analyse(pose_imgs)["head_pose"][:, 0]
    yaw_mae = float(np.mean(np.abs(yaw_pred - np.tile(yaws, len(ids4)))))
    rows_img = []
    for i in range(len(ids4)):
        rows_img += [pose_real[i], pose_imgs[i * 7:(i + 1) * 7]]
    save_png(image_grid(_upscale(np.concatenate(rows_img)), 7), img_dir / "pose_sweep.png")
    timings["sweeps"] = time.perf_counter() - t0

    # control probe: denoising loss with each control vs its null tokens, on held-out renders
    from .probe import control_probe

    t0 = time.perf_counter()
    test = p.data("test")
    m = min(len(test["images"]), ev.probe_images)
    feats = {k: test[k][:m] for k in ("landmarks", "emotion")}
    feats["arcface"] = p.arcface(test["images"][:m])
    probes = {}
    for label, stage in (("stage a", "landmark"), ("stage b", "emotion"), ("joint", "joint")):
        pipe = pipes[stage]
        probes[label] = control_probe(pipe.model, pipe.text_encoder, pipe.vae, test["images"][:m], feats,
                                      controls=pipe.controls, seed=ev.seed)

    timings["control_probe"] = time.perf_counter() - t0
    analyser_ref = json.loads((p.stage_dir("analysers") / "config.json").read_text()).get("metrics_on_test_renders", {})
    records = p.done("records") or {}
    render = p.done("render") or {}
    report = {
        "rows": [{"set": name, "table": group, **m} for name, m, group in rows],
        "split_statistics": render.get("result", {}).get("split_statistics", {}),
        "arcface_leakage": records.get("result", {}).get("arcface_leakage", {}),
        "analysers_on_test_renders": analyser_ref,
        "sweeps": {"emotion_sweep_accuracy": sweep_acc, "pose_sweep_yaw_mae_deg": yaw_mae},
        "control_probe": probes,
        "sampling_seconds": timings,
        "evaluation": {k: getattr(ev, k) for k in ev.__dataclass_fields__},
        "num_conditions": int(len(cond["identity"])),
    }
    report["evaluate_seconds"] = time.perf_counter() - t_ctx
    write_report(p, report)
    return {"report": str(out / "report.md"), "sweeps": report["sweeps"],
            "checks": {name: bool(ok) for name, _, _, ok in acceptance_checks({r["set"]: r for r in report["rows"]})}}


def _stage_table(p, evaluate_seconds: float | None = None) -> str:
    from .stages import STAGE_NAMES

    lines = ["| stage | wall s | CPU s | load avg | notes |", "|---|---:|---:|---:|---|"]
    total = cpu_total = 0.0
    for name in STAGE_NAMES:
        rec = p.done(name)
        if rec is None:
            if name == "evaluate" and evaluate_seconds is not None:
                total += evaluate_seconds
                lines.append(f"| {name} | {evaluate_seconds:.0f} | | | up to writing this report |")
            else:
                lines.append(f"| {name} | (not run) | | | |")
            continue
        total += rec["seconds"]
        cpu = rec.get("cpu_seconds")
        cpu_total += cpu or 0.0
        r = rec.get("result", {})
        note = ""
        if "steps" in r:
            note = f"{r['steps']} steps, final loss {r.get('final_diffusion_loss') or 0:.4f}"
            if r.get("final_ad_loss"):
                note += f", AD {r['final_ad_loss']:.4f}"
        elif name == "vae" and "info" in r:
            note = ", ".join(f"{k} {v}" if isinstance(v, int) else f"{k} {v:.4g}" for k, v in r["info"].items()
                             if isinstance(v, (int, float)) and not isinstance(v, bool))
        elif name == "records":
            note = f"{r.get('records')} records, latents {r.get('latent_shape')}"
        load = rec.get("load_average")
        lines.append(f"| {name} | {rec['seconds']:.0f} | {'' if cpu is None else f'{cpu:.0f}'} | "
                     f"{'' if load is None else f'{load:.1f}'} | {note} |")
    lines.append(f"| **total** | **{total:.0f}** ({total / 60:.1f} min) | {cpu_total:.0f} | | |")
    return "\n".join(lines)


def acceptance_checks(by: dict[str, dict]) -> list[tuple[str, str, str, bool]]:
    """(check, measured, bar, holds) for the report: the base model's quality, the Arc2Face failure, and the
    two controls. "Clearly" means by more than 3 standard errors."""
    base, real_t, real_b = by["base: ID"], by[REAL_TARGETS], by[REAL_BASE]
    lmk, emo = by["joint: ID+LMK"], by["joint: ID+EMO"]

    def below(a, b, key, factor=1.0):
        d = factor * b[key] - a[key]
        se = np.hypot(a.get(f"{key}_se", 0.0), factor * b.get(f"{key}_se", 0.0))
        return d > 3 * se

    fd_ratio = base["fd_base"] / real_b["fd_base"]
    quality = []
    if BASE_OWN in by:
        own_ratio = by[BASE_OWN]["fd_base"] / real_b["fd_base"]
        quality = [("base ID-only image quality: FD with its own celebrity photo per sample / FD of fresh base-split "
                    "renders", f"{own_ratio:.2f}", "<= 1.3", own_ratio <= 1.3)]
    return [
        ("base ID-only identity top-1", f"{base['id_top1']:.3f} ± {base['id_top1_se']:.3f}", ">= 0.8",
         base["id_top1"] >= 0.8),
        ("base ID-only FD / FD of fresh base-split renders (one full-range photo per identity)", f"{fd_ratio:.2f}",
         "<= 1.3", fd_ratio <= 1.3),
        *quality,
        ("base ID-only pose diversity below the adapter split's (real renders of the targets)",
         f"{base['pose_div_deg']:.1f} vs {real_t['pose_div_deg']:.1f} deg", "clearly below",
         below(base, real_t, "pose_div_deg")),
        ("base ID-only expression diversity below the adapter split's",
         f"{base.get('expr_div', float('nan')):.3f} vs {real_t.get('expr_div', float('nan')):.3f}", "clearly below",
         "expr_div" in base and below(base, real_t, "expr_div")),
        ("base ID-only samples copy the reference's pose (yaw slope on the reference's yaw, decoys subtracted)",
         f"{base['yaw_copy_slope']:.2f} ± {base['yaw_copy_slope_se']:.2f}", "clearly above 0",
         base["yaw_copy_slope"] > 3 * base["yaw_copy_slope_se"]),
        ("base ID-only samples copy the reference's expression",
         f"{base.get('expr_copy', float('nan')):.2f} ± {base.get('expr_copy_se', float('nan')):.2f}", "clearly below 1",
         "expr_copy" in base and 1.0 - base["expr_copy"] > 3 * base["expr_copy_se"]),
        ("emotion accuracy: joint ID+EMO vs base ID-only", f"{emo['emotion_acc']:.3f} vs {base['emotion_acc']:.3f}",
         "+0.2", emo["emotion_acc"] > base["emotion_acc"] + 0.2),
        ("pose MAE: joint ID+LMK vs base ID-only", f"{lmk['pose_mae_deg']:.1f} vs {base['pose_mae_deg']:.1f} deg",
         "< 0.6x", lmk["pose_mae_deg"] < 0.6 * base["pose_mae_deg"]),
    ]


def write_report(p, report: dict) -> None:
    """``report.json`` and ``report.md`` (tables, acceptance checks, control probe, images) under ``p.out``."""
    from .identity import leakage_table
    from .probe import probe_table

    out = Path(p.out)
    rows = [(r["set"], r) for r in report["rows"]]
    by = dict(rows)
    ref = report["analysers_on_test_renders"]
    ev = report["evaluation"]
    id_rows = [(n, r) for n, r in rows if r.get("table") in ("id_only", "both")]
    ctl_rows = [(n, r) for n, r in rows if r.get("table") in ("controls", "both")]
    ctl_rows.insert(1, ("base: ID", by["base: ID"]))
    stats = report.get("split_statistics", {})
    split_lines = ["| rendered set | yaw std (within identity) | pitch std (within) | roll std (within) | "
                   "emotion entropy within identity (bits) |", "|---|---:|---:|---:|---:|"]
    for name, st in stats.items():
        split_lines.append(f"| {name} | {st['yaw_std']:.1f} ({st['yaw_std_within']:.1f}) | {st['pitch_std']:.1f} "
                           f"({st['pitch_std_within']:.1f}) | {st['roll_std']:.1f} ({st['roll_std_within']:.1f}) | "
                           f"{st['emotion_entropy_within']:.2f} |")
    md = [
        "# Toy pipeline report",
        "",
        f"Written by `python train.py` (facecrafter_jax/toy/pipeline.py) into `{out}`. Every number comes from the toy "
        "analysers (docs/toy_world.md) run on generated 64 px images, with a standard error clustered by identity "
        "(facecrafter_jax/toy/measure.py).",
        "",
        "## Stages",
        "",
        _stage_table(p, report.get("evaluate_seconds")),
        "",
        "## Data",
        "",
        "The base model trains on the base split (per identity a narrow, identity-specific habit of pose and "
        "expression, facecrafter_jax/toy/splits.py); the analysers and the adapter stages on the full range. "
        "Per rendered set (degrees; within = mean over identities of the per-identity spread):",
        "",
        "\n".join(split_lines),
        "",
        "The toy ArcFace is the identity analyser's embedding of the image (facecrafter_jax/toy/identity.py). How much "
        "pose, expression and emotion a linear read-out recovers from it on fresh full-range renders (2-fold "
        "cross-validated):",
        "",
        leakage_table({"toy ArcFace": report.get("arcface_leakage", {})}) if report.get("arcface_leakage") else "-",
        "",
        "## ID-only sampling: quality, diversity, copying of the reference",
        "",
        f"{report['num_conditions']} conditions: {ev['identities']} training identities x {ev['per_identity']} samples, "
        "each identity conditioned on the toy ArcFace of ONE full-range reference render (as `sample.py --id-image`). "
        f"Sampler {ev['scheduler']}, {ev['num_steps']} steps, g_id {ev['guidance_id']}; sample i starts from the same "
        "noise in every set. Diversity: mean over identities of the pairwise pose angle, pairwise distance of "
        "pose-normalised expression displacements (3-D landmarks aligned onto the identity's neutral frontal face, "
        "/ inter-ocular distance) and the entropy of the emotion classes among its samples. Copy: mean distance of a "
        "sample to its reference / to other renders of the same identity that no model saw (1 = independent of the "
        "reference, 0 = a copy); yaw copy slope: slope of the samples' yaw on their reference's yaw minus that on "
        "such renders' yaw (0 = none, 1 = turns as far as the reference); emotion copy: P(same class as its reference) - "
        "P(same as such a render). FD against fresh base-split "
        "and full-range renders (analyser features; compare rows of equal size only). "
        f"'{BASE_OWN}': the same conditions and noise, every sample conditioned on its own photo of its identity from "
        "the base model's (celebrity) split: its FD is the image quality without the copying of one photo (no copy "
        "metrics: there is no one reference).",
        "",
        markdown_table(id_rows, ID_ONLY_COLUMNS),
        "",
        "## Controls",
        "",
        f"Same conditions; targets from the full range; g_ctl {ev['guidance_control']}. Joint ID-only with the control "
        "branches off is the base model exactly. ID+LMK0+EMO: the landmarks of the target pose with a neutral "
        "expression plus the target emotion (pose from the landmark module, emotion from the emotion module).",
        "",
        markdown_table(ctl_rows, CONTROL_COLUMNS),
        "",
        "## Acceptance checks",
        "",
        "| check | measured | bar | holds |",
        "|---|---:|---|---|",
    ]
    for name, measured, bar, ok in acceptance_checks(by):
        md.append(f"| {name} | {measured} | {bar} | {'yes' if ok else 'NO'} |")
    md += [
        "",
        f"Analysers on fresh full-range renders (reference): identity top-1 {ref.get('id_top1', float('nan')):.3f}, "
        f"pose MAE {ref.get('pose_mae_deg', float('nan')):.2f} deg, landmark NME {ref.get('landmark_nme', float('nan')):.3f}, "
        f"emotion accuracy {ref.get('emotion_acc', float('nan')):.3f}.",
        "",
        "## Control probe",
        "",
        "Whether each trained branch carries its condition, measured where it is trained (facecrafter_jax/toy/probe.py): "
        f"the epsilon-prediction loss on {ev['probe_images']} held-out renders at fixed noise levels with the "
        "control's real value vs its null tokens; gain = (null - with) / null. 0 = the branch ignores its input.",
        "",
        probe_table(report.get("control_probe", {})),
        "",
        "## Images",
        "",
        "![ID-only](images/id_only.png)",
        "",
        "*Base model, ID-only: per row one identity's reference render (whose toy ArcFace is the condition), then its "
        "samples.*",
        "",
        "![comparison](images/comparison.png)",
        "",
        "*Rows: conditions. Columns: the identity's reference render, the real render of the target, then "
        + ", ".join(s[0] for s in SETS) + ".*",
        "",
        "![emotion sweep](images/emotion_sweep.png)",
        "",
        "*Joint model, ID+EMO: one identity per row, the 8 emotions (neutral, happy, sad, surprise, fear, disgust, "
        f"anger, contempt) at full intensity from the same noise. Analyser accuracy on these: "
        f"{report['sweeps']['emotion_sweep_accuracy']:.3f}.*",
        "",
        "![pose sweep](images/pose_sweep.png)",
        "",
        "*Joint model, ID+LMK: landmarks of renders at yaw -40..40 deg (neutral); per identity the real renders, "
        f"then the samples from one noise. Yaw MAE of the samples: {report['sweeps']['pose_sweep_yaw_mae_deg']:.1f} deg.*",
        "",
    ]
    (out / "report.json").write_text(json.dumps(report, indent=1, default=float))
    (out / "report.md").write_text("\n".join(md))
