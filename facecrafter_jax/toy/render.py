"""Procedural face renderer (JAX, batched, anti-aliased): 3D-posed landmarks drawn as shaded soft shapes.

Everything is drawn from the same 3D face that gives the landmarks (:mod:`.landmarks`), so the picture and
the landmarks agree by construction. Per image, back to front:

1. background: vertical two-colour gradient;
2. long hair behind the head (a 3D "curtain" polygon, posed with the head);
3. neck (from under the jaw, posed, to a fixed body position) and clothed shoulders;
4. ears (flat discs beside the head; drawn in front of the skull only when they face the camera);
5. skull (an ellipsoid, ray-cast) and face (the face-oval polygon), both skin, Lambert-shaded with one
   smooth shading ellipsoid so that head rotation and the light direction show;
6. beard (full or goatee, from mesh contours), nose sides (shaded by their own normals), nostrils;
7. lips (outer contour), mouth opening (inner contour) with upper teeth, lip line;
8. eyes: white (eye contour), iris and pupil discs clipped to the opening, upper lid line;
9. brows (brow contours);
10. hair cap: a ray-cast hair ellipsoid, hair wherever its surface point (in the head frame) lies above a
    hairline that depends on the style (front / side / back heights, fringe wave, bald crown);
11. glasses (two posed rings, bridge, temples);
12. global brightness; values are rounded to uint8.

Edges are anti-aliased from signed distances (polygons: exact distance to the edges, parity rule for the
inside; ellipses: first-order distance). Rendering is deterministic: no randomness inside.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, fields, replace

import jax
import jax.numpy as jnp
import numpy as np

from facecrafter_jax.face.geometry import rotation_from_pose

from . import landmarks as L

__all__ = ["FaceParams", "render_faces", "face_landmarks"]


@dataclass(frozen=True)
class FaceParams:
    """Everything the renderer needs for a batch of N faces (numpy arrays, leading dimension N).

    Geometry: ``shape`` [N, 16] (:data:`~.landmarks.SHAPE_PARAMS`), ``expression`` [N, 11]
    (:data:`~.landmarks.EXPRESSION_PARAMS`), ``gaze`` [N, 2], ``iris_radius`` [N] (cm), ``head_pose`` [N, 3]
    (yaw, pitch, roll degrees), ``center`` [N, 2] and ``scale`` [N] (image units, see
    :func:`~.landmarks.project`).

    Appearance (RGB in [0, 1]): ``skin``, ``hair``, ``iris``, ``lips``, ``clothing``, ``bg_top``, ``bg_bottom``,
    ``glasses_color`` [N, 3]. Hair style: ``hairline_front``, ``hairline_side``, ``hairline_back`` (cm, head
    frame y of the hairline at the forehead, temples and nape), ``hair_volume`` (hair ellipsoid / skull
    ratio), ``hair_length`` (cm below the head-frame origin reached by hair behind the head; 0 = none),
    ``crown`` (cm; no hair above this height: balding), ``fringe`` (amplitude of a wavy fringe edge, cm),
    ``ears`` (ear opacity). Extras: ``glasses`` (0 / 1), ``beard`` (opacity), ``beard_style`` (0 full,
    1 goatee). Light: ``light_dir`` [N, 3] (unit, camera frame: x right, y down, z to the viewer),
    ``ambient``, ``brightness``; ``body_dx`` (shoulder offset, image units).
    """

    shape: np.ndarray
    expression: np.ndarray
    gaze: np.ndarray
    iris_radius: np.ndarray
    head_pose: np.ndarray
    center: np.ndarray
    scale: np.ndarray
    skin: np.ndarray
    hair: np.ndarray
    iris: np.ndarray
    lips: np.ndarray
    clothing: np.ndarray
    bg_top: np.ndarray
    bg_bottom: np.ndarray
    glasses_color: np.ndarray
    hairline_front: np.ndarray
    hairline_side: np.ndarray
    hairline_back: np.ndarray
    hair_volume: np.ndarray
    hair_length: np.ndarray
    crown: np.ndarray
    fringe: np.ndarray
    ears: np.ndarray
    glasses: np.ndarray
    beard: np.ndarray
    beard_style: np.ndarray
    light_dir: np.ndarray
    ambient: np.ndarray
    brightness: np.ndarray
    body_dx: np.ndarray

    def __len__(self) -> int:
        return int(np.shape(self.shape)[0])

    def take(self, idx) -> "FaceParams":
        """Rows ``idx`` of every field."""
        return replace(self, **{f.name: np.asarray(getattr(self, f.name))[idx] for f in fields(self)})

    def validate(self) -> "FaceParams":
        """Checks shapes and finiteness; returns the params with float64 arrays. Errors name the field."""
        n = len(self)
        widths = {"shape": len(L.SHAPE_PARAMS), "expression": len(L.EXPRESSION_PARAMS), "gaze": 2,
                  "head_pose": 3, "center": 2, "skin": 3, "hair": 3, "iris": 3, "lips": 3, "clothing": 3,
                  "bg_top": 3, "bg_bottom": 3, "glasses_color": 3, "light_dir": 3}
        out = {}
        for f in fields(self):
            a = np.asarray(getattr(self, f.name), np.float64)
            want = (n, widths[f.name]) if f.name in widths else (n,)
            if a.shape != want:
                raise ValueError(f"FaceParams.{f.name} must have shape {want}, got {a.shape}")
            if not np.all(np.isfinite(a)):
                raise ValueError(f"FaceParams.{f.name} contains NaN or Inf")
            out[f.name] = a
        return FaceParams(**out)


def face_landmarks(params: FaceParams, return_points: bool = False):
    """MediaPipe-layout landmarks [N, 478, 3] (float32) of the faces ``params`` describes.

    With ``return_points`` also returns the head-frame 3D points [N, 478, 3] (cm, float64).
    """
    pts = L.face_points(params.shape, params.expression, params.gaze, params.iris_radius)
    lm = L.project(pts, params.head_pose, params.center, params.scale)
    return (lm, pts) if return_points else lm


# ----------------------------------------------------------------------------- geometry helpers (numpy)
_SKULL_CENTER = np.array([0.0, 2.0, -3.5])
_SKULL_RADII = np.array([7.9, 9.7, 9.9])
_SHADE_CENTER = np.array([0.0, -0.5, -2.5])
_SHADE_RADII = np.array([7.9, 11.5, 10.5])
_FLIP = np.diag([1.0, -1.0, 1.0])


def _camera(params: FaceParams, res: int):
    """Per-image rotation, pixel origin and pixel scale; maps head-frame cm -> (u, v, w) pixels."""
    rot = rotation_from_pose(params.head_pose)
    origin = np.concatenate([params.center * res, np.zeros((len(params), 1))], 1)
    s = params.scale * res
    return rot, origin, s


def _to_cam(p, rot, origin, s):
    """Head-frame points [N, ..., 3] (cm) -> camera (u right, v down, w towards the viewer), pixels."""
    q = np.einsum("nij,n...j->n...i", rot, p)
    q = q * np.array([1.0, -1.0, 1.0])
    shape = (len(s),) + (1,) * (q.ndim - 2) + (1,)
    return origin.reshape(len(s), *(1,) * (q.ndim - 2), 3) + s.reshape(shape) * q


def _dir_to_cam(d, rot, s):
    q = np.einsum("nij,n...j->n...i", rot, d) * np.array([1.0, -1.0, 1.0])
    return s.reshape((len(s),) + (1,) * (q.ndim - 1)) * q


def _ellipsoid(center, radii, rot, origin, s):
    """Camera-frame quadric (Q [N, 3, 3], centre [N, 3]) of a head-frame ellipsoid."""
    n = len(s)
    c = _to_cam(np.broadcast_to(center, (n, 3))[:, None], rot, origin, s)[:, 0]
    d = np.broadcast_to(np.eye(3) / np.square(radii)[..., None], (n, 3, 3)) if np.ndim(radii) == 1 else \
        np.eye(3)[None] / np.square(radii)[:, :, None]
    q = _FLIP @ rot @ d @ np.transpose(rot, (0, 2, 1)) @ _FLIP / np.square(s)[:, None, None]
    return q, c


def _prepare(params: FaceParams, res: int) -> dict[str, np.ndarray]:
    """Numpy pre-pass: landmarks and every posed 3D construct in pixel coordinates, as float32 arrays."""
    p = params
    n = len(p)
    lm, pts = face_landmarks(p, return_points=True)
    rot, origin, s = _camera(p, res)
    cam = _to_cam(pts, rot, origin, s)  # [N, 478, 3]
    out: dict[str, np.ndarray] = {}

    def poly(idx):
        return cam[:, list(idx), :2]

    out["oval"] = poly(L.FACE_OVAL)
    out["eye_r"] = poly(L.eye_loop("right"))
    out["eye_l"] = poly(L.eye_loop("left"))
    out["lid_r"] = poly(L.RIGHT_EYE_UPPER)
    out["lid_l"] = poly(L.LEFT_EYE_UPPER)
    out["brow_r"] = poly(L.RIGHT_BROW)
    out["brow_l"] = poly(L.LEFT_BROW)
    out["lips_out"] = poly(L.lips_outer_loop())
    out["lips_in"] = poly(L.lips_inner_loop())
    out["lip_up"] = poly(L.LIPS_INNER_UPPER)
    out["lip_lo"] = poly(L.LIPS_INNER_LOWER)
    out["nose_r"] = poly(L.RIGHT_NOSE_SIDE)
    out["nose_l"] = poly(L.LEFT_NOSE_SIDE)
    out["beard_full"] = poly(L.BEARD_FULL)
    out["beard_goatee"] = poly(L.BEARD_GOATEE)
    # Iris discs (centre, axis vectors from the +x and up points).
    for side, idx in (("r", L.RIGHT_IRIS), ("l", L.LEFT_IRIS)):
        c = cam[:, idx[0], :2]
        out[f"iris_{side}"] = np.stack([c, cam[:, idx[1], :2] - c, cam[:, idx[2], :2] - c], 1)  # [N, 3, 2]
    # Nostrils: small discs between the subnasale and the nose wings.
    for side, wing in (("r", 98), ("l", 327)):
        c3 = 0.45 * pts[:, 2] + 0.55 * pts[:, wing] + np.array([0.0, 0.12, -0.15])
        c = _to_cam(c3[:, None], rot, origin, s)[:, 0, :2]
        ax = _dir_to_cam(np.broadcast_to([0.33, 0.0, 0.0], (n, 3)), rot, s)[:, :2]
        ay = _dir_to_cam(np.broadcast_to([0.0, 0.16, 0.12], (n, 3)), rot, s)[:, :2]
        out[f"nostril_{side}"] = np.stack([c, ax, ay], 1)
    # Nose-side and ear facing (z of the rotated normal) for shading / visibility.
    rz = rot[:, 2, :]  # third row: z component of R n
    out["nose_nz"] = np.stack([rz @ np.array([-0.75, 0.0, 0.66]), rz @ np.array([0.75, 0.0, 0.66])], 1)
    nose_n = np.stack([np.einsum("nij,j->ni", rot, np.array([-0.75, 0.0, 0.66])),
                       np.einsum("nij,j->ni", rot, np.array([0.75, 0.0, 0.66]))], 1) * np.array([1.0, -1.0, 1.0])
    out["nose_lambert"] = np.clip(np.einsum("nkc,nc->nk", nose_n, p.light_dir), 0.0, 1.0)
    ears, ear_front = [], []
    for sx in (-1.0, 1.0):
        c = _to_cam(np.broadcast_to([sx * 8.0, 0.3, -3.3], (n, 3))[:, None], rot, origin, s)[:, 0, :2]
        ax = _dir_to_cam(np.broadcast_to([0.0, 2.9, 0.0], (n, 3)), rot, s)[:, :2]
        ah = _dir_to_cam(np.broadcast_to(np.array([sx * 0.45, 0.0, -0.9]) * 1.8, (n, 3)), rot, s)[:, :2]
        ears.append(np.stack([c, ah, ax], 1))
        ear_front.append(rz @ np.array([sx * 0.9, 0.0, 0.45]))
    out["ears"] = np.stack(ears, 1)  # [N, 2, 3, 2]
    out["ear_front"] = np.stack(ear_front, 1)  # [N, 2]
    # Neck: top under the jaw (posed), bottom at the body (fixed).
    top = _to_cam(np.broadcast_to(np.array([[-4.7, -5.0, -4.5], [4.7, -5.0, -4.5]]), (n, 2, 3)),
                  rot, origin, s)[..., :2]
    bx = (0.5 + p.body_dx) * res
    bottom = np.stack([np.stack([bx + 0.12 * res, np.full(n, res + 2.0)], -1),
                       np.stack([bx - 0.12 * res, np.full(n, res + 2.0)], -1)], 1)
    out["neck"] = np.concatenate([top, bottom], 1)
    out["body"] = np.stack([bx, np.full(n, 1.13 * res)], -1)
    # Hair behind the head down to hair_length (only drawn when hair_length > 0).
    hl = np.maximum(p.hair_length, 1.0)
    curtain = np.zeros((n, 10, 3))
    side = [(8.4, 4.0, -3.0), (9.0, -3.0, -3.5)]
    for k, (xx, yy, zz) in enumerate(side):
        curtain[:, k] = (-xx, yy, zz)
        curtain[:, 9 - k] = (xx, yy, zz)
    curtain[:, 2] = np.stack([np.full(n, -9.4), -hl, np.full(n, -4.0)], -1)
    curtain[:, 3] = np.stack([np.full(n, -6.0), -hl - 0.8, np.full(n, -4.5)], -1)
    curtain[:, 4] = np.stack([np.full(n, -0.01), -hl - 1.0, np.full(n, -5.0)], -1)
    curtain[:, 5] = np.stack([np.full(n, 0.01), -hl - 1.0, np.full(n, -5.0)], -1)
    curtain[:, 6] = np.stack([np.full(n, 6.0), -hl - 0.8, np.full(n, -4.5)], -1)
    curtain[:, 7] = np.stack([np.full(n, 9.4), -hl, np.full(n, -4.0)], -1)
    curtain = curtain * np.concatenate([p.hair_volume[:, None, None] * np.ones((n, 1, 1)),
                                        np.ones((n, 1, 2))], 2)
    out["curtain"] = _to_cam(curtain, rot, origin, s)[..., :2]
    # Ellipsoids: skull (skin), hair (skull scaled by hair_volume), shading.
    out["skull_q"], out["skull_c"] = _ellipsoid(_SKULL_CENTER, _SKULL_RADII, rot, origin, s)
    hair_r = _SKULL_RADII[None] * p.hair_volume[:, None]
    out["hair_q"], out["hair_c"] = _ellipsoid(_SKULL_CENTER, hair_r, rot, origin, s)
    out["shade_q"], out["shade_c"] = _ellipsoid(_SHADE_CENTER, _SHADE_RADII, rot, origin, s)
    out["rot_t"] = np.transpose(rot, (0, 2, 1))  # camera -> head
    out["s"] = s
    # Glasses: rings in front of the eyes, bridge, temples.
    er = 0.5 * (pts[:, 33] + pts[:, 133])
    el = 0.5 * (pts[:, 362] + pts[:, 263])
    rings = []
    for c3 in (er, el):
        c = _to_cam((c3 + [0.0, -0.1, 1.1])[:, None], rot, origin, s)[:, 0, :2]
        ax = _dir_to_cam(np.broadcast_to([1.65, 0.0, 0.0], (n, 3)), rot, s)[:, :2]
        ay = _dir_to_cam(np.broadcast_to([0.0, 1.25, 0.0], (n, 3)), rot, s)[:, :2]
        rings.append(np.stack([c, ax, ay], 1))
    out["rings"] = np.stack(rings, 1)  # [N, 2, 3, 2]
    segs = np.stack([
        np.stack([er + [1.65, 0.05, 1.1], el + [-1.65, 0.05, 1.1]], 1),
        np.stack([er + [-1.65, 0.0, 1.1], er * [0, 0, 0] + [-7.7, 2.7, -2.5]], 1),
        np.stack([el + [1.65, 0.0, 1.1], el * [0, 0, 0] + [7.7, 2.7, -2.5]], 1),
    ], 1)  # [N, 3, 2, 3]
    out["glasses_segs"] = _to_cam(segs.reshape(n, 6, 3), rot, origin, s)[..., :2].reshape(n, 3, 2, 2)
    # Expression lines: nasolabial folds, two forehead lines, two frown lines between the brows.
    out["fold_r"] = poly(L.RIGHT_FOLD)
    out["fold_l"] = poly(L.LEFT_FOLD)
    fh = pts[:, list(L.FOREHEAD_LINE)]
    out["forehead"] = np.stack([_to_cam(fh, rot, origin, s)[..., :2],
                                _to_cam(fh + [0.0, 0.6, -0.1], rot, origin, s)[..., :2]], 1)
    gl = np.stack([pts[:, 8], pts[:, 9]], 1)
    out["glabella"] = np.stack([_to_cam(gl + [-0.45, 0.0, 0.0], rot, origin, s)[..., :2],
                                _to_cam(gl + [0.45, 0.0, 0.0], rot, origin, s)[..., :2]], 1)
    out["eye_centre"] = np.stack([0.5 * (cam[:, 33, :2] + cam[:, 133, :2]), 0.5 * (cam[:, 362, :2] + cam[:, 263, :2])],
                                 1)
    out["eye_centre"] = 0.5 * (out["eye_centre"] + out["rings"][:, :, 0])
    out["nose_centre"] = 0.5 * (out["nose_r"].mean(1) + out["nose_l"].mean(1))
    out["mouth_centre"] = out["lips_out"].mean(1)
    out["beard_centre"] = 0.5 * (out["beard_full"].min(1) + out["beard_full"].max(1))
    out["lm"] = lm
    return {k: np.asarray(v, np.float32) for k, v in out.items()}


# ----------------------------------------------------------------------------- drawing primitives (JAX)
def _seg_dist2(p, a, e):
    """Squared distances [K, P] from pixels p [P, 2] to the segments a -> a + e (a, e [K, 2]).

    Laid out edges-major with separate x / y arrays, which XLA's CPU backend fuses far better than
    [P, K, 2] broadcasting.
    """
    px, py = p[None, :, 0], p[None, :, 1]
    ax, ay, ex, ey = a[:, 0:1], a[:, 1:2], e[:, 0:1], e[:, 1:2]
    inv = 1.0 / jnp.maximum(ex * ex + ey * ey, 1e-9)
    wx, wy = px - ax, py - ay
    t = jnp.clip((wx * ex + wy * ey) * inv, 0.0, 1.0)
    dx, dy = wx - t * ex, wy - t * ey
    return dx * dx + dy * dy, wx, wy


def _polygon_sdf(p, poly):
    """Signed distance (px, negative inside) from p [P, 2] to the closed polygon [K, 2] (even-odd rule)."""
    e = jnp.roll(poly, -1, axis=0) - poly
    d2, wx, wy = _seg_dist2(p, poly, e)
    ey, ex = e[:, 1:2], e[:, 0:1]
    ay, py = poly[:, 1:2], p[None, :, 1]
    crosses = (ay > py) != (ay + ey > py)
    # the edge crosses the horizontal line through p to the right of p  <=>  cross(w, e) * ey < 0
    toggle = crosses & ((wx * ey - wy * ex) * ey < 0)
    inside = (jnp.sum(toggle.astype(jnp.int32), axis=0) & 1) == 1
    d = jnp.sqrt(jnp.min(d2, axis=0) + 1e-12)
    return jnp.where(inside, -d, d)


def _convex_sdf(p, poly):
    """Signed distance to a convex polygon [K, 2] (either orientation) as the max over its edge half-planes.

    Exact inside and across the edges, a lower bound beyond the corners, which is all anti-aliasing needs;
    a slightly concave outline is filled to its hull. Three flops per pixel and edge instead of ~15.
    """
    e = jnp.roll(poly, -1, axis=0) - poly
    area2 = jnp.sum(poly[:, 0] * jnp.roll(poly[:, 1], -1) - jnp.roll(poly[:, 0], -1) * poly[:, 1])
    orient = jnp.where(area2 >= 0, 1.0, -1.0)
    length = jnp.sqrt(jnp.sum(e * e, -1, keepdims=True) + 1e-12)
    n = orient * jnp.stack([e[:, 1], -e[:, 0]], -1) / length  # outward normals [K, 2]
    c = jnp.sum(n * poly, -1, keepdims=True)
    return jnp.max(n[:, 0:1] * p[None, :, 0] + n[:, 1:2] * p[None, :, 1] - c, axis=0)


def _polyline_dist(p, pts):
    """Distance from p [P, 2] to the open polyline pts [K, 2]."""
    d2, _, _ = _seg_dist2(p, pts[:-1], pts[1:] - pts[:-1])
    return jnp.sqrt(jnp.min(d2, axis=0) + 1e-12)


def _cov(sdf, soft=1.0):
    """Anti-aliased coverage of the region sdf < 0 (sdf in pixels; ``soft`` widens the ramp)."""
    return jnp.clip(0.5 - sdf / soft, 0.0, 1.0)


def _ellipse_sdf(p, c, ax, ay):
    """Approximate signed distance to the ellipse {c + cos t ax + sin t ay} (axes need not be orthogonal)."""
    m = jnp.stack([ax, ay], 1)  # columns
    det = m[0, 0] * m[1, 1] - m[0, 1] * m[1, 0]
    det = jnp.where(jnp.abs(det) < 1e-6, 1e-6, det)
    inv = jnp.array([[m[1, 1], -m[0, 1]], [-m[1, 0], m[0, 0]]]) / det
    q = (p - c) @ inv.T
    r = jnp.sqrt(jnp.sum(q * q, -1) + 1e-12)
    # gradient of |q| w.r.t. p is (q / r) @ inv: distance ~ (r - 1) / |grad|
    g = (q / r[:, None]) @ inv
    return (r - 1.0) / jnp.maximum(jnp.sqrt(jnp.sum(g * g, -1)), 1e-6)


def _raycast(p, q, c):
    """Orthographic rays (along w) against the quadric (x-c)^T q (x-c) = 1.

    Returns (silhouette sdf [P] in px, front surface point [P, 3] (clamped at the rim), normal [P, 3]).
    """
    d = p - c[None, :2]
    a = q[2, 2]
    b = d @ q[:2, 2]
    m2 = q[:2, :2] - jnp.outer(q[:2, 2], q[:2, 2]) / a
    a2 = jnp.sum((d @ m2) * d, -1)
    grad = 2.0 * (d @ m2)
    sdf = (a2 - 1.0) / jnp.maximum(jnp.sqrt(jnp.sum(grad * grad, -1)), 1e-6)
    disc = jnp.maximum(a * (1.0 - a2), 0.0)
    w = (-b + jnp.sqrt(disc)) / a
    x = jnp.concatenate([d, w[:, None]], -1)
    nrm = x @ q
    nrm = nrm / jnp.maximum(jnp.linalg.norm(nrm, axis=-1, keepdims=True), 1e-9)
    return sdf, x + c[None], nrm


def _over(img, colour, alpha):
    a = alpha[:, None]
    return img * (1.0 - a) + colour * a


# Square windows (fractions of the image side) in which the small features are drawn: each window is
# cut from the image at a per-image position, painted, and written back, so that the distance fields of
# eyes, brows, mouth and nose cost a window's pixels instead of the whole image's.
_WINDOWS = {"eye": 0.27, "brow": 0.27, "mouth": 0.36, "nose": 0.28, "beard": 0.72}


def _window_size(kind: str, res: int) -> int:
    return int(min(res, np.ceil(_WINDOWS[kind] * res)))


def _paint_window(img, maps, centre, size: int, paint):
    """Cuts a ``size`` square around ``centre`` from img [R, R, 3] and the per-pixel ``maps`` ([R, R, ...]),
    calls ``paint(sub_img, p, sub_maps)`` (p: pixel centres [size*size, 2]) and writes the result back."""
    res = img.shape[0]
    o = jnp.clip(jnp.round(centre - size / 2.0).astype(jnp.int32), 0, res - size)  # (u0, v0)
    sub = jax.lax.dynamic_slice(img, (o[1], o[0], 0), (size, size, 3)).reshape(-1, 3)
    sub_maps = {k: jax.lax.dynamic_slice(m, (o[1], o[0]) + (0,) * (m.ndim - 2), (size, size) + m.shape[2:])
                .reshape((size * size,) + m.shape[2:]) for k, m in maps.items()}
    t = jnp.arange(size, dtype=jnp.float32) + 0.5
    uu, vv = jnp.meshgrid(t + o[0], t + o[1])
    p = jnp.stack([uu.ravel(), vv.ravel()], -1)
    out = paint(sub, p, sub_maps)
    return jax.lax.dynamic_update_slice(img, out.reshape(size, size, 3), (o[1], o[0], 0))


def _draw_one(g, res: int):
    """Renders one image from the per-image slice ``g`` of :func:`_prepare`'s output -> [res, res, 3] in [0, 1]."""
    t = jnp.arange(res, dtype=jnp.float32) + 0.5
    uu, vv = jnp.meshgrid(t, t)
    p = jnp.stack([uu.ravel(), vv.ravel()], -1)  # [P, 2] (u right, v down)
    px_cm = g["s"]  # pixels per cm
    light = g["light_dir"]
    amb = g["ambient"]

    def lambert(nrm):
        return amb + (1.0 - amb) * jnp.clip(nrm @ light, 0.0, 1.0)

    # 1. background
    f = (p[:, 1] / res)[:, None]
    img = g["bg_top"][None] * (1.0 - f) + g["bg_bottom"][None] * f

    # shading field for skin (one smooth ellipsoid for skull and face)
    _, _, n_shade = _raycast(p, g["shade_q"], g["shade_c"])
    shade = lambert(n_shade)
    skin = g["skin"][None] * shade[:, None]

    # 2. hair behind the head
    hair_sdf, hair_pt, hair_n = _raycast(p, g["hair_q"], g["hair_c"])
    back = jnp.minimum(_convex_sdf(p, g["curtain"]), hair_sdf)
    has_back = (g["hair_length"] > 0).astype(jnp.float32)
    hair_col = g["hair"][None] * (0.55 + 0.45 * lambert(hair_n))[:, None]
    img = _over(img, hair_col * 0.8, _cov(back) * has_back)

    # 3. neck and shoulders
    img = _over(img, g["skin"][None] * (0.62 + 0.2 * amb), _cov(_convex_sdf(p, g["neck"])))
    body = _ellipse_sdf(p, g["body"], jnp.array([0.55 * res, 0.0]), jnp.array([0.0, 0.26 * res]))
    cloth = g["clothing"][None] * (0.8 + 0.2 * jnp.clip(1.0 - (p[:, 1:2] - 0.85 * res) / (0.3 * res), 0, 1))
    img = _over(img, cloth, _cov(body))

    # 4. ears behind the skull
    def ear_alpha(k):
        e = g["ears"][k]
        outer = _cov(_ellipse_sdf(p, e[0], e[1], e[2]))
        inner = _cov(_ellipse_sdf(p, e[0] + 0.1 * e[1], 0.5 * e[1], 0.6 * e[2]), 1.5)
        return outer, inner

    ear_col = g["skin"][None] * (amb + 0.25)
    ears = [ear_alpha(k) for k in range(2)]
    for outer, inner in ears:
        img = _over(img, ear_col, outer * g["ears_alpha"])
        img = _over(img, ear_col * 0.75, inner * outer * g["ears_alpha"])

    # 5. skull and face skin
    skull_sdf, _, _ = _raycast(p, g["skull_q"], g["skull_c"])
    img = _over(img, skin, _cov(skull_sdf))
    for k, (outer, inner) in enumerate(ears):  # ears that face the camera are in front of the skull
        front = jnp.clip((g["ear_front"][k] + 0.05) / 0.2, 0.0, 1.0) * g["ears_alpha"]
        img = _over(img, ear_col, outer * front)
        img = _over(img, ear_col * 0.75, inner * outer * front)
    img = _over(img, skin, _cov(_convex_sdf(p, g["oval"])))
    img = img.reshape(res, res, 3)
    maps = {"shade": shade.reshape(res, res)}

    # 6. beard, nose
    def paint_beard(sub, q, m):
        full = _cov(_polygon_sdf(q, g["beard_full"]), 1.5)
        goatee = _cov(_polygon_sdf(q, g["beard_goatee"]), 1.5)
        inside_face = _cov(_convex_sdf(q, g["oval"]) + 0.5)  # clipped to the face outline
        beard = jnp.where(g["beard_style"] > 0.5, goatee, full) * g["beard"] * inside_face
        return _over(sub, g["hair"][None] * (0.5 + 0.5 * m["shade"])[:, None], beard)

    img = _paint_window(img, maps, g["beard_centre"], _window_size("beard", res), paint_beard)

    def paint_nose(sub, q, m):
        for k, key in enumerate(("nose_r", "nose_l")):
            cov = _cov(_polygon_sdf(q, g[key]), 1.5)
            factor = (amb + (1.0 - amb) * g["nose_lambert"][k]) / jnp.maximum(m["shade"], 1e-3)
            factor = jnp.clip(factor, 0.78, 1.12)
            sub = sub * (1.0 + cov * g["nose_facing"][k] * (factor - 1.0))[:, None]
        for key in ("nostril_r", "nostril_l"):
            n_ = g[key]
            sub = _over(sub, g["skin"][None] * 0.35, 0.85 * _cov(_ellipse_sdf(q, n_[0], n_[1], n_[2]), 1.2))
        return sub

    img = _paint_window(img, maps, g["nose_centre"], _window_size("nose", res), paint_nose)

    # 7. mouth
    line_w = 0.05 * px_cm + 0.3
    line_col = g["skin"][None] * 0.5

    def paint_mouth(sub, q, m):
        lit = m["shade"][:, None]
        for k, key in enumerate(("fold_r", "fold_l")):
            sub = _over(sub, line_col * lit, g["line_alpha"][k] * _cov(_polyline_dist(q, g[key]) - line_w))
        sub = _over(sub, g["lips"][None] * lit, _cov(_polygon_sdf(q, g["lips_out"])))
        inner = _cov(_polygon_sdf(q, g["lips_in"]))
        sub = _over(sub, jnp.array([0.18, 0.05, 0.06])[None], inner)
        d_up = _polyline_dist(q, g["lip_up"])
        corners = jnp.minimum(jnp.linalg.norm(q - g["lip_up"][0], axis=-1), jnp.linalg.norm(q - g["lip_up"][-1], axis=-1))
        teeth = _cov(d_up - 0.32 * px_cm) * inner * jnp.clip((corners - 0.3 * px_cm) / (0.3 * px_cm), 0.0, 1.0)
        sub = _over(sub, jnp.array([0.93, 0.91, 0.86])[None] * lit, teeth)
        line = _cov(jnp.minimum(d_up, _polyline_dist(q, g["lip_lo"])) - 0.35, 1.0)
        return _over(sub, g["lips"][None] * 0.45, 0.6 * line)

    img = _paint_window(img, maps, g["mouth_centre"], _window_size("mouth", res), paint_mouth)

    # 8. eyes (and the glasses' rings, which sit in front of them)
    gl = g["glasses"]
    thick = 0.12 * px_cm + 0.35
    for k, side in enumerate(("r", "l")):
        def paint_eye(sub, q, m, k=k, side=side):
            opening = _cov(_polygon_sdf(q, g[f"eye_{side}"]))
            sub = _over(sub, jnp.array([0.95, 0.94, 0.92])[None] * (0.75 + 0.25 * amb), opening)
            ir = g[f"iris_{side}"]
            iris = _cov(_ellipse_sdf(q, ir[0], ir[1], ir[2])) * opening
            sub = _over(sub, g["iris"][None], iris)
            pupil = _cov(_ellipse_sdf(q, ir[0], 0.42 * ir[1], 0.42 * ir[2])) * opening
            sub = _over(sub, jnp.array([0.03, 0.03, 0.03])[None], pupil)
            lid = _cov(_polyline_dist(q, g[f"lid_{side}"]) - 0.09 * px_cm, 1.0)
            return _over(sub, jnp.array([0.08, 0.06, 0.06])[None], 0.9 * lid)

        img = _paint_window(img, maps, g["eye_centre"][k], _window_size("eye", res), paint_eye)

    # 9. brows
    brow_col = g["hair"][None] * 0.45 + 0.02
    for key in ("brow_r", "brow_l"):
        def paint_brow(sub, q, m, key=key):
            return _over(sub, brow_col, 0.92 * _cov(_polygon_sdf(q, g[key]), 1.2))

        img = _paint_window(img, maps, jnp.mean(g[key], axis=0), _window_size("brow", res), paint_brow)

    # 10. forehead and frown lines (full image: few segments), then the hair cap on the hair ellipsoid
    img = img.reshape(-1, 3)
    lit = shade[:, None]
    for j in range(2):
        img = _over(img, line_col * lit, g["line_alpha"][2] * _cov(_polyline_dist(p, g["forehead"][j]) - line_w))
        img = _over(img, line_col * lit, g["line_alpha"][3] * _cov(_polyline_dist(p, g["glabella"][j]) - line_w))
    hp = (hair_pt - g["hair_c"][None]) / px_cm
    hp = hp * jnp.array([1.0, -1.0, 1.0])
    hp = hp @ g["rot_t"].T  # head frame, relative to the skull centre
    hx, hy, hz = hp[:, 0] + _SKULL_CENTER[0], hp[:, 1] + _SKULL_CENTER[1], hp[:, 2] + _SKULL_CENTER[2]
    front = jnp.clip((hz + 1.0) / 4.0, 0.0, 1.0)
    front = front * front * (3 - 2 * front)
    backw = jnp.clip((-4.0 - hz) / 4.0, 0.0, 1.0)
    hline = g["hairline_side"] + (g["hairline_front"] - g["hairline_side"]) * front
    hline = hline + g["fringe"] * jnp.sin(2.3 * hx + 1.0) * front
    hline = hline + 0.8 * jnp.clip((jnp.abs(hx) - 3.5) / 3.0, 0.0, 1.0) * front
    hline = hline + (g["hairline_back"] - hline) * backw
    mask = jax.nn.sigmoid((hy - hline) / 0.18) * jax.nn.sigmoid((g["crown"] - hy) / 0.3)
    strands = 1.0 + 0.07 * jnp.sin(6.0 * hx + 2.0 * hy)
    img = _over(img, hair_col * strands[:, None], _cov(hair_sdf) * mask)

    # 11. glasses: lenses and rings, bridge and temples
    for k in range(2):
        r = g["rings"][k]
        e = _ellipse_sdf(p, r[0], r[1], r[2])
        img = _over(img, jnp.array([0.85, 0.9, 0.95])[None], 0.12 * _cov(e) * gl)
        img = _over(img, g["glasses_color"][None], _cov(jnp.abs(e) - thick) * gl)
    for k in range(3):
        seg = g["glasses_segs"][k]
        img = _over(img, g["glasses_color"][None], _cov(_polyline_dist(p, seg) - thick) * gl)

    img = jnp.clip(img * g["brightness"], 0.0, 1.0)
    return img.reshape(res, res, 3)


