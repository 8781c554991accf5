"""Procedural 3D face in MediaPipe's 478-landmark layout: identity shape, expression, iris, pose and projection.

The template is MediaPipe's own canonical face mesh (468 vertices, :mod:`.canonical_mesh`), so every index
means what it means in MediaPipe's output: eye corners 33 / 133 / 362 / 263, nose tip 4, mouth corners
61 / 291, inner lips 13 / 14, chin 152, the face oval, brows, lip and eye contours. The ten iris points
468-477 are added around an iris disc in front of each eye (468 = centre of the subject's right iris, the
one between 33 and 133, then +x, up, -x, down in the image; 473-477 the same for the left iris), as MediaPipe
orders them.

A face is ``template + shape_basis . shape + expression_basis . expression`` (both bases linear
displacement fields on the 468 vertices, in centimetres), then the irises, then a rigid rotation by the head
pose and a scaled orthographic projection into the image:

* head frame: x to the subject's left, y up, z towards the viewer (MediaPipe's canonical frame);
* rotation ``R = Rz(roll) @ Ry(yaw) @ Rx(pitch)`` (:mod:`facecrafter_jax.face.geometry`): yaw > 0
  turns the face towards the image right, pitch > 0 tilts it down, roll > 0 turns it counter-clockwise;
* landmark ``x = cx + s * X``, ``y = cy - s * Y`` in units of the image side, ``z = -s * Z`` (smaller is
  closer to the camera, same units as x, zero at the head-frame origin), with ``(X, Y, Z) = R p``.

The default placement ``(cx, cy) = (0.5, 0.573)``, ``s = 0.0381`` per cm puts a frontal average face at the
FFHQ-style crop positions of ``data_prep`` (eyes at about (0.38, 0.47) and (0.62, 0.47), mouth corners near
(0.41, 0.74) and (0.59, 0.74)).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from facecrafter_jax.face.geometry import rotation_from_pose
from facecrafter_jax.face.vocabulary import NUM_LANDMARKS

from .canonical_mesh import CANONICAL_VERTICES, NUM_MESH_VERTICES

__all__ = [
    "NUM_LANDMARKS", "SHAPE_PARAMS", "EXPRESSION_PARAMS", "EXPRESSION_RANGES", "KEY_POINTS", "FACE_OVAL",
    "RIGHT_EYE_UPPER", "RIGHT_EYE_LOWER", "LEFT_EYE_UPPER", "LEFT_EYE_LOWER", "RIGHT_BROW", "LEFT_BROW",
    "LIPS_OUTER_UPPER", "LIPS_OUTER_LOWER", "LIPS_INNER_UPPER", "LIPS_INNER_LOWER", "RIGHT_IRIS", "LEFT_IRIS",
    "NOSE_RIDGE", "RIGHT_FOLD", "LEFT_FOLD", "FOREHEAD_LINE", "RIGHT_NOSE_SIDE", "LEFT_NOSE_SIDE", "BEARD_FULL", "BEARD_GOATEE", "MIRROR",
    "FaceTemplate", "face_template", "face_points", "project", "DEFAULT_CENTER",
    "DEFAULT_SCALE", "eye_loop", "lips_outer_loop", "lips_inner_loop",
]

# --------------------------------------------------------------------------- MediaPipe index sets
# Chains are ordered from the image-left end (subject's right) to the image-right end when frontal.
FACE_OVAL = (10, 338, 297, 332, 284, 251, 389, 356, 454, 323, 361, 288, 397, 365, 379, 378, 400, 377, 152, 148,
             176, 149, 150, 136, 172, 58, 132, 93, 234, 127, 162, 21, 54, 103, 67, 109)
RIGHT_EYE_UPPER = (33, 246, 161, 160, 159, 158, 157, 173, 133)
RIGHT_EYE_LOWER = (33, 7, 163, 144, 145, 153, 154, 155, 133)
LEFT_EYE_UPPER = (362, 398, 384, 385, 386, 387, 388, 466, 263)
LEFT_EYE_LOWER = (362, 382, 381, 380, 374, 373, 390, 249, 263)
# Brow polygons: lower row (outer -> inner), then upper row (inner -> outer).
RIGHT_BROW = (46, 53, 52, 65, 55, 107, 66, 105, 63, 70)
LEFT_BROW = (276, 283, 282, 295, 285, 336, 296, 334, 293, 300)
LIPS_OUTER_UPPER = (61, 185, 40, 39, 37, 0, 267, 269, 270, 409, 291)
LIPS_OUTER_LOWER = (61, 146, 91, 181, 84, 17, 314, 405, 321, 375, 291)
LIPS_INNER_UPPER = (78, 191, 80, 81, 82, 13, 312, 311, 310, 415, 308)
LIPS_INNER_LOWER = (78, 95, 88, 178, 87, 14, 317, 402, 318, 324, 308)
RIGHT_IRIS = (468, 469, 470, 471, 472)  # centre, +x, up, -x, down (image directions, frontal face)
LEFT_IRIS = (473, 474, 475, 476, 477)
NOSE_RIDGE = (168, 6, 197, 195, 5, 4)
# Side of the nose: ridge down to the tip, around the wing, back up along the nose-cheek junction.
# Expression lines (drawn with an opacity that follows the expression): nasolabial fold, forehead.
RIGHT_FOLD = (129, 203, 206, 216)
FOREHEAD_LINE = (69, 108, 151, 337, 299)
RIGHT_NOSE_SIDE = (168, 6, 197, 195, 5, 4, 45, 220, 115, 48, 64, 98, 129, 209, 126, 47, 114, 245, 193)
KEY_POINTS = {
    "right_eye_outer": 33, "right_eye_inner": 133, "left_eye_inner": 362, "left_eye_outer": 263,
    "nose_tip": 4, "nose_bridge": 168, "subnasale": 2, "mouth_right": 61, "mouth_left": 291,
    "upper_lip_inner": 13, "lower_lip_inner": 14, "upper_lip_outer": 0, "lower_lip_outer": 17,
    "chin": 152, "forehead": 10, "right_cheek_contour": 234, "left_cheek_contour": 454,
    "right_brow_inner": 55, "left_brow_inner": 285, "right_brow_outer": 46, "left_brow_outer": 276,
    "right_upper_lid": 159, "right_lower_lid": 145, "left_upper_lid": 386, "left_lower_lid": 374,
    "right_iris": 468, "left_iris": 473,
}


def _mirror_map() -> np.ndarray:
    v = CANONICAL_VERTICES.astype(np.float64)
    m = v * np.array([-1.0, 1.0, 1.0])
    idx = np.linalg.norm(v[None] - m[:, None], axis=-1).argmin(1)
    # irises: centre <-> centre, up <-> up, down <-> down, and +x <-> -x (the image is flipped)
    full = np.concatenate([idx, [473, 476, 475, 474, 477, 468, 471, 470, 469, 472]])
    return full.astype(np.int64)


MIRROR = _mirror_map()
"""``MIRROR[i]`` is the landmark that lands on ``i`` when the image is flipped left-right: the canonical mesh is
exactly symmetric, so mesh vertices map to their mirror twins; iris points map centre to centre and swap +x
with -x. Flipping landmarks: ``flipped = lm[:, MIRROR] * (-1, 1, 1) + (1, 0, 0)``."""

LEFT_NOSE_SIDE = tuple(int(MIRROR[i]) for i in RIGHT_NOSE_SIDE)
LEFT_FOLD = tuple(int(MIRROR[i]) for i in RIGHT_FOLD)
# Full beard: the lower face oval from ear to ear, then back along the cheeks and over the upper lip.
_BEARD_HALF = (213, 216, 92, 165, 167)
BEARD_FULL = (132, 58, 172, 136, 150, 149, 176, 148, 152, 377, 400, 378, 379, 365, 397, 288, 361) + \
    tuple(int(MIRROR[i]) for i in _BEARD_HALF) + (164,) + tuple(reversed(_BEARD_HALF))
# Goatee: moustache and chin.
BEARD_GOATEE = (92, 165, 167, 164, 393, 391, 322, 410, 422, 431, 400, 377, 152, 148, 176, 211, 202, 186)


def eye_loop(side: str) -> tuple[int, ...]:
    """Closed eye-opening contour (upper lid then lower lid back) for ``side`` in {"right", "left"}."""
    up, lo = (RIGHT_EYE_UPPER, RIGHT_EYE_LOWER) if side == "right" else (LEFT_EYE_UPPER, LEFT_EYE_LOWER)
    return up + tuple(reversed(lo[1:-1]))


def lips_outer_loop() -> tuple[int, ...]:
    """Closed outer lip contour."""
    return LIPS_OUTER_UPPER + tuple(reversed(LIPS_OUTER_LOWER[1:-1]))


def lips_inner_loop() -> tuple[int, ...]:
    """Closed inner lip contour (the mouth opening)."""
    return LIPS_INNER_UPPER + tuple(reversed(LIPS_INNER_LOWER[1:-1]))


# --------------------------------------------------------------------------- parameters
SHAPE_PARAMS = (
    "face_width", "face_length", "jaw_width", "chin_length", "forehead_height", "eye_spacing", "eye_size",
    "eye_height", "nose_length", "nose_width", "nose_protrusion", "mouth_width", "lip_thickness", "brow_height",
    "brow_thickness", "cheek_fullness",
)
"""Identity shape coefficients; each basis is scaled so that a coefficient of 1 is about one standard
deviation of human variation (coefficients are drawn from N(0, 1) clipped to [-2, 2])."""

EXPRESSION_PARAMS = (
    "jaw_open", "smile_left", "smile_right", "mouth_stretch", "brow_raise", "brow_inner_up", "brow_furrow",
    "eye_open", "squint", "upper_lip_raise", "lip_press",
)
EXPRESSION_RANGES = {
    "jaw_open": (0.0, 1.0), "smile_left": (-1.0, 1.0), "smile_right": (-1.0, 1.0), "mouth_stretch": (0.0, 1.0),
    "brow_raise": (0.0, 1.0), "brow_inner_up": (0.0, 1.0), "brow_furrow": (0.0, 1.0), "eye_open": (-1.0, 0.6),
    "squint": (0.0, 1.0), "upper_lip_raise": (0.0, 1.0), "lip_press": (0.0, 1.0),
}
"""Valid range of each expression coefficient (0 = neutral). ``eye_open`` -1 closes the eyes, 0.6 opens
them 60 % wider; ``smile_*`` < 0 pulls the mouth corner down."""

DEFAULT_CENTER = (0.5, 0.573)
DEFAULT_SCALE = 0.0381
IRIS_RADIUS_CM = 0.56


def _smoothstep(t):
    t = np.clip(t, 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def _gauss(v, centre, sigma):
    d = (v - np.asarray(centre, np.float64)) / np.asarray(sigma, np.float64)
    return np.exp(-0.5 * np.sum(d * d, axis=-1))


def _chain_interp(v, chain, values):
    """Interpolates per-chain-vertex ``values`` along x (chain must be monotone in x)."""
    xs = v[list(chain), 0]
    order = np.argsort(xs)
    return np.interp(v[:, 0], xs[order], np.asarray(values, np.float64)[order])


def _eye_fields(v: np.ndarray, upper: tuple, lower: tuple) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-vertex (gap, upper-lid weight, lower-lid weight) for one eye."""
    gap_u = v[list(upper), 1] - v[list(lower), 1]  # upper and lower chains are paired index by index
    gap = _chain_interp(v, upper, gap_u)
    x0, x1 = sorted((v[upper[0], 0], v[upper[-1], 0]))
    inside_x = _smoothstep((v[:, 0] - (x0 - 0.4)) / 0.4) * _smoothstep(((x1 + 0.4) - v[:, 0]) / 0.4)
    y_up = _chain_interp(v, upper, v[list(upper), 1])
    y_lo = _chain_interp(v, lower, v[list(lower), 1])
    y_c = 0.5 * (y_up + y_lo)
    z_ok = _gauss(v[:, 2:3], [v[list(upper), 2].mean()], [1.0])
    w_up = np.where(v[:, 1] >= y_up, np.exp(-0.5 * ((v[:, 1] - y_up) / 0.3) ** 2),
                    _smoothstep((v[:, 1] - y_c) / np.maximum(y_up - y_c, 1e-3)))
    w_lo = np.where(v[:, 1] <= y_lo, np.exp(-0.5 * ((y_lo - v[:, 1]) / 0.3) ** 2),
                    _smoothstep((y_c - v[:, 1]) / np.maximum(y_c - y_lo, 1e-3)))
    lower_set = np.zeros(len(v), bool)
    lower_set[list(lower)] = True
    upper_set = np.zeros(len(v), bool)
    upper_set[list(upper)] = True
    w_up = np.where(lower_set, 0.0, np.where(upper_set, 1.0, w_up)) * inside_x * z_ok
    w_lo = np.where(upper_set, 0.0, np.where(lower_set, 1.0, w_lo)) * inside_x * z_ok
    return gap, w_up, w_lo


