"""Metrics assembly: run the analysers on every sample set and compute the paper's metrics per set.

Only metrics whose targets and analysers are present are computed. Images in which the analysers find no face
are counted (``no_face``) and left out of the averages; they never stop the run. Metric definitions:
:mod:`facecrafter_jax.metrics` and docs/evaluation.md.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from facecrafter_jax import metrics as M
from facecrafter_jax.errors import DataError
from facecrafter_jax.face.images import IMAGE_EXTENSIONS
from facecrafter_jax.face.vocabulary import EMOTION_CLASSES, ID_DIM, NUM_EMOTIONS, NUM_LANDMARKS
from facecrafter_jax.sample_set import SampleSet, load_embedding, load_landmarks, load_rgb

from .analysers import Analysers

__all__ = ["METRIC_COLUMNS", "Analysis", "analyse", "evaluate_set", "evaluate", "reference_images"]


# Table columns: key -> (description, better). Order = column order of the markdown table.
METRIC_COLUMNS: dict[str, tuple[str, str]] = {
    "images": ("generated images", ""),
    "no_face": ("images in which no face was found (left out of every metric)", "lower"),
    "id_cos": ("identity: mean cosine of ArcFace(generated) and the source identity embedding", "higher"),
    "id_cos_std": ("identity: std of that cosine", ""),
    "id_frac": ("identity: fraction of images with cosine > --id-threshold", "higher"),
    "nme": ("landmarks: NME, all 478 points, / target inter-ocular distance (33-263)", "lower"),
    "nme_expr": ("expression: NME on mouth+eyes+brows after Procrustes (similarity) alignment", "lower"),
    "nme_mouth": ("expression: Procrustes NME, mouth (40 lip points)", "lower"),
    "nme_eyes": ("expression: Procrustes NME, eyes (32 eye-contour points)", "lower"),
    "nme_brows": ("expression: Procrustes NME, brows (20 points)", "lower"),
    "pose_err": ("head pose: mean of |yaw|, |pitch|, |roll| errors (degrees)", "lower"),
    "yaw_err": ("head pose: mean |yaw error| (degrees)", "lower"),
    "pitch_err": ("head pose: mean |pitch error| (degrees)", "lower"),
    "roll_err": ("head pose: mean |roll error| (degrees)", "lower"),
    "pose_geo": ("head pose: mean geodesic angle between predicted and target rotations (degrees)", "lower"),
    "emo_acc": ("emotion: accuracy of EmoNet's argmax class vs the target class", "higher"),
    "val_mae": ("emotion: valence MAE", "lower"),
    "val_rmse": ("emotion: valence RMSE", "lower"),
    "aro_mae": ("emotion: arousal MAE", "lower"),
    "aro_rmse": ("emotion: arousal RMSE", "lower"),
    "div_ids": ("diversity (ID-only images): identities with >= 2 faces", ""),
    "div_yaw": ("diversity: std of yaw per identity (degrees), mean over identities", "higher"),
    "div_pitch": ("diversity: std of pitch per identity (degrees)", "higher"),
    "div_roll": ("diversity: std of roll per identity (degrees)", "higher"),
    "div_pose": ("diversity: mean pairwise geodesic angle between head poses (degrees)", "higher"),
    "div_expr": ("diversity: mean pairwise expression NME (Procrustes, mouth+eyes+brows)", "higher"),
    "div_emo_H": ("diversity: entropy (bits, max 3) of the predicted emotion classes", "higher"),
    "div_val": ("diversity: std of predicted valence", "higher"),
    "div_aro": ("diversity: std of predicted arousal", "higher"),
    "fd_arcface": ("quality proxy: Fréchet distance of ArcFace embeddings vs --reference images", "lower"),
    "fd_emonet": ("quality proxy: Fréchet distance of EmoNet outputs (8 probs, valence, arousal) vs --reference",
                  "lower"),
}


@dataclass
class Analysis:
    """Analyser outputs for a list of images (NaN rows = no face)."""

    identity: np.ndarray | None = None
    landmarks: np.ndarray | None = None
    pose: np.ndarray | None = None
    probs: np.ndarray | None = None
    valence: np.ndarray | None = None
    arousal: np.ndarray | None = None

    def no_face(self) -> np.ndarray:
        """True where an analyser that ran found no face."""
        rows = [a.reshape(len(a), -1) for a in (self.identity, self.landmarks, self.probs) if a is not None]
        if not rows:
            return np.zeros(0, bool)
        return np.any([~np.all(np.isfinite(r), axis=1) for r in rows], axis=0)


def analyse(analysers: Analysers, paths: Sequence[str], batch_size: int, log: Callable[[str], None] = lambda s: None
            ) -> Analysis:
    """Run every available analysis on the image files, ``batch_size`` images in memory at a time."""
    caps = analysers.capabilities
    parts: dict[str, list[np.ndarray]] = {}
    for start in range(0, len(paths), batch_size):
        imgs = [load_rgb(p) for p in paths[start:start + batch_size]]
        if "identity" in caps:
            parts.setdefault("identity", []).append(np.asarray(analysers.identity(imgs), np.float64))
        if "landmarks" in caps:
            lm, pose = analysers.landmarks(imgs)
            parts.setdefault("landmarks", []).append(np.asarray(lm, np.float64))
            parts.setdefault("pose", []).append(np.asarray(pose, np.float64))
        if "emotion" in caps:
            p, v, a = analysers.emotion(imgs)
            parts.setdefault("probs", []).append(np.asarray(p, np.float64))
            parts.setdefault("valence", []).append(np.asarray(v, np.float64).reshape(-1))
            parts.setdefault("arousal", []).append(np.asarray(a, np.float64).reshape(-1))
        log(f"  analysed {min(start + batch_size, len(paths))}/{len(paths)}")
    out = Analysis(**{k: np.concatenate(v) for k, v in parts.items()})
    n = len(paths)
    checks = {"identity": (n, ID_DIM), "landmarks": (n, NUM_LANDMARKS, 3), "pose": (n, 3),
              "probs": (n, NUM_EMOTIONS), "valence": (n,), "arousal": (n,)}
    for k, shape in checks.items():
        a = getattr(out, k)
        if a is not None and a.shape != shape:
            raise ValueError(f"analysers {analysers.name!r}: {k} has shape {a.shape}, expected {shape}")
    return out


class _Targets:
    """Loads and caches targets; photo targets go through the analysers."""

    def __init__(self, analysers: Analysers):
        self.analysers = analysers
        self._emb: dict[str, np.ndarray] = {}
        self._lmk: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}

    def embedding(self, t: dict) -> np.ndarray:
        if t["path"] not in self._emb:
            if t["kind"] == "file":
                self._emb[t["path"]] = load_embedding(t["path"])
            else:
                e = np.asarray(self.analysers.identity([load_rgb(t["path"])]), np.float64)[0]
                if not np.all(np.isfinite(e)):
                    raise DataError(f"identity photo {t['path']}: no face found")
                self._emb[t["path"]] = e / np.linalg.norm(e)
        return self._emb[t["path"]]

    def landmarks(self, t: dict, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        """(landmarks [478, 3], pose [3] (NaN if unknown)) for a generated image of (height, width)."""
        key = (t["path"], size) if t["kind"] == "image" else (t["path"],)
        if key not in self._lmk:
            if t["kind"] == "file":
                self._lmk[key] = (load_landmarks(t["path"]), np.full(3, np.nan))
            else:
                h, w = size
                if h != w:
                    raise DataError(f"landmark target photo {t['path']}: generated images must be square to map "
                                   f"it into the aligned crop (got {w}x{h})")
                r = self.analysers.reference_landmarks(load_rgb(t["path"]), w)
                if r is None:
                    raise DataError(f"landmark target photo {t['path']}: no face found")
                self._lmk[key] = (np.asarray(r[0], np.float64), np.asarray(r[1], np.float64))
        lm, pose = self._lmk[key]
        if t.get("pose") is not None:
            pose = np.asarray(t["pose"], np.float64)
        return lm, pose


def _image_size(path: str) -> tuple[int, int]:
    from PIL import Image, ImageOps

    with Image.open(path) as im:
        im = ImageOps.exif_transpose(im)
        return im.height, im.width


def _f(x) -> float | None:
    """JSON-friendly float (NaN -> None)."""
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def evaluate_set(s: SampleSet, analysers: Analysers, *, batch_size: int = 16, id_threshold: float = 0.4,
                 reference: Analysis | None = None, log: Callable[[str], None] = lambda s: None) -> dict:
    """All applicable metrics for one sample set. Returns the set's report entry (JSON-able)."""
    caps = analysers.capabilities
    paths = [it.path for it in s.items]
    a = analyse(analysers, paths, batch_size, log)
    n = len(paths)
    no_face = a.no_face() if n else np.zeros(0, bool)
    targets = _Targets(analysers)
    cols: dict[str, float | int | None] = {"images": n, "no_face": int(no_face.sum())}
    details: dict[str, Any] = {}
    skipped: list[str] = []
    per_image = [{"file": it.rel, "face": not bool(no_face[i])} for i, it in enumerate(s.items)]

    # ---- identity
    id_items = [i for i, it in enumerate(s.items) if it.identity is not None]
    if id_items and "identity" in caps:
        src = np.stack([targets.embedding(s.items[i].identity) for i in id_items])
        gen = a.identity[id_items]
        d = M.identity_similarity(gen, src, id_threshold)
        cos = M.cosine_similarity(gen, src)
        details["identity"] = d
        cols.update(id_cos=d["mean"], id_cos_std=d["std"], id_frac=d["frac_above"])
        for i, c in zip(id_items, cos):
            per_image[i]["id_cos"] = _f(c)
    elif id_items:
        skipped.append("identity: no identity analyser (--arcface)")

    # ---- landmarks and pose
    lm_items = [i for i, it in enumerate(s.items) if it.landmarks is not None]
    if lm_items and "landmarks" in caps:
        if any(s.items[i].landmarks["kind"] == "image" for i in lm_items) and "reference_landmarks" not in caps:
            raise DataError(f"set {s.name}: landmark targets from photos need analysers with reference_landmarks")
        tl, tp = zip(*(targets.landmarks(s.items[i].landmarks, _image_size(s.items[i].path)) for i in lm_items))
        tl, tp = np.stack(tl), np.stack(tp)
        gl, gp = a.landmarks[lm_items], a.pose[lm_items]
        e = M.nme(gl, tl)
        ex = M.expression_nme(gl, tl)
        details["landmarks"] = {"nme": M.summarise(e), **{f"nme_{k}": M.summarise(v) for k, v in ex.items()}}
        cols.update(nme=details["landmarks"]["nme"]["mean"], nme_expr=details["landmarks"]["nme_expression"]["mean"],
                    nme_mouth=details["landmarks"]["nme_mouth"]["mean"], nme_eyes=details["landmarks"]["nme_eyes"]["mean"],
                    nme_brows=details["landmarks"]["nme_brows"]["mean"])
        for j, i in enumerate(lm_items):
            per_image[i].update(nme=_f(e[j]), nme_expr=_f(ex["expression"][j]))
        has_pose = np.all(np.isfinite(tp), axis=1)
        if has_pose.any():
            idx = np.flatnonzero(has_pose)
            pe = M.pose_errors(gp[idx], tp[idx])
            details["pose"] = {k: M.summarise(v) for k, v in pe.items()}
            cols.update(pose_err=details["pose"]["mean"]["mean"], yaw_err=details["pose"]["yaw"]["mean"],
                        pitch_err=details["pose"]["pitch"]["mean"], roll_err=details["pose"]["roll"]["mean"],
                        pose_geo=details["pose"]["geodesic"]["mean"])
            for j, k in enumerate(idx):
                per_image[lm_items[k]].update(pose_err=_f(pe["mean"][j]), pose_geo=_f(pe["geodesic"][j]),
                                              target_pose=[_f(x) for x in tp[k]])
        if not has_pose.all():
            skipped.append(f"pose error: no head-pose target for {int((~has_pose).sum())} image(s) "
                           "(landmark .npy targets without head_pose)")
    elif lm_items:
        skipped.append("landmarks / pose: no landmark analyser")

    # ---- emotion
    emo_items = [i for i, it in enumerate(s.items) if it.emotion is not None]
    if emo_items and "emotion" in caps:
        em = [s.items[i].emotion for i in emo_items]
        out: dict[str, Any] = {}
        cls_idx = [j for j, t in enumerate(em) if t["index"] is not None]
        if cls_idx:
            rows = [emo_items[j] for j in cls_idx]
            out.update(M.emotion_errors(a.probs[rows], np.array([em[j]["index"] for j in cls_idx])))
        for name, short in (("valence", "val"), ("arousal", "aro")):
            jj = [j for j, t in enumerate(em) if t[name] is not None]
            if jj:
                rows = [emo_items[j] for j in jj]
                kw = {name: getattr(a, name)[rows], f"target_{name}": np.array([em[j][name] for j in jj])}
                out.update(M.emotion_errors(**kw))
        details["emotion"] = out
        cols.update({k: out[src] for k, src in (("emo_acc", "accuracy"), ("val_mae", "valence_mae"),
                                                ("val_rmse", "valence_rmse"), ("aro_mae", "arousal_mae"),
                                                ("aro_rmse", "arousal_rmse")) if src in out})
    elif emo_items:
        skipped.append("emotion: no emotion analyser (--emonet)")
    if a.probs is not None:
        for i in range(n):
            if np.all(np.isfinite(a.probs[i])):
                per_image[i].update(emotion=EMOTION_CLASSES[int(np.argmax(a.probs[i]))],
                                    valence=_f(a.valence[i]), arousal=_f(a.arousal[i]))
    if a.pose is not None:
        for i in range(n):
            per_image[i]["pose"] = [_f(x) for x in a.pose[i]]

    # ---- diversity of ID-only images, per identity
    groups: dict[str, list[int]] = {}
    for i, it in enumerate(s.items):
        if it.id_only:
            key = it.identity["path"] if it.identity is not None else "(no identity recorded)"
            groups.setdefault(key, []).append(i)
    if groups and (a.pose is not None or a.probs is not None):
        g_in = []
        for idx in groups.values():
            g = {}
            if a.pose is not None:
                g.update(pose=a.pose[idx], landmarks=a.landmarks[idx])
            if a.probs is not None:
                g.update(probs=a.probs[idx], valence=a.valence[idx], arousal=a.arousal[idx])
            g_in.append(g)
        dv = M.diversity(g_in)
        details["diversity"] = {**dv, "identities": len(groups), "id_only_images": sum(map(len, groups.values()))}
        ids = [dv[k] for k in dv if k.endswith("_identities")]
        cols["div_ids"] = max(ids) if ids else 0
        for col, key in (("div_yaw", "pose_yaw_std"), ("div_pitch", "pose_pitch_std"), ("div_roll", "pose_roll_std"),
                         ("div_pose", "pose_pairwise"), ("div_expr", "expression_pairwise"),
                         ("div_emo_H", "emotion_entropy"), ("div_val", "valence_std"), ("div_aro", "arousal_std")):
            if key in dv:
                cols[col] = dv[key]

    # ---- Fréchet distances against reference images
    if reference is not None:
        for col, feats, ref in (("fd_arcface", a.identity, reference.identity),
                                ("fd_emonet", _emo_features(a), _emo_features(reference))):
            if feats is None or ref is None:
                continue
            try:
                cols[col] = M.frechet_distance(feats, ref)
            except ValueError as e:
                skipped.append(f"{col}: {e}")

    return {
        "name": s.name, "root": s.root, "folders": s.folders,
        "num_images": n, "num_faces": int(n - no_face.sum()), "no_face": int(no_face.sum()),
        "no_face_files": [it.rel for i, it in enumerate(s.items) if no_face[i]],
        "targets": {"identity": len(id_items), "landmarks": len(lm_items), "emotion": len(emo_items),
                    "id_only": sum(it.id_only for it in s.items)},
        "metrics": {k: (_f(v) if isinstance(v, float) else v) for k, v in cols.items()},
        "details": _jsonable(details),
        "skipped": skipped,
        "images": per_image,
    }


