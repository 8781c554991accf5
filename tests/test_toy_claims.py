"""The toy study's statistics against closed forms: seed means, paired SEs, verdict thresholds."""

import math

import numpy as np
import pytest

from facecrafter_jax.toy.claims import ClaimRow, claim_table, estimate, paired_difference, verdict


def test_estimate_and_paired_difference_closed_form():
    e = estimate([1.0, 2.0, 4.0])
    assert e.mean == pytest.approx(7 / 3)
    assert e.se == pytest.approx(math.sqrt(np.var([1, 2, 4], ddof=1) / 3))
    # the within-seed floor wins when the seeds agree better than their sampling noise allows
    tight = estimate([1.0, 1.0, 1.0], within_se=[0.3, 0.3, 0.6])
    assert tight.se == pytest.approx(math.sqrt((0.09 + 0.09 + 0.36) / 3 / 3))
    d = paired_difference([0.5, 0.7, 0.6], [0.4, 0.5, 0.5])
    assert d.mean == pytest.approx(0.4 / 3) and d.per_seed == pytest.approx((0.1, 0.2, 0.1))
    assert d.se == pytest.approx(math.sqrt(np.var([0.1, 0.2, 0.1], ddof=1) / 3))
    with pytest.raises(ValueError, match="one seed needs"):
        estimate([0.3])
    assert estimate([0.3], within_se=[0.05]).se == pytest.approx(0.05)
    with pytest.raises(ValueError, match="finite"):
        estimate([0.1, float("nan")])
    with pytest.raises(ValueError, match="3 variant seeds vs 2"):
        paired_difference([1, 2, 3], [1, 2])


def test_verdicts_follow_the_numbers():
    from facecrafter_jax.toy.claims import Estimate

    assert verdict(Estimate(0.3, 0.1, (0.3,)), +1) == ("yes", pytest.approx(3.0))
    assert verdict(Estimate(0.3, 0.1, (0.3,)), -1)[0] == "no"  # significantly the opposite of the claim
    assert verdict(Estimate(0.15, 0.1, (0.15,)), +1)[0] == "inconclusive"  # within its error: never "yes"
    assert verdict(Estimate(-0.5, 0.1, (-0.5,)), -1)[0] == "yes"  # lower is better
    row = ClaimRow("c", "m", "v", "r", estimate([1, 2, 3]), estimate([0, 1, 2]), paired_difference([1, 2, 3], [0, 1, 2],
                   within_se=[0.1, 0.1, 0.1]), +1)
    assert row.result == "yes" and row.z == pytest.approx(1 / math.sqrt(0.01 / 3))
    md = claim_table([row])
    assert "| c | m ↑ |" in md and "**yes**" in md and row.to_dict()["reproduced"] == "yes"


def test_equivalence_verdicts_closed_form():
    """'Similar within a margin': yes only when the whole +-2 SE interval is inside the margin."""
    from facecrafter_jax.toy.claims import Estimate, equivalence

    assert equivalence(Estimate(0.01, 0.01, (0.01,)), 0.05) == ("yes", pytest.approx(4.0))  # [-0.01, 0.03] inside
    assert equivalence(Estimate(-0.02, 0.02, (0.0,)), 0.05)[0] == "inconclusive"  # reaches -0.06: not inside
    assert equivalence(Estimate(-0.2, 0.05, (0.0,)), 0.05) == ("no", pytest.approx(-3.0))  # wholly outside
    assert equivalence(Estimate(0.0, 0.0, (0.0,)), 0.05)[0] == "yes"
    with pytest.raises(ValueError, match="margin"):
        equivalence(Estimate(0.0, 0.1, (0.0,)), 0.0)
    with pytest.raises(ValueError, match="needs a margin"):
        ClaimRow("c", "m", "v", "r", estimate([1, 2]), estimate([1, 2]), paired_difference([1, 2], [1, 2]), 0)
    row = ClaimRow("c", "m", "v", "r", estimate([1, 2]), estimate([1, 2]),
                   paired_difference([0.51, 0.5], [0.5, 0.5], within_se=[0.001, 0.001]), 0, margin=0.05)
    assert row.result == "yes" and "≈ (±0.05)" in claim_table([row])
