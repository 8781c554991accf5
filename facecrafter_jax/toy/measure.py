"""Measuring toy models: evaluation conditions, sampling, analysis and metrics with standard errors.

The experiment (Arc2Face's use: one photo of a person, many samples)::

    identities   K training identities, evenly spread over the world's
    reference    per identity ONE render from the full range (pose, expression, emotion drawn fresh): its toy
                 ArcFace (:func:`~.identity.toy_arcface`) is the identity condition of all that identity's
                 samples, as ``sample.py --id-image`` would use it
    decoys       per identity ``decoys`` more full-range renders that no model sees: other photos of the same
                 person, the control of the copy measures
    targets      per identity M fresh full-range draws (pose, landmarks, emotion): what the controlled sets
                 are asked for, and "real renders", the analysers' reference row
    noise        condition i starts from ``initial_noise(seed, i)`` in every set

Every metric is computed from the toy analysers' reading of the images (:func:`analyse`) and returned as
``(value, standard error)``; samples of one identity share a reference, so standard errors are clustered by
identity (means: the standard deviation of the per-identity means / sqrt(K); ratios and FD: a bootstrap over
identities, ``bootstrap`` resamples). Metrics (:func:`set_metrics`):

* against the targets: ``id_top1`` (identity classifier vs the conditioning identity), ``id_cos`` (embedding vs
  the identity's mean embedding on fresh renders), ``pose_mae_deg``, ``landmark_nme``, ``emotion_acc``,
  ``valence_rmse`` / ``arousal_rmse``;
* diversity among an identity's M samples: ``pose_div_deg`` (mean pairwise geodesic angle), ``expr_div``
  (mean pairwise distance of pose-normalised expression displacements, :func:`expression_displacement`),
  ``emotion_entropy`` (bits of the histogram of emotion classes);
* copying of the reference (the Arc2Face failure): ``pose_copy`` = mean pose distance of a sample to its
  reference / mean distance to its identity's decoys (reference and decoys are independent draws of the same
  person, so 1 = the sample does not depend on which photo conditioned it, 0 = exact copy; distances between the
  analysers' readings, so an analyser's identity-specific bias cancels); ``expr_copy`` the same for expression
  displacements; ``emotion_copy`` = P(sample's emotion class = its reference's) - P(= a decoy's) (0 = none);
  ``yaw_copy_slope`` = least-squares slope of the samples' yaw on their reference's yaw minus the mean slope on
  their decoys' yaw (0 = none, 1 = the sample turns as far as the reference);
* ``fd``: Frechet distance of analyser features (the identity classifier's cosines, emotion probabilities,
  valence / arousal, pose / 30 deg) to a reference set of fresh renders (small-sample biased: compare sets of equal size only).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import numpy as np

from facecrafter_jax import metrics as M

__all__ = ["Conditions", "make_conditions", "own_photo_conditions", "reference_images", "analyse",
           "expression_displacement", "set_metrics", "sample_set", "features", "fd_parts", "with_references",
           "cluster_mean", "cluster_bootstrap", "MEAN_METRICS"]

MEAN_METRICS = ("id_top1", "id_cos", "pose_mae_deg", "landmark_nme", "emotion_acc")
_RIGID = np.arange(468)  # the mesh points (irises excluded) used for pose normalisation


class Conditions(dict):
    """Evaluation conditions (see the module docstring). Keys, N = K x M conditions (identity-major):
    ``identity`` [N], ``arcface`` [N, 512] (the reference's toy ArcFace), ``images`` [N, R, R, 3] (real renders
    of the targets), ``landmarks`` / ``neutral_landmarks`` [N, 478, 3] (the target's, and the target pose with
    a neutral expression), ``head_pose`` [N, 3], ``emotion`` [N, 10] (record field), ``emotion_class`` [N];
    ``ref_images`` / ``ref_head_pose`` / ``ref_emotion_class`` [K, ...] (the references), ``identities`` [K],
    ``decoy_images`` [K * D, ...] (identity-major) and ``decoys`` D,
    ``neutral_frontal`` [K, 478, 3] (each identity's exact landmarks, neutral and frontal),
    ``per_identity`` M."""


def make_conditions(world, arcface_fn: Callable[[np.ndarray], np.ndarray], identities: int, per_identity: int,
                    seed: int, decoys: int = 4) -> Conditions:
    """``identities`` evenly spread identities x ``per_identity`` full-range targets, one full-range reference
    and ``decoys`` full-range decoys per identity (seeds ``3000 + seed`` targets, ``3500 + seed`` references,
    ``3700 + seed`` decoys)."""
    import dataclasses

    num = world.config.num_identities
    ids = np.unique(np.linspace(0, num - 1, min(identities, num)).round().astype(np.int64))
    k, m = len(ids), per_identity
    refs = world.sample(k, seed=3500 + int(seed), identity=ids)
    ref_images = world.render(refs)
    ref_arc = np.asarray(arcface_fn(ref_images), np.float32)
    decoy = world.sample(k * decoys, seed=3700 + int(seed), identity=np.repeat(ids, decoys))
    identity = np.repeat(ids, m)
    attrs = world.sample(k * m, seed=3000 + int(seed), identity=identity)
    feats = world.features(attrs)
    neutral = dataclasses.replace(attrs, emotion=np.zeros_like(attrs.emotion), expression=np.zeros_like(attrs.expression))
    frontal = world.sample(k, seed=0, identity=ids, emotion=0, head_pose=np.zeros(3))
    frontal = dataclasses.replace(frontal, expression=np.zeros_like(frontal.expression),
                                  gaze=np.zeros_like(frontal.gaze))
    return Conditions(
        identity=identity.astype(np.int32), arcface=np.repeat(ref_arc, m, axis=0), images=world.render(attrs),
        landmarks=feats["landmarks"], neutral_landmarks=world.features(neutral)["landmarks"],
        head_pose=feats["head_pose"], emotion=feats["emotion"], emotion_class=np.asarray(attrs.emotion, np.int32),
        ref_images=ref_images, ref_head_pose=np.asarray(refs.head_pose, np.float32),
        ref_emotion_class=np.asarray(refs.emotion, np.int32), identities=ids.astype(np.int32),
        decoy_images=world.render(decoy), decoys=decoys,
        neutral_frontal=world.features(frontal)["landmarks"], per_identity=m)


def with_references(cond: Conditions, world, arcface_fn: Callable[[np.ndarray], np.ndarray], refs,
                    decoys=None) -> Conditions:
    """``cond`` conditioned on other reference photos (attributes ``refs``); the targets are unchanged.

    * one photo per identity of ``cond["identities"]``: they become the references (their toy ArcFace the identity
      condition of every sample of that identity) and ``decoys`` (attributes, ``cond["decoys"]`` per identity,
      identity-major) the decoys; e.g. celebrity-split photos instead of full-range ones (``base-probe
      --reference celebrity``), the base model's in-distribution use;
    * one photo per condition (``len(refs) == len(cond["identity"])``): every sample gets its own photo of its
      identity, so copying of a photo averages out over a set (``--reference celebrity_each``); ``decoys`` must be
      None, ``ref_images`` holds each identity's first photo (for display) and ``cond["reference_each"]`` is set:
      the copy metrics are undefined then (:func:`set_metrics` with ``ref_analysis=None``)."""
    ids = np.asarray(cond["identities"])
    rid = np.asarray(refs.identity)
    m = int(cond["per_identity"])
    out = Conditions(cond)
    if len(rid) == len(cond["identity"]) and decoys is None:
        if not np.array_equal(rid, np.asarray(cond["identity"])):
            raise ValueError("with_references: per-condition refs must have the identities of cond['identity']")
        images = world.render(refs)
        out.update(arcface=np.asarray(arcface_fn(images), np.float32), ref_images=images[::m],
                   ref_head_pose=np.asarray(refs.head_pose, np.float32)[::m],
                   ref_emotion_class=np.asarray(refs.emotion, np.int32)[::m], reference_each=True)
        return out
    if decoys is None or not (np.array_equal(rid, ids)
                              and np.array_equal(np.asarray(decoys.identity), np.repeat(ids, cond["decoys"]))):
        raise ValueError("with_references: refs must hold one photo per identity of cond['identities'] (with decoys, "
                         f"{cond['decoys']} per identity, identity-major) or one per condition (without decoys)")
    ref_images = world.render(refs)
    out.update(arcface=np.repeat(np.asarray(arcface_fn(ref_images), np.float32), m, axis=0),
               ref_images=ref_images, ref_head_pose=np.asarray(refs.head_pose, np.float32),
               ref_emotion_class=np.asarray(refs.emotion, np.int32), decoy_images=world.render(decoys))
    return out


OWN_PHOTO_SEED = {"full_each": 4000, "celebrity_each": 4100}
"""Seed offset (plus the evaluation seed) of the per-condition photos of each ``_each`` reference."""


def own_photo_conditions(p, cond, reference: str, seed: int):
    """``cond`` with every condition on its own photo of its identity (:func:`with_references`):
    ``reference`` ``celebrity_each`` draws them from pipeline ``p``'s base (celebrity) split, ``full_each`` from
    the full range, with seed ``OWN_PHOTO_SEED[reference] + seed``. The report's own-photo row and ``base-probe
    --reference celebrity_each`` use the same photos."""
    from .splits import sample_split

    if reference not in OWN_PHOTO_SEED:
        raise ValueError(f"reference must be one of {list(OWN_PHOTO_SEED)}, got {reference!r}")
    split = p.split_of("base") if reference == "celebrity_each" else "full"
    who = np.asarray(cond["identity"])
    refs = sample_split(p.world, split, len(who), OWN_PHOTO_SEED[reference] + seed, p.celebrity, identity=who)
    return with_references(cond, p.world, p.arcface, refs)


def reference_images(cond: Conditions) -> np.ndarray:
    """The references [K] then the decoys [K * D]: what ``ref_analysis`` of :func:`set_metrics` reads."""
    return np.concatenate([cond["ref_images"], cond["decoy_images"]])


def analyse(analysers, images: np.ndarray) -> dict[str, np.ndarray]:
    """The toy analysers' reading of uint8 images (``ToyAnalysers.analyse``)."""
    return analysers.analyse(np.asarray(images))


def features(a: Mapping[str, np.ndarray]) -> np.ndarray:
    """FD features of an analysis (77-d for 64 identities): the identity classifier's cosines to every identity
    centre (a compact identity-and-quality code; the 512-d embedding would be rank-deficient at 256 samples),
    emotion probabilities, valence / arousal, pose / 30 deg."""
    return np.concatenate([a["cosines"], a["emotion_probs"], a["va"], a["head_pose"] / 30.0], axis=1)


def fd_parts(f: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    """The FD of :func:`features` ``f`` to ``reference`` (both [N, 64 + 13] for 64 identities), whole and per
    feature group: ``identity`` (the classifier's cosines), ``emotion`` (emotion probabilities and valence /
    arousal), ``pose``. Where the FD of a set comes from; the parts do not add up to the whole (cross-group
    covariances), they do when the groups are uncorrelated."""
    f, reference = np.asarray(f), np.asarray(reference)
    if f.ndim != 2 or reference.ndim != 2 or f.shape[1] != reference.shape[1] or f.shape[1] < 14:
        raise ValueError(f"fd_parts needs [N, K + 13] features of equal width, got {f.shape} and {reference.shape}")
    k = f.shape[1] - 13
    groups = {"all": slice(0, None), "identity": slice(0, k), "emotion": slice(k, k + 10), "pose": slice(k + 10, None)}
    return {g: float(M.frechet_distance(f[:, sl], reference[:, sl])) for g, sl in groups.items()}


def expression_displacement(landmarks: np.ndarray, neutral_frontal: np.ndarray) -> np.ndarray:
    """Pose-normalised expression of faces ``landmarks`` [N, 478, 3]: each is similarity-aligned in 3-D
    (rotation, scale, translation over the 468 mesh points) onto its identity's neutral frontal landmarks
    ``neutral_frontal`` [N, 478, 3], then the displacement from them on the mouth, eye and brow points
    (:data:`facecrafter_jax.metrics.EXPRESSION_INDICES`), divided by the neutral face's inter-ocular distance.
    Returns [N, len(EXPRESSION_INDICES) * 3]; 0 for the neutral face itself, whatever its pose."""
    lm = np.asarray(landmarks, np.float64)
    ref = np.asarray(neutral_frontal, np.float64)
    if lm.shape[-1] != 3 or ref.shape != lm.shape:
        raise ValueError(f"expression_displacement needs 3-D landmarks of equal shape, got {lm.shape} and {ref.shape}")
    aligned, *_ = M.procrustes_align(lm, ref, indices=_RIGID)
    iod = M.inter_ocular_distance(ref)
    idx = np.asarray(M.EXPRESSION_INDICES)
    return ((aligned[:, idx] - ref[:, idx]) / iod[:, None, None]).reshape(len(lm), -1)


def cluster_mean(values: np.ndarray, groups: np.ndarray) -> tuple[float, float]:
    """(mean of the per-group means, their standard deviation / sqrt(number of groups)); NaN values dropped."""
    v = np.asarray(values, np.float64)
    means = np.array([np.nanmean(v[groups == g]) for g in np.unique(groups) if np.isfinite(v[groups == g]).any()])
    if len(means) == 0:
        return float("nan"), float("nan")
    se = float(means.std(ddof=1) / np.sqrt(len(means))) if len(means) > 1 else float("nan")
    return float(means.mean()), se


def cluster_bootstrap(stat: Callable[[np.ndarray], float], num_groups: int, *, resamples: int = 100,
                      seed: int = 0) -> float:
    """Standard error of ``stat(group_indices)`` (a statistic of the samples of the listed groups, repeats
    allowed) over ``resamples`` bootstrap draws of the groups with replacement."""
    rng = np.random.default_rng([seed, 13])
    vals = [stat(rng.integers(0, num_groups, num_groups)) for _ in range(resamples)]
    vals = np.asarray(vals, np.float64)
    vals = vals[np.isfinite(vals)]
    return float(vals.std(ddof=1)) if len(vals) > 1 else float("nan")


def _pairwise_mean(x: np.ndarray, dist: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> float:
    i, j = np.triu_indices(len(x), k=1)
    return float(dist(x[i], x[j]).mean())


def _geodesic(a, b):
    return M.geodesic_angle(M.rotation_from_pose(a), M.rotation_from_pose(b))


def _euclid(a, b):
    return np.linalg.norm(a - b, axis=-1)


def _copy_metrics(a, cond, ref_analysis, disp, cls, group, k, bootstrap, seed) -> dict:
    """The copy metrics of :func:`set_metrics` (pose / expression copy ratios, yaw copy slope, emotion copy)."""
    out: dict[str, tuple[float, float]] = {}
    nd = int(cond["decoys"])
    ref_pose, dec_pose = ref_analysis["head_pose"][:k], ref_analysis["head_pose"][k:]
    d_own = {"pose_copy": _geodesic(a["head_pose"], ref_pose[group])}
    d_dec = {"pose_copy": np.stack([_geodesic(a["head_pose"], dec_pose[group * nd + j]) for j in range(nd)], 1)}
    if disp is not None:
        nf = cond["neutral_frontal"]
        ref_disp = expression_displacement(ref_analysis["landmarks"][:k], nf)
        dec_disp = expression_displacement(ref_analysis["landmarks"][k:], np.repeat(nf, nd, axis=0))
        d_own["expr_copy"] = _euclid(disp, ref_disp[group])
        d_dec["expr_copy"] = np.stack([_euclid(disp, dec_disp[group * nd + j]) for j in range(nd)], 1)

    def rows_of(g):
        return np.concatenate([np.flatnonzero(group == i) for i in g])
    for name in d_own:
        def ratio(g, name=name):
            r = rows_of(g)
            den = d_dec[name][r].mean()
            return d_own[name][r].mean() / den if den > 0 else float("nan")
        out[name] = (float(ratio(np.arange(k))), cluster_bootstrap(ratio, k, resamples=bootstrap, seed=seed))
    def yaw_slope(g):
        r = rows_of(g)
        y = a["head_pose"][r, 0]

        def slope(x):
            x = x - x.mean()
            return float(x @ (y - y.mean()) / (x @ x)) if x @ x > 0 else float("nan")
        return slope(ref_pose[group[r], 0]) - np.mean([slope(dec_pose[group[r] * nd + j, 0]) for j in range(nd)])
    out["yaw_copy_slope"] = (yaw_slope(np.arange(k)), cluster_bootstrap(yaw_slope, k, resamples=bootstrap, seed=seed))
    ref_cls = ref_analysis["emotion_probs"].argmax(-1)
    agree_own = (cls == ref_cls[:k][group]).astype(np.float64)
    agree_dec = np.stack([cls == ref_cls[k:][group * nd + j] for j in range(nd)], 1).astype(np.float64)

    def emo_copy(g):
        r = rows_of(g)
        return agree_own[r].mean() - agree_dec[r].mean()
    out["emotion_copy"] = (float(emo_copy(np.arange(k))), cluster_bootstrap(emo_copy, k, resamples=bootstrap, seed=seed))
    return out


def set_metrics(a: Mapping[str, np.ndarray], cond: Conditions, *, ref_analysis: Mapping[str, np.ndarray] | None,
                id_centres: np.ndarray, fd_reference: np.ndarray | None = None, bootstrap: int = 100,
                seed: int = 0, per_identity: dict | None = None) -> dict[str, tuple[float, float]]:
    """Every metric of the module docstring for one set (analysis ``a`` of one image per condition), as
    ``{name: (value, standard error)}``. ``ref_analysis``: the analysers' reading of the references followed by
    the decoys (``analyse(analysers, reference_images(cond))``; None: no copy metrics);
    ``id_centres`` [I, E]: unit mean embedding per identity (fresh renders); ``fd_reference``: feature rows
    (:func:`features`) of the FD reference set (None: no ``fd``). ``per_identity``: a dict that receives, for
    every metric that is a mean over identities (:data:`MEAN_METRICS` and the three diversities), its K
    per-identity values (what paired comparisons of two sets on the same conditions need)."""
    from .analysers import landmark_nme

    m = int(cond["per_identity"])
    n = len(cond["identity"])
    k = n // m
    group = np.repeat(np.arange(k), m)
    out: dict[str, tuple[float, float]] = {}
    per = {
        "id_top1": (a["identity"] == cond["identity"]).astype(np.float64),
        "id_cos": np.sum(a["embedding"] * id_centres[cond["identity"]], axis=1),
        "pose_mae_deg": np.abs(a["head_pose"] - cond["head_pose"]).mean(1),
        "landmark_nme": landmark_nme(a["landmarks"], cond["landmarks"]),
        "emotion_acc": (a["emotion_probs"].argmax(-1) == cond["emotion_class"]).astype(np.float64),
    }
    for name, v in per.items():
        out[name] = cluster_mean(v, group)
        if per_identity is not None:
            per_identity[name] = np.array([np.nanmean(v[group == g]) for g in range(k)])
    for j, name in enumerate(("valence", "arousal")):
        sq = (a["va"][:, j] - cond["emotion"][:, 8 + j]) ** 2
        out[f"{name}_rmse"] = (float(np.sqrt(sq.mean())),
                               cluster_bootstrap(lambda g: np.sqrt(np.concatenate([sq[group == i] for i in g]).mean()),
                                                 k, resamples=bootstrap, seed=seed))
    # diversity among each identity's samples
    disp = expression_displacement(a["landmarks"], np.repeat(cond["neutral_frontal"], m, axis=0)) \
        if a["landmarks"].shape[-1] == 3 else None
    cls = a["emotion_probs"].argmax(-1)
    div = {"pose_div_deg": np.asarray([_pairwise_mean(a["head_pose"][group == g], _geodesic) for g in range(k)])}
    if disp is not None:
        div["expr_div"] = np.asarray([_pairwise_mean(disp[group == g], _euclid) for g in range(k)])
    div["emotion_entropy"] = np.asarray([M.class_entropy(cls[group == g]) for g in range(k)])
    for name, v in div.items():
        out[name] = cluster_mean(v, np.arange(k))
        if per_identity is not None:
            per_identity[name] = v
    # copying of the reference: distance to the reference vs to the same identity's decoys
    if ref_analysis is not None:
        out.update(_copy_metrics(a, cond, ref_analysis, disp, cls, group, k, bootstrap, seed))
    if fd_reference is not None:
        f = features(a)

        def fd(g):
            return M.frechet_distance(np.concatenate([f[group == i] for i in g]), fd_reference)
        out["fd"] = (fd(np.arange(k)), cluster_bootstrap(fd, k, resamples=bootstrap, seed=seed))
    return out


def sample_set(pipe, cond: Mapping[str, Any], controls: Sequence[str], ev, *, emotion=None, landmarks=None,
               **kwargs) -> np.ndarray:
    """uint8 images, one per condition, from a ``FaceCrafterPipeline`` (batches of ``ev.batch_size``; condition
    i uses noise index i). ``controls``: any of ``landmark`` (the target landmarks), ``neutral_landmark`` (the
    target pose with a neutral expression), ``emotion``; none = ID-only (``guidance_id`` only, exactly the base
    model). ``kwargs`` go to the pipeline (e.g. ``null_controls``)."""
    n = len(cond["identity"])
    out = []
    for s in range(0, n, ev.batch_size):
        sl = slice(s, min(n, s + ev.batch_size))
        kw = dict(kwargs)
        if "landmark" in controls:
            kw["landmarks"] = (cond["landmarks"] if landmarks is None else landmarks)[sl]
        if "neutral_landmark" in controls:
            kw["landmarks"] = cond["neutral_landmarks"][sl]
        if "emotion" in controls:
            kw["emotion"] = (cond["emotion"] if emotion is None else emotion)[sl]
        if "landmarks" in kw or "emotion" in kw:
            kw.setdefault("guidance_control", ev.guidance_control)
        res = pipe(cond["arcface"][sl], num_steps=ev.num_steps, scheduler=ev.scheduler, seed=ev.seed, first_index=s,
                   guidance_id=ev.guidance_id, **kw)
        out.append(np.asarray(res.images))
    return np.concatenate(out)
