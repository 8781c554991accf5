"""Toy face world: canonical mesh, landmark geometry vs pose / expression, renderer, emotions, records.

References: MediaPipe's own bundle and connection lists (mesh and index sets), ``facecrafter_jax.face``
(rotation convention and its inverse), a closed-form Kabsch fit (pose recovered from the landmarks),
and first principles (an image rendered at 2x and box-downsampled must match the 1x render).
"""

import dataclasses

import numpy as np
import pytest

from facecrafter_jax.face.geometry import head_pose_from_matrix
from facecrafter_jax.data.records import EMOTION_CLASSES, iter_records, read_dataset_info
from facecrafter_jax.toy import landmarks as L
from facecrafter_jax.toy.canonical_mesh import CANONICAL_VERTICES, extract_canonical_mesh
from facecrafter_jax.image_grid import image_grid, save_png
from facecrafter_jax.toy.render import face_landmarks, render_faces
from facecrafter_jax.toy.world import (EMOTION_EXPRESSIONS, VALENCE_AROUSAL, Attributes, ToyWorld, WorldConfig,
                                       emotion_vectors, write_records)

BS = 16  # one renderer compilation per resolution for the whole module


@pytest.fixture(scope="module")
def world():
    return ToyWorld(WorldConfig(num_identities=24, seed=3))


def _neutral(n):
    return np.zeros((n, len(L.SHAPE_PARAMS))), np.zeros((n, len(L.EXPRESSION_PARAMS)))


# ----------------------------------------------------------------------------- mesh and index sets
def test_canonical_mesh_matches_mediapipe_bundle(shared_models):
    v, uv, tri = extract_canonical_mesh(shared_models / "face_landmarker.task")
    np.testing.assert_array_equal(v, CANONICAL_VERTICES)
    assert uv.shape == (468, 2) and tri.shape == (898, 3)
    # MediaPipe's mesh is exactly left-right symmetric; our mirror map must be an involution that maps it
    m = L.MIRROR
    assert (m[m] == np.arange(L.NUM_LANDMARKS)).all()
    np.testing.assert_array_equal(CANONICAL_VERTICES[m[:468]] * [-1, 1, 1], CANONICAL_VERTICES)
    assert m[33] == 263 and m[133] == 362 and m[61] == 291 and m[4] == 4 and m[468] == 473 and m[469] == 476


def test_index_sets_follow_mediapipe_connections():
    from mediapipe.tasks.python.vision.face_landmarker import FaceLandmarksConnections as C

    def edges(conns):
        return {frozenset((c.start, c.end)) for c in conns}

    def chain_edges(chain, closed=False):
        pairs = list(zip(chain[:-1], chain[1:])) + ([(chain[-1], chain[0])] if closed else [])
        return {frozenset(p) for p in pairs}

    assert chain_edges(L.FACE_OVAL, closed=True) == edges(C.FACE_LANDMARKS_FACE_OVAL)
    assert chain_edges(L.eye_loop("right"), closed=True) == edges(C.FACE_LANDMARKS_RIGHT_EYE)
    assert chain_edges(L.eye_loop("left"), closed=True) == edges(C.FACE_LANDMARKS_LEFT_EYE)
    lips = (chain_edges(L.LIPS_OUTER_UPPER) | chain_edges(L.LIPS_OUTER_LOWER) | chain_edges(L.LIPS_INNER_UPPER)
            | chain_edges(L.LIPS_INNER_LOWER))
    assert lips == edges(C.FACE_LANDMARKS_LIPS)
    for brow, conn in ((L.RIGHT_BROW, C.FACE_LANDMARKS_RIGHT_EYEBROW), (L.LEFT_BROW, C.FACE_LANDMARKS_LEFT_EYEBROW)):
        assert chain_edges(brow[:5]) | chain_edges(brow[5:][::-1]) == edges(conn)
    # iris rings: MediaPipe connects +x, up, -x, down in a loop
    assert chain_edges(L.RIGHT_IRIS[1:], closed=True) == edges(C.FACE_LANDMARKS_RIGHT_IRIS)
    assert chain_edges(L.LEFT_IRIS[1:], closed=True) == edges(C.FACE_LANDMARKS_LEFT_IRIS)