@functools.partial(jax.jit, static_argnames=("res",))
def _draw_batch(g, res: int):
    return jax.vmap(lambda x: _draw_one(x, res))(g)


def _line_alphas(expression: np.ndarray) -> np.ndarray:
    """Opacity [N, 4] of the expression lines: right fold, left fold, forehead, frown lines."""
    e = {k: expression[:, i] for i, k in enumerate(L.EXPRESSION_PARAMS)}
    lift = 0.6 * e["upper_lip_raise"] + 0.3 * e["squint"]
    fold_r = np.clip(0.6 * np.maximum(e["smile_right"], 0) + lift, 0, 1)
    fold_l = np.clip(0.6 * np.maximum(e["smile_left"], 0) + lift, 0, 1)
    forehead = np.clip(e["brow_raise"] + 0.5 * e["brow_inner_up"], 0, 1)
    frown = np.clip(e["brow_furrow"], 0, 1)
    return 0.6 * np.stack([fold_r, fold_l, forehead, frown], 1)


def render_faces(params: FaceParams, resolution: int = 64, batch_size: int = 128,
                 return_landmarks: bool = False):
    """Renders N faces -> uint8 [N, R, R, 3] (and landmarks [N, 478, 3] with ``return_landmarks``).

    Work is done in chunks of ``batch_size`` (the last chunk is padded, so one compilation serves every
    chunk; fewer than ``batch_size`` images use the next power of two). Deterministic: equal params give
    equal pixels, whatever the chunking.
    """
    if not isinstance(resolution, (int, np.integer)) or resolution < 16:
        raise ValueError(f"resolution must be an int >= 16, got {resolution!r}")
    params = params.validate()
    n = len(params)
    g = _prepare(params, int(resolution))
    lm = g.pop("lm")
    per = {
        "light_dir": params.light_dir, "ambient": params.ambient,
        "skin": params.skin, "hair": params.hair, "iris": params.iris, "lips": params.lips,
        "clothing": params.clothing, "bg_top": params.bg_top, "bg_bottom": params.bg_bottom,
        "glasses_color": params.glasses_color, "hairline_front": params.hairline_front,
        "hairline_side": params.hairline_side, "hairline_back": params.hairline_back,
        "hair_length": params.hair_length, "crown": params.crown, "fringe": params.fringe,
        "ears_alpha": params.ears, "glasses": params.glasses, "beard": params.beard,
        "beard_style": params.beard_style, "brightness": params.brightness,
        "nose_facing": np.clip((g["nose_nz"] + 0.2) / 0.4, 0.0, 1.0),
        "line_alpha": _line_alphas(params.expression),
    }
    g.update({k: np.asarray(v, np.float32) for k, v in per.items()})
    g.pop("nose_nz")
    # chunks of batch_size; fewer images use the next power of two, so few distinct shapes get compiled
    bs = max(1, min(int(batch_size), 1 << max(n - 1, 0).bit_length()))
    out = np.empty((n, resolution, resolution, 3), np.uint8)
    for i in range(0, n, bs):
        j = min(i + bs, n)
        chunk = {k: v[i:j] for k, v in g.items()}
        if j - i < bs:
            chunk = {k: np.concatenate([v, np.repeat(v[-1:], bs - (j - i), 0)]) for k, v in chunk.items()}
        img = np.asarray(_draw_batch(chunk, int(resolution)))[: j - i]
        out[i:j] = np.round(img * 255.0).astype(np.uint8)
    return (out, lm) if return_landmarks else out
