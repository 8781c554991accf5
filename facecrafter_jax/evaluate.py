"""Evaluate folders of generated faces with the FaceCrafter paper's metrics.

Reads the PNGs and samples.json that sample.py writes (one folder per identity / condition, or a folder of
such folders), runs face analysers on every image (ArcFace identity, MediaPipe landmarks and head pose,
EmoNet emotion) and compares them with the targets recorded in samples.json. Writes OUT.json (everything,
including per-image values) and OUT.md (one table row per sample set, one column per metric).

Examples:
  python -m facecrafter_jax.evaluate --samples out/arc2face --samples out/facecrafter \\
      --arcface arcface.onnx --landmarker face_landmarker.task --emonet emonet_8.pth --out results/report
  python -m facecrafter_jax.evaluate --samples out/me --landmarker face_landmarker.task --out report

Sample sets. Each --samples DIR is one set (one table row, named after the folder). DIR holds samples.json
and its images, or its immediate subfolders each do (e.g. one subfolder per identity). From samples.json:
  images[].file                      the generated PNGs (relative to the folder)
  identity.embedding_file            identity target: the conditioning embedding (identity.npy)
  identity.source / identity.path    "image": the photo the identity came from (re-embedded with --arcface
                                     when --id-target is auto or image); "embedding": an .npy
  controls.landmarks                 landmark target: {"file": NPY in the folder} or {"source": "npy",
                                     "path": NPY} ([478, 3], x, y in [0, 1] of the aligned crop, as data_prep)
                                     or {"source": "image", "path": IMG} (landmarks detected on the photo and
                                     mapped into the FFHQ-style aligned crop at the generated image's size,
                                     exactly as data_prep does; head pose detected on that crop);
                                     optional "head_pose": [yaw, pitch, roll] degrees (pose target)
  controls.emotion                   {"name" | "index", "valence", "arousal"}: emotion targets
  images[i].identity / .controls     optional per-image overrides of the two entries above
Images without landmark / emotion controls are "ID-only": their diversity is measured per identity.

Metrics (definitions with formulas in facecrafter_jax.metrics and docs/evaluation.md). Only metrics whose
targets and analysers are present are computed; the others are "-" in the table. Images in which the
analysers find no face are counted (no_face) and left out of the averages; they never stop the run.

Errors are one line `error: ...` on stderr with exit status 2: missing folders, samples.json, images,
model or target files, bad target shapes or values, unknown analyser backend or option are found before any
model is loaded; an identity / landmark target photo without a face stops the run the same way.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import importlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from facecrafter_jax import metrics as M

__all__ = [
    "Analysers", "RealAnalysers", "Backend", "register_backend", "get_backend", "BACKENDS", "PLUGIN_MODULES",
    "CLIError", "SampleSet", "load_sample_set", "evaluate_set", "evaluate", "write_report", "report_markdown",
    "METRIC_COLUMNS", "build_parser", "main",
]

ID_DIM = 512
REFERENCE_POSE_SIDE = 256  # minimum side of the aligned crop on which a photo's pose target is detected
EMOTION_CLASSES = ("neutral", "happy", "sad", "surprise", "fear", "disgust", "anger", "contempt")  # records order
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm", ".pgm", ".pnm")


class CLIError(Exception):
    """A user error: printed as one line ``error: <message>``, exit status 2."""


# ======================================================================================== analysers
class Analysers:
    """The analyser interface the evaluator uses. Subclass it (or duck-type it) for a new backend.

    ``images`` are sequences of uint8 RGB arrays [H, W, 3] (sizes may differ). Each method returns one row
    per image, with NaN rows for images in which no face was found.

    * ``identity(images) -> [N, 512]`` L2-normalised identity embeddings;
    * ``landmarks(images) -> (lmk [N, 478, 3], pose [N, 3])``: landmarks with x, y normalised to [0, 1] by
      the image width / height, z relative depth in the units of x; head pose (yaw, pitch, roll) degrees;
    * ``emotion(images) -> (probs [N, 8], valence [N], arousal [N])``, classes in ``EMOTION_CLASSES`` order;
    * ``reference_landmarks(image, size) -> (lmk [478, 3], pose [3])`` (optional): the landmark / pose
      *target* of a photo, in the frame of a generated image of side ``size`` (real backend: the FFHQ-style
      aligned crop, as in the training records). ``None`` when no face is found.

    ``capabilities`` names the methods that work (subset of identity, landmarks, emotion,
    reference_landmarks); ``describe()`` returns a JSON-able dict recorded in the report.
    """

    name = "base"
    capabilities: frozenset[str] = frozenset()

    def identity(self, images: Sequence[np.ndarray]) -> np.ndarray:
        raise NotImplementedError(f"analysers {self.name!r} have no identity model")

    def landmarks(self, images: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError(f"analysers {self.name!r} have no landmark model")

    def emotion(self, images: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        raise NotImplementedError(f"analysers {self.name!r} have no emotion model")

    def reference_landmarks(self, image: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray] | None:
        raise NotImplementedError(f"analysers {self.name!r} cannot take landmark targets from photos")

    def describe(self) -> dict:
        return {"backend": self.name, "capabilities": sorted(self.capabilities)}

    def close(self) -> None:
        pass


class RealAnalysers(Analysers):
    """The real analysers, built from data_prep's pieces (same detection and crops as the training data).

    * faces: MediaPipe face landmarker (``num_faces=5``, the largest face is used, as in data_prep);
    * ``identity``: five points -> 112x112 ArcFace alignment -> ArcFace ONNX (``data_prep.arcface``),
      L2-normalised;
    * ``landmarks``: the detected 478 landmarks of the image as MediaPipe returns them (normalised by the
      image size; generated images are already FFHQ-style aligned crops, so they are directly comparable to
      data_prep's stored landmarks), head pose from the facial transformation matrix
      (``data_prep.landmarks.head_pose_from_matrix``);
    * ``emotion``: data_prep's 256x256 EmoNet crop (``emonet_crop_scale``) -> EmoNet (Flax port, official
      8-class checkpoint), softmax probabilities, valence and arousal clipped to [-1, 1];
    * ``reference_landmarks``: landmarks of a photo mapped into the FFHQ-style aligned crop of side ``size``
      (data_prep.extract's transform, including its z scaling), and the head pose detected *on that aligned
      crop* (rendered at >= 256 px): MediaPipe's pose depends on the framing, so only a pose measured on the
      same framing as the generated images is comparable (data_prep's records keep the photo's pose).

    Detections are cached per image content, so the three analyses of one image run MediaPipe once.
    """

    name = "real"

    def __init__(self, landmarker: str, arcface: str | None = None, emonet: str | None = None, *,
                 batch_size: int = 16, emonet_crop_scale: float = 0.75):
        from data_prep.landmarks import FaceLandmarker

        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.paths = {"landmarker": landmarker, "arcface": arcface, "emonet": emonet}
        self.batch_size = batch_size
        self.emonet_crop_scale = emonet_crop_scale
        try:
            self._landmarker = FaceLandmarker(landmarker, num_faces=5)
        except FileNotFoundError:
            raise
        except Exception as e:  # MediaPipe raises RuntimeError for a file that is not a landmarker bundle
            raise ValueError(f"--landmarker {landmarker}: cannot open as a MediaPipe face landmarker ({e})") from None
        try:
            self._load_models(arcface, emonet, batch_size)
        except BaseException:
            self._landmarker.close()  # MediaPipe complains at exit about landmarkers left open
            raise
        self._cache: dict[bytes, Any] = {}

    def _load_models(self, arcface, emonet, batch_size):
        caps = {"landmarks", "reference_landmarks"}
        self._arcface = self._emonet = None
        if arcface is not None:
            from data_prep.arcface import ArcFaceONNX

            self._arcface = ArcFaceONNX(arcface)
            caps.add("identity")
        if emonet is not None:
            from data_prep.models import EmotionModel

            try:
                self._emonet = EmotionModel(emonet, batch_size)
            except (FileNotFoundError, ValueError):
                raise
            except Exception as e:  # pickle / key errors from a file that is not an EmoNet checkpoint
                raise ValueError(f"--emonet {emonet}: cannot load as an EmoNet checkpoint "
                                 f"({type(e).__name__}: {e})") from None
            caps.add("emotion")
        self.capabilities = frozenset(caps)

    # ---------------------------------------------------------------- detection
    def _face(self, image: np.ndarray):
        """(Face or None, width, height) of the largest face; cached by image content."""
        from data_prep.landmarks import select_largest_face

        img = np.ascontiguousarray(image)
        if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
            raise ValueError(f"expected uint8 RGB images [H, W, 3], got {img.dtype} {img.shape}")
        key = hashlib.sha1(img.tobytes() + str(img.shape).encode()).digest()
        if key not in self._cache:
            if len(self._cache) > 4096:
                self._cache.clear()
            h, w = img.shape[:2]
            faces = self._landmarker.detect(img)
            self._cache[key] = faces[select_largest_face(faces, w, h)] if faces else None
        return self._cache[key], img.shape[1], img.shape[0]

    def _crops(self, images, template, size: int, antialias: bool):
        from data_prep.align import umeyama, warp_affine
        from data_prep.landmarks import five_points

        crops, found = [], []
        for img in images:
            face, w, h = self._face(img)
            if face is None:
                found.append(False)
                continue
            m = umeyama(five_points(face.pixel_xy(w, h)), template)
            crops.append(warp_affine(np.ascontiguousarray(img), m, size, antialias=antialias))
            found.append(True)
        return crops, np.array(found, bool)

    # ---------------------------------------------------------------- analyses
    def identity(self, images):
        if self._arcface is None:
            return super().identity(images)
        from data_prep.align import arcface_template

        crops, found = self._crops(images, arcface_template(), 112, antialias=False)  # as data_prep / sample.py
        out = np.full((len(found), ID_DIM), np.nan, np.float64)
        if crops:
            emb = np.concatenate([self._arcface(np.stack(crops[i:i + self.batch_size]))
                                  for i in range(0, len(crops), self.batch_size)])
            out[found] = emb
        return out

    def landmarks(self, images):
        from data_prep.landmarks import head_pose_from_matrix

        lmk = np.full((len(images), M.NUM_LANDMARKS, 3), np.nan, np.float64)
        pose = np.full((len(images), 3), np.nan, np.float64)
        for i, img in enumerate(images):
            face, _, _ = self._face(img)
            if face is None:
                continue
            lmk[i] = face.landmarks
            if np.all(np.isfinite(face.matrix)):
                pose[i] = head_pose_from_matrix(face.matrix)
        return lmk, pose

    def emotion(self, images):
        if self._emonet is None:
            return super().emotion(images)
        from data_prep.extract import EMONET_SIZE, emonet_template

        crops, found = self._crops(images, emonet_template(self.emonet_crop_scale), EMONET_SIZE, antialias=True)
        out = np.full((len(found), 10), np.nan, np.float64)
        if crops:
            out[found] = np.concatenate([self._emonet(np.stack(crops[i:i + self.batch_size]))
                                         for i in range(0, len(crops), self.batch_size)])
        return out[:, :8], out[:, 8], out[:, 9]

    def reference_landmarks(self, image, size):
        from data_prep.align import ffhq_template, similarity_scale, transform_points, umeyama, warp_affine
        from data_prep.landmarks import five_points, head_pose_from_matrix

        face, w, h = self._face(image)
        if face is None:
            return None
        xy = face.pixel_xy(w, h)
        kps = five_points(xy)
        m = umeyama(kps, ffhq_template(size))
        lm = np.empty((M.NUM_LANDMARKS, 3), np.float64)
        lm[:, :2] = transform_points(m, xy) / size
        lm[:, 2] = face.landmarks[:, 2].astype(np.float64) * (w * similarity_scale(m) / size)
        # Head pose: MediaPipe's pose depends on where the face sits in the frame (perspective camera model),
        # so the photo's own pose does not transfer to a crop (the astronaut: pitch 14.9 deg on the photo,
        # 6.4 on her aligned crop). The target is the pose detected on the photo's aligned crop, at least
        # REFERENCE_POSE_SIDE px so that detection does not suffer from tiny crops (same framing at any size).
        side = max(size, REFERENCE_POSE_SIDE)
        crop = warp_affine(np.ascontiguousarray(image), umeyama(kps, ffhq_template(side)), side)
        cface, _, _ = self._face(crop)
        if cface is None or not np.all(np.isfinite(cface.matrix)):
            return lm, np.full(3, np.nan)
        return lm, head_pose_from_matrix(cface.matrix).astype(np.float64)

    def describe(self):
        d = super().describe()
        d.update({k: (os.path.abspath(v) if v else None) for k, v in self.paths.items()})
        d.update(batch_size=self.batch_size, emonet_crop_scale=self.emonet_crop_scale, face_selection="largest")
        return d

    def close(self):
        self._landmarker.close()
        self._cache.clear()


# ---------------------------------------------------------------------------------------- backend registry
@dataclass(frozen=True)
class Backend:
    """An analyser backend: ``build(options) -> Analysers``. ``options`` holds ``arcface``, ``landmarker``,
    ``emonet`` (paths or None), ``batch_size`` and ``extra`` (the ``--analyser-option KEY=VALUE`` pairs)."""

    name: str
    build: Callable[[dict], Analysers]
    help: str = ""


BACKENDS: dict[str, Backend] = {}
# Modules imported (if they exist) before a backend name is looked up, so that other parts of the project
# can register backends without editing this file, e.g. facecrafter_jax/toy/analysers.py calling
# ``register_backend("toy", build_toy_analysers, help=...)``.
PLUGIN_MODULES: tuple[str, ...] = ("facecrafter_jax.toy.analysers",)


def register_backend(name: str, build: Callable[[dict], Analysers], help: str = "") -> None:
    """Register an analyser backend under ``name`` (selected with ``--analysers NAME``)."""
    if not name or ":" in name:
        raise ValueError(f"backend name must be non-empty and without ':', got {name!r}")
    BACKENDS[name] = Backend(name, build, help)


def _load_plugins() -> None:
    for mod in PLUGIN_MODULES:
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name is None or not mod.startswith(e.name):  # a dependency of the plugin is missing: report
                raise


def get_backend(name: str) -> Backend:
    """A registered backend, or ``package.module:function`` (a factory ``options -> Analysers``)."""
    _load_plugins()
    if name in BACKENDS:
        return BACKENDS[name]
    if ":" in name:
        mod, _, attr = name.partition(":")
        try:
            fn = getattr(importlib.import_module(mod), attr)
        except (ImportError, AttributeError) as e:
            raise CLIError(f"--analysers {name}: cannot import ({type(e).__name__}: {e})") from None
        return Backend(name, fn, "")
    raise CLIError(f"--analysers {name!r}: unknown backend; choose one of {', '.join(sorted(BACKENDS))} "
                   "or give package.module:factory")


def _build_real(options: dict) -> Analysers:
    if options.get("landmarker") is None:
        raise CLIError("--landmarker is required by the real analysers (every analysis starts from its face "
                       "detection and alignment)")
    extra = dict(options.get("extra") or {})
    kw = {}
    if "emonet_crop_scale" in extra:
        try:
            kw["emonet_crop_scale"] = float(extra.pop("emonet_crop_scale"))
        except ValueError:
            raise CLIError("--analyser-option emonet_crop_scale must be a number") from None
    if extra:
        raise CLIError(f"--analyser-option: unknown option(s) {sorted(extra)} for the real analysers "
                       "(known: emonet_crop_scale)")
    try:
        return RealAnalysers(options["landmarker"], options.get("arcface"), options.get("emonet"),
                             batch_size=options.get("batch_size", 16), **kw)
    except (FileNotFoundError, ValueError) as e:
        raise CLIError(str(e)) from None


register_backend("real", _build_real, help="MediaPipe landmarker + ArcFace ONNX + EmoNet (data_prep's pipeline)")


# ======================================================================================== sample sets
@dataclass
class Item:
    """One generated image and its targets (resolved, loaded lazily where a model is needed)."""

    path: str
    rel: str  # path relative to the set folder, for the report
    identity: dict | None  # {"kind": "file"|"image", "path", "key"}
    landmarks: dict | None  # {"kind": "file"|"image", "path", "pose": [3] or None}
    emotion: dict | None  # {"index": int or None, "valence", "arousal"}

    @property
    def id_only(self) -> bool:
        return self.landmarks is None and self.emotion is None


@dataclass
class SampleSet:
    name: str
    root: str
    folders: list[str]
    items: list[Item] = field(default_factory=list)


def _read_json(path: str) -> dict:
    try:
        with open(path) as f:
            d = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise CLIError(f"{path}: cannot read ({type(e).__name__}: {e})") from None
    if not isinstance(d, dict):
        raise CLIError(f"{path}: expected a JSON object")
    return d


def _abs(folder: str, p: str) -> str:
    return os.path.abspath(p if os.path.isabs(p) else os.path.join(folder, p))


def _need(path: str, what: str) -> str:
    if not os.path.isfile(path):
        raise CLIError(f"{what} {path}: no such file")
    if not os.access(path, os.R_OK):
        raise CLIError(f"{what} {path}: not readable")
    return path


def _identity_target(spec: Any, folder: str, mode: str, where: str) -> dict | None:
    if spec is None:
        return None
    if not isinstance(spec, dict):
        raise CLIError(f"{where}: 'identity' must be an object")
    files = []
    if spec.get("embedding_file"):
        files.append(_abs(folder, spec["embedding_file"]))
    if spec.get("source") == "embedding" and spec.get("path"):
        files.append(_abs(folder, spec["path"]))
    image = _abs(folder, spec["path"]) if spec.get("source") == "image" and spec.get("path") else None
    if mode == "image":
        if image is None:
            raise CLIError(f"{where}: --id-target image, but the identity does not come from a photo")
        return {"kind": "image", "path": _need(image, f"{where}: identity photo")}
    if mode == "auto" and image is not None and os.path.isfile(image):
        return {"kind": "image", "path": _need(image, f"{where}: identity photo")}
    for f in files:
        if os.path.isfile(f):
            return {"kind": "file", "path": _need(f, f"{where}: identity embedding")}
    if files:
        _need(files[0], f"{where}: identity embedding")  # raises: missing
    if image is not None and mode == "auto":
        _need(image, f"{where}: identity photo")  # raises: missing
    raise CLIError(f"{where}: identity has no embedding_file" + (" (--id-target embedding)" if image else
                                                                " nor a path to an embedding or photo"))


def _landmark_target(spec: Any, folder: str, where: str, head_pose: Any = None) -> dict | None:
    if spec is None:
        return None
    if not isinstance(spec, dict):
        raise CLIError(f"{where}: 'controls.landmarks' must be an object")
    pose = spec.get("head_pose", head_pose)
    if pose is not None:
        p = np.asarray(pose, np.float64)
        if p.shape != (3,) or not np.all(np.isfinite(p)):
            raise CLIError(f"{where}: head_pose must be [yaw, pitch, roll] in degrees, got {pose!r}")
        pose = p.tolist()
    if spec.get("file"):
        return {"kind": "file", "path": _need(_abs(folder, spec["file"]), f"{where}: landmark target"), "pose": pose}
    src, path = spec.get("source"), spec.get("path")
    if src == "npy" and path:
        return {"kind": "file", "path": _need(_abs(folder, path), f"{where}: landmark target"), "pose": pose}
    if src == "image" and path:
        return {"kind": "image", "path": _need(_abs(folder, path), f"{where}: landmark target photo"), "pose": pose}
    raise CLIError(f"{where}: controls.landmarks needs 'file', or 'source' npy/image with 'path'")


def _emotion_target(spec: Any, where: str) -> dict | None:
    if spec is None:
        return None
    if not isinstance(spec, dict):
        raise CLIError(f"{where}: 'controls.emotion' must be an object")
    index = spec.get("index")
    name = spec.get("name")
    if name is not None:
        if str(name).lower() not in EMOTION_CLASSES:
            raise CLIError(f"{where}: unknown emotion {name!r}; expected one of {', '.join(EMOTION_CLASSES)}")
        if index is not None and int(index) != EMOTION_CLASSES.index(str(name).lower()):
            raise CLIError(f"{where}: emotion name {name!r} and index {index} disagree")
        index = EMOTION_CLASSES.index(str(name).lower())
    if index is not None and not (isinstance(index, int) and 0 <= index < len(EMOTION_CLASSES)):
        raise CLIError(f"{where}: emotion index must be an integer in 0..{len(EMOTION_CLASSES) - 1}, got {index!r}")
    out = {"index": index}
    for k in ("valence", "arousal"):
        v = spec.get(k)
        if v is not None and (not isinstance(v, (int, float)) or not math.isfinite(v) or not -1 <= v <= 1):
            raise CLIError(f"{where}: {k} must be a number in [-1, 1], got {v!r}")
        out[k] = None if v is None else float(v)
    if out["index"] is None and out["valence"] is None and out["arousal"] is None:
        return None
    return out


def _folders(root: str) -> list[str]:
    if not os.path.isdir(root):
        raise CLIError(f"--samples {root}: no such directory")
    if os.path.isfile(os.path.join(root, "samples.json")):
        return [root]
    subs = sorted(os.path.join(root, d) for d in os.listdir(root)
                  if os.path.isfile(os.path.join(root, d, "samples.json")))
    if not subs:
        raise CLIError(f"--samples {root}: no samples.json in the folder or its subfolders")
    return subs


def load_sample_set(root: str, id_target: str = "auto", name: str | None = None) -> SampleSet:
    """Read one sample set (a folder with samples.json, or a folder of such folders) and resolve the
    targets of every image. Only files are checked here; no model runs. Raises :class:`CLIError`."""
    root = os.path.abspath(root)
    s = SampleSet(name or os.path.basename(root.rstrip(os.sep)) or root, root, _folders(root))
    for folder in s.folders:
        meta_path = os.path.join(folder, "samples.json")
        meta = _read_json(meta_path)
        images = meta.get("images")
        if not isinstance(images, list) or not images:
            raise CLIError(f"{meta_path}: no 'images' list")
        controls = meta.get("controls") or {}
        if not isinstance(controls, dict):
            raise CLIError(f"{meta_path}: 'controls' must be an object")
        for i, entry in enumerate(images):
            if not isinstance(entry, dict) or not isinstance(entry.get("file"), str):
                raise CLIError(f"{meta_path}: images[{i}] has no 'file'")
            where = f"{meta_path} images[{i}]"
            path = _need(_abs(folder, entry["file"]), f"{meta_path}: image")
            ctl = dict(controls)
            if isinstance(entry.get("controls"), dict):
                ctl.update(entry["controls"])
            ident = _identity_target(entry.get("identity", meta.get("identity")), folder, id_target, where)
            s.items.append(Item(
                path=path, rel=os.path.relpath(path, root), identity=ident,
                landmarks=_landmark_target(ctl.get("landmarks"), folder, where, ctl.get("head_pose")),
                emotion=_emotion_target(ctl.get("emotion"), where)))
    return s


def load_rgb(path: str) -> np.ndarray:
    """An image file as uint8 RGB [H, W, 3] (data_prep's loader: EXIF, modes, alpha on white)."""
    from data_prep.images import SkipImage, load_image

    try:
        return load_image(path, min_side=1)
    except SkipImage as e:
        raise CLIError(f"{path}: {e.reason.replace('_', ' ')}" + (f" ({e.detail})" if e.detail else "")) from None


def _load_embedding(path: str) -> np.ndarray:
    try:
        a = np.load(path, allow_pickle=False)
    except Exception as e:
        raise CLIError(f"identity embedding {path}: cannot read as .npy ({type(e).__name__}: {e})") from None
    if a.shape not in ((ID_DIM,), (1, ID_DIM)) or not np.issubdtype(a.dtype, np.number):
        raise CLIError(f"identity embedding {path}: shape {list(a.shape)}, expected [{ID_DIM}] or [1, {ID_DIM}]")
    a = a.reshape(ID_DIM).astype(np.float64)
    n = np.linalg.norm(a)
    if not np.isfinite(n) or n < 1e-12:
        raise CLIError(f"identity embedding {path}: zero, NaN or Inf")
    return a / n


def _load_landmarks(path: str) -> np.ndarray:
    try:
        a = np.load(path, allow_pickle=False)
    except Exception as e:
        raise CLIError(f"landmark target {path}: cannot read as .npy ({type(e).__name__}: {e})") from None
    if a.shape != (M.NUM_LANDMARKS, 3) or not np.issubdtype(a.dtype, np.number):
        raise CLIError(f"landmark target {path}: shape {list(a.shape)}, expected [{M.NUM_LANDMARKS}, 3]")
    if not np.all(np.isfinite(a)):
        raise CLIError(f"landmark target {path}: contains NaN or Inf")
    return a.astype(np.float64)


def check_target_files(s: SampleSet) -> None:
    """Load every .npy target once (shape errors before any model runs)."""
    for it in s.items:
        if it.identity and it.identity["kind"] == "file":
            _load_embedding(it.identity["path"])
        if it.landmarks and it.landmarks["kind"] == "file":
            _load_landmarks(it.landmarks["path"])


# ======================================================================================== evaluation
# Table columns: key -> (description, better). Order = column order of the markdown table.
METRIC_COLUMNS: dict[str, tuple[str, str]] = {
    "images": ("generated images", ""),
    "no_face": ("images in which no face was found (left out of every metric)", "lower"),
    "id_cos": ("identity: mean cosine of ArcFace(generated) and the source identity embedding", "higher"),
    "id_cos_std": ("identity: std of that cosine", ""),
    "id_frac": ("identity: fraction of images with cosine > --id-threshold", "higher"),
    "nme": ("landmarks: NME, all 478 points, / target inter-ocular distance (33-263)", "lower"),
    "nme_expr": ("expression: NME on mouth+eyes+brows after Procrustes (similarity) alignment", "lower"),
    "nme_mouth": ("expression: Procrustes NME, mouth (40 lip points)", "lower"),
    "nme_eyes": ("expression: Procrustes NME, eyes (32 eye-contour points)", "lower"),
    "nme_brows": ("expression: Procrustes NME, brows (20 points)", "lower"),
    "pose_err": ("head pose: mean of |yaw|, |pitch|, |roll| errors (degrees)", "lower"),
    "yaw_err": ("head pose: mean |yaw error| (degrees)", "lower"),
    "pitch_err": ("head pose: mean |pitch error| (degrees)", "lower"),
    "roll_err": ("head pose: mean |roll error| (degrees)", "lower"),
    "pose_geo": ("head pose: mean geodesic angle between predicted and target rotations (degrees)", "lower"),
    "emo_acc": ("emotion: accuracy of EmoNet's argmax class vs the target class", "higher"),
    "val_mae": ("emotion: valence MAE", "lower"),
    "val_rmse": ("emotion: valence RMSE", "lower"),
    "aro_mae": ("emotion: arousal MAE", "lower"),
    "aro_rmse": ("emotion: arousal RMSE", "lower"),
    "div_ids": ("diversity (ID-only images): identities with >= 2 faces", ""),
    "div_yaw": ("diversity: std of yaw per identity (degrees), mean over identities", "higher"),
    "div_pitch": ("diversity: std of pitch per identity (degrees)", "higher"),
    "div_roll": ("diversity: std of roll per identity (degrees)", "higher"),
    "div_pose": ("diversity: mean pairwise geodesic angle between head poses (degrees)", "higher"),
    "div_expr": ("diversity: mean pairwise expression NME (Procrustes, mouth+eyes+brows)", "higher"),
    "div_emo_H": ("diversity: entropy (bits, max 3) of the predicted emotion classes", "higher"),
    "div_val": ("diversity: std of predicted valence", "higher"),
    "div_aro": ("diversity: std of predicted arousal", "higher"),
    "fd_arcface": ("quality proxy: Fréchet distance of ArcFace embeddings vs --reference images", "lower"),
    "fd_emonet": ("quality proxy: Fréchet distance of EmoNet outputs (8 probs, valence, arousal) vs --reference",
                  "lower"),
}


@dataclass
class Analysis:
    """Analyser outputs for a list of images (NaN rows = no face)."""

    identity: np.ndarray | None = None
    landmarks: np.ndarray | None = None
    pose: np.ndarray | None = None
    probs: np.ndarray | None = None
    valence: np.ndarray | None = None
    arousal: np.ndarray | None = None

    def no_face(self) -> np.ndarray:
        """True where an analyser that ran found no face."""
        rows = [a.reshape(len(a), -1) for a in (self.identity, self.landmarks, self.probs) if a is not None]
        if not rows:
            return np.zeros(0, bool)
        return np.any([~np.all(np.isfinite(r), axis=1) for r in rows], axis=0)


def analyse(analysers: Analysers, paths: Sequence[str], batch_size: int, log: Callable[[str], None] = lambda s: None
            ) -> Analysis:
    """Run every available analysis on the image files, ``batch_size`` images in memory at a time."""
    caps = analysers.capabilities
    parts: dict[str, list[np.ndarray]] = {}
    for start in range(0, len(paths), batch_size):
        imgs = [load_rgb(p) for p in paths[start:start + batch_size]]
        if "identity" in caps:
            parts.setdefault("identity", []).append(np.asarray(analysers.identity(imgs), np.float64))
        if "landmarks" in caps:
            lm, pose = analysers.landmarks(imgs)
            parts.setdefault("landmarks", []).append(np.asarray(lm, np.float64))
            parts.setdefault("pose", []).append(np.asarray(pose, np.float64))
        if "emotion" in caps:
            p, v, a = analysers.emotion(imgs)
            parts.setdefault("probs", []).append(np.asarray(p, np.float64))
            parts.setdefault("valence", []).append(np.asarray(v, np.float64).reshape(-1))
            parts.setdefault("arousal", []).append(np.asarray(a, np.float64).reshape(-1))
        log(f"  analysed {min(start + batch_size, len(paths))}/{len(paths)}")
    out = Analysis(**{k: np.concatenate(v) for k, v in parts.items()})
    n = len(paths)
    checks = {"identity": (n, ID_DIM), "landmarks": (n, M.NUM_LANDMARKS, 3), "pose": (n, 3),
              "probs": (n, M.NUM_EMOTIONS), "valence": (n,), "arousal": (n,)}
    for k, shape in checks.items():
        a = getattr(out, k)
        if a is not None and a.shape != shape:
            raise ValueError(f"analysers {analysers.name!r}: {k} has shape {a.shape}, expected {shape}")
    return out


class _Targets:
    """Loads and caches targets; photo targets go through the analysers."""

    def __init__(self, analysers: Analysers):
        self.analysers = analysers
        self._emb: dict[str, np.ndarray] = {}
        self._lmk: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}

    def embedding(self, t: dict) -> np.ndarray:
        if t["path"] not in self._emb:
            if t["kind"] == "file":
                self._emb[t["path"]] = _load_embedding(t["path"])
            else:
                e = np.asarray(self.analysers.identity([load_rgb(t["path"])]), np.float64)[0]
                if not np.all(np.isfinite(e)):
                    raise CLIError(f"identity photo {t['path']}: no face found")
                self._emb[t["path"]] = e / np.linalg.norm(e)
        return self._emb[t["path"]]

    def landmarks(self, t: dict, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        """(landmarks [478, 3], pose [3] (NaN if unknown)) for a generated image of (height, width)."""
        key = (t["path"], size) if t["kind"] == "image" else (t["path"],)
        if key not in self._lmk:
            if t["kind"] == "file":
                self._lmk[key] = (_load_landmarks(t["path"]), np.full(3, np.nan))
            else:
                h, w = size
                if h != w:
                    raise CLIError(f"landmark target photo {t['path']}: generated images must be square to map "
                                   f"it into the aligned crop (got {w}x{h})")
                r = self.analysers.reference_landmarks(load_rgb(t["path"]), w)
                if r is None:
                    raise CLIError(f"landmark target photo {t['path']}: no face found")
                self._lmk[key] = (np.asarray(r[0], np.float64), np.asarray(r[1], np.float64))
        lm, pose = self._lmk[key]
        if t.get("pose") is not None:
            pose = np.asarray(t["pose"], np.float64)
        return lm, pose


def _image_size(path: str) -> tuple[int, int]:
    from PIL import Image, ImageOps

    with Image.open(path) as im:
        im = ImageOps.exif_transpose(im)
        return im.height, im.width


def _f(x) -> float | None:
    """JSON-friendly float (NaN -> None)."""
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def evaluate_set(s: SampleSet, analysers: Analysers, *, batch_size: int = 16, id_threshold: float = 0.4,
                 reference: Analysis | None = None, log: Callable[[str], None] = lambda s: None) -> dict:
    """All applicable metrics for one sample set. Returns the set's report entry (JSON-able)."""
    caps = analysers.capabilities
    paths = [it.path for it in s.items]
    a = analyse(analysers, paths, batch_size, log)
    n = len(paths)
    no_face = a.no_face() if n else np.zeros(0, bool)
    targets = _Targets(analysers)
    cols: dict[str, float | int | None] = {"images": n, "no_face": int(no_face.sum())}
    details: dict[str, Any] = {}
    skipped: list[str] = []
    per_image = [{"file": it.rel, "face": not bool(no_face[i])} for i, it in enumerate(s.items)]

    # ---- identity
    id_items = [i for i, it in enumerate(s.items) if it.identity is not None]
    if id_items and "identity" in caps:
        src = np.stack([targets.embedding(s.items[i].identity) for i in id_items])
        gen = a.identity[id_items]
        d = M.identity_similarity(gen, src, id_threshold)
        cos = M.cosine_similarity(gen, src)
        details["identity"] = d
        cols.update(id_cos=d["mean"], id_cos_std=d["std"], id_frac=d["frac_above"])
        for i, c in zip(id_items, cos):
            per_image[i]["id_cos"] = _f(c)
    elif id_items:
        skipped.append("identity: no identity analyser (--arcface)")

    # ---- landmarks and pose
    lm_items = [i for i, it in enumerate(s.items) if it.landmarks is not None]
    if lm_items and "landmarks" in caps:
        if any(s.items[i].landmarks["kind"] == "image" for i in lm_items) and "reference_landmarks" not in caps:
            raise CLIError(f"set {s.name}: landmark targets from photos need analysers with reference_landmarks")
        tl, tp = zip(*(targets.landmarks(s.items[i].landmarks, _image_size(s.items[i].path)) for i in lm_items))
        tl, tp = np.stack(tl), np.stack(tp)
        gl, gp = a.landmarks[lm_items], a.pose[lm_items]
        e = M.nme(gl, tl)
        ex = M.expression_nme(gl, tl)
        details["landmarks"] = {"nme": M.summarise(e), **{f"nme_{k}": M.summarise(v) for k, v in ex.items()}}
        cols.update(nme=details["landmarks"]["nme"]["mean"], nme_expr=details["landmarks"]["nme_expression"]["mean"],
                    nme_mouth=details["landmarks"]["nme_mouth"]["mean"], nme_eyes=details["landmarks"]["nme_eyes"]["mean"],
                    nme_brows=details["landmarks"]["nme_brows"]["mean"])
        for j, i in enumerate(lm_items):
            per_image[i].update(nme=_f(e[j]), nme_expr=_f(ex["expression"][j]))
        has_pose = np.all(np.isfinite(tp), axis=1)
        if has_pose.any():
            idx = np.flatnonzero(has_pose)
            pe = M.pose_errors(gp[idx], tp[idx])
            details["pose"] = {k: M.summarise(v) for k, v in pe.items()}
            cols.update(pose_err=details["pose"]["mean"]["mean"], yaw_err=details["pose"]["yaw"]["mean"],
                        pitch_err=details["pose"]["pitch"]["mean"], roll_err=details["pose"]["roll"]["mean"],
                        pose_geo=details["pose"]["geodesic"]["mean"])
            for j, k in enumerate(idx):
                per_image[lm_items[k]].update(pose_err=_f(pe["mean"][j]), pose_geo=_f(pe["geodesic"][j]),
                                              target_pose=[_f(x) for x in tp[k]])
        if not has_pose.all():
            skipped.append(f"pose error: no head-pose target for {int((~has_pose).sum())} image(s) "
                           "(landmark .npy targets without head_pose)")
    elif lm_items:
        skipped.append("landmarks / pose: no landmark analyser")

    # ---- emotion
    emo_items = [i for i, it in enumerate(s.items) if it.emotion is not None]
    if emo_items and "emotion" in caps:
        em = [s.items[i].emotion for i in emo_items]
        out: dict[str, Any] = {}
        cls_idx = [j for j, t in enumerate(em) if t["index"] is not None]
        if cls_idx:
            rows = [emo_items[j] for j in cls_idx]
            out.update(M.emotion_errors(a.probs[rows], np.array([em[j]["index"] for j in cls_idx])))
        for name, short in (("valence", "val"), ("arousal", "aro")):
            jj = [j for j, t in enumerate(em) if t[name] is not None]
            if jj:
                rows = [emo_items[j] for j in jj]
                kw = {name: getattr(a, name)[rows], f"target_{name}": np.array([em[j][name] for j in jj])}
                out.update(M.emotion_errors(**kw))
        details["emotion"] = out
        cols.update({k: out[src] for k, src in (("emo_acc", "accuracy"), ("val_mae", "valence_mae"),
                                                ("val_rmse", "valence_rmse"), ("aro_mae", "arousal_mae"),
                                                ("aro_rmse", "arousal_rmse")) if src in out})
    elif emo_items:
        skipped.append("emotion: no emotion analyser (--emonet)")
    if a.probs is not None:
        for i in range(n):
            if np.all(np.isfinite(a.probs[i])):
                per_image[i].update(emotion=EMOTION_CLASSES[int(np.argmax(a.probs[i]))],
                                    valence=_f(a.valence[i]), arousal=_f(a.arousal[i]))
    if a.pose is not None:
        for i in range(n):
            per_image[i]["pose"] = [_f(x) for x in a.pose[i]]

    # ---- diversity of ID-only images, per identity
    groups: dict[str, list[int]] = {}
    for i, it in enumerate(s.items):
        if it.id_only:
            key = it.identity["path"] if it.identity is not None else "(no identity recorded)"
            groups.setdefault(key, []).append(i)
    if groups and (a.pose is not None or a.probs is not None):
        g_in = []
        for idx in groups.values():
            g = {}
            if a.pose is not None:
                g.update(pose=a.pose[idx], landmarks=a.landmarks[idx])
            if a.probs is not None:
                g.update(probs=a.probs[idx], valence=a.valence[idx], arousal=a.arousal[idx])
            g_in.append(g)
        dv = M.diversity(g_in)
        details["diversity"] = {**dv, "identities": len(groups), "id_only_images": sum(map(len, groups.values()))}
        ids = [dv[k] for k in dv if k.endswith("_identities")]
        cols["div_ids"] = max(ids) if ids else 0
        for col, key in (("div_yaw", "pose_yaw_std"), ("div_pitch", "pose_pitch_std"), ("div_roll", "pose_roll_std"),
                         ("div_pose", "pose_pairwise"), ("div_expr", "expression_pairwise"),
                         ("div_emo_H", "emotion_entropy"), ("div_val", "valence_std"), ("div_aro", "arousal_std")):
            if key in dv:
                cols[col] = dv[key]

    # ---- Fréchet distances against reference images
    if reference is not None:
        for col, feats, ref in (("fd_arcface", a.identity, reference.identity),
                                ("fd_emonet", _emo_features(a), _emo_features(reference))):
            if feats is None or ref is None:
                continue
            try:
                cols[col] = M.frechet_distance(feats, ref)
            except ValueError as e:
                skipped.append(f"{col}: {e}")

    return {
        "name": s.name, "root": s.root, "folders": s.folders,
        "num_images": n, "num_faces": int(n - no_face.sum()), "no_face": int(no_face.sum()),
        "no_face_files": [it.rel for i, it in enumerate(s.items) if no_face[i]],
        "targets": {"identity": len(id_items), "landmarks": len(lm_items), "emotion": len(emo_items),
                    "id_only": sum(it.id_only for it in s.items)},
        "metrics": {k: (_f(v) if isinstance(v, float) else v) for k, v in cols.items()},
        "details": _jsonable(details),
        "skipped": skipped,
        "images": per_image,
    }


def _emo_features(a: Analysis) -> np.ndarray | None:
    if a.probs is None:
        return None
    return np.concatenate([a.probs, a.valence[:, None], a.arousal[:, None]], axis=1)


def _jsonable(x):
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.integer, int)) and not isinstance(x, bool):
        return int(x)
    if isinstance(x, (np.floating, float)):
        return _f(x)
    return x