def test_iris_order_matches_mediapipe_on_a_real_photo(shared_models):
    """468 is the iris between 33 and 133; 469/471 are +x/-x and 470/472 up/down in the image (real detector)."""
    import skimage.data

    from facecrafter_jax.face.landmarker import FaceLandmarker

    det = FaceLandmarker(shared_models / "face_landmarker.task")
    try:
        real = det.detect(skimage.data.astronaut())[0].landmarks
    finally:
        det.close()
    lm = face_landmarks(_params_for(np.zeros((1, 3))))[0]
    for pts in (real, lm):
        assert np.linalg.norm(pts[468, :2] - pts[[33, 133], :2].mean(0)) < np.linalg.norm(
            pts[468, :2] - pts[[362, 263], :2].mean(0))
        for c, px, up, mx, dn in (L.RIGHT_IRIS, L.LEFT_IRIS):
            assert pts[px, 0] > pts[c, 0] > pts[mx, 0]
            assert pts[up, 1] < pts[c, 1] < pts[dn, 1]


# ----------------------------------------------------------------------------- pose
def _params_for(head_pose, expression=None, shape=None):
    w = ToyWorld(WorldConfig(num_identities=2, seed=0))
    n = len(head_pose)
    a = w.sample(n, seed=0, identity=0, head_pose=head_pose)
    a = dataclasses.replace(a, center=np.tile(L.DEFAULT_CENTER, (n, 1)), scale=np.full(n, L.DEFAULT_SCALE),
                            gaze=np.zeros((n, 2)),
                            expression=np.zeros((n, len(L.EXPRESSION_PARAMS))) if expression is None else expression)
    p = w.face_params(a)
    return dataclasses.replace(p, shape=np.zeros_like(p.shape) if shape is None else shape,
                               iris_radius=np.full(n, L.IRIS_RADIUS_CM))


def test_pose_recovered_from_landmarks_by_procrustes():
    """Kabsch fit of the neutral template to the projected landmarks (x, y, z) gives back the pose."""
    rng = np.random.default_rng(1)
    poses = rng.uniform([-40, -20, -15], [40, 20, 15], (6, 3))
    lm = face_landmarks(_params_for(poses)).astype(np.float64)
    shape, expr = _neutral(1)
    tmpl = L.face_points(shape, expr)[0]
    c = np.asarray(L.DEFAULT_CENTER)
    for k in range(len(poses)):
        # image units -> head-aligned camera frame (x right, y up, z to the viewer), scaled by s
        obs = np.stack([lm[k, :, 0] - c[0], -(lm[k, :, 1] - c[1]), -lm[k, :, 2]], -1) / L.DEFAULT_SCALE
        a = tmpl - tmpl.mean(0)
        b = obs - obs.mean(0)
        u, _, vt = np.linalg.svd(b.T @ a)
        d = np.diag([1, 1, np.sign(np.linalg.det(u @ vt))])
        rot = u @ d @ vt
        np.testing.assert_allclose(head_pose_from_matrix(rot), poses[k], atol=1e-3)
        np.testing.assert_allclose(obs, tmpl @ rot.T, atol=1e-4)


