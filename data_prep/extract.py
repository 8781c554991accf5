"""Per-image CPU stage (runs in worker processes): decode, detect landmarks, pick the face, align, crop.

For every input it returns a plain dict (picklable, no exceptions escape):

* skipped: ``{"image_id", "status": "skipped", "reason", "detail"}``;
* ok: ``{"image_id", "status": "ok", "image", "arcface_crop", "emonet_crop", "landmarks", "head_pose",
  "meta"}`` where ``image`` is the FFHQ-style aligned crop [R, R, 3] uint8, ``arcface_crop`` the 112x112
  ArcFace crop, ``emonet_crop`` the 256x256 EmoNet input crop, ``landmarks`` [478, 3] float32 in the
  aligned crop's frame and ``meta`` the JSON-serialisable facts written to the manifest.

Detection, alignment and crops are :mod:`facecrafter_jax.face.analysis` (the same path ``sample.py`` and the
evaluation analysers use); this module adds data_prep's policy: the minimum image / face size and the
requirement of a head pose, with skip reasons for the manifest.
"""

from __future__ import annotations

import os
import traceback
from dataclasses import asdict, dataclass

from facecrafter_jax.face.analysis import FaceAnalyser, aligned_face, arcface_crop, emonet_crop
from facecrafter_jax.face.emotion import DEFAULT_EMONET_CROP_SCALE
from facecrafter_jax.face.images import MIN_SIDE, SkipImage, load_image

__all__ = ["ExtractSettings", "FaceExtractor", "init_worker", "process_in_worker"]


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
    emonet_crop_scale: float = DEFAULT_EMONET_CROP_SCALE

    def __post_init__(self):
        if self.resolution < 8 or self.resolution % 8:
            raise ValueError(f"resolution must be a positive multiple of 8, got {self.resolution}")
        if self.num_faces < 2:
            raise ValueError(f"num_faces must be >= 2 so that every face is seen (largest-face policy), got {self.num_faces}")
        if not 0.2 <= self.emonet_crop_scale <= 2.0:
            raise ValueError(f"emonet_crop_scale must be in [0.2, 2], got {self.emonet_crop_scale}")


class FaceExtractor:
    """Decode + landmark + align one image. Holds a MediaPipe landmarker (one per process)."""

    def __init__(self, landmarker_path: str | os.PathLike, settings: ExtractSettings):
        self.settings = settings
        self.analyser = FaceAnalyser(landmarker_path, num_faces=settings.num_faces)

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
        face = self.analyser.detect(rgb)
        if face is None:
            raise SkipImage("no_face", "the face landmarker found no face")
        if not face.has_pose:
            raise SkipImage("no_pose", "the landmarker returned no facial transformation matrix")
        aligned = aligned_face(rgb, face, s.resolution)
        if aligned.source_side < s.min_side:
            raise SkipImage("face_too_small", f"the aligned crop covers {aligned.source_side:.0f} source px "
                                              f"(< {s.min_side})")
        pose = face.head_pose()
        info = face.info()
        meta = {
            "width": face.width,
            "height": face.height,
            **{k: info[k] for k in ("num_faces", "face_index", "face_selection", "face_box", "kps5")},
            "crop_matrix": aligned.matrix[:2].tolist(),  # full precision: crops can be reproduced exactly
            "head_pose": [round(float(v), 3) for v in pose],
        }
        return {"image_id": image_id, "status": "ok", "image": aligned.image, "arcface_crop": arcface_crop(rgb, face),
                "emonet_crop": emonet_crop(rgb, face, s.emonet_crop_scale), "landmarks": aligned.landmarks,
                "head_pose": pose, "meta": meta}

    def close(self):
        self.analyser.close()


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
