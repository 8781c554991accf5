"""MediaPipe Face Landmarker (Tasks API), face selection, five alignment points and head pose.

The landmarker is created per process (MediaPipe task objects cannot be pickled). It runs in IMAGE mode
with ``num_faces`` > 1 so that every face of a photo is found, and returns for each face 478 landmarks
(x, y normalised by the image width / height, z a relative depth on roughly the same scale as x) and the
4x4 facial transformation matrix (canonical face model -> camera, metric units, rotation orthonormal).

Face selection policy: when several faces are found, the one with the largest landmark bounding-box area
(in pixels) is used; the manifest records ``num_faces`` and the chosen ``face_index``.

Five alignment points from the 478 landmarks (``FIVE_POINT_INDICES``), in the order of the ArcFace template
(image-left first, as the template is defined for an unmirrored photo):

* image-left eye centre: mean of eye corners 33 and 133 (the subject's right eye);
* image-right eye centre: mean of eye corners 362 and 263 (the subject's left eye);
* nose tip: landmark 4 (pronasale, the most protruding point of the mesh);
* image-left mouth corner: 61; image-right mouth corner: 291.

Eye centres use the eye corners, not the iris landmarks (468 / 473), so gaze direction does not move the
alignment.

Head pose (``head_pose_from_matrix``): yaw, pitch, roll in degrees from the rotation part R of the facial
transformation matrix, decomposed as ``R = Rz(roll) @ Ry(yaw) @ Rx(pitch)`` in MediaPipe's camera frame
(x to the image right, y up, z towards the viewer). Signs: yaw > 0 = face turned towards the image right
(the subject's left), pitch > 0 = face tilted down, roll > 0 = head rotated counter-clockwise as seen in the
image. Mirroring an image negates yaw and roll and keeps pitch. Note that the canonical face model is not
exactly "frontal" for a person looking into the camera: a frontal photo gives pitch of about +10..15 deg.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

__all__ = [
    "Face", "FaceLandmarker", "FIVE_POINT_INDICES", "five_points", "select_largest_face", "head_pose_from_matrix",
    "rotation_from_head_pose", "NUM_LANDMARKS",
]

NUM_LANDMARKS = 478
FIVE_POINT_INDICES = ((33, 133), (362, 263), (4,), (61,), (291,))


@dataclass
class Face:
    landmarks: np.ndarray  # [478, 3] float32: x, y normalised to [0, 1] by width / height, z relative depth
    matrix: np.ndarray  # [4, 4] float64 facial transformation matrix

    def pixel_xy(self, width: int, height: int) -> np.ndarray:
        """Landmark x, y in continuous pixel coordinates of the image they were detected in."""
        return self.landmarks[:, :2].astype(np.float64) * np.array([width, height], np.float64)

    def box(self, width: int, height: int) -> tuple[float, float, float, float]:
        xy = self.pixel_xy(width, height)
        return (float(xy[:, 0].min()), float(xy[:, 1].min()), float(xy[:, 0].max()), float(xy[:, 1].max()))

    def area(self, width: int, height: int) -> float:
        x0, y0, x1, y1 = self.box(width, height)
        return max(0.0, x1 - x0) * max(0.0, y1 - y0)


def five_points(xy: np.ndarray) -> np.ndarray:
    """[478, 2] landmark pixel coordinates -> [5, 2] alignment points (see :data:`FIVE_POINT_INDICES`)."""
    xy = np.asarray(xy, np.float64)
    return np.stack([xy[list(idx)].mean(axis=0) for idx in FIVE_POINT_INDICES])


def select_largest_face(faces: list[Face], width: int, height: int) -> int:
    """Index of the face with the largest landmark bounding box (ties: the first)."""
    if not faces:
        raise ValueError("no faces to select from")
    areas = [f.area(width, height) for f in faces]
    return int(np.argmax(areas))


def _rot_x(a):
    c, s = np.cos(a), np.sin(a)
    return np.array([[1, 0, 0], [0, c, -s], [0, s, c]])


def _rot_y(a):
    c, s = np.cos(a), np.sin(a)
    return np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])


def _rot_z(a):
    c, s = np.cos(a), np.sin(a)
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])


def rotation_from_head_pose(yaw: float, pitch: float, roll: float) -> np.ndarray:
    """The 3x3 rotation ``Rz(roll) @ Ry(yaw) @ Rx(pitch)`` for angles in degrees (inverse of the decomposition)."""
    y, p, r = np.deg2rad([yaw, pitch, roll])
    return _rot_z(r) @ _rot_y(y) @ _rot_x(p)


def head_pose_from_matrix(matrix: np.ndarray) -> np.ndarray:
    """(yaw, pitch, roll) in degrees, float32, from a 4x4 facial transformation matrix (or a 3x3 rotation).

    The rotation block is first projected onto the nearest rotation (SVD), so a matrix carrying a uniform
    scale gives the same angles. At |yaw| = 90 deg (gimbal lock) roll is set to 0.
    """
    m = np.asarray(matrix, np.float64)
    if m.shape not in ((4, 4), (3, 3)):
        raise ValueError(f"expected a 4x4 transformation matrix or a 3x3 rotation, got shape {m.shape}")
    u, _, vt = np.linalg.svd(m[:3, :3])
    r = u @ vt
    if np.linalg.det(r) < 0:
        raise ValueError("facial transformation matrix contains a reflection")
    sy = -r[2, 0]
    yaw = np.arcsin(np.clip(sy, -1.0, 1.0))
    if abs(sy) < 1 - 1e-9:
        pitch = np.arctan2(r[2, 1], r[2, 2])
        roll = np.arctan2(r[1, 0], r[0, 0])
    else:
        roll = 0.0
        pitch = np.arctan2(-r[1, 2], r[1, 1])  # R[1] = (0, cos p, -sin p) for yaw = +-90 and roll = 0
    return np.rad2deg(np.array([yaw, pitch, roll])).astype(np.float32)


class FaceLandmarker:
    """A MediaPipe ``FaceLandmarker`` in IMAGE mode. One instance per process; not picklable.

    Args:
        model_path: a ``face_landmarker.task`` bundle.
        num_faces: maximum faces returned (> 1 so the largest-face policy sees every face).
        min_detection_confidence: face detector threshold (MediaPipe's default 0.5).
    """

    def __init__(self, model_path: str | os.PathLike, num_faces: int = 5, min_detection_confidence: float = 0.5):
        model_path = os.fspath(model_path)
        if not os.path.isfile(model_path):
            raise FileNotFoundError(f"face landmarker model not found: {model_path}")
        if num_faces < 1:
            raise ValueError(f"num_faces must be >= 1, got {num_faces}")
        from mediapipe.tasks.python import BaseOptions, vision

        options = vision.FaceLandmarkerOptions(
            base_options=BaseOptions(model_asset_path=model_path),
            running_mode=vision.RunningMode.IMAGE,
            num_faces=num_faces,
            min_face_detection_confidence=min_detection_confidence,
            output_face_blendshapes=False,
            output_facial_transformation_matrixes=True,
        )
        self._landmarker = vision.FaceLandmarker.create_from_options(options)

    def detect(self, rgb: np.ndarray) -> list[Face]:
        """All faces in a uint8 RGB image [H, W, 3]."""
        import mediapipe as mp

        if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
            raise ValueError(f"expected a uint8 RGB image [H, W, 3], got {rgb.dtype} {rgb.shape}")
        result = self._landmarker.detect(mp.Image(image_format=mp.ImageFormat.SRGB, data=np.ascontiguousarray(rgb)))
        faces = []
        matrices = result.facial_transformation_matrixes or []
        for i, lms in enumerate(result.face_landmarks):
            pts = np.array([[p.x, p.y, p.z] for p in lms], dtype=np.float32)
            if pts.shape != (NUM_LANDMARKS, 3):
                continue  # a model bundle without the iris refinement (468 points) is not supported
            matrix = np.asarray(matrices[i], np.float64) if i < len(matrices) else np.full((4, 4), np.nan)
            faces.append(Face(pts, matrix))
        return faces

    def close(self) -> None:
        if self._landmarker is not None:
            self._landmarker.close()
            self._landmarker = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
