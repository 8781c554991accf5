"""The toy ArcFace: an identity embedding computed from the image, so it leaks pose and expression.

Real ArcFace embeddings are trained to be invariant to pose and expression but are not: linear read-outs of
top-level face-recognition features predict yaw and pitch surprisingly well (Parde et al. 2017, "Face and
image representation in deep CNN features", FG 2017) and many non-identity attributes (expression, mouth
open, smiling, ...) are predictable from ArcFace / FaceNet templates (Terhoerst et al. 2020, "Beyond
identity: what information is stored in biometric face templates?", IJCB 2020). Arc2Face conditions on such
an embedding of one photo, so its samples inherit that photo's pose and expression.

The toy pipeline plays this with the toy identity analyser (:mod:`.analysers`, trained with a CosFace loss
to be pose- and expression-invariant, which it is only approximately): ``toy_arcface(analysers, images)``
is its unit embedding of each image. The pipeline's analysers embed in 512 dimensions, ArcFace's width; with
64 identities to separate, the dimensions the identity loss does not need keep some of the pose and
expression the shared trunk computes, and a linear read-out recovers about half of their variance (64-d
embeddings leak far less: docs/toy_world.md). A narrower embedding is mapped to 512 dimensions by a fixed
seeded matrix with orthonormal columns (:func:`arcface_projection`: the norm and every cosine are kept).

:func:`leakage` measures how much pose, expression and emotion the embedding carries: cross-validated R^2 of
a linear (least-squares) read-out of yaw, pitch, roll and each expression coefficient, and the accuracy of a
linear read-out of the emotion class; :func:`linear_r2` / :func:`r2_from_correlations` are the in-sample R^2
two ways (residuals of the least-squares fit; squared multiple correlation ``r_yx R_xx^-1 r_xy``).
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

__all__ = ["ARCFACE_DIM", "arcface_projection", "toy_arcface", "linear_r2", "r2_from_correlations",
           "cross_validated_r2", "linear_readout_accuracy", "leakage", "leakage_table"]

ARCFACE_DIM = 512


def arcface_projection(dim_in: int, seed: int = 0, dim_out: int = ARCFACE_DIM) -> np.ndarray:
    """``[dim_out, dim_in]`` with orthonormal columns (Q of the QR decomposition of a Gaussian matrix drawn from
    ``(seed, 8)``, column signs fixed so that R has a positive diagonal)."""
    if not 1 <= dim_in <= dim_out:
        raise ValueError(f"need 1 <= dim_in <= dim_out, got {dim_in}, {dim_out}")
    g = np.random.default_rng([int(seed), 8]).standard_normal((dim_out, dim_in))
    q, r = np.linalg.qr(g)
    return (q * np.sign(np.diag(r))[None, :]).astype(np.float64)


def toy_arcface(analysers, images: np.ndarray, *, seed: int = 0, batch_size: int = 256) -> np.ndarray:
    """float32 ``[N, 512]`` unit vectors: the identity analyser's embedding of each image (512-d, as the
    pipeline's analysers produce), or a narrower one projected by :func:`arcface_projection` (``seed``)."""
    emb = np.asarray(analysers.embed(images, batch_size=batch_size), np.float64)
    out = emb if emb.shape[1] == ARCFACE_DIM else emb @ arcface_projection(emb.shape[1], seed).T
    out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
    return out.astype(np.float32)