@dataclass(frozen=True)
class FaceTemplate:
    """The canonical vertices and the linear shape / expression bases (all float64, cm, head frame)."""

    vertices: np.ndarray  # [468, 3]
    shape_basis: np.ndarray  # [len(SHAPE_PARAMS), 468, 3]
    expression_basis: np.ndarray  # [len(EXPRESSION_PARAMS), 468, 3]


@functools.lru_cache(maxsize=1)
def face_template() -> FaceTemplate:
    """Builds (once) the template and its displacement bases from the canonical mesh."""
    v = CANONICAL_VERTICES.astype(np.float64)
    n = NUM_MESH_VERTICES
    x, y, z = v[:, 0], v[:, 1], v[:, 2]
    zeros = np.zeros(n)
    ax = np.abs(x)
    sx = np.sign(x)

    def field(dx=zeros, dy=zeros, dz=zeros):
        return np.stack([np.broadcast_to(dx, (n,)), np.broadcast_to(dy, (n,)), np.broadcast_to(dz, (n,))], -1)

    eye_r = v[[33, 133]].mean(0)
    eye_l = v[[362, 263]].mean(0)
    mouth = v[[61, 291]].mean(0)
    brow_r = v[list(RIGHT_BROW)].mean(0)
    brow_l = v[list(LEFT_BROW)].mean(0)
    near_eyes = np.maximum(_gauss(v[:, :2], eye_r[:2], [1.7, 1.1]), _gauss(v[:, :2], eye_l[:2], [1.7, 1.1]))
    eye_centre = np.where(x[:, None] < 0, eye_r, eye_l)
    near_brows = np.maximum(_gauss(v[:, :2], brow_r[:2], [1.9, 0.7]), _gauss(v[:, :2], brow_l[:2], [1.9, 0.7]))
    near_mouth = _gauss(v[:, :2], mouth[:2], [2.4, 0.9])
    # The mouth line: midway between the inner lips, extended flat beyond the corners.
    y_line = 0.5 * (_chain_interp(v, LIPS_INNER_UPPER, y[list(LIPS_INNER_UPPER)])
                    + _chain_interp(v, LIPS_INNER_LOWER, y[list(LIPS_INNER_LOWER)]))
    # Outer lip region only (the inner contours stay on the mouth line unless the jaw opens).
    outer_lips = _gauss(v[:, :2], mouth[:2], [2.2, 0.8]) * _smoothstep((np.abs(y - y_line) - 0.3) / 0.3)
    brow_upper = np.zeros(n)
    brow_upper[[70, 63, 105, 66, 107, 300, 293, 334, 296, 336]] = 1.0
    nose_low = _gauss(v[:, :2], [0.0, -1.2], [1.1, 0.9]) * _smoothstep((z - 4.5) / 1.0)
    alar = np.maximum(_gauss(v[:, :2], v[98, :2], 0.7), _gauss(v[:, :2], v[327, :2], 0.7))

    shape = {
        "face_width": field(dx=0.055 * x),
        "face_length": field(dy=0.045 * (y + 0.7)),
        "jaw_width": field(dx=0.07 * x * _smoothstep((-1.0 - y) / 5.0)),
        "chin_length": field(dy=-0.55 * _smoothstep((-5.0 - y) / 3.5)),
        "forehead_height": field(dy=0.5 * _smoothstep((y - 4.5) / 3.5)),
        "eye_spacing": field(dx=0.22 * sx * near_eyes),
        "eye_size": 0.09 * near_eyes[:, None] * (v - eye_centre),
        "eye_height": field(dy=0.22 * np.maximum(near_eyes, near_brows)),
        "nose_length": field(dy=-0.28 * nose_low, dz=0.08 * nose_low),
        "nose_width": field(dx=0.12 * x * np.maximum(alar, _gauss(v[:, :2], [0.0, -1.4], [1.6, 0.6]))),
        "nose_protrusion": field(dz=0.45 * _gauss(v[:, :2], [0.0, -0.6], [0.9, 1.6]) * _smoothstep((z - 5.0))),
        "mouth_width": field(dx=0.09 * x * near_mouth),
        "lip_thickness": field(dy=0.16 * (y - y_line) * outer_lips),
        "brow_height": field(dy=0.25 * near_brows),
        "brow_thickness": field(dy=0.12 * brow_upper),
        "cheek_fullness": field(dx=0.05 * x * _gauss(v[:, 1:2], [-2.0], [2.5]) * _smoothstep((ax - 3.0) / 2.0)),
    }

    # ----------------------------------------------------------------- expressions
    # Jaw: rotation about a horizontal axis behind the mouth (linearised), 0.2 rad at jaw_open = 1, for
    # everything below the mouth line; the line is sharp at the lips and soft on the cheeks.
    width = 0.06 + 0.5 * _smoothstep((ax - 2.2) / 2.5)
    below = 1.0 / (1.0 + np.exp(-(y_line - y) / width))
    pivot_y, pivot_z = -4.0, -4.0
    jaw = field(dy=-0.2 * (z - pivot_z) * below, dz=0.2 * (y - pivot_y) * below)

    def smile(side):
        corner = v[291] if side > 0 else v[61]
        g = _gauss(v[:, :2], corner[:2], 0.95) * (sx * side > -0.2)
        cheek = _gauss(v[:, :2], [side * 3.4, -1.8], 1.3) * (sx * side > 0)
        return field(dx=side * 0.5 * g, dy=1.1 * g + 0.3 * cheek, dz=-0.2 * g + 0.1 * cheek)

    corners = np.maximum(_gauss(v[:, :2], v[61, :2], 1.0), _gauss(v[:, :2], v[291, :2], 1.0))
    inner_brows = np.maximum(_gauss(v[:, :2], [-1.5, 4.6], [1.0, 0.8]), _gauss(v[:, :2], [1.5, 4.6], [1.0, 0.8]))
    brow_band = _smoothstep((y - 3.2) / 0.9) * np.exp(-0.5 * ((y - 4.7) / 1.4) ** 2) * (ax < 6.8)
    gap_r, up_r, lo_r = _eye_fields(v, RIGHT_EYE_UPPER, RIGHT_EYE_LOWER)
    gap_l, up_l, lo_l = _eye_fields(v, LEFT_EYE_UPPER, LEFT_EYE_LOWER)
    gap = np.where(x < 0, gap_r, gap_l)
    w_up = np.where(x < 0, up_r, up_l)
    w_lo = np.where(x < 0, lo_r, lo_l)
    cheeks = np.maximum(_gauss(v[:, :2], [-3.3, 0.8], 1.2), _gauss(v[:, :2], [3.3, 0.8], 1.2)) * (1 - w_up)
    upper_lip = _gauss(v[:, :2], [0.0, -3.6], [2.0, 0.6]) * (y > y_line) * (1.0 - _smoothstep((y + 2.3) / 0.5))
    expression = {
        "jaw_open": jaw,
        "smile_left": smile(+1),
        "smile_right": smile(-1),
        "mouth_stretch": field(dx=0.9 * sx * corners, dy=-0.35 * corners, dz=-0.1 * corners),
        "brow_raise": field(dy=1.2 * brow_band),
        "brow_inner_up": field(dy=1.1 * inner_brows * (y > 3.3)),
        "brow_furrow": field(dx=-0.5 * sx * inner_brows * (y > 3.3), dy=-1.0 * inner_brows * (y > 3.3)),
        "eye_open": field(dy=0.8 * gap * w_up - 0.2 * gap * w_lo),
        "squint": field(dy=0.6 * gap * w_lo + 0.3 * cheeks),
        "upper_lip_raise": field(dy=0.7 * upper_lip + 0.3 * alar, dz=0.05 * upper_lip),
        "lip_press": field(dy=-0.6 * (y - y_line) * outer_lips),
    }
    # Rest pose: the canonical mesh has the mouth slightly open (13-14 = 0.55 cm); close it to 0.08 cm.
    # The bases above were computed on the original mesh, so the jaw still moves the whole lower lip.
    v = v.copy()
    for chain, sign in ((LIPS_INNER_UPPER, 1.0), (LIPS_INNER_LOWER, -1.0)):
        idx = list(chain[1:-1])
        v[idx, 1] = y_line[idx] + sign * 0.04
    v[brow_upper > 0, 1] += 0.12  # bolder brows (the canonical ones are ~2 px thick in a 64 px crop)
    sb = np.stack([shape[k] for k in SHAPE_PARAMS]).astype(np.float64)
    eb = np.stack([expression[k] for k in EXPRESSION_PARAMS]).astype(np.float64)
    for a in (v, sb, eb):
        a.setflags(write=False)
    return FaceTemplate(vertices=v, shape_basis=sb, expression_basis=eb)


