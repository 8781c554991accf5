"""The toy world's splits (facecrafter_jax/toy/splits.py): the celebrity split's statistics against their
closed forms, per-identity habits, determinism, config errors."""

import numpy as np
import pytest

from facecrafter_jax.toy.splits import CelebritySplit, identity_habits, sample_split, split_statistics
from facecrafter_jax.toy.world import ToyWorld, WorldConfig


@pytest.fixture(scope="module")
def world():
    return ToyWorld(WorldConfig(num_identities=16, seed=3))


def test_celebrity_pose_is_identity_centre_plus_narrow_jitter(world):
    cfg = CelebritySplit(yaw_std=5.0, pitch_std=3.0, roll_std=2.0)
    a = sample_split(world, "celebrity", 6000, seed=1, celebrity=cfg)
    centre = identity_habits(world, cfg)["pose_centre"][a.identity]
    resid = a.head_pose - centre
    # jitter ~ N(0, std) independent of the identity (clipping at +-45 / 25 / 20 deg is > 5 sd away here)
    np.testing.assert_allclose(resid.mean(0), 0.0, atol=0.25)
    np.testing.assert_allclose(resid.std(0), [5.0, 3.0, 2.0], rtol=0.05)
    stats = split_statistics(a.identity, a.head_pose, a.emotion)
    np.testing.assert_allclose([stats["yaw_std_within"], stats["pitch_std_within"], stats["roll_std_within"]],
                               [5.0, 3.0, 2.0], rtol=0.06)
    # law of total variance: var(yaw) = var over samples of the identity centres + jitter variance
    np.testing.assert_allclose(stats["yaw_std"] ** 2, centre[:, 0].var() + 25.0, rtol=0.08)


def test_celebrity_emotions_come_from_the_identity_habits(world):
    cfg = CelebritySplit(emotions_per_identity=3, main_emotion_share=0.6)
    a = sample_split(world, "celebrity", 8000, seed=2, celebrity=cfg)
    habits = identity_habits(world, cfg)["emotions"]
    assert habits.shape == (16, 3) and all(len(set(h)) == 3 for h in habits)
    slot = np.array([list(habits[i]).index(e) for i, e in zip(a.identity, a.emotion)])  # raises if not a habit
    # main emotion with p = 0.6, each of the 2 others with p = 0.2 (binomial sd ~0.0055 at n = 8000)
    np.testing.assert_allclose(np.bincount(slot, minlength=3) / len(slot), [0.6, 0.2, 0.2], atol=0.02)
    stats = split_statistics(a.identity, a.head_pose, a.emotion)
    h = -(0.6 * np.log2(0.6) + 2 * 0.2 * np.log2(0.2))  # entropy of (0.6, 0.2, 0.2) in bits
    assert abs(stats["emotion_entropy_within"] - h) < 0.03


def test_habits_do_not_depend_on_the_number_of_identities_and_full_is_the_world():
    small, big = ToyWorld(WorldConfig(num_identities=4, seed=1)), ToyWorld(WorldConfig(num_identities=40, seed=1))
    hs, hb = identity_habits(small, CelebritySplit()), identity_habits(big, CelebritySplit())
    np.testing.assert_array_equal(hs["emotions"], hb["emotions"][:4])
    np.testing.assert_array_equal(hs["pose_centre"], hb["pose_centre"][:4])
    a, b = sample_split(small, "full", 50, seed=9), small.sample(50, seed=9)
    np.testing.assert_array_equal(a.head_pose, b.head_pose)
    c1, c2 = sample_split(small, "celebrity", 50, seed=9), sample_split(small, "celebrity", 50, seed=9)
    np.testing.assert_array_equal(c1.head_pose, c2.head_pose)
    np.testing.assert_array_equal(c1.expression, c2.expression)
    fixed = sample_split(small, "celebrity", 10, seed=3, identity=2)
    assert (fixed.identity == 2).all()


def test_full_range_is_wider_than_celebrity_within_identity(world):
    full = sample_split(world, "full", 4000, seed=4)
    cel = sample_split(world, "celebrity", 4000, seed=4)
    sf = split_statistics(full.identity, full.head_pose, full.emotion)
    sc = split_statistics(cel.identity, cel.head_pose, cel.emotion)
    assert sf["yaw_std_within"] > 3 * sc["yaw_std_within"]
    assert sf["emotion_entropy_within"] > 2.8 and sc["emotion_entropy_within"] < 1.0


def test_split_config_errors(world):
    with pytest.raises(ValueError, match="unknown split"):
        sample_split(world, "wild", 3, 0)
    with pytest.raises(ValueError, match="yaw_stdd"):
        CelebritySplit.from_dict({"yaw_stdd": 1.0})
    with pytest.raises(ValueError, match="emotions_per_identity"):
        CelebritySplit(emotions_per_identity=0)
    with pytest.raises(ValueError, match="emotion_weights"):
        CelebritySplit(emotion_weights=(1.0,) + (0.0,) * 7, emotions_per_identity=2)
    assert CelebritySplit.from_dict(CelebritySplit(yaw_std=2.0).to_dict()) == CelebritySplit(yaw_std=2.0)
