"""Statistics of the toy study: per-seed estimates, paired differences with standard errors, claim verdicts.

Every metric of a study cell (variant x seed) is a mean over >= 256 generated samples. Across seeds a metric
has per-seed values ``m_1 .. m_S``; a variant is compared with its reference through the *paired* per-seed
differences ``d_s = m_s(variant) - m_s(reference)`` (the same training seed, data order and sampling noise on both
sides, so most sampling noise cancels). Their mean is the effect and its standard error is

    SE = sqrt( max(s_d^2 / S,  mean_s(se_s^2) / S) )

with ``s_d`` the sample standard deviation of the ``d_s`` (seed-to-seed spread, which already contains the
within-seed sampling noise) and ``se_s`` the within-seed standard error of each ``d_s`` (from the per-sample
values); the larger of the two is used, so a lucky agreement of three seeds cannot make an effect look more
certain than its sampling noise allows. With one seed only the within-seed term is left.

Verdict of a claim "variant is better than reference on metric M" (``direction`` +1: higher is better, -1: lower):
``z = direction * mean(d) / SE``; **yes** if ``z >= Z``, **no** if ``z <= -Z`` (the opposite, significantly),
**inconclusive** otherwise, with ``Z = 2`` (about 95% two-sided under a normal approximation; with three seeds
the between-seed SE is itself uncertain, so borderline verdicts deserve more seeds, and the table prints z).

Verdict of a claim "variant is *similar* to reference on M" (``direction`` 0, an equivalence test with a
``margin``): **yes** if the whole interval ``mean(d) +- Z * SE`` lies inside ``(-margin, margin)``, **no** if it
lies wholly outside (``|mean(d)| - Z * SE >= margin``), **inconclusive** otherwise; ``z`` is then
``(margin - |mean(d)|) / SE`` (>= Z for yes, <= -Z for no).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

__all__ = ["Estimate", "estimate", "paired_difference", "verdict", "equivalence", "Z_THRESHOLD", "ClaimRow",
           "claim_table"]

Z_THRESHOLD = 2.0


@dataclass(frozen=True)
class Estimate:
    """A mean over seeds with its standard error; ``per_seed`` keeps the per-seed values."""

    mean: float
    se: float
    per_seed: tuple[float, ...]

    @property
    def n(self) -> int:
        return len(self.per_seed)

    def to_dict(self) -> dict:
        return {"mean": self.mean, "se": self.se, "per_seed": list(self.per_seed)}

    def __str__(self) -> str:
        return f"{self.mean:.4g} ± {self.se:.2g}"


def _finite(values: Sequence[float], what: str) -> np.ndarray:
    v = np.asarray(values, np.float64).reshape(-1)
    if v.size == 0 or not np.all(np.isfinite(v)):
        raise ValueError(f"{what}: need finite per-seed values, got {list(v)}")
    return v


def estimate(per_seed: Sequence[float], within_se: Sequence[float] | None = None) -> Estimate:
    """Mean over seeds; SE as in the module docstring (``within_se``: each seed's sampling SE, optional)."""
    v = _finite(per_seed, "estimate")
    between = float(np.var(v, ddof=1) / v.size) if v.size > 1 else 0.0
    within = float(np.mean(np.square(_finite(within_se, "within_se"))) / v.size) if within_se is not None else 0.0
    if v.size == 1 and within_se is None:
        raise ValueError("estimate: one seed needs its within-seed standard error")
    return Estimate(float(v.mean()), math.sqrt(max(between, within)), tuple(float(x) for x in v))


def paired_difference(variant: Sequence[float], reference: Sequence[float],
                      within_se: Sequence[float] | None = None) -> Estimate:
    """The per-seed paired differences ``variant - reference`` as an :func:`estimate` (seeds in the same order)."""
    a, b = _finite(variant, "variant"), _finite(reference, "reference")
    if a.shape != b.shape:
        raise ValueError(f"paired_difference: {a.size} variant seeds vs {b.size} reference seeds")
    return estimate(a - b, within_se)


def verdict(diff: Estimate, direction: int, threshold: float = Z_THRESHOLD) -> tuple[str, float]:
    """("yes" | "no" | "inconclusive", z) for the claim that the difference goes in ``direction`` (+1 / -1)."""
    if direction not in (1, -1):
        raise ValueError(f"direction must be +1 or -1, got {direction!r}")
    if diff.se <= 0:
        z = math.copysign(math.inf, direction * diff.mean) if diff.mean else 0.0
    else:
        z = direction * diff.mean / diff.se
    if z >= threshold:
        return "yes", z
    if z <= -threshold:
        return "no", z
    return "inconclusive", z


def equivalence(diff: Estimate, margin: float, threshold: float = Z_THRESHOLD) -> tuple[str, float]:
    """("yes" | "no" | "inconclusive", z) for the claim that the difference is within ``+-margin`` (see the module
    docstring)."""
    if not margin > 0:
        raise ValueError(f"equivalence margin must be > 0, got {margin!r}")
    gap = margin - abs(diff.mean)
    z = gap / diff.se if diff.se > 0 else math.copysign(math.inf, gap)
    if z >= threshold:
        return "yes", z
    if z <= -threshold:
        return "no", z
    return "inconclusive", z


@dataclass
class ClaimRow:
    """One row of the claim table: the claim, the metric and the two sides compared. ``direction`` +1 / -1: the
    variant is claimed higher / lower; 0: similar within ``margin`` (:func:`equivalence`)."""

    claim: str
    metric: str
    variant: str
    reference: str
    value: Estimate
    reference_value: Estimate
    diff: Estimate
    direction: int
    result: str = ""
    z: float = 0.0
    note: str = ""
    margin: float | None = None
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.direction == 0 and self.margin is None:
            raise ValueError(f"claim {self.claim!r}: a similarity claim (direction 0) needs a margin")
        if not self.result:
            self.result, self.z = (equivalence(self.diff, self.margin) if self.direction == 0
                                   else verdict(self.diff, self.direction))

    def to_dict(self) -> dict:
        return {"claim": self.claim, "metric": self.metric, "variant": self.variant, "reference": self.reference,
                "value": self.value.to_dict(), "reference_value": self.reference_value.to_dict(),
                "difference": self.diff.to_dict(), "direction": self.direction, "margin": self.margin, "z": self.z,
                "reproduced": self.result, "note": self.note, **self.extra}


def claim_table(rows: Sequence[ClaimRow]) -> str:
    """Markdown: claim, metric, FaceCrafter value, reference value, difference ± SE, z, reproduced."""
    lines = ["| claim | metric | FaceCrafter (variant) | reference | difference ± SE | z | reproduced |",
             "|---|---|---|---|---|---:|---|"]
    for r in rows:
        better = "↑" if r.direction > 0 else "↓" if r.direction < 0 else f"≈ (±{r.margin:g})"
        lines.append(f"| {r.claim} | {r.metric} {better} | {r.value} ({r.variant}) | {r.reference_value} "
                     f"({r.reference}) | {r.diff.mean:+.4g} ± {r.diff.se:.2g} | {r.z:+.1f} | **{r.result}**"
                     + (f" ({r.note})" if r.note else "") + " |")
    return "\n".join(lines)