def test_landmarks_move_with_pose_in_the_expected_directions():
    yaws = np.array([-30.0, -10.0, 0.0, 10.0, 30.0])
    lm = face_landmarks(_params_for(np.stack([yaws, 0 * yaws, 0 * yaws], 1)))
    eye_mid_x = lm[:, [33, 133, 362, 263], 0].mean(1)
    nose_off = lm[:, 4, 0] - eye_mid_x
    assert abs(nose_off[2]) < 1e-6 and np.all(np.diff(nose_off) > 0)  # yaw > 0: nose towards the image right
    assert nose_off[4] > 0.03
    pitches = np.array([-20.0, 0.0, 20.0])
    lm = face_landmarks(_params_for(np.stack([0 * pitches, pitches, 0 * pitches], 1)))
    drop = lm[:, 4, 1] - lm[:, [33, 263], 1].mean(1)  # nose below the eyes (image y grows downwards)
    assert np.all(np.diff(drop) > 0)  # pitch > 0 tilts the face down: the protruding nose moves down
    lm = face_landmarks(_params_for(np.array([[0.0, 0.0, 15.0], [0.0, 0.0, -15.0]])))
    assert lm[0, 33, 1] > lm[0, 263, 1] and lm[1, 33, 1] < lm[1, 263, 1]  # roll > 0 is counter-clockwise
    tilt = np.degrees(np.arctan2(-(lm[:, 263, 1] - lm[:, 33, 1]), lm[:, 263, 0] - lm[:, 33, 0]))
    base = np.degrees(np.arctan2(-(CANONICAL_VERTICES[263, 1] - CANONICAL_VERTICES[33, 1]),
                                 CANONICAL_VERTICES[263, 0] - CANONICAL_VERTICES[33, 0]))
    np.testing.assert_allclose(tilt, [15.0 + base, -15.0 + base], atol=1e-3)


def test_mirrored_landmarks_equal_the_mirrored_pose_and_expression():
    """Flipping the landmarks of (yaw, pitch, roll, smile_left) gives those of (-yaw, pitch, -roll, smile_right)."""
    e = _expr(smile_left=0.8, jaw_open=0.3, brow_furrow=0.5)
    e_m = _expr(smile_right=0.8, jaw_open=0.3, brow_furrow=0.5)
    pose = np.array([[20.0, 7.0, -9.0]])
    lm = face_landmarks(_params_for(pose, e))[0]
    lm_m = face_landmarks(_params_for(pose * [-1, 1, -1], e_m))[0]
    c = L.DEFAULT_CENTER[0]
    flipped = lm[L.MIRROR] * [-1, 1, 1] + [2 * c, 0, 0]
    np.testing.assert_allclose(flipped, lm_m, atol=1e-6)


def test_frontal_face_sits_at_the_ffhq_template_positions():
    lm = face_landmarks(_params_for(np.zeros((1, 3))))[0]
    eyes = np.stack([lm[[33, 133], :2].mean(0), lm[[362, 263], :2].mean(0)])
    np.testing.assert_allclose(eyes, [[0.380, 0.473], [0.620, 0.473]], atol=0.01)
    np.testing.assert_allclose(lm[[61, 291], :2], [[0.402, 0.75], [0.601, 0.75]], atol=0.02)
    assert lm[4, 2] < lm[33, 2] < lm[234, 2]  # nose closest to the camera, face contour furthest


# ----------------------------------------------------------------------------- expression
def _expr(**kw):
    e = np.zeros((1, len(L.EXPRESSION_PARAMS)))
    for k, v in kw.items():
        e[0, L.EXPRESSION_PARAMS.index(k)] = v
    return e


def _points(**kw):
    shape, _ = _neutral(1)
    return L.face_points(shape, _expr(**kw))[0]


def test_expressions_move_the_right_landmarks():
    rest = _points()
    assert abs(rest[13, 1] - rest[14, 1]) < 0.1  # closed mouth at rest (vertical gap, cm)
    lip = [_points(jaw_open=j)[13, 1] - _points(jaw_open=j)[14, 1] for j in (0.0, 0.5, 1.0)]
    assert np.all(np.diff(lip) > 0.5) and lip[2] > 1.5
    smile = _points(smile_left=1.0, smile_right=1.0)
    frown = _points(smile_left=-1.0, smile_right=-1.0)
    for corner in (61, 291):
        assert smile[corner, 1] - rest[corner, 1] > 0.5 and frown[corner, 1] - rest[corner, 1] < -0.5
    smirk = _points(smile_left=1.0)
    assert smirk[291, 1] - rest[291, 1] > 0.5 and abs(smirk[61, 1] - rest[61, 1]) < 0.05
    closed = _points(eye_open=-1.0)
    wide = _points(eye_open=0.6)
    for up, lo in ((159, 145), (386, 374)):
        assert abs(closed[up, 1] - closed[lo, 1]) < 0.02
        assert wide[up, 1] - wide[lo, 1] > 1.4 * (rest[up, 1] - rest[lo, 1])
    raised = _points(brow_raise=1.0)
    assert raised[105, 1] - raised[159, 1] > rest[105, 1] - rest[159, 1] + 0.6
    furrow = _points(brow_furrow=1.0)
    assert furrow[55, 1] < rest[55, 1] - 0.4 and furrow[285, 0] < rest[285, 0]  # inner brows down and together
    # every basis is mirror symmetric except the one-sided smiles, which mirror into each other
    t = L.face_template()
    flip = np.array([-1.0, 1.0, 1.0])
    for k, name in enumerate(L.EXPRESSION_PARAMS):
        other = {"smile_left": "smile_right", "smile_right": "smile_left"}.get(name, name)
        b = t.expression_basis[L.EXPRESSION_PARAMS.index(other)]
        np.testing.assert_allclose(t.expression_basis[k][L.MIRROR[:468]] * flip, b, atol=1e-9, err_msg=name)


