"""Per-image CPU stage (runs in worker processes): decode, detect landmarks, pick the face, align, crop.

For every input it returns a plain dict (picklable, no exceptions escape):

* skipped: ``{"image_id", "status": "skipped", "reason", "detail"}``;
* ok: ``{"image_id", "status": "ok", "image", "arcface_crop", "emonet_crop", "landmarks", "head_pose",
  "meta"}`` where ``image`` is the FFHQ-style aligned crop [R, R, 3] uint8, ``arcface_crop`` the 112x112
  ArcFace crop, ``emonet_crop`` the 256x256 EmoNet input crop, ``landmarks`` [478, 3] float32 in the
  aligned crop's frame and ``meta`` the JSON-serialisable facts written to the manifest.

Stored landmarks are the detected landmarks *transformed* into the aligned crop (not re-detected on it):
the transform is exact and cheap, it cannot fail on a crop where the detector would miss the face (small
resolutions, faces near the crop border), and it keeps landmarks, ArcFace crop and image crop consistent
by construction. x, y are divided by the crop side (so they are in [0, 1] inside the crop, like
MediaPipe's normalised output); z, which MediaPipe scales like x (by the image width), is multiplied by
the source width and the similarity scale and divided by the crop side, i.e. it stays in the same units
as x.
"""

from __future__ import annotations

import os
import traceback
from dataclasses import asdict, dataclass

import numpy as np

from data_prep.align import arcface_template, ffhq_template, similarity_scale, transform_points, umeyama, warp_affine
from data_prep.images import MIN_SIDE, SkipImage, load_image
from data_prep.landmarks import FaceLandmarker, five_points, head_pose_from_matrix, select_largest_face

__all__ = ["ExtractSettings", "FaceExtractor", "EMONET_SIZE", "init_worker", "process_in_worker"]

EMONET_SIZE = 256


@dataclass(frozen=True)
class ExtractSettings:
    """Settings of the CPU stage (all recorded in ``dataset.json`` metadata).

    Attributes:
        resolution: side of the FFHQ-style aligned crop (the training image).
        min_side: images with a shorter side below this are skipped (``too_small``); a face whose FFHQ
            crop would cover fewer source pixels than this is skipped (``face_too_small``).
        num_faces: maximum faces the landmarker reports (the largest is used).
        emonet_crop_scale: side of the EmoNet crop relative to the FFHQ crop (same centre and rotation).
            EmoNet was trained on AffectNet face crops, which are tighter than FFHQ framing.
    """

    resolution: int = 512
    min_side: int = MIN_SIDE
    num_faces: int = 5
    emonet_crop_scale: float = 0.75

    def __post_init__(self):
        if self.resolution < 8 or self.resolution % 8:
            raise ValueError(f"resolution must be a positive multiple of 8, got {self.resolution}")
        if self.num_faces < 2:
            raise ValueError(f"num_faces must be >= 2 so that every face is seen (largest-face policy), got {self.num_faces}")
        if not 0.2 <= self.emonet_crop_scale <= 2.0:
            raise ValueError(f"emonet_crop_scale must be in [0.2, 2], got {self.emonet_crop_scale}")


def emonet_template(scale: float) -> np.ndarray:
    """EmoNet crop template: the FFHQ template scaled by 1/``scale`` about the crop centre, at 256 px."""
    t = ffhq_template(1.0)
    return ((t - 0.5) / scale + 0.5) * EMONET_SIZE


class FaceExtractor:
    """Decode + landmark + align one image. Holds a MediaPipe landmarker (one per process)."""

    def __init__(self, landmarker_path: str | os.PathLike, settings: ExtractSettings):
        self.settings = settings
        self.landmarker = FaceLandmarker(landmarker_path, num_faces=settings.num_faces)
        self._t_arc = arcface_template()
        self._t_ffhq = ffhq_template(settings.resolution)
        self._t_emo = emonet_template(settings.emonet_crop_scale)

    def __call__(self, root: str, image_id: str) -> dict:
        try:
            return self._process(os.path.join(root, image_id), image_id)
        except SkipImage as s:
            return {"image_id": image_id, "status": "skipped", "reason": s.reason, "detail": s.detail}
        except Exception as e:  # never let one image stop the run
            return {"image_id": image_id, "status": "skipped", "reason": "error",
                    "detail": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc(limit=5)}

    def _process(self, path: str, image_id: str) -> dict:
        s = self.settings
        rgb = load_image(path, min_side=s.min_side)
        h, w = rgb.shape[:2]
        faces = self.landmarker.detect(rgb)
        if not faces:
            raise SkipImage("no_face", "the face landmarker found no face")
        idx = select_largest_face(faces, w, h)
        face = faces[idx]
        if not np.all(np.isfinite(face.matrix)):
            raise SkipImage("no_pose", "the landmarker returned no facial transformation matrix")
        xy = face.pixel_xy(w, h)
        kps = five_points(xy)

        m_ffhq = umeyama(kps, self._t_ffhq)
        scale = similarity_scale(m_ffhq)  # crop px per source px
        if s.resolution / scale < s.min_side:
            raise SkipImage("face_too_small", f"the aligned crop covers {s.resolution / scale:.0f} source px "
                                              f"(< {s.min_side})")
        m_arc = umeyama(kps, self._t_arc)
        m_emo = umeyama(kps, self._t_emo)

        image = warp_affine(rgb, m_ffhq, s.resolution)
        arc_crop = warp_affine(rgb, m_arc, 112, antialias=False)
        emo_crop = warp_affine(rgb, m_emo, EMONET_SIZE)

        lm = np.empty_like(face.landmarks, dtype=np.float32)
        lm[:, :2] = transform_points(m_ffhq, xy) / s.resolution
        lm[:, 2] = face.landmarks[:, 2] * (w * scale / s.resolution)
        pose = head_pose_from_matrix(face.matrix)

        meta = {
            "width": w,
            "height": h,
            "num_faces": len(faces),
            "face_index": idx,
            "face_selection": "largest",
            "face_box": [round(v, 2) for v in face.box(w, h)],
            "kps5": np.round(kps, 3).tolist(),
            "crop_matrix": m_ffhq[:2].tolist(),  # full precision: crops can be reproduced exactly
            "head_pose": [round(float(v), 3) for v in pose],
        }
        return {"image_id": image_id, "status": "ok", "image": image, "arcface_crop": arc_crop,
                "emonet_crop": emo_crop, "landmarks": lm, "head_pose": pose, "meta": meta}

    def close(self):
        self.landmarker.close()


# ------------------------------------------------------------------ worker-process entry points
_WORKER: FaceExtractor | None = None
_ROOT: str | None = None


def init_worker(landmarker_path: str, settings: dict, root: str) -> None:
    """Pool initializer: one landmarker per worker process."""
    global _WORKER, _ROOT
    _WORKER = FaceExtractor(landmarker_path, ExtractSettings(**settings))
    _ROOT = root


def process_in_worker(image_id: str) -> dict:
    assert _WORKER is not None and _ROOT is not None, "init_worker was not called in this process"
    return _WORKER(_ROOT, image_id)


def settings_dict(settings: ExtractSettings) -> dict:
    return asdict(settings)
