"""facecrafter_jax.metrics against closed forms on hand-built inputs, and against independent references
(MediaPipe's connection sets, scikit-image's similarity estimate, SciPy's rotations and matrix square root,
data_prep's head-pose convention)."""

import numpy as np
import pytest
import scipy.linalg
from scipy.spatial.transform import Rotation

from facecrafter_jax import metrics as M
from facecrafter_jax.face.geometry import rotation_from_pose


def _face(rng, n=1):
    """Plausible random landmark sets: [n, 478, 3] in [0.2, 0.8] with a non-degenerate eye distance."""
    lm = rng.uniform(0.2, 0.8, size=(n, 478, 3))
    lm[:, 33, :2] = (0.35, 0.45)
    lm[:, 263, :2] = (0.65, 0.45)
    return lm


def _similarity_2d(points, scale, angle_deg, shift):
    a = np.deg2rad(angle_deg)
    r = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    out = np.array(points, np.float64, copy=True)
    out[..., :2] = scale * points[..., :2] @ r.T + np.asarray(shift)
    return out


# ------------------------------------------------------------------------------------------ index subsets
def test_subsets_match_mediapipe_connections():
    from mediapipe.tasks.python.vision.face_landmarker import FaceLandmarksConnections as C

    def pts(conns):
        return tuple(sorted({i for c in conns for i in (c.start, c.end)}))

    assert M.MOUTH_INDICES == pts(C.FACE_LANDMARKS_LIPS)
    assert M.LEFT_EYE_INDICES == pts(C.FACE_LANDMARKS_LEFT_EYE)
    assert M.RIGHT_EYE_INDICES == pts(C.FACE_LANDMARKS_RIGHT_EYE)
    assert M.LEFT_BROW_INDICES == pts(C.FACE_LANDMARKS_LEFT_EYEBROW)
    assert M.RIGHT_BROW_INDICES == pts(C.FACE_LANDMARKS_RIGHT_EYEBROW)
    assert len(M.EXPRESSION_INDICES) == 92 and len(set(M.EXPRESSION_INDICES)) == 92
    assert set(M.OUTER_EYE_CORNERS) <= set(M.EYE_INDICES)
    assert not set(M.EXPRESSION_INDICES) & set(range(468, 478))  # no iris points


# ------------------------------------------------------------------------------------------ identity
def test_identity_similarity_known_angles():
    rng = np.random.default_rng(0)
    s = rng.normal(size=512)
    s /= np.linalg.norm(s)
    u = rng.normal(size=512)
    u -= (u @ s) * s
    u /= np.linalg.norm(u)
    cos = np.array([1.0, 0.8, 0.5, 0.1, -0.3])
    g = cos[:, None] * s + np.sqrt(1 - cos[:, None] ** 2) * u
    g *= np.array([1.0, 2.0, 0.5, 3.0, 1.0])[:, None]  # norms do not matter
    g = np.concatenate([g, np.full((1, 512), np.nan)])  # one image without a face
    out = M.identity_similarity(g, s * 7.0, threshold=0.4)
    assert out["n"] == 5
    np.testing.assert_allclose(out["mean"], cos.mean(), atol=1e-12)
    np.testing.assert_allclose(out["std"], cos.std(), atol=1e-12)
    assert out["frac_above"] == pytest.approx(3 / 5)
    same = M.identity_similarity(np.tile(s, (4, 1)), s)
    assert same["mean"] == pytest.approx(1.0, abs=1e-12) and same["std"] == pytest.approx(0.0, abs=1e-7)
    assert same["frac_above"] == 1.0
    np.testing.assert_allclose(M.cosine_similarity(g[:5], np.tile(s, (5, 1))), cos, atol=1e-12)