def _reference_images(root: str) -> list[str]:
    if not os.path.isdir(root):
        raise CLIError(f"--reference {root}: no such directory")
    files = sorted(os.path.join(dp, f) for dp, dn, fs in os.walk(root) for f in fs
                   if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith("."))
    if len(files) < 2:
        raise CLIError(f"--reference {root}: needs at least 2 images, found {len(files)}")
    return files


def evaluate(sets: Sequence[SampleSet], analysers: Analysers, *, batch_size: int = 16, id_threshold: float = 0.4,
             reference_dir: str | None = None, log: Callable[[str], None] = lambda s: None) -> dict:
    """Evaluate every sample set; returns the report dict (what OUT.json holds, minus run metadata)."""
    reference = None
    ref_info = None
    if reference_dir is not None:
        files = _reference_images(reference_dir)
        log(f"reference: {len(files)} images")
        reference = analyse(analysers, files, batch_size, log)
        ref_info = {"dir": os.path.abspath(reference_dir), "images": len(files),
                    "no_face": int(reference.no_face().sum())}
    entries = []
    for s in sets:
        log(f"set {s.name}: {len(s.items)} images")
        entries.append(evaluate_set(s, analysers, batch_size=batch_size, id_threshold=id_threshold,
                                    reference=reference, log=log))
    return {"sets": entries, "reference": ref_info}