def _emo_features(a: Analysis) -> np.ndarray | None:
    if a.probs is None:
        return None
    return np.concatenate([a.probs, a.valence[:, None], a.arousal[:, None]], axis=1)


def _jsonable(x):
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.integer, int)) and not isinstance(x, bool):
        return int(x)
    if isinstance(x, (np.floating, float)):
        return _f(x)
    return x


def reference_images(root: str) -> list[str]:
    if not os.path.isdir(root):
        raise DataError(f"--reference {root}: no such directory")
    files = sorted(os.path.join(dp, f) for dp, dn, fs in os.walk(root) for f in fs
                   if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith("."))
    if len(files) < 2:
        raise DataError(f"--reference {root}: needs at least 2 images, found {len(files)}")
    return files


def evaluate(sets: Sequence[SampleSet], analysers: Analysers, *, batch_size: int = 16, id_threshold: float = 0.4,
             reference_dir: str | None = None, log: Callable[[str], None] = lambda s: None) -> dict:
    """Evaluate every sample set; returns the report dict (what OUT.json holds, minus run metadata)."""
    reference = None
    ref_info = None
    if reference_dir is not None:
        files = reference_images(reference_dir)
        log(f"reference: {len(files)} images")
        reference = analyse(analysers, files, batch_size, log)
        ref_info = {"dir": os.path.abspath(reference_dir), "images": len(files),
                    "no_face": int(reference.no_face().sum())}
    entries = []
    for s in sets:
        log(f"set {s.name}: {len(s.items)} images")
        entries.append(evaluate_set(s, analysers, batch_size=batch_size, id_threshold=id_threshold,
                                    reference=reference, log=log))
    return {"sets": entries, "reference": ref_info}
