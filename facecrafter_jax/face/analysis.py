"""One face-analysis path for training data, sampling and evaluation: detect -> largest face -> 5 points -> crops.

:class:`FaceAnalyser` wraps the MediaPipe face landmarker; :meth:`FaceAnalyser.detect` returns the largest
face of an RGB image as a :class:`DetectedFace` (or None). The crops are functions of the image and that
face, so data_prep (training records), ``sample.py`` (``--id-image`` / ``--landmarks-from``) and the real
evaluation analysers cut exactly the same pixels:

* :func:`arcface_crop`: 112x112, five-point similarity to the ArcFace template, plain bilinear (as
  insightface's ``norm_crop``);
* :func:`emonet_crop`: 256x256, the FFHQ crop's centre and rotation scaled by ``crop_scale``;
* :func:`aligned_face`: the FFHQ-style aligned crop of side ``resolution`` (the training image) and the 478
  landmarks *transformed* into it (exact and cheap, and it cannot fail where a detector on the crop would):
  x, y divided by the crop side, z (which MediaPipe scales like x, by the image width) multiplied by the source
  width and the similarity scale and divided by the crop side, so it stays in the units of x.

Coordinates are continuous pixel coordinates (see :mod:`facecrafter_jax.face.align`).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import numpy as np

from .align import (ARCFACE_SIZE, arcface_template, ffhq_template, similarity_scale, transform_points, umeyama,
                    warp_affine)
from .emotion import DEFAULT_EMONET_CROP_SCALE, EMONET_SIZE, emonet_template
from .geometry import head_pose_from_matrix
from .images import MIN_SIDE
from .landmarker import Face, FaceLandmarker, five_points, select_largest_face

__all__ = ["DetectedFace", "AlignedFace", "FaceAnalyser", "arcface_crop", "emonet_crop", "aligned_face",
           "open_landmarker", "identity_from_photo", "landmarks_from_photo"]


@dataclass
class DetectedFace:
    """The face chosen in an image (the largest of ``num_faces``) and the image's size."""

    face: Face
    width: int
    height: int
    index: int
    num_faces: int

    @property
    def pixel_xy(self) -> np.ndarray:
        """[478, 2] landmark positions in continuous pixel coordinates."""
        return self.face.pixel_xy(self.width, self.height)

    @property
    def kps5(self) -> np.ndarray:
        """[5, 2] alignment points (eye centres, nose tip, mouth corners) in pixels."""
        return five_points(self.pixel_xy)

    @property
    def has_pose(self) -> bool:
        return bool(np.all(np.isfinite(self.face.matrix)))

    def head_pose(self) -> np.ndarray:
        """(yaw, pitch, roll) degrees [3] float32 from MediaPipe's transformation matrix (NaN without one)."""
        return head_pose_from_matrix(self.face.matrix) if self.has_pose else np.full(3, np.nan, np.float32)

    def info(self) -> dict:
        """JSON-able facts about the detection (recorded by data_prep's manifest and samples.json)."""
        return {"num_faces": self.num_faces, "face_index": self.index, "face_selection": "largest",
                "face_box": [round(v, 2) for v in self.face.box(self.width, self.height)],
                "kps5": np.round(self.kps5, 3).tolist(), "image_size": [self.width, self.height]}


@dataclass
class AlignedFace:
    """The FFHQ-style aligned crop of a detected face.

    ``matrix``: 3x3 source -> crop similarity; ``landmarks`` [478, 3] float32 in the crop's frame (x, y in
    [0, 1]); ``source_side``: how many source pixels the crop's side covers (its resolution / scale);
    ``image``: the crop [R, R, 3] uint8 (None when only the landmarks were asked for).
    """

    matrix: np.ndarray
    landmarks: np.ndarray
    source_side: float
    image: np.ndarray | None = None


def arcface_crop(image: np.ndarray, face: DetectedFace) -> np.ndarray:
    """The 112x112 ArcFace input crop of ``face`` (no antialiasing, like insightface)."""
    m = umeyama(face.kps5, arcface_template())
    return warp_affine(np.ascontiguousarray(image), m, ARCFACE_SIZE, antialias=False)


def emonet_crop(image: np.ndarray, face: DetectedFace, crop_scale: float = DEFAULT_EMONET_CROP_SCALE) -> np.ndarray:
    """The 256x256 EmoNet input crop of ``face``."""
    m = umeyama(face.kps5, emonet_template(crop_scale))
    return warp_affine(np.ascontiguousarray(image), m, EMONET_SIZE)


def aligned_face(image: np.ndarray, face: DetectedFace, resolution: int, *, with_image: bool = True) -> AlignedFace:
    """The FFHQ-style crop of side ``resolution`` and the face's landmarks in its frame (module docstring)."""
    xy = face.pixel_xy
    m = umeyama(five_points(xy), ffhq_template(resolution))
    scale = similarity_scale(m)  # crop px per source px
    lm = np.empty((len(xy), 3), np.float32)
    lm[:, :2] = transform_points(m, xy) / resolution
    lm[:, 2] = face.face.landmarks[:, 2] * (face.width * scale / resolution)
    crop = warp_affine(np.ascontiguousarray(image), m, resolution) if with_image else None
    return AlignedFace(matrix=m, landmarks=lm, source_side=resolution / scale, image=crop)


