"""Toy evaluation metrics (facecrafter_jax/toy/measure.py) against exact cases: the pose-normalised expression
displacement is zero for a neutral face in any pose and the same for one expression in two poses; the copy
ratios are 0 for samples equal to their references and ~1 for independent ones; clustered standard errors
against a hand computation; the FD split by feature group against the closed form of a mean shift."""

import dataclasses

import numpy as np
import pytest

from facecrafter_jax.toy.measure import cluster_bootstrap, cluster_mean, expression_displacement, fd_parts, set_metrics
from facecrafter_jax.toy.world import ToyWorld, WorldConfig


@pytest.fixture(scope="module")
def world():
    return ToyWorld(WorldConfig(num_identities=4, seed=5))


def _landmarks(world, identity, pose, expression=None):
    a = world.sample(len(pose), seed=1, identity=identity, head_pose=np.asarray(pose, float))
    expr = np.zeros_like(a.expression) if expression is None else np.broadcast_to(expression, a.expression.shape)
    return world.features(dataclasses.replace(a, expression=expr))["landmarks"]


def test_expression_displacement_removes_pose_and_keeps_expression(world):
    poses = [[0, 0, 0], [35, -12, 8], [-30, 15, -10]]
    frontal = np.repeat(_landmarks(world, 2, [[0, 0, 0]]), 3, axis=0)
    neutral = _landmarks(world, 2, poses)
    np.testing.assert_allclose(expression_displacement(neutral, frontal), 0.0, atol=1e-5)
    smile = np.zeros(11)
    smile[[1, 2]] = 1.0  # smile_left, smile_right
    d = expression_displacement(_landmarks(world, 2, poses, smile), frontal)
    assert np.linalg.norm(d[0]) > 0.05                           # a smile moves the mouth by >5% of the eye distance
    np.testing.assert_allclose(d[1], d[0], atol=2e-3 * np.abs(d[0]).max() + 1e-4)
    np.testing.assert_allclose(d[2], d[0], atol=2e-3 * np.abs(d[0]).max() + 1e-4)


def test_cluster_mean_and_bootstrap():
    v = np.array([1.0, 3.0, 2.0, 2.0, 10.0, 14.0])
    g = np.array([0, 0, 1, 1, 2, 2])
    mean, se = cluster_mean(v, g)
    means = np.array([2.0, 2.0, 12.0])
    assert mean == pytest.approx(means.mean())
    assert se == pytest.approx(np.sqrt(np.sum((means - means.mean()) ** 2) / 2) / np.sqrt(3))
    # the bootstrap SE of a group mean approaches sqrt((K-1)/K) x the analytic one
    boot = cluster_bootstrap(lambda idx: means[idx].mean(), 3, resamples=4000, seed=1)
    assert boot == pytest.approx(se * np.sqrt(2 / 3), rel=0.05)


def _analysis(pose, probs, identity, landmarks):
    n = len(pose)
    return {"identity": identity, "embedding": np.tile(np.eye(4)[:1], (n, 1)), "head_pose": pose,
            "landmarks": landmarks, "emotion_probs": probs, "va": np.zeros((n, 2))}


