"""The ``real`` analyser backend: MediaPipe face landmarker + ArcFace ONNX + EmoNet, through the one face-analysis
path data_prep and sample.py use (:mod:`facecrafter_jax.face.analysis`), so generated images are measured on the
same crops as the training data."""

from __future__ import annotations

import os

import numpy as np

from facecrafter_jax.errors import ConfigError
from facecrafter_jax.face.analysis import FaceAnalyser, aligned_face, arcface_crop, emonet_crop
from facecrafter_jax.face.emotion import DEFAULT_EMONET_CROP_SCALE
from facecrafter_jax.face.vocabulary import ID_DIM, NUM_LANDMARKS

from .analysers import Analysers, register_backend

__all__ = ["RealAnalysers", "REFERENCE_POSE_SIDE"]

REFERENCE_POSE_SIDE = 256  # minimum side of the aligned crop on which a photo's pose target is detected


class RealAnalysers(Analysers):
    """The real analysers, on the same detection and crops as the training data (:mod:`facecrafter_jax.face`).

    * faces: MediaPipe face landmarker (``num_faces=5``, the largest face is used, as in data_prep);
    * ``identity``: five points -> 112x112 ArcFace crop -> ArcFace ONNX, L2-normalised;
    * ``landmarks``: the detected 478 landmarks of the image as MediaPipe returns them (normalised by the
      image size; generated images are already FFHQ-style aligned crops, so they are directly comparable to
      the stored landmarks of the records), head pose from the facial transformation matrix;
    * ``emotion``: the 256x256 EmoNet crop (``emonet_crop_scale``) -> EmoNet (Flax port, official 8-class
      checkpoint), softmax probabilities, valence and arousal clipped to [-1, 1];
    * ``reference_landmarks``: landmarks of a photo mapped into the FFHQ-style aligned crop of side ``size``
      (:func:`facecrafter_jax.face.analysis.aligned_face`, as data_prep stores them), and the head pose detected
      *on that aligned crop* (rendered at >= 256 px): MediaPipe's pose depends on the framing, so only a pose
      measured on the same framing as the generated images is comparable (the records keep the photo's pose).

    Detections are cached per image content, so the three analyses of one image run MediaPipe once.
    """

    name = "real"

    def __init__(self, landmarker: str, arcface: str | None = None, emonet: str | None = None, *,
                 batch_size: int = 16, emonet_crop_scale: float = DEFAULT_EMONET_CROP_SCALE):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.paths = {"landmarker": landmarker, "arcface": arcface, "emonet": emonet}
        self.batch_size = batch_size
        self.emonet_crop_scale = emonet_crop_scale
        try:
            self._faces = FaceAnalyser(landmarker, num_faces=5, cache_size=4096)
        except ValueError as e:
            raise ValueError(f"--landmarker {e}") from None
        try:
            self._load_models(arcface, emonet, batch_size)
        except BaseException:
            self._faces.close()  # MediaPipe complains at exit about landmarkers left open
            raise

    def _load_models(self, arcface, emonet, batch_size):
        caps = {"landmarks", "reference_landmarks"}
        self._arcface = self._emonet = None
        if arcface is not None:
            from facecrafter_jax.face.arcface import ArcFaceONNX

            self._arcface = ArcFaceONNX(arcface)
            caps.add("identity")
        if emonet is not None:
            from facecrafter_jax.face.emotion import EmotionModel

            try:
                self._emonet = EmotionModel(emonet, batch_size)
            except FileNotFoundError:
                raise
            except ValueError as e:  # the weight readers' one-line errors: say which flag gave the file
                raise ValueError(f"--emonet {emonet}: {e}") from None
            except Exception as e:  # pickle / key errors from a file that is not an EmoNet checkpoint
                raise ValueError(f"--emonet {emonet}: cannot load as an EmoNet checkpoint "
                                 f"({type(e).__name__}: {e})") from None
            caps.add("emotion")
        self.capabilities = frozenset(caps)

    def _crops(self, images, crop):
        """``crop(image, face)`` of every image with a face, and the found mask."""
        crops, found = [], []
        for img in images:
            face = self._faces.detect(img)
            found.append(face is not None)
            if face is not None:
                crops.append(crop(np.ascontiguousarray(img), face))
        return crops, np.array(found, bool)

    def _batched(self, model, crops):
        return np.concatenate([model(np.stack(crops[i:i + self.batch_size]))
                               for i in range(0, len(crops), self.batch_size)])

    # ---------------------------------------------------------------- analyses
    def identity(self, images):
        if self._arcface is None:
            return super().identity(images)
        crops, found = self._crops(images, arcface_crop)
        out = np.full((len(found), ID_DIM), np.nan, np.float64)
        if crops:
            out[found] = self._batched(self._arcface, crops)
        return out

    def landmarks(self, images):
        lmk = np.full((len(images), NUM_LANDMARKS, 3), np.nan, np.float64)
        pose = np.full((len(images), 3), np.nan, np.float64)
        for i, img in enumerate(images):
            face = self._faces.detect(img)
            if face is None:
                continue
            lmk[i] = face.face.landmarks
            pose[i] = face.head_pose()
        return lmk, pose

    def emotion(self, images):
        if self._emonet is None:
            return super().emotion(images)
        crops, found = self._crops(images, lambda img, face: emonet_crop(img, face, self.emonet_crop_scale))
        out = np.full((len(found), 10), np.nan, np.float64)
        if crops:
            out[found] = self._batched(self._emonet, crops)
        return out[:, :8], out[:, 8], out[:, 9]

    def reference_landmarks(self, image, size):
        face = self._faces.detect(image)
        if face is None:
            return None
        lm = aligned_face(image, face, size, with_image=False).landmarks.astype(np.float64)
        # Head pose: MediaPipe's pose depends on where the face sits in the frame (perspective camera model),
        # so the photo's own pose does not transfer to a crop (the astronaut: pitch 14.9 deg on the photo,
        # 6.4 on her aligned crop). The target is the pose detected on the photo's aligned crop, at least
        # REFERENCE_POSE_SIDE px so that detection does not suffer from tiny crops (same framing at any size).
        crop = aligned_face(image, face, max(size, REFERENCE_POSE_SIDE)).image
        cface = self._faces.detect(crop)
        if cface is None or not cface.has_pose:
            return lm, np.full(3, np.nan)
        return lm, cface.head_pose().astype(np.float64)

    def describe(self):
        d = super().describe()
        d.update({k: (os.path.abspath(v) if v else None) for k, v in self.paths.items()})
        d.update(batch_size=self.batch_size, emonet_crop_scale=self.emonet_crop_scale, face_selection="largest")
        return d

    def close(self):
        self._faces.close()


def _build_real(options: dict) -> Analysers:
    if options.get("landmarker") is None:
        raise ConfigError("--landmarker is required by the real analysers (every analysis starts from its face "
                          "detection and alignment)")
    extra = dict(options.get("extra") or {})
    kw = {}
    if "emonet_crop_scale" in extra:
        try:
            kw["emonet_crop_scale"] = float(extra.pop("emonet_crop_scale"))
        except ValueError:
            raise ConfigError("--analyser-option emonet_crop_scale must be a number") from None
    if extra:
        raise ConfigError(f"--analyser-option: unknown option(s) {sorted(extra)} for the real analysers "
                          "(known: emonet_crop_scale)")
    try:
        return RealAnalysers(options["landmarker"], options.get("arcface"), options.get("emonet"),
                             batch_size=options.get("batch_size", 16), **kw)
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(str(e)) from None


register_backend("real", _build_real, help="MediaPipe landmarker + ArcFace ONNX + EmoNet (the crops of data_prep)")
