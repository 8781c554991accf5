"""The toy pipeline's evaluation: sample every model under every conditioning setup, measure with the toy
analysers, write ``report.md`` / ``report.json`` and image grids.

The experiment (``evaluation`` section of ``configs/toy/pipeline.yaml``)::

    conditions   identities x per_identity target draws from the toy world (training identities; pose,
                 expression / emotion, scene drawn fresh with a seed that training never used)
    real         the renders of exactly those conditions (the analysers' reference accuracy)
    sets         base ID-only | stage a ID+LMK | stage b ID+EMO | joint ID+LMK | joint ID+EMO | joint ID+LMK+EMO
                 (joint ID-only is the base model exactly: control branches off = Arc2Face, tested)
    noise        condition i starts from initial_noise(seed, i) in every set, so sets differ only by conditioning

Metrics of a set against the targets of its conditions (toy analysers, :func:`~.analysers.evaluate_analysers`):
identity top-1 (analyser's classifier vs the conditioning identity), identity cosine (embedding vs the
mean embedding of that identity's fresh renders), pose MAE (deg, vs the target pose), landmark NME (vs the
target landmarks), emotion accuracy (vs the target class), valence / arousal RMSE; diversity among the
``per_identity`` samples of an identity (pose pairwise angle, emotion entropy: what ID-only sampling
leaves free); FD: Frechet distance between analyser features (identity embedding, emotion probabilities,
valence / arousal, pose / 30 deg) of the set and of the fresh test renders (a quality proxy; small-sample
bias makes it comparable only between sets of the same size).
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

__all__ = ["SETS", "Conditions", "make_conditions", "sample_set", "analyse_set", "evaluate_pipeline",
           "write_report", "markdown_table", "evaluation_context", "load_pipeline", "JOINT_SETS"]

SETS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("base: ID", "base", ()),
    ("stage a: ID+LMK", "landmark", ("landmark",)),
    ("stage b: ID+EMO", "emotion", ("emotion",)),
    ("joint: ID+LMK", "joint", ("landmark",)),
    ("joint: ID+EMO", "joint", ("emotion",)),
    ("joint: ID+LMK+EMO", "joint", ("landmark", "emotion")),
    ("joint: ID+LMK0+EMO", "joint", ("neutral_landmark", "emotion")),
)
"""(row label, model (pipeline stage whose export is sampled), controls given). ``neutral_landmark``: the
landmarks of the target pose with a neutral expression, so pose must come from the landmarks and the emotion
from the emotion module (the two controls combined, each for its own attribute)."""
JOINT_SETS = tuple(s for s in SETS if s[1] == "joint")

COLUMNS = (("id_top1", "ID top-1 ↑", 3), ("id_cos", "ID cos ↑", 3), ("pose_mae_deg", "pose MAE° ↓", 1),
           ("landmark_nme", "NME ↓", 3), ("emotion_acc", "emotion acc ↑", 3), ("valence_rmse", "V RMSE ↓", 3),
           ("arousal_rmse", "A RMSE ↓", 3), ("pose_pairwise_deg", "pose div°", 1), ("emotion_entropy", "emo div", 2),
           ("fd", "FD ↓", 2))


class Conditions(dict):
    """``identity`` [N], ``arcface``, ``landmarks``, ``head_pose``, ``emotion`` (targets) and ``images`` (real)."""


def make_conditions(world, identities: int, per_identity: int, seed: int) -> Conditions:
    """``identities`` evenly spread training identities x ``per_identity`` fresh attribute draws each."""
    num = world.config.num_identities
    ids = np.unique(np.linspace(0, num - 1, min(identities, num)).round().astype(np.int64))
    identity = np.repeat(ids, per_identity)
    attrs = world.sample(len(identity), seed=3000 + int(seed), identity=identity)
    feats = world.features(attrs)
    neutral = dataclasses.replace(attrs, emotion=np.zeros_like(attrs.emotion), expression=np.zeros_like(attrs.expression))
    return Conditions(identity=identity.astype(np.int32), images=world.render(attrs),
                      neutral_landmarks=world.features(neutral)["landmarks"], **feats)


def load_model(folder: str | Path):
    """(denoiser for FaceCrafterPipeline, text encoder, vae) of a converted folder."""
    from facecrafter_jax.pretrained import load_pretrained, read_manifest

    comps = read_manifest(str(folder))["components"]
    want = ("unet", "text_encoder", "vae") + (("adapters",) if "adapters" in comps else ())
    pre = load_pretrained(str(folder), components=want)
    return (pre.adapters if pre.adapters is not None else pre.unet), pre.text_encoder, pre.vae


def sample_set(pipe, cond: Conditions, controls: Sequence[str], ev, *, emotion=None, landmarks=None) -> np.ndarray:
    """uint8 images, one per condition (batches of ``ev.batch_size``; condition i uses noise index i)."""
    n = len(cond["identity"])
    out = []
    for s in range(0, n, ev.batch_size):
        sl = slice(s, min(n, s + ev.batch_size))
        kw = {}
        if "landmark" in controls:
            kw["landmarks"] = (cond["landmarks"] if landmarks is None else landmarks)[sl]
        if "neutral_landmark" in controls:
            kw["landmarks"] = cond["neutral_landmarks"][sl]
        if "emotion" in controls:
            kw["emotion"] = (cond["emotion"] if emotion is None else emotion)[sl]
        if kw:
            kw.update(guidance_id=ev.guidance_id, guidance_control=ev.guidance_control)
        else:
            kw.update(guidance_id=ev.guidance_id)
        res = pipe(cond["arcface"][sl], num_steps=ev.num_steps, scheduler=ev.scheduler, seed=ev.seed,
                   first_index=s, **kw)
        out.append(np.asarray(res.images))
    return np.concatenate(out)


def _features(a: dict[str, np.ndarray]) -> np.ndarray:
    return np.concatenate([a["embedding"], a["emotion_probs"], a["va"], a["head_pose"] / 30.0], axis=1)


def analyse_set(analysers, images: np.ndarray, cond: Conditions, *, id_centres: np.ndarray,
                reference_features: np.ndarray, per_identity: int) -> dict[str, float]:
    """Every metric of the module docstring for one set of images (one per condition)."""
    from facecrafter_jax import metrics as M

    from .analysers import evaluate_analysers

    targets = {k: cond[k] for k in ("identity", "head_pose", "landmarks", "emotion")}
    m = evaluate_analysers(analysers, images, targets)
    a = analysers.analyse(images)
    m["id_cos"] = float(np.mean(np.sum(a["embedding"] * id_centres[cond["identity"]], axis=1)))
    groups = []
    for i in range(0, len(images), per_identity):
        sl = slice(i, i + per_identity)
        groups.append({"pose": a["head_pose"][sl], "probs": a["emotion_probs"][sl]})
    div = M.diversity(groups)
    m["pose_pairwise_deg"] = float(div.get("pose_pairwise", float("nan")))
    m["emotion_entropy"] = float(div.get("emotion_entropy", float("nan")))
    m["fd"] = float(M.frechet_distance(_features(a), reference_features))
    return m


def _row_noise(pipe, seed: int, n: int) -> np.ndarray:
    """One seeded starting noise repeated ``n`` times (a sweep row differs only by its conditions)."""
    from facecrafter_jax.sampling import initial_noise

    return np.repeat(np.asarray(initial_noise(seed, 1, pipe.latent_shape(None, None))), n, axis=0)


def _upscale(images: np.ndarray, k: int = 2) -> np.ndarray:
    return np.repeat(np.repeat(images, k, axis=1), k, axis=2)


def markdown_table(rows: Sequence[tuple[str, dict]], columns=COLUMNS) -> str:
    head = "| set | " + " | ".join(c[1] for c in columns) + " |"
    sep = "|---|" + "|".join("---:" for _ in columns) + "|"
    lines = [head, sep]
    for name, m in rows:
        cells = []
        for key, _, digits in columns:
            v = m.get(key)
            cells.append("-" if v is None or not np.isfinite(v) else f"{v:.{digits}f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def load_pipeline(folder: str | Path, scheduler: str):
    """A :class:`~facecrafter_jax.sampling.FaceCrafterPipeline` on a converted folder (base or with adapters)."""
    from facecrafter_jax.sampling import FaceCrafterPipeline

    model, text, vae = load_model(folder)
    return FaceCrafterPipeline(model, text, vae, scheduler=scheduler)


def evaluation_context(p) -> dict[str, Any]:
    """What every evaluated set shares: the analysers, the conditions (``cond``), and ``analyse(images)``
    (:func:`analyse_set` against the conditions, with the identity centres and FD reference of the fresh
    test renders)."""
    from .analysers import ToyAnalysers

    ev = p.cfg.evaluation
    analysers = ToyAnalysers.load(p.stage_dir("analysers"))
    test = p.data("test")
    ta = analysers.analyse(test["images"])
    num_ids = p.world.config.num_identities
    centres = np.zeros((num_ids, ta["embedding"].shape[1]), np.float32)
    for k in range(num_ids):
        sel = test["identity"] == k
        if sel.any():
            c = ta["embedding"][sel].mean(0)
            centres[k] = c / max(np.linalg.norm(c), 1e-8)
    cond = make_conditions(p.world, ev.identities, ev.per_identity, ev.seed)
    ref = _features(ta)

    def analyse(images):
        return analyse_set(analysers, images, cond, id_centres=centres, reference_features=ref,
                           per_identity=ev.per_identity)

    return {"analysers": analysers, "cond": cond, "analyse": analyse}


def evaluate_pipeline(p) -> dict[str, Any]:
    """The ``evaluate`` stage of :class:`~facecrafter_jax.toy.pipeline.ToyPipeline`; returns the report dict."""
    from .stages import EXPORTS
    from facecrafter_jax.image_grid import image_grid, save_png
    from .world import emotion_vectors

    ev = p.cfg.evaluation
    out = Path(p.out)
    img_dir = out / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    ctx = evaluation_context(p)
    analysers, cond = ctx["analysers"], ctx["cond"]
    rows: list[tuple[str, dict]] = [("real renders (analysers' reference)", ctx["analyse"](cond["images"]))]
    images: dict[str, np.ndarray] = {}
    timings: dict[str, float] = {}
    pipes = {}
    for label, stage, controls in SETS:
        if stage not in pipes:
            pipes[stage] = load_pipeline(out / EXPORTS[stage], ev.scheduler)
        t0 = time.perf_counter()
        images[label] = sample_set(pipes[stage], cond, controls, ev)
        timings[label] = time.perf_counter() - t0
        rows.append((label, ctx["analyse"](images[label])))
        p.log(f"[toy] {label}: " + ", ".join(f"{k} {rows[-1][1][k]:.3f}" for k in ("id_top1", "pose_mae_deg",
                                                                                      "emotion_acc")))
    # image grids: conditions x (target render, sets)
    pick = np.arange(0, len(cond["identity"]), max(1, len(cond["identity"]) // 8))[:8]
    cols = [cond["images"][pick]] + [images[label][pick] for label, _, _ in SETS]
    grid = np.stack(cols, 1).reshape((-1,) + cond["images"].shape[1:])
    save_png(image_grid(_upscale(grid), len(cols)), img_dir / "comparison.png")

    # emotion sweep of the joint model (ID+EMO): 4 identities x 8 emotions at full intensity
    joint = pipes["joint"]
    ids4 = np.unique(cond["identity"])[:4]
    sweep = Conditions(identity=np.repeat(ids4, 8).astype(np.int32),
                       arcface=np.repeat(p.world.identities.arcface[ids4], 8, axis=0),
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
    for i, k in enumerate(ids4):
        attrs = p.world.sample(7, seed=4000 + i, identity=int(k), emotion=0,
                               head_pose=np.stack([yaws, np.zeros(7), np.zeros(7)], 1))
        f = p.world.features(attrs)
        noise = _row_noise(joint, ev.seed + 200 + i, 7)
        res = joint(f["arcface"], landmarks=f["landmarks"], guidance_id=ev.guidance_id,
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

    # control probe: denoising loss with each control vs its null tokens, on held-out renders
    from .probe import control_probe

    test = p.data("test")
    m = min(len(test["images"]), ev.identities * ev.per_identity)
    feats = {k: test[k][:m] for k in ("arcface", "landmarks", "emotion")}
    probes = {}
    for label, stage in (("stage a", "landmark"), ("stage b", "emotion"), ("joint", "joint")):
        pipe = pipes[stage]
        probes[label] = control_probe(pipe.model, pipe.text_encoder, pipe.vae, test["images"][:m], feats,
                                      controls=pipe.controls, seed=ev.seed)

    analyser_ref = json.loads((p.stage_dir("analysers") / "config.json").read_text()).get("metrics_on_test_renders", {})
    report = {
        "rows": [{"set": name, **m} for name, m in rows],
        "analysers_on_test_renders": analyser_ref,
        "sweeps": {"emotion_sweep_accuracy": sweep_acc, "pose_sweep_yaw_mae_deg": yaw_mae},
        "control_probe": probes,
        "sampling_seconds": timings,
        "evaluation": {k: getattr(ev, k) for k in ev.__dataclass_fields__},
        "num_conditions": int(len(cond["identity"])),
    }
    write_report(p, report)
    return {"report": str(out / "report.md"), "sweeps": report["sweeps"]}


def _stage_table(p) -> str:
    from .stages import STAGE_NAMES

    lines = ["| stage | seconds | notes |", "|---|---:|---|"]
    total = 0.0
    for name in STAGE_NAMES:
        rec = p.done(name)
        if rec is None:
            lines.append(f"| {name} | (this run) | |")
            continue
        total += rec["seconds"]
        r = rec.get("result", {})
        note = ""
        if "steps" in r:
            note = f"{r['steps']} steps, final loss {r.get('final_diffusion_loss') or 0:.4f}"
            if r.get("final_ad_loss"):
                note += f", AD {r['final_ad_loss']:.4f}"
        elif name == "vae" and "info" in r:
            note = ", ".join(f"{k} {v:.4g}" for k, v in r["info"].items() if isinstance(v, (int, float)))
        elif name == "records":
            note = f"{r.get('records')} records, latents {r.get('latent_shape')}"
        lines.append(f"| {name} | {rec['seconds']:.0f} | {note} |")
    lines.append(f"| total (earlier stages) | {total:.0f} | |")
    return "\n".join(lines)


def write_report(p, report: dict) -> None:
    """``report.json`` and ``report.md`` (tables, acceptance checks, control probe, images) under ``p.out``."""
    from .probe import probe_table
    out = Path(p.out)
    rows = [(r["set"], r) for r in report["rows"]]
    by = dict(rows)
    ref = report["analysers_on_test_renders"]
    base, lmk, emo = by["base: ID"], by["joint: ID+LMK"], by["joint: ID+EMO"]
    checks = [
        ("emotion accuracy: joint ID+EMO vs ID-only", emo["emotion_acc"], base["emotion_acc"],
         emo["emotion_acc"] > base["emotion_acc"] + 0.2),
        ("pose MAE (deg): joint ID+LMK vs ID-only", lmk["pose_mae_deg"], base["pose_mae_deg"],
         lmk["pose_mae_deg"] < 0.6 * base["pose_mae_deg"]),
    ]
    ev = report["evaluation"]
    md = [
        "# Toy pipeline report",
        "",
        f"Written by `python train.py` (facecrafter_jax/toy/pipeline.py) into `{out}`. Every number comes from the toy "
        "analysers (docs/toy_world.md) run on generated 64 px images; the first row is the same analysers on real "
        "renders of exactly the target conditions, i.e. the best a generator can score.",
        "",
        "## Stages",
        "",
        _stage_table(p),
        "",
        "## Controls",
        "",
        f"{report['num_conditions']} conditions: {ev['identities']} training identities x {ev['per_identity']} fresh "
        f"targets (pose, expression / emotion). Sampler {ev['scheduler']}, {ev['num_steps']} steps, guidance "
        f"g_id {ev['guidance_id']}, g_ctl {ev['guidance_control']}; condition i starts from the same noise in every set. "
        "Joint ID-only is not a separate row: with the control branches off the joint model is the base model exactly. "
        "ID+LMK0+EMO: the landmarks of the target pose with a neutral expression plus the target emotion, so the pose "
        "has to come from the landmark module and the emotion from the emotion module.",
        "",
        markdown_table(rows),
        "",
        "Columns: identity top-1 of the toy identity classifier vs the conditioning identity; cosine of its embedding "
        "to the identity's mean embedding on fresh renders; pose MAE (yaw, pitch, roll mean) and landmark NME vs the "
        "target; emotion accuracy vs the target class; valence / arousal RMSE; diversity among an identity's samples "
        "(pose pairwise angle, emotion entropy); FD = Frechet distance of analyser features to fresh renders.",
        "",
        "## Acceptance checks",
        "",
        "| check | controlled | ID-only | holds |",
        "|---|---:|---:|---|",
    ]
    for name, a, b, ok in checks:
        md.append(f"| {name} | {a:.3f} | {b:.3f} | {'yes' if ok else 'NO'} |")
    md += [
        "",
        f"Analysers on real renders (reference): emotion accuracy {ref.get('emotion_acc', float('nan')):.3f}, "
        f"pose MAE {ref.get('pose_mae_deg', float('nan')):.2f} deg, identity top-1 {ref.get('id_top1', float('nan')):.3f}, "
        f"landmark NME {ref.get('landmark_nme', float('nan')):.3f} (fresh test renders).",
        "",
        "## Control probe",
        "",
        "Whether each trained branch carries its condition, measured where it is trained (facecrafter_jax/toy/probe.py): "
        f"the epsilon-prediction loss on {report['num_conditions']} held-out renders at fixed noise levels with the "
        "control's real value vs its null tokens; gain = (null - with) / null. 0 = the branch ignores its input.",
        "",
        probe_table(report.get("control_probe", {})),
        "",
        "## Images",
        "",
        "![comparison](images/comparison.png)",
        "",
        "*Rows: conditions. Columns: the real render of the target, then "
        + ", ".join(label for label, _, _ in SETS) + ".*",
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