def test_copy_ratios_zero_for_copies_and_about_one_for_independent_samples():
    rng = np.random.default_rng(0)
    k, m, nd = 40, 6, 4
    bias = rng.normal(0, 10, (k, 3))   # an identity-specific analyser bias: must not look like copying
    ref_pose = rng.normal(0, 18, (k, 3)) + bias
    dec_pose = rng.normal(0, 18, (k * nd, 3)) + np.repeat(bias, nd, 0)
    ref_cls, dec_cls = rng.integers(0, 8, k), rng.integers(0, 8, k * nd)
    identity = np.repeat(np.arange(k), m)
    lm = np.zeros((k * m, 478, 3))
    lm[:] = rng.normal(0, 1, (478, 3))
    cond = {"identity": identity, "per_identity": m, "decoys": nd, "head_pose": np.zeros((k * m, 3)),
            "landmarks": lm, "emotion": np.zeros((k * m, 10)), "emotion_class": np.zeros(k * m, int),
            "neutral_frontal": lm[::m]}
    ref = {"head_pose": np.concatenate([ref_pose, dec_pose]), "landmarks": np.concatenate([lm[::m]] * (1 + nd)),
           "emotion_probs": np.eye(8)[np.concatenate([ref_cls, dec_cls])]}
    centres = np.eye(4)[:1].repeat(k, 0)
    copy = _analysis(np.repeat(ref_pose, m, 0), np.repeat(np.eye(8)[ref_cls], m, 0), identity, lm)
    out = set_metrics(copy, cond, ref_analysis=ref, id_centres=centres)
    assert out["pose_copy"][0] == pytest.approx(0.0, abs=1e-6)
    assert out["pose_div_deg"][0] == pytest.approx(0.0, abs=1e-4)
    # slope 1 on the own reference minus the decoys' (independent draws: slope ~0, up to sampling noise)
    dec_slopes = [np.polyfit(dec_pose[j::nd, 0], ref_pose[:, 0], 1)[0] for j in range(nd)]
    assert out["yaw_copy_slope"][0] == pytest.approx(1.0 - np.mean(dec_slopes), abs=1e-9)
    # P(class = reference's) = 1 minus P(class = a decoy's), the decoys' agreement rate with the reference
    agree = np.mean([(dec_cls[i * nd:(i + 1) * nd] == ref_cls[i]).mean() for i in range(k)])
    assert out["emotion_copy"][0] == pytest.approx(1.0 - agree, abs=1e-9)
    own = rng.normal(0, 18, (k * m, 3)) + np.repeat(bias, m, 0)  # same bias, pose independent of the reference
    indep = _analysis(own, np.eye(8)[rng.integers(0, 8, k * m)], identity, lm)
    out = set_metrics(indep, cond, ref_analysis=ref, id_centres=centres)
    assert abs(out["pose_copy"][0] - 1.0) < 3 * out["pose_copy"][1] + 0.02
    assert abs(out["emotion_copy"][0]) < 3 * out["emotion_copy"][1] + 0.02
    assert abs(out["yaw_copy_slope"][0]) < 3 * out["yaw_copy_slope"][1] + 0.02
    assert out["emotion_entropy"][0] > 1.5
    half = _analysis(0.5 * own + 0.5 * np.repeat(ref_pose, m, 0), indep["emotion_probs"], identity, lm)
    out = set_metrics(half, cond, ref_analysis=ref, id_centres=centres)
    assert out["pose_copy"][0] < 0.75 and abs(out["yaw_copy_slope"][0] - 0.5) < 3 * out["yaw_copy_slope"][1] + 0.05


def test_fd_parts_of_a_mean_shift_is_the_squared_shift_in_its_group():
    """Shifting the emotion columns of a feature set by a constant leaves every covariance equal, so the FD is
    exactly |shift|^2, all of it in the emotion group; identity and pose read 0."""
    rng = np.random.default_rng(0)
    k = 6                                           # identities: 6 cosines + 8 emotion probs + 2 va + 3 pose
    ref = rng.standard_normal((500, k + 13)) @ rng.standard_normal((k + 13, k + 13)) * 0.1
    shift = np.zeros(k + 13)
    shift[k:k + 10] = rng.uniform(-0.3, 0.3, 10)
    parts = fd_parts(ref + shift, ref)
    want = float(shift @ shift)
    assert parts["emotion"] == pytest.approx(want, rel=1e-6)
    assert parts["all"] == pytest.approx(want, rel=1e-6)
    assert abs(parts["identity"]) < 1e-9 and abs(parts["pose"]) < 1e-9
    pose_shift = np.zeros(k + 13)
    pose_shift[-3:] = [0.1, -0.2, 0.3]
    assert fd_parts(ref + pose_shift, ref)["pose"] == pytest.approx(0.14, rel=1e-6)
    with pytest.raises(ValueError, match="fd_parts"):
        fd_parts(ref[:, :-1], ref)