def test_shape_changes_identity_geometry():
    shape = np.zeros((2, len(L.SHAPE_PARAMS)))
    shape[1, L.SHAPE_PARAMS.index("face_width")] = 2.0
    _, e = _neutral(2)
    p = L.face_points(shape, e)
    assert p[1, 454, 0] - p[1, 234, 0] > 1.08 * (p[0, 454, 0] - p[0, 234, 0])  # +5.5 % per unit
    shape = np.zeros((1, len(L.SHAPE_PARAMS)))
    shape[0, L.SHAPE_PARAMS.index("eye_spacing")] = 1.5
    q = L.face_points(shape, e[:1])[0]
    assert q[362, 0] - q[133, 0] > p[0, 362, 0] - p[0, 133, 0] + 0.3


# ----------------------------------------------------------------------------- emotions
def test_emotion_vectors_follow_the_documented_table():
    rng = np.random.default_rng(0)
    emo = np.tile(np.arange(8), 4)
    k = rng.uniform(0.55, 1.0, len(emo))
    v = emotion_vectors(emo, k)
    assert v.shape == (32, 10) and v.dtype == np.float32
    np.testing.assert_allclose(v[:, :8].sum(1), 1.0, atol=1e-6)
    assert (v[:, :8].argmax(1) == emo).all() and (v[:, :8] > 0).all()
    kk = np.where(emo == 0, 1.0, k)
    np.testing.assert_allclose(v[:, 8:], kk[:, None] * VALENCE_AROUSAL[emo], atol=1e-6)
    np.testing.assert_allclose(v[emo == 0, :8], np.tile([0.95 + 0.05 / 8] + [0.05 / 8] * 7, (4, 1)), atol=1e-6)
    # circumplex quadrants: happy pleasant + aroused, sad unpleasant + calm, anger / fear unpleasant + aroused
    va = dict(zip(EMOTION_CLASSES, VALENCE_AROUSAL))
    assert va["happy"][0] > 0.5 and va["happy"][1] > 0 and va["sad"][0] < 0 and va["sad"][1] < 0
    assert va["anger"][0] < 0 < va["anger"][1] and va["fear"][0] < 0 < va["fear"][1] and va["surprise"][1] > 0.5
    assert np.all(np.abs(VALENCE_AROUSAL) <= 1)
    with pytest.raises(ValueError, match="emotion class"):
        emotion_vectors([8], [1.0])


def test_sampled_expressions_come_from_the_emotion_table(world):
    c = world.config
    a = world.sample(64, seed=5)
    assert np.all(a.intensity[a.emotion > 0] >= c.intensity_min) and np.all(a.intensity[a.emotion == 0] == 1.0)
    expected = a.intensity[:, None] * EMOTION_EXPRESSIONS[a.emotion]
    il, ir = L.EXPRESSION_PARAMS.index("smile_left"), L.EXPRESSION_PARAMS.index("smile_right")
    contempt = a.emotion == EMOTION_CLASSES.index("contempt")
    swapped = expected.copy()
    swapped[:, [il, ir]] = swapped[:, [ir, il]]
    err = np.abs(a.expression - expected).max(1)
    err[contempt] = np.minimum(err[contempt], np.abs(a.expression - swapped).max(1)[contempt])
    assert np.all(err < 5 * c.expression_jitter)  # table + N(0, jitter) noise (then clipped to the ranges)


