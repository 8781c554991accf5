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

Head pose from the facial transformation matrix: :func:`facecrafter_jax.face.geometry.head_pose_from_matrix`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from .vocabulary import NUM_LANDMARKS

__all__ = ["Face", "FaceLandmarker", "FIVE_POINT_INDICES", "five_points", "select_largest_face"]

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