# ------------------------------------------------------------------------------------------ landmarks
def test_nme_closed_form():
    rng = np.random.default_rng(1)
    t = _face(rng, 3)
    iod = 0.3  # 33 at x=0.35, 263 at x=0.65
    np.testing.assert_allclose(M.inter_ocular_distance(t), iod)
    np.testing.assert_array_equal(M.nme(t, t), 0.0)
    shifted = t.copy()
    shifted[..., 0] += 0.03
    shifted[..., 1] -= 0.04
    shifted[..., 2] += 5.0  # z is ignored
    np.testing.assert_allclose(M.nme(shifted, t), 0.05 / iod, rtol=1e-12)
    # one moved point: its displacement / 478 / iod; a subset containing only it: displacement / iod
    one = t.copy()
    one[:, 61, :2] += (0.006, 0.008)
    np.testing.assert_allclose(M.nme(one, t), 0.01 / 478 / iod, rtol=1e-9)
    np.testing.assert_allclose(M.nme(one, t, indices=[61]), 0.01 / iod, rtol=1e-9)
    # a single target broadcasts; NaN (no face) propagates
    nan = t.copy()
    nan[1] = np.nan
    r = M.nme(nan, t[0])
    assert np.isnan(r[1]) and np.isfinite(r[[0, 2]]).all()
    with pytest.raises(ValueError, match="478"):
        M.nme(np.zeros((2, 468, 3)), t[:2])


@pytest.mark.parametrize("dim", [2, 3])
def test_procrustes_removes_a_similarity_exactly(dim):
    rng = np.random.default_rng(2)
    x = rng.normal(size=(4, 50, dim))
    rots = Rotation.random(4, random_state=3).as_matrix() if dim == 3 else np.stack(
        [[[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]] for a in rng.uniform(-3, 3, 4)])
    scales = np.array([0.5, 1.0, 2.5, 7.0])
    shifts = rng.normal(size=(4, dim))
    y = scales[:, None, None] * np.einsum("nij,nkj->nki", rots, x) + shifts[:, None]
    aligned, s, r, t = M.procrustes_align(x, y)
    np.testing.assert_allclose(aligned, y, atol=1e-12)
    np.testing.assert_allclose(s, scales, rtol=1e-12)
    np.testing.assert_allclose(r, rots, atol=1e-12)
    np.testing.assert_allclose(t, shifts, atol=1e-12)


def test_procrustes_matches_skimage_on_noisy_points_and_never_reflects():
    from skimage.transform import SimilarityTransform

    rng = np.random.default_rng(4)
    x = rng.normal(size=(30, 2))
    y = _similarity_2d(x, 1.7, 25.0, (0.3, -0.2)) + 0.05 * rng.normal(size=(30, 2))
    aligned, s, r, t = M.procrustes_align(x, y)
    ref = SimilarityTransform.from_estimate(x, y)
    np.testing.assert_allclose(aligned, ref(x), atol=1e-10)
    np.testing.assert_allclose(s, ref.scale, rtol=1e-10)
    mirrored = x * np.array([-1.0, 1.0])  # a reflection is not a similarity: best proper rotation only
    _, _, r_m, _ = M.procrustes_align(x, mirrored)
    assert np.linalg.det(r_m) == pytest.approx(1.0)


def test_expression_nme_ignores_similarity_and_matches_skimage():
    from skimage.transform import SimilarityTransform

    rng = np.random.default_rng(5)
    t = _face(rng, 1)[0]
    moved = _similarity_2d(t, 1.3, -12.0, (0.1, 0.05))
    zero = M.expression_nme(moved[None], t[None])
    for name, v in zero.items():
        assert v[0] == pytest.approx(0.0, abs=1e-12), name
    assert M.nme(moved[None], t[None])[0] > 0.1  # plain NME does see the similarity
    # open the mouth (lower lip points move down), then move the whole face: the mouth error dominates and
    # equals an independent computation (skimage similarity estimate on all points, then NME on the subset)
    mouth = t.copy()
    lower = [i for i in M.MOUTH_INDICES if t[i, 1] > t[list(M.MOUTH_INDICES), 1].mean()]
    mouth[lower, 1] += 0.03
    pred = _similarity_2d(mouth, 0.8, 30.0, (-0.1, 0.2))
    got = M.expression_nme(pred[None], t[None])
    tf = SimilarityTransform.from_estimate(pred[:, :2], t[:, :2])
    back = tf(pred[:, :2])
    iod = np.linalg.norm(t[33, :2] - t[263, :2])
    for name, idx in M.EXPRESSION_SUBSETS.items():
        ref = np.linalg.norm(back[list(idx)] - t[list(idx), :2], axis=1).mean() / iod
        np.testing.assert_allclose(got[name][0], ref, rtol=1e-9)
    assert got["mouth"][0] > 3 * got["eyes"][0] and got["mouth"][0] > 3 * got["brows"][0]