# ----------------------------------------------------------------------------- rendering
def test_generation_is_deterministic_and_identities_are_stable(world):
    b1 = world.generate(6, seed=11, batch_size=BS)
    b2 = world.generate(6, seed=11, batch_size=BS)
    np.testing.assert_array_equal(b1.images, b2.images)
    for k in b1.features:
        np.testing.assert_array_equal(b1.features[k], b2.features[k])
    assert b1.images.shape == (6, 64, 64, 3) and b1.images.dtype == np.uint8
    np.testing.assert_array_equal(world.render(b1.attributes, batch_size=4), b1.images)  # chunking-independent
    b3 = world.generate(6, seed=12, batch_size=BS)
    assert np.abs(b1.images.astype(int) - b3.images).mean() > 5
    # identity i does not depend on how many identities the world has
    small = ToyWorld(WorldConfig(num_identities=5, seed=3))
    for f in dataclasses.fields(small.identities):
        np.testing.assert_array_equal(getattr(small.identities, f.name), getattr(world.identities, f.name)[:5])
    arc = world.identities.arcface
    np.testing.assert_allclose(np.linalg.norm(arc, axis=1), 1.0, atol=1e-6)
    assert np.abs(arc @ arc.T - np.eye(len(arc))).max() < 0.3  # independent random directions
    assert b1.image_ids == [f"toy/s11/{i:07d}" for i in range(6)]
    joined = Attributes.concatenate([b1.attributes.take([0, 1]), b1.attributes.take([2])])
    for f in dataclasses.fields(joined):
        np.testing.assert_array_equal(getattr(joined, f.name), getattr(b1.attributes, f.name)[:3])


def _colour_stats(images):
    """Per-image joint colour histogram (4 bins per channel), normalised."""
    q = (images // 64).reshape(len(images), -1, 3).astype(int)
    code = q[..., 0] * 16 + q[..., 1] * 4 + q[..., 2]
    return np.stack([np.bincount(c, minlength=64) for c in code]) / code.shape[1]


def test_identity_changes_the_picture_more_than_pose(world):
    """Same scene and expression: colour statistics move less under a pose change than across identities."""
    n_id = 8
    base = world.sample(1, seed=21, emotion=0)
    poses = np.array([[-25.0, -8.0, -6.0], [0.0, 0.0, 0.0], [25.0, 8.0, 6.0]])
    attrs = base.take(np.zeros(n_id * 3, int))
    ids = np.repeat(np.arange(n_id), 3)
    attrs = dataclasses.replace(attrs, identity=ids, head_pose=np.tile(poses, (n_id, 1)))
    stats = _colour_stats(world.render(attrs, batch_size=BS)).reshape(n_id, 3, -1)
    same = [np.abs(stats[i, a] - stats[i, b]).sum() for i in range(n_id) for a, b in ((0, 1), (1, 2), (0, 2))]
    diff = [np.abs(stats[i, p] - stats[j, p]).sum() for i in range(n_id) for j in range(i + 1, n_id) for p in range(3)]
    assert np.mean(same) * 2 < np.mean(diff)
    assert np.median(same) < np.median(diff)


def test_picture_agrees_with_landmarks(world):
    """Drawn features sit at their landmarks: pupils at the iris centres, mouth interior between 13 and 14."""
    a = world.sample(4, seed=31, head_pose=[0.0, 0.0, 0.0])
    expr = np.zeros_like(a.expression)
    expr[:, L.EXPRESSION_PARAMS.index("jaw_open")] = 1.0
    expr[:, L.EXPRESSION_PARAMS.index("eye_open")] = 0.6
    a = dataclasses.replace(a, expression=expr, gaze=np.zeros((4, 2)))
    res = 128
    params = world.face_params(a)
    params = dataclasses.replace(params, glasses=np.zeros(4))
    images, lm = render_faces(params, res, batch_size=BS, return_landmarks=True)
    img = images.astype(float) / 255.0
    for k in range(4):
        for c in (468, 473):
            x, y = (lm[k, c, :2] * res).astype(int)
            assert img[k, y, x].max() < 0.12, (k, c, img[k, y, x])  # pupil (near black)
        mid = 0.5 * (lm[k, 13, :2] + lm[k, 14, :2]) * res
        x, y = mid.astype(int)
        assert img[k, y, x].sum() < 0.55  # dark mouth interior
        cheek = lm[k, 50, :2] * res
        x, y = cheek.astype(int)
        skin = params.skin[k] * params.brightness[k]
        assert np.abs(img[k, y, x] - skin).max() < 0.45  # skin-coloured (shaded) cheek
        np.testing.assert_allclose(img[k, 0, res // 2], np.clip(a.bg_top[k] * params.brightness[k], 0, 1), atol=0.02)


def test_resolution_consistency(world):
    """A 128 px render box-downsampled by 2 matches the 64 px render (anti-aliasing is resolution-aware)."""
    a = world.sample(4, seed=41)
    lo = world.render(a, 64, batch_size=BS).astype(float)
    hi = world.render(a, 128, batch_size=BS).astype(float)
    down = hi.reshape(4, 64, 2, 64, 2, 3).mean(axis=(2, 4))
    err = np.abs(down - lo)
    assert err.mean() < 2.5 and np.percentile(err, 99) < 40, (err.mean(), np.percentile(err, 99))


def test_render_speed_and_contact_sheet(world, tmp_path):
    import time

    a = world.sample(2 * BS, seed=51)
    world.render(a.take(np.arange(BS)), batch_size=BS)  # compiled already by earlier tests; warm anyway
    t = time.perf_counter()
    imgs = world.render(a, batch_size=BS)
    per_image = (time.perf_counter() - t) / len(a)
    assert per_image < 0.1, per_image  # ~5-15 ms on a shared 2-core CPU
    sheet = image_grid(imgs[:6], 3, pad=2)
    assert sheet.shape == (2 * 66 + 2, 3 * 66 + 2, 3)
    np.testing.assert_array_equal(sheet[2:66, 68:132], imgs[1])
    save_png(sheet, tmp_path / "s.png")
    from PIL import Image

    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "s.png")), sheet)