def open_landmarker(path: str | os.PathLike, num_faces: int = 5) -> FaceLandmarker:
    """A MediaPipe face landmarker; a file that is not a landmarker bundle raises ``ValueError`` naming it."""
    try:
        return FaceLandmarker(path, num_faces=num_faces)
    except FileNotFoundError:
        raise
    except Exception as e:  # MediaPipe raises RuntimeError for a file that is not a landmarker bundle
        raise ValueError(f"{os.fspath(path)}: cannot open as a MediaPipe face landmarker ({e})") from None


class FaceAnalyser:
    """Detects the largest face of an image (MediaPipe, ``num_faces`` > 1 so that every face is seen).

    ``cache_size`` > 0 keeps that many detections keyed by image content, so that several analyses of one
    image (identity, landmarks, emotion) run the landmarker once. A context manager; call :meth:`close`.
    """

    def __init__(self, landmarker: str | os.PathLike, *, num_faces: int = 5, cache_size: int = 0):
        if num_faces < 2:
            raise ValueError(f"num_faces must be >= 2 so that every face is seen (largest-face policy), got {num_faces}")
        self.path = os.fspath(landmarker)
        self.landmarker = open_landmarker(landmarker, num_faces)
        self.cache_size = int(cache_size)
        self._cache: dict[bytes, DetectedFace | None] = {}

    def detect(self, image: np.ndarray) -> DetectedFace | None:
        """The largest face of a uint8 RGB image [H, W, 3], or None when there is none."""
        img = np.ascontiguousarray(image)
        if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
            raise ValueError(f"expected a uint8 RGB image [H, W, 3], got {img.dtype} {img.shape}")
        key = None
        if self.cache_size > 0:
            key = hashlib.sha1(img.tobytes() + str(img.shape).encode()).digest()
            if key in self._cache:
                return self._cache[key]
        h, w = img.shape[:2]
        faces = self.landmarker.detect(img)
        found = None
        if faces:
            idx = select_largest_face(faces, w, h)
            found = DetectedFace(faces[idx], w, h, idx, len(faces))
        if key is not None:
            if len(self._cache) >= self.cache_size:
                self._cache.clear()
            self._cache[key] = found
        return found

    def close(self) -> None:
        self.landmarker.close()
        self._cache.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# --------------------------------------------------------------------------------------------
# A photo's identity and landmarks (sample.py --id-image / --landmarks-from)
# --------------------------------------------------------------------------------------------
def _detect_photo(image: np.ndarray, landmarker: str, what: str) -> DetectedFace:
    from facecrafter_jax.errors import DataError

    try:
        analyser = FaceAnalyser(landmarker)
    except (FileNotFoundError, ValueError) as e:
        raise DataError(f"--landmarker {e}") from None
    with analyser:
        face = analyser.detect(image)
    if face is None:
        raise DataError(f"{what}: no face found")
    return face


def identity_from_photo(image: np.ndarray, landmarker: str, arcface: str, *,
                        what: str = "photo") -> tuple[np.ndarray, dict]:
    """The largest face of a photo -> (L2-normalised ArcFace embedding [512] float32, detection info).

    The same detection and 112x112 crop as data_prep's records. ``what`` names the photo in errors
    (:class:`~facecrafter_jax.errors.DataError`: no face, unusable model files).
    """
    from facecrafter_jax.errors import DataError

    from .arcface import ArcFaceONNX

    try:
        model = ArcFaceONNX(arcface)
    except (FileNotFoundError, ValueError) as e:
        raise DataError(f"--arcface: {e}") from None
    face = _detect_photo(image, landmarker, what)
    emb = model(arcface_crop(image, face)[None])[0]
    return emb.astype(np.float32), face.info()


def landmarks_from_photo(image: np.ndarray, landmarker: str, *, resolution: int = 512, min_side: int = MIN_SIDE,
                         what: str = "photo") -> tuple[np.ndarray, dict]:
    """The largest face of a photo -> (its 478 landmarks [478, 3] float32 in the FFHQ-style aligned crop's
    frame, exactly as data_prep stores them, detection info with the head pose).

    A face whose aligned crop would cover fewer than ``min_side`` source pixels is rejected, as data_prep does.
    """
    from facecrafter_jax.errors import DataError

    face = _detect_photo(image, landmarker, what)
    if not face.has_pose:
        raise DataError(f"{what}: the landmarker returned no head pose for the face")
    aligned = aligned_face(image, face, resolution, with_image=False)
    if aligned.source_side < min_side:
        raise DataError(f"{what}: face too small (the aligned crop covers {aligned.source_side:.0f} source px, "
                        f"< {min_side})")
    info = face.info()
    info["head_pose"] = [round(float(v), 3) for v in face.head_pose()]
    return aligned.landmarks, info