# ------------------------------------------------------------------------------------------ head pose
def test_rotation_convention_is_rz_ry_rx():
    """R = Rz(roll) Ry(yaw) Rx(pitch): scipy's intrinsic "ZYX" Euler angles; head_pose_from_matrix inverts it."""
    from facecrafter_jax.face.geometry import head_pose_from_matrix

    poses = np.array([[0.0, 0.0, 0.0], [30.0, -10.0, 5.0], [-60.0, 20.0, -45.0], [10.0, 80.0, 170.0]])
    r = rotation_from_pose(poses)
    for p, ri in zip(poses, r):
        want = Rotation.from_euler("ZYX", [p[2], p[0], p[1]], degrees=True).as_matrix()
        np.testing.assert_allclose(ri, want, atol=1e-12)
        np.testing.assert_allclose(rotation_from_pose(p), want, atol=1e-12)
        np.testing.assert_allclose(head_pose_from_matrix(ri), p, atol=1e-4)


def test_geodesic_angle_of_known_rotations():
    rng = np.random.default_rng(6)
    base = Rotation.random(5, random_state=7).as_matrix()
    axes = rng.normal(size=(5, 3))
    axes /= np.linalg.norm(axes, axis=1, keepdims=True)
    angles = np.array([0.0, 1e-4, 10.0, 90.0, 179.0])
    delta = Rotation.from_rotvec(axes * np.deg2rad(angles)[:, None]).as_matrix()
    np.testing.assert_allclose(M.geodesic_angle(base, base @ delta), angles, atol=1e-6)
    np.testing.assert_allclose(M.geodesic_angle(base, delta @ base), angles, atol=1e-6)  # either side


def test_pose_errors_closed_form():
    target = np.array([[10.0, 5.0, -3.0], [0.0, 0.0, 0.0], [179.0, 0.0, 0.0]])
    same = M.pose_errors(target, target)
    for k, v in same.items():
        np.testing.assert_allclose(v, 0.0, atol=1e-6, err_msg=k)
    pred = np.array([[10.0, 5.0, -3.0], [12.0, 0.0, 0.0], [-179.0, 0.0, 0.0]])
    e = M.pose_errors(pred, target)
    np.testing.assert_allclose(e["yaw"], [0.0, 12.0, 2.0], atol=1e-9)  # 179 vs -179 wraps to 2
    np.testing.assert_allclose(e["geodesic"], [0.0, 12.0, 2.0], atol=1e-6)  # pure yaw change = its angle
    np.testing.assert_allclose(e["mean"], [0.0, 4.0, 2.0 / 3.0], atol=1e-9)
    mixed = M.pose_errors([[20.0, 15.0, 5.0]], [0.0, 0.0, 0.0])
    ref = np.rad2deg(Rotation.from_matrix(rotation_from_pose([[20.0, 15.0, 5.0]])[0]).magnitude())
    assert mixed["geodesic"][0] == pytest.approx(ref, abs=1e-6)
    assert mixed["mean"][0] == pytest.approx(40.0 / 3.0)