def _design(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return np.concatenate([x, np.ones((len(x), 1))], axis=1)


def linear_r2(x: np.ndarray, y: np.ndarray) -> float:
    """In-sample R^2 of the least-squares fit of ``y`` [N] on ``x`` [N, D] with an intercept:
    ``1 - SS_res / SS_tot``."""
    y = np.asarray(y, np.float64)
    a = _design(x)
    coef, *_ = np.linalg.lstsq(a, y, rcond=None)
    res = y - a @ coef
    return float(1.0 - res @ res / np.sum((y - y.mean()) ** 2))


def r2_from_correlations(x: np.ndarray, y: np.ndarray) -> float:
    """The same R^2 as the squared multiple correlation ``r_yx R_xx^-1 r_xy`` (correlations of ``y`` with each
    column of ``x`` and among the columns); needs a full-rank ``x``."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    c = np.corrcoef(np.concatenate([x, y[:, None]], axis=1), rowvar=False)
    rxx, rxy = c[:-1, :-1], c[:-1, -1]
    return float(rxy @ np.linalg.solve(rxx, rxy))


def _folds(n: int, k: int, seed: int) -> list[np.ndarray]:
    return np.array_split(np.random.default_rng([seed, 9]).permutation(n), k)


def _ridge_fit(x: np.ndarray, y: np.ndarray, ridge: float) -> np.ndarray:
    """Least-squares weights of ``y`` on ``[x, 1]`` with ridge ``ridge * N`` on the weights (not the bias)."""
    a = _design(x)
    reg = ridge * len(x) * np.eye(a.shape[1])
    reg[-1, -1] = 0.0
    return np.linalg.solve(a.T @ a + reg, a.T @ y)


def cross_validated_r2(x: np.ndarray, y: np.ndarray, *, folds: int = 2, seed: int = 0, ridge: float = 1e-3) -> float:
    """Out-of-sample R^2 of a least-squares read-out (ridge ``ridge`` x N on the weights, for stability):
    predictions for each fold from a fit on the others, then ``1 - SS_res / SS_tot`` over all samples."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    pred = np.empty_like(y)
    for test in _folds(len(y), folds, seed):
        train = np.setdiff1d(np.arange(len(y)), test)
        pred[test] = _design(x[test]) @ _ridge_fit(x[train], y[train], ridge)
    ss_tot = np.sum((y - y.mean()) ** 2)
    return float(1.0 - np.sum((y - pred) ** 2) / ss_tot) if ss_tot > 0 else float("nan")


def linear_readout_accuracy(x: np.ndarray, labels: np.ndarray, num_classes: int, *, folds: int = 2,
                            seed: int = 0, ridge: float = 1e-3) -> float:
    """Cross-validated accuracy of a linear read-out of a class label (least squares onto one-hot targets,
    argmax), folds as in :func:`cross_validated_r2`."""
    x = np.asarray(x, np.float64)
    labels = np.asarray(labels, np.int64)
    onehot = np.eye(num_classes)[labels]
    correct = 0
    for test in _folds(len(labels), folds, seed):
        train = np.setdiff1d(np.arange(len(labels)), test)
        coef = _ridge_fit(x[train], onehot[train], ridge)
        correct += int(np.sum((_design(x[test]) @ coef).argmax(1) == labels[test]))
    return correct / len(labels)


def leakage(embedding: np.ndarray, *, head_pose: np.ndarray, expression: np.ndarray | None = None,
            emotion: np.ndarray | None = None, identity: np.ndarray | None = None,
            expression_names: tuple[str, ...] = (), num_classes: int = 8, seed: int = 0) -> dict[str, float]:
    """How much of the mutable factors a linear read-out recovers from ``embedding`` [N, D] (2-fold
    cross-validated): ``r2_yaw`` / ``r2_pitch`` / ``r2_roll``, ``r2_<expression coefficient>`` and their mean
    ``r2_expression``, ``emotion_acc`` (with ``emotion_chance``, the majority-class rate); with ``identity``,
    ``identity_acc`` (the same linear read-out of the identity) as the reference for what the embedding is
    for."""
    e = np.asarray(embedding, np.float64)
    out: dict[str, float] = {}
    pose = np.asarray(head_pose, np.float64)
    for j, name in enumerate(("yaw", "pitch", "roll")):
        out[f"r2_{name}"] = cross_validated_r2(e, pose[:, j], seed=seed)
    if expression is not None:
        ex = np.asarray(expression, np.float64)
        names = expression_names or tuple(f"expr{j}" for j in range(ex.shape[1]))
        vals = []
        for j, name in enumerate(names):
            if ex[:, j].std() > 0:
                vals.append(cross_validated_r2(e, ex[:, j], seed=seed))
                out[f"r2_{name}"] = vals[-1]
        out["r2_expression"] = float(np.mean(vals)) if vals else float("nan")
    if emotion is not None:
        lab = np.asarray(emotion, np.int64)
        out["emotion_acc"] = linear_readout_accuracy(e, lab, num_classes, seed=seed)
        out["emotion_chance"] = float(np.bincount(lab, minlength=num_classes).max() / len(lab))
    if identity is not None:
        ids = np.asarray(identity, np.int64)
        out["identity_acc"] = linear_readout_accuracy(e, ids, int(ids.max()) + 1, seed=seed)
    return out


def leakage_table(rows: Mapping[str, Mapping[str, float]]) -> str:
    """Markdown table of :func:`leakage` results (one row per embedding)."""
    cols = (("r2_yaw", "R² yaw"), ("r2_pitch", "R² pitch"), ("r2_roll", "R² roll"),
            ("r2_expression", "R² expression (mean of 11)"), ("emotion_acc", "emotion acc (linear)"),
            ("emotion_chance", "chance"), ("identity_acc", "identity acc (linear)"))
    lines = ["| embedding | " + " | ".join(c[1] for c in cols) + " |", "|---|" + "---:|" * len(cols)]
    for name, r in rows.items():
        lines.append(f"| {name} | " + " | ".join("-" if r.get(k) is None else f"{r[k]:.3f}" for k, _ in cols) + " |")
    return "\n".join(lines)