# ======================================================================================== report
def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    if isinstance(v, int) and not isinstance(v, bool):
        return str(v)
    a = abs(v)
    if a != 0 and (a < 1e-3 or a >= 1e5):
        return f"{v:.3e}"
    return f"{v:.4g}" if a >= 1 else f"{v:.4f}"


def report_markdown(report: dict) -> str:
    """The markdown report: one table row per sample set, one column per metric present in any set,
    then a legend of the columns and notes (faces not found, skipped metrics)."""
    sets = report["sets"]
    keys = [k for k in METRIC_COLUMNS if any(k in s["metrics"] for s in sets)]
    lines = ["# Evaluation report", "", f"Created {report.get('created', '')} by `facecrafter_jax.evaluate`; "
             f"analysers: {report.get('analysers', {}).get('backend', '?')}; identity threshold "
             f"{report.get('settings', {}).get('id_threshold', '?')}.", ""]
    lines.append("| set | " + " | ".join(keys) + " |")
    lines.append("|---|" + "|".join("---:" for _ in keys) + "|")
    for s in sets:
        lines.append(f"| {s['name'].replace('|', '/')} | " + " | ".join(_fmt(s["metrics"].get(k)) for k in keys) + " |")
    lines += ["", "Columns (higher / lower = better):", ""]
    for k in keys:
        desc, better = METRIC_COLUMNS[k]
        lines.append(f"- `{k}`: {desc}" + (f" ({better})" if better else ""))
    notes = []
    for s in sets:
        if s["no_face"]:
            shown = ", ".join(s["no_face_files"][:10]) + (" ..." if len(s["no_face_files"]) > 10 else "")
            notes.append(f"- {s['name']}: no face in {s['no_face']} of {s['num_images']} images ({shown})")
        for msg in s["skipped"]:
            notes.append(f"- {s['name']}: skipped {msg}")
    if report.get("reference"):
        r = report["reference"]
        notes.append(f"- reference images: {r['images']} from {r['dir']} (no face in {r['no_face']})")
    if notes:
        lines += ["", "Notes:", ""] + notes
    return "\n".join(lines) + "\n"


