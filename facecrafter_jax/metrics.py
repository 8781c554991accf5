"""Evaluation metrics of the FaceCrafter paper's kind, as pure NumPy functions.

Every function works on plain arrays (no model, no I/O); the analysers of :mod:`facecrafter_jax.evaluation`
produce the inputs. Conventions:

* Per-image functions return one value per image and **propagate NaN**: an image whose analyser found no
  face carries NaN rows, and gets NaN. The ``summarise`` helpers then average over the finite values only
  and report how many there were (``n``).
* Landmarks are MediaPipe's 478 points ``[..., 478, 3]``: x, y normalised to [0, 1] by the image width /
  height, z a relative depth in the units of x (data_prep's convention). 2-D metrics use x, y only.
* Head pose is ``(yaw, pitch, roll)`` in degrees with ``R = Rz(roll) @ Ry(yaw) @ Rx(pitch)``
  (:mod:`facecrafter_jax.face.geometry`).
* Standard deviations are population standard deviations (``ddof=0``); covariances for the Fréchet
  distance use ``ddof=1`` (as the FID reference implementations do).

Landmark index subsets (MediaPipe face-mesh topology, the point sets of the ``FaceLandmarksConnections``
contours of ``mediapipe.tasks.python.vision.face_landmarker``; checked against it in the tests):

* ``mouth``: the 40 points of the outer and inner lip contours (``FACE_LANDMARKS_LIPS``);
* ``eyes``: the 16 + 16 points of both eye contours (``FACE_LANDMARKS_LEFT_EYE`` / ``RIGHT_EYE``); the iris
  points 468-477 are *not* included (gaze is not expression, and iris points are the least stable);
* ``brows``: the 10 + 10 points of both eyebrows (``FACE_LANDMARKS_LEFT_EYEBROW`` / ``RIGHT_EYEBROW``);
* ``expression``: the union of the three (92 points).

The inter-ocular distance is the 2-D distance between the outer eye corners 33 (image-left, the subject's
right eye) and 263 (image-right).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from facecrafter_jax.face.geometry import rotation_from_pose
from facecrafter_jax.face.vocabulary import NUM_EMOTIONS, NUM_LANDMARKS

__all__ = [
    "MOUTH_INDICES", "LEFT_EYE_INDICES", "RIGHT_EYE_INDICES", "EYE_INDICES", "LEFT_BROW_INDICES",
    "RIGHT_BROW_INDICES", "BROW_INDICES", "EXPRESSION_INDICES", "EXPRESSION_SUBSETS", "OUTER_EYE_CORNERS",
    "cosine_similarity", "identity_similarity", "inter_ocular_distance", "nme", "procrustes_align",
    "expression_nme", "geodesic_angle", "pose_errors", "emotion_errors",
    "pose_diversity", "expression_diversity", "emotion_diversity", "diversity", "class_entropy",
    "frechet_distance", "frechet_distance_from_stats", "summarise",
]

OUTER_EYE_CORNERS = (33, 263)

MOUTH_INDICES = (0, 13, 14, 17, 37, 39, 40, 61, 78, 80, 81, 82, 84, 87, 88, 91, 95, 146, 178, 181, 185, 191, 267,
                 269, 270, 291, 308, 310, 311, 312, 314, 317, 318, 321, 324, 375, 402, 405, 409, 415)
LEFT_EYE_INDICES = (249, 263, 362, 373, 374, 380, 381, 382, 384, 385, 386, 387, 388, 390, 398, 466)
RIGHT_EYE_INDICES = (7, 33, 133, 144, 145, 153, 154, 155, 157, 158, 159, 160, 161, 163, 173, 246)
LEFT_BROW_INDICES = (276, 282, 283, 285, 293, 295, 296, 300, 334, 336)
RIGHT_BROW_INDICES = (46, 52, 53, 55, 63, 65, 66, 70, 105, 107)
EYE_INDICES = tuple(sorted(LEFT_EYE_INDICES + RIGHT_EYE_INDICES))
BROW_INDICES = tuple(sorted(LEFT_BROW_INDICES + RIGHT_BROW_INDICES))
EXPRESSION_INDICES = tuple(sorted(MOUTH_INDICES + EYE_INDICES + BROW_INDICES))
EXPRESSION_SUBSETS: dict[str, tuple[int, ...]] = {
    "mouth": MOUTH_INDICES, "eyes": EYE_INDICES, "brows": BROW_INDICES, "expression": EXPRESSION_INDICES,
}


# ------------------------------------------------------------------------------------------------ helpers
def _landmarks(x, name: str) -> np.ndarray:
    a = np.asarray(x, np.float64)
    if a.ndim == 2:
        a = a[None]
    if a.ndim != 3 or a.shape[1] != NUM_LANDMARKS or a.shape[2] not in (2, 3):
        raise ValueError(f"{name}: expected landmarks [N, {NUM_LANDMARKS}, 2 or 3], got shape {np.shape(x)}")
    return a


def _finite_rows(a: np.ndarray) -> np.ndarray:
    """True for the leading-axis entries whose values are all finite."""
    return np.all(np.isfinite(a.reshape(len(a), -1)), axis=1)


def summarise(values, prefix: str = "") -> dict[str, float | int]:
    """Mean, population std and count of the finite entries of ``values`` (NaN = image without a face).

    Returns ``{prefix+"mean", prefix+"std", prefix+"n"}``; mean and std are NaN when no entry is finite.
    """
    v = np.asarray(values, np.float64).reshape(-1)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return {prefix + "mean": float("nan"), prefix + "std": float("nan"), prefix + "n": 0}
    return {prefix + "mean": float(v.mean()), prefix + "std": float(v.std()), prefix + "n": int(v.size)}


def _nanmean(v) -> float:
    v = np.asarray(v, np.float64).reshape(-1)
    v = v[np.isfinite(v)]
    return float(v.mean()) if v.size else float("nan")


# ------------------------------------------------------------------------------------------------ identity
def cosine_similarity(a, b) -> np.ndarray:
    """Row-wise cosine ``<a_i, b_i> / (|a_i| |b_i|)``; ``b`` of shape [D] is broadcast. NaN rows give NaN."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    a2 = a if a.ndim == 2 else a[None]
    b2 = np.broadcast_to(b if b.ndim == 2 else b[None], a2.shape)
    if a2.shape[-1] != b2.shape[-1]:
        raise ValueError(f"cosine_similarity: feature sizes differ ({a2.shape[-1]} vs {b2.shape[-1]})")
    num = np.einsum("nd,nd->n", a2, b2)
    den = np.linalg.norm(a2, axis=1) * np.linalg.norm(b2, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return num / den


def identity_similarity(generated, source, threshold: float = 0.4) -> dict[str, float | int]:
    """Identity preservation: cosine between ArcFace embeddings of generated images and the source identity.

    ``cos_i = <g_i, s> / (|g_i| |s|)`` for generated embeddings ``g`` [N, D] and the source embedding ``s``
    ([D], or [N, D] for one source per image). Returns ``mean`` and ``std`` of ``cos`` over the images
    with a face, ``frac_above`` = fraction of those with ``cos > threshold``, ``n`` and ``threshold``.
    """
    cos = cosine_similarity(generated, source)
    out = summarise(cos)
    ok = cos[np.isfinite(cos)]
    out["frac_above"] = float((ok > threshold).mean()) if ok.size else float("nan")
    out["threshold"] = float(threshold)
    return out


# ------------------------------------------------------------------------------------------------ landmarks
def inter_ocular_distance(landmarks) -> np.ndarray:
    """2-D distance between the outer eye corners 33 and 263, per image: ``|t_33 - t_263|`` [N]."""
    lm = _landmarks(landmarks, "landmarks")
    i, j = OUTER_EYE_CORNERS
    return np.linalg.norm(lm[:, i, :2] - lm[:, j, :2], axis=-1)


def nme(pred, target, indices: Sequence[int] | None = None, normaliser=None) -> np.ndarray:
    """Normalised mean error per image: ``NME = mean_k |p_k - t_k|_2 / d_io(t)`` over 2-D points.

    ``pred``, ``target``: [N, 478, 2|3] (or one [478, 2|3] target broadcast to all images); only x, y
    are used. ``indices`` restricts the mean to a subset of points (default all 478). ``d_io`` is the
    inter-ocular distance of the *target* (outer eye corners 33 / 263), unless ``normaliser`` ([N] or a
    scalar) is given. Returns [N]; NaN where either point set has NaN.
    """
    p = _landmarks(pred, "pred")
    t = _landmarks(target, "target")
    t = np.broadcast_to(t, (len(p),) + t.shape[1:]) if len(t) == 1 else t
    if len(t) != len(p):
        raise ValueError(f"nme: {len(p)} predictions but {len(t)} targets")
    d = inter_ocular_distance(t) if normaliser is None else np.broadcast_to(np.asarray(normaliser, np.float64), (len(p),))
    idx = np.arange(NUM_LANDMARKS) if indices is None else np.asarray(indices)
    err = np.linalg.norm(p[:, idx, :2] - t[:, idx, :2], axis=-1).mean(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return err / d


def procrustes_align(src, dst, indices: Sequence[int] | None = None, scale: bool = True):
    """Least-squares similarity alignment (Umeyama 1991) of ``src`` onto ``dst``, batched.

    ``src``, ``dst``: [N, K, D] (or [K, D]) corresponding points. Finds per item the rotation ``R``
    (det +1, no reflection), uniform scale ``s`` (1 if ``scale`` is False) and translation ``t``
    minimising ``sum_k |s R src_k + t - dst_k|^2`` over the points ``indices`` (default all), and applies
    it to *all* points of ``src``. With centred points ``X = src - mean``, ``Y = dst - mean`` and the SVD
    ``Y^T X / K = U diag(S) V^T``: ``R = U diag(1, .., det(U V^T)) V^T``, ``s = tr(diag(S) diag(1, ..,
    det)) / var(X)``, ``t = mean(dst) - s R mean(src)``.

    Returns ``(aligned [N, K, D], s [N], R [N, D, D], t [N, D])``; items with non-finite points give NaN.
    """
    x = np.asarray(src, np.float64)
    y = np.asarray(dst, np.float64)
    squeeze = x.ndim == 2
    if squeeze:
        x, y = x[None], y[None]
    if len(y) == 1 and len(x) > 1:
        y = np.broadcast_to(y, x.shape)
    if x.shape != y.shape or x.ndim != 3:
        raise ValueError(f"procrustes_align: src {np.shape(src)} and dst {np.shape(dst)} must both be [N, K, D]")
    n, k, d = x.shape
    idx = np.arange(k) if indices is None else np.asarray(indices)
    aligned = np.full_like(x, np.nan)
    s_out, r_out, t_out = np.full(n, np.nan), np.full((n, d, d), np.nan), np.full((n, d), np.nan)
    ok = _finite_rows(x) & _finite_rows(y)
    if ok.any():
        xs, ys = x[ok][:, idx], y[ok][:, idx]
        mx, my = xs.mean(1, keepdims=True), ys.mean(1, keepdims=True)
        xc, yc = xs - mx, ys - my
        cov = np.einsum("nki,nkj->nij", yc, xc) / len(idx)
        u, sig, vt = np.linalg.svd(cov)
        sign = np.ones((len(xs), d))
        sign[:, -1] = np.sign(np.linalg.det(u) * np.linalg.det(vt))
        sign[sign == 0] = 1.0
        rot = u @ (sign[:, :, None] * vt)
        var_x = (xc ** 2).sum(axis=(1, 2)) / len(idx)
        with np.errstate(invalid="ignore", divide="ignore"):
            s = (sig * sign).sum(1) / var_x if scale else np.ones(len(xs))
        t = my[:, 0] - s[:, None] * np.einsum("nij,nj->ni", rot, mx[:, 0])
        aligned[ok] = s[:, None, None] * np.einsum("nij,nkj->nki", rot, x[ok]) + t[:, None]
        s_out[ok], r_out[ok], t_out[ok] = s, rot, t
    if squeeze:
        return aligned[0], s_out[0], r_out[0], t_out[0]
    return aligned, s_out, r_out, t_out


def expression_nme(pred, target, subsets: Mapping[str, Sequence[int]] | None = None) -> dict[str, np.ndarray]:
    """Expression-only landmark error: NME after removing the similarity transform between the two faces.

    The 2-D points of ``pred`` are Procrustes-aligned onto ``target`` using all 478 points
    (:func:`procrustes_align`: rotation, uniform scale, translation), then :func:`nme` (normalised by the
    target's inter-ocular distance) is taken on each subset of ``subsets`` (default
    :data:`EXPRESSION_SUBSETS`: mouth, eyes, brows and their union ``expression``). In-plane head pose,
    face size and position therefore do not count; out-of-plane rotation still does (it is not a 2-D
    similarity). Returns ``{subset: [N]}``.
    """
    p = _landmarks(pred, "pred")[..., :2]
    t = _landmarks(target, "target")[..., :2]
    t = np.broadcast_to(t, p.shape) if len(t) == 1 else t
    aligned, *_ = procrustes_align(p, t)
    subsets = EXPRESSION_SUBSETS if subsets is None else subsets
    return {name: nme(aligned, t, idx) for name, idx in subsets.items()}


# ------------------------------------------------------------------------------------------------ head pose
def geodesic_angle(r1, r2) -> np.ndarray:
    """Angle in degrees of the relative rotation ``R1^T R2`` (geodesic distance on SO(3)), per item.

    ``theta = arccos((tr(R1^T R2) - 1) / 2)``, computed as ``2 arcsin(|R1 - R2|_F / (2 sqrt 2))`` (equal for
    rotations, since ``|R1 - R2|_F^2 = 8 sin^2(theta / 2)``, and accurate near 0). [N, 3, 3] inputs, [N] out.
    """
    a = np.asarray(r1, np.float64).reshape(-1, 3, 3)
    b = np.asarray(r2, np.float64).reshape(-1, 3, 3)
    a, b = np.broadcast_arrays(a, b)
    f = np.linalg.norm((a - b).reshape(-1, 9), axis=1)
    return np.rad2deg(2.0 * np.arcsin(np.clip(f / (2.0 * np.sqrt(2.0)), 0.0, 1.0)))


def _wrap_deg(d):
    return (np.asarray(d, np.float64) + 180.0) % 360.0 - 180.0


def pose_errors(pred, target) -> dict[str, np.ndarray]:
    """Head-pose error per image from (yaw, pitch, roll) in degrees, ``pred`` [N, 3], ``target`` [N, 3] or [3].

    ``yaw``, ``pitch``, ``roll``: absolute differences, wrapped to [0, 180]; ``mean``: their mean (the
    paper-style "pose error"); ``geodesic``: :func:`geodesic_angle` between the two rotations (one
    number that does not depend on the Euler decomposition).
    """
    p = np.asarray(pred, np.float64).reshape(-1, 3)
    t = np.broadcast_to(np.asarray(target, np.float64).reshape(-1, 3), p.shape)
    ae = np.abs(_wrap_deg(p - t))
    return {"yaw": ae[:, 0], "pitch": ae[:, 1], "roll": ae[:, 2], "mean": ae.mean(1),
            "geodesic": geodesic_angle(rotation_from_pose(p), rotation_from_pose(t))}


# ------------------------------------------------------------------------------------------------ emotion
def emotion_errors(probs=None, target_class=None, valence=None, target_valence=None, arousal=None,
                   target_arousal=None) -> dict[str, float | int]:
    """Emotion control metrics over the images with a face (finite predictions).

    * ``accuracy``: fraction of images whose ``argmax(probs)`` equals ``target_class`` (ints [N] or one int);
    * ``valence_mae`` = mean |v - v*|, ``valence_rmse`` = sqrt(mean (v - v*)^2); likewise for arousal.

    Each group is computed only when both prediction and target are given; ``*_n`` counts the images used.
    """
    out: dict[str, float | int] = {}
    if probs is not None and target_class is not None:
        p = np.asarray(probs, np.float64)
        ok = _finite_rows(p)
        tc = np.broadcast_to(np.asarray(target_class), (len(p),))
        hit = np.argmax(np.where(np.isfinite(p), p, -np.inf), axis=1) == tc
        out["accuracy"] = float(hit[ok].mean()) if ok.any() else float("nan")
        out["accuracy_n"] = int(ok.sum())
    for name, v, tv in (("valence", valence, target_valence), ("arousal", arousal, target_arousal)):
        if v is None or tv is None:
            continue
        v = np.asarray(v, np.float64).reshape(-1)
        e = v - np.broadcast_to(np.asarray(tv, np.float64), v.shape)
        e = e[np.isfinite(e)]
        out[f"{name}_mae"] = float(np.abs(e).mean()) if e.size else float("nan")
        out[f"{name}_rmse"] = float(np.sqrt((e ** 2).mean())) if e.size else float("nan")
        out[f"{name}_n"] = int(e.size)
    return out


# ------------------------------------------------------------------------------------------------ diversity
def class_entropy(classes, num_classes: int = NUM_EMOTIONS) -> float:
    """Entropy in bits of the histogram of integer ``classes``: ``H = -sum_c p_c log2 p_c`` (0 log 0 = 0)."""
    c = np.asarray(classes).reshape(-1)
    if c.size == 0:
        return float("nan")
    p = np.bincount(c, minlength=num_classes) / c.size
    p = p[p > 0]
    return float(-(p * np.log2(p)).sum()) + 0.0


def _pairs(n: int):
    return np.triu_indices(n, k=1)


def pose_diversity(pose) -> dict[str, float]:
    """Spread of head poses of one identity's samples, ``pose`` [n, 3] (yaw, pitch, roll degrees, no NaN).

    ``yaw_std``, ``pitch_std``, ``roll_std``: population std of each angle; ``pairwise``: mean over pairs
    ``i < j`` of :func:`geodesic_angle` between their rotations. Needs n >= 2.
    """
    p = np.asarray(pose, np.float64).reshape(-1, 3)
    if len(p) < 2:
        raise ValueError("pose_diversity needs at least 2 samples")
    i, j = _pairs(len(p))
    r = rotation_from_pose(p)
    std = p.std(axis=0)
    return {"yaw_std": float(std[0]), "pitch_std": float(std[1]), "roll_std": float(std[2]),
            "pairwise": float(geodesic_angle(r[i], r[j]).mean())}


def expression_diversity(landmarks, subset: Sequence[int] = EXPRESSION_INDICES) -> float:
    """Mean pairwise expression distance of one identity's samples, ``landmarks`` [n, 478, 2|3] (no NaN).

    For each pair ``i < j``: the symmetric expression NME ``(e(i, j) + e(j, i)) / 2``, where ``e(a, b)`` is
    :func:`expression_nme` of ``b`` against ``a`` on ``subset`` (Procrustes-align b onto a with all points,
    NME on the subset normalised by a's inter-ocular distance). Needs n >= 2.
    """
    lm = _landmarks(landmarks, "landmarks")[..., :2]
    if len(lm) < 2:
        raise ValueError("expression_diversity needs at least 2 samples")
    i, j = _pairs(len(lm))
    sub = {"s": tuple(subset)}
    e_ij = expression_nme(lm[j], lm[i], sub)["s"]
    e_ji = expression_nme(lm[i], lm[j], sub)["s"]
    return float(((e_ij + e_ji) / 2).mean())


def emotion_diversity(probs=None, valence=None, arousal=None) -> dict[str, float]:
    """Spread of emotions of one identity's samples: ``entropy`` (bits) of the histogram of
    ``argmax(probs)`` (:func:`class_entropy`, 0..3 bits for 8 classes), ``valence_std``, ``arousal_std``
    (population std). Inputs without NaN; any may be None."""
    out = {}
    if probs is not None:
        p = np.asarray(probs, np.float64)
        out["entropy"] = class_entropy(np.argmax(p, axis=1), p.shape[1])
    if valence is not None:
        out["valence_std"] = float(np.asarray(valence, np.float64).std())
    if arousal is not None:
        out["arousal_std"] = float(np.asarray(arousal, np.float64).std())
    return out


def diversity(groups: Sequence[Mapping[str, np.ndarray]]) -> dict[str, float | int]:
    """Diversity under ID-only conditioning, averaged over identities.

    ``groups``: one mapping per identity with any of ``pose`` [n, 3], ``landmarks`` [n, 478, 3],
    ``probs`` [n, 8], ``valence`` [n], ``arousal`` [n] for its samples (NaN rows = no face, dropped per
    quantity). Per identity with at least 2 valid samples: :func:`pose_diversity` (``pose_yaw_std``,
    ``pose_pitch_std``, ``pose_roll_std``, ``pose_pairwise``), :func:`expression_diversity`
    (``expression_pairwise``), :func:`emotion_diversity` (``emotion_entropy``, ``valence_std``,
    ``arousal_std``); each is then the plain mean over those identities, and ``*_identities`` counts them.
    """
    acc: dict[str, list[float]] = {}

    def add(key, value):
        acc.setdefault(key, []).append(float(value))

    for g in groups:
        if g.get("pose") is not None:
            p = np.asarray(g["pose"], np.float64).reshape(-1, 3)
            p = p[_finite_rows(p)]
            if len(p) >= 2:
                for k, v in pose_diversity(p).items():
                    add(f"pose_{k}", v)
        if g.get("landmarks") is not None:
            lm = _landmarks(g["landmarks"], "landmarks")
            lm = lm[_finite_rows(lm)]
            if len(lm) >= 2:
                add("expression_pairwise", expression_diversity(lm))
        if g.get("probs") is not None:
            p = np.asarray(g["probs"], np.float64)
            p = p[_finite_rows(p)]
            if len(p) >= 2:
                add("emotion_entropy", class_entropy(np.argmax(p, axis=1), p.shape[1]))
        for name in ("valence", "arousal"):
            if g.get(name) is not None:
                v = np.asarray(g[name], np.float64).reshape(-1)
                v = v[np.isfinite(v)]
                if len(v) >= 2:
                    add(f"{name}_std", v.std())
    out: dict[str, float | int] = {}
    for k, vals in acc.items():
        out[k] = float(np.mean(vals))
        out[f"{k}_identities"] = len(vals)
    return out


# ------------------------------------------------------------------------------------------------ Fréchet
def _clip_spectrum(w: np.ndarray) -> np.ndarray:
    """Eigenvalues of a PSD matrix with round-off noise removed: values below ``D * eps * max|w|`` become 0."""
    tol = len(w) * np.finfo(np.float64).eps * max(float(np.abs(w).max(initial=0.0)), 1e-300)
    return np.where(w > tol, w, 0.0)


def _sqrt_psd(s: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((s + s.T) / 2)
    return (v * np.sqrt(_clip_spectrum(w))) @ v.T


def frechet_distance_from_stats(mu1, sigma1, mu2, sigma2) -> float:
    """Fréchet distance between Gaussians N(mu1, S1) and N(mu2, S2) (the FID formula):

    ``d^2 = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2))``.

    ``tr((S1 S2)^(1/2))`` is computed as ``sum_i sqrt(lambda_i)`` over the eigenvalues of the symmetric PSD
    matrix ``S1^(1/2) S2 S1^(1/2)`` (same spectrum as ``S1 S2``), with ``S1^(1/2)`` from an eigendecomposition;
    eigenvalues below ``D * eps * max eigenvalue`` (round-off, including tiny negative ones) count as 0, so
    rank-deficient covariances (fewer samples than dimensions) give exactly 0 for identical sets. Returns ``d^2`` (>= 0 up to round-off).
    """
    mu1, mu2 = np.asarray(mu1, np.float64).reshape(-1), np.asarray(mu2, np.float64).reshape(-1)
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    d = mu1.size
    if mu2.size != d or s1.shape != (d, d) or s2.shape != (d, d):
        raise ValueError(f"frechet_distance: inconsistent shapes mu1 {mu1.shape}, S1 {s1.shape}, mu2 {mu2.shape}, "
                         f"S2 {s2.shape}")
    r1 = _sqrt_psd(s1)
    m = r1 @ s2 @ r1
    w = np.linalg.eigvalsh((m + m.T) / 2)
    tr_sqrt = float(np.sqrt(_clip_spectrum(w)).sum())
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_sqrt)


def frechet_distance(features1, features2) -> float:
    """Fréchet distance between two sets of feature vectors [N1, D] and [N2, D] (rows with NaN dropped):
    the Gaussians' means and ``ddof=1`` covariances go into :func:`frechet_distance_from_stats`. An
    FID-like quality proxy when the features are analyser outputs (e.g. ArcFace embeddings). Each set needs
    at least 2 rows; with fewer rows than dimensions the covariances are rank-deficient but the formula
    stays defined (the estimate is then biased upwards, as for FID on small sets)."""
    out = []
    for name, f in (("features1", features1), ("features2", features2)):
        a = np.asarray(f, np.float64)
        if a.ndim != 2:
            raise ValueError(f"frechet_distance: {name} must be [N, D], got shape {a.shape}")
        a = a[_finite_rows(a)]
        if len(a) < 2:
            raise ValueError(f"frechet_distance: {name} has {len(a)} finite rows; need at least 2")
        out.append(a)
    x, y = out
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"frechet_distance: feature sizes differ ({x.shape[1]} vs {y.shape[1]})")
    return frechet_distance_from_stats(x.mean(0), np.cov(x, rowvar=False), y.mean(0), np.cov(y, rowvar=False))