# ----------------------------------------------------------------------------- records and errors
def test_records_written_and_read_back(world, tmp_path):
    b = world.generate(5, seed=61, batch_size=BS)
    lat = np.random.default_rng(0).standard_normal((5, 8, 8, 8)).astype(np.float32)
    n = write_records(tmp_path / "ds", b.image_ids, b.features, lat, resolution=64, shard_size=3,
                      metadata={"world": world.config.to_dict()})
    assert n == 5
    info = read_dataset_info(tmp_path / "ds")
    assert info["num_records"] == 5 and info["metadata"]["world"]["num_identities"] == 24
    recs = list(iter_records(tmp_path / "ds"))
    assert [r["image_id"] for r in recs] == b.image_ids
    for i, r in enumerate(recs):
        for k in ("arcface", "landmarks", "head_pose", "emotion"):
            np.testing.assert_array_equal(r[k], b.features[k][i])
        np.testing.assert_allclose(r["latent_moments"], lat[i], rtol=1e-3, atol=1e-3)  # stored as float16
    assert b.features["landmarks"].shape == (5, 478, 3)
    with pytest.raises(ValueError, match="latent_moments has 4 rows"):
        write_records(tmp_path / "ds2", b.image_ids, b.features, lat[:4])
    with pytest.raises(ValueError, match="identities has 4 entries"):
        write_records(tmp_path / "ds2", b.image_ids, b.features, lat, identities=b.attributes.identity[:4])


def test_records_identity_labels_for_other_photo_identity(world, tmp_path):
    """identities.tsv holds each record's world identity (also across appended batches), as the other-photo
    identity draw reads it."""
    from facecrafter_jax.data.identities import read_identity_labels

    lat = np.zeros((4, 8, 8, 8), np.float32)
    ids = []
    for seed in (62, 63):  # the second batch appends to the dataset
        b = world.generate(4, seed=seed, batch_size=BS)
        write_records(tmp_path / "ds", b.image_ids, b.features, lat, shard_size=3, identities=b.attributes.identity)
        ids += [f"id{int(k):04d}" for k in b.attributes.identity]
    assert read_identity_labels(tmp_path / "ds") == ids