def write_report(report: dict, out: str) -> tuple[str, str]:
    """Write ``out``.json and ``out``.md (a trailing .json / .md of ``out`` is dropped). Returns both paths."""
    base = out[:-5] if out.endswith(".json") else out[:-3] if out.endswith(".md") else out
    parent = os.path.dirname(os.path.abspath(base))
    os.makedirs(parent, exist_ok=True)
    jp, mp = base + ".json", base + ".md"
    for path, text in ((jp, json.dumps(report, indent=2, allow_nan=False) + "\n"), (mp, report_markdown(report))):
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    return jp, mp


# ======================================================================================== CLI
class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, our format
        raise CLIError(message)


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of ``python -m facecrafter_jax.evaluate``."""
    doc = __doc__.split("\n\n")
    p = _Parser(prog="python -m facecrafter_jax.evaluate", description=doc[0],
                epilog="\n\n".join(doc[1:]), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", action="append", required=True, metavar="DIR",
                   help="a sample set: a folder with samples.json + images, or a folder of such folders "
                        "(repeat for several sets; one table row each)")
    p.add_argument("--out", required=True, metavar="PATH",
                   help="report path without extension: writes PATH.json and PATH.md (folders are created)")
    a = p.add_argument_group("analysers")
    a.add_argument("--analysers", default="real", metavar="NAME",
                   help="analyser backend: 'real' (default: MediaPipe + ArcFace + EmoNet), another registered "
                        "name, or package.module:factory")
    a.add_argument("--landmarker", metavar="TASK", help="MediaPipe face_landmarker.task bundle (required by the "
                   "real backend: faces are found and aligned with it)")
    a.add_argument("--arcface", metavar="ONNX", help="ArcFace ONNX model (Arc2Face's arcface.onnx): identity metrics")
    a.add_argument("--emonet", metavar="PTH", help="official EmoNet 8-class checkpoint (emonet_8.pth): emotion "
                   "metrics and emotion diversity")
    a.add_argument("--analyser-option", action="append", default=[], metavar="KEY=VALUE",
                   help="backend option (repeatable); real backend: emonet_crop_scale (default 0.75, as data_prep)")
    a.add_argument("--batch-size", type=int, default=16, metavar="N",
                   help="images loaded and analysed at a time (default 16)")
    m = p.add_argument_group("metrics")
    m.add_argument("--id-target", choices=("auto", "embedding", "image"), default="auto",
                   help="identity target: the conditioning embedding file, or the identity photo re-embedded "
                        "with --arcface; auto (default) = the photo when samples.json names one that exists, "
                        "else the embedding")
    m.add_argument("--id-threshold", type=float, default=0.4, metavar="T",
                   help="cosine above which a generated face counts as the same identity (id_frac; default 0.4)")
    m.add_argument("--reference", metavar="DIR", help="folder of real face images: Fréchet distances of "
                   "ArcFace / EmoNet features of each set against them (fd_arcface, fd_emonet)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    return p


def _options(args) -> dict:
    extra = {}
    for kv in args.analyser_option:
        k, sep, v = kv.partition("=")
        if not sep or not k:
            raise CLIError(f"--analyser-option {kv!r}: expected KEY=VALUE")
        extra[k] = v
    for flag in ("landmarker", "arcface", "emonet"):
        path = getattr(args, flag)
        if path is not None:
            _need(path, f"--{flag}")
    return {"landmarker": args.landmarker, "arcface": args.arcface, "emonet": args.emonet,
            "batch_size": args.batch_size, "extra": extra}


def run(args) -> tuple[dict, tuple[str, str]]:
    """Validate everything, build the analysers, evaluate, write the report. Raises :class:`CLIError`."""
    if args.batch_size < 1:
        raise CLIError(f"--batch-size {args.batch_size}: must be >= 1")
    if not math.isfinite(args.id_threshold) or not -1 <= args.id_threshold <= 1:
        raise CLIError(f"--id-threshold {args.id_threshold}: must be in [-1, 1]")
    log = (lambda s: None) if args.quiet else (lambda s: print(s, file=sys.stderr, flush=True))
    options = _options(args)
    backend = get_backend(args.analysers)
    names: dict[str, int] = {}
    sets = []
    for d in args.samples:
        s = load_sample_set(d, args.id_target)
        if s.name in names:  # disambiguate equal folder names
            names[s.name] += 1
            s.name = f"{s.name} ({names[s.name]})"
        else:
            names[s.name] = 1
        check_target_files(s)
        sets.append(s)
    if args.reference is not None:
        _reference_images(args.reference)
    out_parent = os.path.dirname(os.path.abspath(args.out))
    if os.path.exists(out_parent) and not os.path.isdir(out_parent):
        raise CLIError(f"--out {args.out}: {out_parent} is not a directory")

    t0 = time.perf_counter()
    analysers = backend.build(options)
    try:
        if not isinstance(getattr(analysers, "capabilities", None), (set, frozenset)):
            raise CLIError(f"--analysers {args.analysers}: the factory did not return analysers (no capabilities)")
        t_build = time.perf_counter() - t0
        report = evaluate(sets, analysers, batch_size=args.batch_size, id_threshold=args.id_threshold,
                          reference_dir=args.reference, log=log)
        report = {
            "tool": "facecrafter_jax.evaluate",
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "argv": list(getattr(args, "argv", [])),
            "analysers": analysers.describe(),
            "settings": {"id_target": args.id_target, "id_threshold": args.id_threshold,
                         "batch_size": args.batch_size},
            "columns": {k: {"description": d, "better": b or None} for k, (d, b) in METRIC_COLUMNS.items()},
            **report,
            "timing_s": {"load_analysers": round(t_build, 3), "total": round(time.perf_counter() - t0, 3)},
        }
    finally:
        getattr(analysers, "close", lambda: None)()
    return report, write_report(report, args.out)


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit status (0 ok, 2 bad input)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(argv)
        args.argv = argv
        report, (jp, mp) = run(args)
    except CLIError as e:
        print("error: " + " ".join(str(e).split()), file=sys.stderr)  # always one line
        return 2
    for s in report["sets"]:
        print(f"{s['name']}: {s['num_images']} images, {s['no_face']} without a face")
    print(f"wrote {jp} and {mp}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