# ------------------------------------------------------------------------------------------ emotion
def test_emotion_errors_closed_form():
    probs = np.eye(8)[[1, 1, 2, 0, 1]] * 0.9 + 0.1 / 8
    probs[4] = np.nan  # no face
    out = M.emotion_errors(probs, 1, valence=[0.5, 0.1, -0.2, 0.0, np.nan], target_valence=0.3,
                           arousal=[0.0, 0.0, 0.0, 0.4, np.nan], target_arousal=[0.0, 0.1, -0.1, 0.0, 0.0])
    assert out["accuracy"] == pytest.approx(2 / 4) and out["accuracy_n"] == 4
    dv = np.array([0.2, -0.2, -0.5, -0.3])
    assert out["valence_mae"] == pytest.approx(np.abs(dv).mean())
    assert out["valence_rmse"] == pytest.approx(np.sqrt((dv ** 2).mean()))
    da = np.array([0.0, -0.1, 0.1, 0.4])
    assert out["arousal_mae"] == pytest.approx(np.abs(da).mean()) and out["arousal_n"] == 4
    assert out["arousal_rmse"] == pytest.approx(np.sqrt((da ** 2).mean()))
    perfect = M.emotion_errors(np.eye(8), np.arange(8), valence=np.zeros(8), target_valence=np.zeros(8))
    assert perfect["accuracy"] == 1.0 and perfect["valence_mae"] == 0.0 and perfect["valence_rmse"] == 0.0


# ------------------------------------------------------------------------------------------ diversity
def test_class_entropy_closed_form():
    assert M.class_entropy([3, 3, 3]) == 0.0
    assert M.class_entropy([0, 1, 0, 1]) == pytest.approx(1.0)
    assert M.class_entropy(np.arange(8)) == pytest.approx(3.0)
    assert M.class_entropy([0, 0, 1, 2]) == pytest.approx(1.5)


def test_diversity_is_zero_for_identical_samples_and_grows_with_spread():
    rng = np.random.default_rng(8)
    face = _face(rng, 1)[0]
    pose = np.array([5.0, 10.0, -2.0])
    probs = np.eye(8)[2] * 0.5 + 0.5 / 8
    same = {"pose": np.tile(pose, (4, 1)), "landmarks": np.tile(face, (4, 1, 1)), "probs": np.tile(probs, (4, 1)),
            "valence": np.full(4, 0.3), "arousal": np.full(4, -0.1)}
    out = M.diversity([same, same])
    for k in ("pose_yaw_std", "pose_pitch_std", "pose_roll_std", "pose_pairwise", "expression_pairwise",
              "emotion_entropy", "valence_std", "arousal_std"):
        assert out[k] == pytest.approx(0.0, abs=1e-6), k
        assert out[f"{k}_identities"] == 2
    # samples that differ only by a similarity transform have no expression diversity
    sim = np.stack([_similarity_2d(face, s, a, (a / 100, 0)) for s, a in ((1, 0), (1.2, 10), (0.9, -20))])
    assert M.expression_diversity(sim) == pytest.approx(0.0, abs=1e-12)

    results = []
    for spread in (1.0, 2.0, 4.0):
        yaw = spread * np.array([-10.0, 0.0, 10.0, 20.0])
        g = {"pose": np.stack([yaw, np.zeros(4), np.zeros(4)], 1),
             "landmarks": np.stack([face + spread * 0.01 * rng.normal(size=face.shape) for _ in range(4)]),
             "valence": spread * np.array([-0.1, 0.0, 0.1, 0.2])}
        results.append(M.diversity([g]))
        # yaw-only poses: pairwise geodesic angle = mean |yaw_i - yaw_j|, yaw std = np.std
        i, j = np.triu_indices(4, 1)
        assert results[-1]["pose_pairwise"] == pytest.approx(np.abs(yaw[i] - yaw[j]).mean(), abs=1e-6)
        assert results[-1]["pose_yaw_std"] == pytest.approx(yaw.std())
        assert results[-1]["valence_std"] == pytest.approx(g["valence"].std())
    for key in ("pose_pairwise", "pose_yaw_std", "expression_pairwise", "valence_std"):
        vals = [r[key] for r in results]
        assert vals[0] < vals[1] < vals[2], (key, vals)

    # averaging over identities; NaN rows (no face) are dropped; groups with < 2 samples are skipped
    a = {"valence": np.array([0.0, 1.0])}
    b = {"valence": np.array([0.0, 0.0, 0.5, np.nan])}
    c = {"valence": np.array([0.7, np.nan])}
    out = M.diversity([a, b, c])
    assert out["valence_std_identities"] == 2
    assert out["valence_std"] == pytest.approx((0.5 + np.std([0.0, 0.0, 0.5])) / 2)
    ent = M.diversity([{"probs": np.eye(8)[[0, 1, 2, 3]]}, {"probs": np.eye(8)[[5, 5]]}])
    assert ent["emotion_entropy"] == pytest.approx((2.0 + 0.0) / 2)


