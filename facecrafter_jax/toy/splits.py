"""The toy world's data splits: narrow "celebrity photos" for the base, the full range for the adapters.

Real identity datasets (what Arc2Face trains on) are narrow in the mutable factors: a person is photographed
mostly near-frontal, with a few typical expressions, and those habits differ between people (the Arc2Face
card: poses limited to the frontal hemisphere; FaceCrafter: "existing datasets lack sufficient diversity in
mutable factors"). FaceCrafter trains its control modules on data with that variety. The toy pipeline
reproduces both:

* ``full``: :meth:`ToyWorld.sample` as configured (yaw N(0, 18) deg, pitch N(0, 9), roll N(0, 6), the 8 emotions
  uniform): the adapter stages' data, the analysers' data and every evaluation target.
* ``celebrity`` (:class:`CelebritySplit`): per identity ``i`` a typical head pose ``mu_i`` (yaw ~
  N(0, ``yaw_centre_std``), pitch ~ N(0, ``pitch_centre_std``), roll 0) and ``emotions_per_identity`` typical
  emotions drawn without replacement with ``emotion_weights`` (neutral and happy most often, as in posed
  photos); a sample of identity i has pose ``mu_i + N(0, (yaw_std, pitch_std, roll_std))`` and its first
  typical emotion with probability ``main_emotion_share``, else one of the others uniformly. Identity i's
  habits come from its own generator ``(world seed, 6, i)``, so they do not depend on the number of identities
  or samples. Intensity, expression jitter, gaze and framing are the world's.

``sample_split(world, "celebrity", n, seed, CelebritySplit())`` returns :class:`~.world.Attributes` like
``world.sample``; :func:`split_statistics` summarises a set of samples (per-identity spreads, emotion
entropy) for the docs and the tests.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from .world import NUM_EMOTIONS, Attributes, ToyWorld, checked_config_dict

__all__ = ["SPLITS", "CelebritySplit", "identity_habits", "sample_split", "split_statistics"]

SPLITS = ("full", "celebrity")


@dataclass(frozen=True)
class CelebritySplit:
    """Per-identity pose / expression habits of the base model's data (see the module docstring); degrees."""

    yaw_centre_std: float = 10.0
    pitch_centre_std: float = 4.0
    yaw_std: float = 5.0
    pitch_std: float = 3.0
    roll_std: float = 2.5
    emotions_per_identity: int = 2
    emotion_weights: tuple[float, ...] = (4.0, 4.0, 1.0, 1.0, 0.5, 0.5, 1.0, 1.0)
    main_emotion_share: float = 0.7

    def __post_init__(self):
        w = tuple(float(x) for x in self.emotion_weights)
        object.__setattr__(self, "emotion_weights", w)
        if len(w) != NUM_EMOTIONS or min(w) < 0 or sum(x > 0 for x in w) < self.emotions_per_identity:
            raise ValueError(f"emotion_weights must be {NUM_EMOTIONS} non-negative numbers with at least "
                             f"emotions_per_identity positive ones, got {self.emotion_weights!r}")
        if not isinstance(self.emotions_per_identity, int) or not 1 <= self.emotions_per_identity <= NUM_EMOTIONS:
            raise ValueError(f"emotions_per_identity must be an int in [1, {NUM_EMOTIONS}], got "
                             f"{self.emotions_per_identity!r}")
        for name in ("yaw_centre_std", "pitch_centre_std", "yaw_std", "pitch_std", "roll_std"):
            if not float(getattr(self, name)) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        if not 0.0 <= float(self.main_emotion_share) <= 1.0:
            raise ValueError(f"main_emotion_share must be in [0, 1], got {self.main_emotion_share!r}")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> "CelebritySplit":
        """From a mapping (YAML); unknown keys raise ``ValueError`` naming them."""
        return cls(**checked_config_dict(cls, d, "celebrity split"))  # the engine coerces lists to the tuple fields

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["emotion_weights"] = list(self.emotion_weights)
        return d