def _as_2d(a, width: int, name: str, n: int | None = None) -> np.ndarray:
    a = np.asarray(a, np.float64)
    if a.ndim == 1:
        a = a[None]
    if a.ndim != 2 or a.shape[1] != width:
        raise ValueError(f"{name} must have shape [N, {width}], got {np.shape(a)}")
    if n is not None and a.shape[0] != n:
        raise ValueError(f"{name} has {a.shape[0]} rows, expected {n}")
    return a


def face_points(shape, expression, gaze=None, iris_radius=None) -> np.ndarray:
    """Head-frame 3D landmarks [N, 478, 3] (cm) for shape [N, 16] and expression [N, 11] coefficients.

    ``gaze`` [N, 2] moves the irises (x right, y up; 1 = 0.35 cm / 0.2 cm); ``iris_radius`` [N] in cm
    (default 0.56). Iris discs face forward in the head frame, 0.3 cm in front of the eye corners.
    """
    t = face_template()
    shape = _as_2d(shape, len(SHAPE_PARAMS), "shape")
    n = shape.shape[0]
    expression = _as_2d(expression, len(EXPRESSION_PARAMS), "expression", n)
    gaze = np.zeros((n, 2)) if gaze is None else _as_2d(gaze, 2, "gaze", n)
    r = np.full(n, IRIS_RADIUS_CM) if iris_radius is None else np.broadcast_to(np.asarray(iris_radius, np.float64), (n,))
    mesh = (t.vertices[None] + np.einsum("nk,kvc->nvc", shape, t.shape_basis)
            + np.einsum("nk,kvc->nvc", expression, t.expression_basis))
    irises = []
    for a, b in ((33, 133), (362, 263)):
        c = 0.5 * (mesh[:, a] + mesh[:, b]) + np.array([0.0, 0.04, 0.3])
        c = c + np.concatenate([gaze * np.array([0.35, 0.2]), np.zeros((n, 1))], axis=1)
        off = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [-1, 0, 0], [0, -1, 0]], np.float64)
        irises.append(c[:, None] + off[None] * r[:, None, None])
    return np.concatenate([mesh] + irises, axis=1)