def test_studio_scene_keeps_the_draws_and_removes_the_nuisance(world):
    """scene=studio: same identity / pose / expression draws as varied; background, light and body fixed,
    clothing a function of the identity; a corner pixel (background) is the same in every image."""
    studio = ToyWorld(WorldConfig(num_identities=24, seed=3, scene="studio"))
    a, s = world.sample(12, seed=5), studio.sample(12, seed=5)
    for name in ("identity", "head_pose", "emotion", "intensity", "expression", "gaze", "center", "scale"):
        np.testing.assert_array_equal(getattr(a, name), getattr(s, name))
    assert np.ptp(a.bg_top, axis=0).max() > 0.1 and np.ptp(s.bg_top, axis=0).max() == 0
    for name in ("light_dir", "ambient", "brightness", "bg_bottom", "body_dx"):
        assert np.ptp(getattr(s, name), axis=0).max() == 0, name
    np.testing.assert_array_equal(s.clothing, studio.studio_clothing()[s.identity])
    assert len({tuple(c) for c in studio.studio_clothing()}) == 24  # every identity its own colour
    images = studio.render(s.take(np.arange(4)), batch_size=4)
    assert np.ptp(images[:, 1, 1].astype(int), axis=0).max() <= 1
    with pytest.raises(ValueError, match="scene must be one of"):
        WorldConfig(scene="beach")


def test_face_zoom_scales_the_landmarks_about_the_lifted_face_centre(world):
    """face_zoom=z: same draws; every landmark's (x, y) offset from the face centre is z times the unzoomed
    one (z too, orthographic depth), the centre moves up by FACE_ZOOM_LIFT * (z - 1)."""
    from facecrafter_jax.toy.world import FACE_ZOOM_LIFT

    z = 1.35
    zoomed = ToyWorld(WorldConfig(num_identities=24, seed=3, face_zoom=z))
    a, b = world.sample(6, seed=9), zoomed.sample(6, seed=9)
    for name in ("identity", "head_pose", "emotion", "expression", "gaze", "light_dir"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    np.testing.assert_allclose(b.scale, z * a.scale, rtol=1e-12)
    np.testing.assert_allclose(b.center, a.center - [0.0, FACE_ZOOM_LIFT * (z - 1)], atol=1e-12)
    la, lb = world.features(a)["landmarks"], zoomed.features(b)["landmarks"]
    ca, cb = a.center[:, None].astype(np.float32), b.center[:, None].astype(np.float32)
    np.testing.assert_allclose(lb[..., :2] - cb, z * (la[..., :2] - ca), atol=2e-6)
    np.testing.assert_allclose(lb[..., 2], z * la[..., 2], atol=2e-6)
    for bad in (0.2, 3.0):
        with pytest.raises(ValueError, match="face_zoom must be in"):
            WorldConfig(face_zoom=bad)


def test_bad_inputs_are_named(world):
    with pytest.raises(ValueError, match="unknown toy world config key"):
        WorldConfig.from_dict({"num_identities": 4, "yaw_sd": 3})
    with pytest.raises(ValueError, match="intensity_min"):
        WorldConfig(intensity_min=0.3)
    with pytest.raises(ValueError, match="identity indices"):
        world.sample(2, seed=0, identity=99)
    p = world.face_params(world.sample(2, seed=0))
    with pytest.raises(ValueError, match="FaceParams.skin"):
        render_faces(dataclasses.replace(p, skin=np.zeros((2, 4))))
    with pytest.raises(ValueError, match="FaceParams.head_pose contains NaN"):
        render_faces(dataclasses.replace(p, head_pose=np.full((2, 3), np.nan)))
    with pytest.raises(ValueError, match="expression must have shape"):
        L.face_points(np.zeros((1, len(L.SHAPE_PARAMS))), np.zeros((1, 3)))