# ------------------------------------------------------------------------------------------ Fréchet
def _exact_samples(rng, mu, cov, n):
    """n samples whose empirical mean is exactly mu and ddof=1 covariance exactly cov."""
    z = rng.normal(size=(n, len(mu)))
    z -= z.mean(0)
    c = np.cov(z, rowvar=False)
    z = z @ np.linalg.inv(np.linalg.cholesky(c)).T  # empirical covariance I
    return z @ np.linalg.cholesky(cov).T + mu


def test_frechet_distance_matches_formula():
    rng = np.random.default_rng(9)
    d = 6
    a = rng.normal(size=(d, d))
    b = rng.normal(size=(d, d))
    s1, s2 = a @ a.T + 0.1 * np.eye(d), b @ b.T + 0.1 * np.eye(d)
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    ref = float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2)
                - 2 * np.trace(scipy.linalg.sqrtm(s1 @ s2)).real)
    assert M.frechet_distance_from_stats(mu1, s1, mu2, s2) == pytest.approx(ref, rel=1e-9)
    # feature sets whose sample statistics are exactly (mu, S)
    x, y = _exact_samples(rng, mu1, s1, 40), _exact_samples(rng, mu2, s2, 55)
    assert M.frechet_distance(x, y) == pytest.approx(ref, rel=1e-9)
    # commuting (diagonal) covariances: |mu1 - mu2|^2 + sum (sqrt(a) - sqrt(b))^2
    va, vb = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 0.25])
    closed = 1.0 + np.sum((np.sqrt(va) - np.sqrt(vb)) ** 2)
    got = M.frechet_distance_from_stats([0, 0, 1], np.diag(va), [0, 0, 0], np.diag(vb))
    assert got == pytest.approx(closed, rel=1e-12)


def test_frechet_distance_same_set_is_zero_and_grows_with_shift():
    rng = np.random.default_rng(10)
    x = rng.normal(size=(200, 16))
    assert abs(M.frechet_distance(x, x)) < 1e-9
    assert M.frechet_distance(x, x + 0.5) == pytest.approx(16 * 0.25, rel=1e-9)  # pure mean shift
    # rank-deficient covariances (fewer rows than dimensions) stay defined
    small = rng.normal(size=(5, 16))
    assert abs(M.frechet_distance(small, small)) < 1e-9
    # large samples from known Gaussians approach the analytic value
    big1 = rng.normal(size=(20000, 2)) * [1.0, 2.0]
    big2 = rng.normal(size=(20000, 2)) * [1.0, 1.0] + [1.0, 0.0]
    assert M.frechet_distance(big1, big2) == pytest.approx(1.0 + 1.0, abs=0.08)
    with pytest.raises(ValueError, match="at least 2"):
        M.frechet_distance(x[:1], x)
    with pytest.raises(ValueError, match="differ"):
        M.frechet_distance(x, x[:, :3])