def identity_habits(world: ToyWorld, split: CelebritySplit) -> dict[str, np.ndarray]:
    """Per identity: ``pose_centre`` [I, 3] (yaw, pitch, 0) and ``emotions`` [I, K] (its typical emotions,
    the main one first), each identity from its own generator ``(world seed, 6, i)``."""
    c = world.config
    centres, emotions = [], []
    w = np.asarray(split.emotion_weights) / np.sum(split.emotion_weights)
    for i in range(c.num_identities):
        rng = np.random.default_rng([c.seed, 6, i])
        centres.append([rng.normal(0.0, split.yaw_centre_std), rng.normal(0.0, split.pitch_centre_std), 0.0])
        emotions.append(rng.choice(NUM_EMOTIONS, size=split.emotions_per_identity, replace=False, p=w))
    centre = np.asarray(centres)
    centre[:, 0] = np.clip(centre[:, 0], -c.yaw_max, c.yaw_max)
    centre[:, 1] = np.clip(centre[:, 1], -c.pitch_max, c.pitch_max)
    return {"pose_centre": centre, "emotions": np.asarray(emotions, np.int64)}


def sample_split(world: ToyWorld, split: str, n: int, seed: int, celebrity: CelebritySplit | None = None, *,
                 identity=None) -> Attributes:
    """``n`` attribute draws of ``split`` (``full`` or ``celebrity``; deterministic for ``seed``); ``identity``
    ([n] or a scalar) fixes who is drawn, as in :meth:`ToyWorld.sample`."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; splits: {list(SPLITS)}")
    if split == "full":
        return world.sample(n, seed, identity=identity)
    cfg = celebrity or CelebritySplit()
    c = world.config
    rng = np.random.default_rng([c.seed, 7, int(seed)])
    ids = rng.integers(0, c.num_identities, n)
    if identity is not None:
        ids = np.broadcast_to(np.asarray(identity, np.int64), (n,)).copy()
    habits = identity_habits(world, cfg)
    jitter = rng.normal(0.0, 1.0, (n, 3)) * [cfg.yaw_std, cfg.pitch_std, cfg.roll_std]
    pose = habits["pose_centre"][ids] + jitter
    pose = np.clip(pose, [-c.yaw_max, -c.pitch_max, -c.roll_max], [c.yaw_max, c.pitch_max, c.roll_max])
    k = cfg.emotions_per_identity
    main = rng.random(n) < cfg.main_emotion_share
    other = rng.integers(1, k, n) if k > 1 else np.zeros(n, np.int64)
    emotion = habits["emotions"][ids, np.where(main | (k == 1), 0, other)]
    return world.sample(n, seed, identity=ids, head_pose=pose, emotion=emotion)


def _entropy_bits(labels: np.ndarray, k: int) -> float:
    p = np.bincount(labels, minlength=k) / max(len(labels), 1)
    p = p[p > 0]
    return float(-(p * np.log2(p)).sum())


def split_statistics(identity, head_pose, emotion) -> dict[str, float]:
    """Summary of a set of samples (``identity`` [N], ``head_pose`` [N, 3] degrees, ``emotion`` [N] class
    indices, e.g. the fields of :class:`~.world.Attributes`): the overall yaw / pitch / roll std, their mean
    within-identity std (population std per identity with >= 2 samples, then the mean), the mean
    within-identity emotion entropy (bits of the class histogram) and the overall emotion entropy."""
    ids = np.asarray(identity)
    pose = np.asarray(head_pose, np.float64)
    emo = np.asarray(emotion, np.int64)
    within_std, within_ent = [], []
    for k in np.unique(ids):
        sel = ids == k
        if sel.sum() >= 2:
            within_std.append(pose[sel].std(axis=0))
            within_ent.append(_entropy_bits(emo[sel], NUM_EMOTIONS))
    ws = np.mean(within_std, axis=0) if within_std else np.full(3, np.nan)
    out = {f"{a}_std": float(pose[:, j].std()) for j, a in enumerate(("yaw", "pitch", "roll"))}
    out.update({f"{a}_std_within": float(ws[j]) for j, a in enumerate(("yaw", "pitch", "roll"))})
    out["emotion_entropy_within"] = float(np.mean(within_ent)) if within_ent else float("nan")
    out["emotion_entropy"] = _entropy_bits(emo, NUM_EMOTIONS)
    return out