def project(points, head_pose, center=None, scale=None) -> np.ndarray:
    """Rotates head-frame points [N, P, 3] (cm) by the head pose and projects them (scaled orthographic).

    ``center`` [N, 2] is the image position of the head-frame origin and ``scale`` [N] the size of 1 cm,
    both in units of the image side (defaults :data:`DEFAULT_CENTER`, :data:`DEFAULT_SCALE`). Returns
    MediaPipe-style landmarks [N, P, 3] float32: x, y in [0, 1] of the image, z relative depth
    (smaller = closer), in the units of x.
    """
    p = np.asarray(points, np.float64)
    if p.ndim != 3 or p.shape[2] != 3:
        raise ValueError(f"points must have shape [N, P, 3], got {p.shape}")
    n = p.shape[0]
    r = rotation_from_pose(_as_2d(head_pose, 3, "head_pose"))
    if r.shape[0] != n:
        raise ValueError(f"head_pose has {r.shape[0]} rows, points {n}")
    c = np.broadcast_to(np.asarray(DEFAULT_CENTER if center is None else center, np.float64), (n, 2))
    s = np.broadcast_to(np.asarray(DEFAULT_SCALE if scale is None else scale, np.float64), (n,))
    q = np.einsum("nij,npj->npi", r, p)
    out = np.stack([c[:, None, 0] + s[:, None] * q[..., 0], c[:, None, 1] - s[:, None] * q[..., 1],
                    -s[:, None] * q[..., 2]], -1)
    return out.astype(np.float32)
