"""The sample-set schema: ``samples.json``, written by ``sample.py`` and read by the evaluation.

A sample set is a folder holding ``samples.json`` and its images, or a folder of such folders (e.g. one per
identity). The fields the evaluation reads (every other field is provenance and is kept as written)::

  images[].file                      the generated PNGs (relative to the folder)
  identity.embedding_file            identity target: the conditioning embedding (identity.npy)
  identity.source / identity.path    "image": the photo the identity came from (re-embedded by the evaluation
                                     when its --id-target is auto or image); "embedding": an .npy
  controls.landmarks                 landmark target: {"file": NPY in the folder} or {"source": "npy",
                                     "path": NPY} ([478, 3], x, y in [0, 1] of the aligned crop, as data_prep)
                                     or {"source": "image", "path": IMG} (landmarks detected on the photo and
                                     mapped into the aligned crop at the generated image's size); optional
                                     "head_pose": [yaw, pitch, roll] degrees (pose target)
  controls.emotion                   {"name" | "index", "valence", "arousal"}: emotion targets
  images[i].identity / .controls     optional per-image overrides of the two entries above

Images without landmark / emotion controls are "ID-only". :func:`write_samples_json` writes a folder's file and
reads it back with :func:`load_sample_set`, so whatever the writer produces the reader accepts. Problems are
:class:`~facecrafter_jax.errors.DataError` s naming the file and entry.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from facecrafter_jax.errors import DataError
from facecrafter_jax.face.vocabulary import EMOTION_CLASSES, ID_DIM, NUM_LANDMARKS

__all__ = ["SAMPLES_JSON", "Item", "SampleSet", "load_sample_set", "write_samples_json", "load_rgb", "load_embedding",
           "load_landmarks", "check_target_files", "sample_set_folders", "need_file"]

SAMPLES_JSON = "samples.json"


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
        raise DataError(f"{path}: cannot read ({type(e).__name__}: {e})") from None
    if not isinstance(d, dict):
        raise DataError(f"{path}: expected a JSON object")
    return d


def _abs(folder: str, p: str) -> str:
    return os.path.abspath(p if os.path.isabs(p) else os.path.join(folder, p))


def need_file(path: str, what: str) -> str:
    if not os.path.isfile(path):
        raise DataError(f"{what} {path}: no such file")
    if not os.access(path, os.R_OK):
        raise DataError(f"{what} {path}: not readable")
    return path


def _identity_target(spec: Any, folder: str, mode: str, where: str) -> dict | None:
    if spec is None:
        return None
    if not isinstance(spec, dict):
        raise DataError(f"{where}: 'identity' must be an object")
    files = []
    if spec.get("embedding_file"):
        files.append(_abs(folder, spec["embedding_file"]))
    if spec.get("source") == "embedding" and spec.get("path"):
        files.append(_abs(folder, spec["path"]))
    image = _abs(folder, spec["path"]) if spec.get("source") == "image" and spec.get("path") else None
    if mode == "image":
        if image is None:
            raise DataError(f"{where}: --id-target image, but the identity does not come from a photo")
        return {"kind": "image", "path": need_file(image, f"{where}: identity photo")}
    if mode == "auto" and image is not None and os.path.isfile(image):
        return {"kind": "image", "path": need_file(image, f"{where}: identity photo")}
    for f in files:
        if os.path.isfile(f):
            return {"kind": "file", "path": need_file(f, f"{where}: identity embedding")}
    if files:
        need_file(files[0], f"{where}: identity embedding")  # raises: missing
    if image is not None and mode == "auto":
        need_file(image, f"{where}: identity photo")  # raises: missing
    raise DataError(f"{where}: identity has no embedding_file" + (" (--id-target embedding)" if image else
                                                                " nor a path to an embedding or photo"))


def _landmark_target(spec: Any, folder: str, where: str, head_pose: Any = None) -> dict | None:
    if spec is None:
        return None
    if not isinstance(spec, dict):
        raise DataError(f"{where}: 'controls.landmarks' must be an object")
    pose = spec.get("head_pose", head_pose)
    if pose is not None:
        p = np.asarray(pose, np.float64)
        if p.shape != (3,) or not np.all(np.isfinite(p)):
            raise DataError(f"{where}: head_pose must be [yaw, pitch, roll] in degrees, got {pose!r}")
        pose = p.tolist()
    if spec.get("file"):
        return {"kind": "file", "path": need_file(_abs(folder, spec["file"]), f"{where}: landmark target"), "pose": pose}
    src, path = spec.get("source"), spec.get("path")
    if src == "npy" and path:
        return {"kind": "file", "path": need_file(_abs(folder, path), f"{where}: landmark target"), "pose": pose}
    if src == "image" and path:
        return {"kind": "image", "path": need_file(_abs(folder, path), f"{where}: landmark target photo"), "pose": pose}
    raise DataError(f"{where}: controls.landmarks needs 'file', or 'source' npy/image with 'path'")


def _emotion_target(spec: Any, where: str) -> dict | None:
    if spec is None:
        return None
    if not isinstance(spec, dict):
        raise DataError(f"{where}: 'controls.emotion' must be an object")
    index = spec.get("index")
    name = spec.get("name")
    if name is not None:
        if str(name).lower() not in EMOTION_CLASSES:
            raise DataError(f"{where}: unknown emotion {name!r}; expected one of {', '.join(EMOTION_CLASSES)}")
        if index is not None and int(index) != EMOTION_CLASSES.index(str(name).lower()):
            raise DataError(f"{where}: emotion name {name!r} and index {index} disagree")
        index = EMOTION_CLASSES.index(str(name).lower())
    if index is not None and not (isinstance(index, int) and 0 <= index < len(EMOTION_CLASSES)):
        raise DataError(f"{where}: emotion index must be an integer in 0..{len(EMOTION_CLASSES) - 1}, got {index!r}")
    out = {"index": index}
    for k in ("valence", "arousal"):
        v = spec.get(k)
        if v is not None and (not isinstance(v, (int, float)) or not math.isfinite(v) or not -1 <= v <= 1):
            raise DataError(f"{where}: {k} must be a number in [-1, 1], got {v!r}")
        out[k] = None if v is None else float(v)
    if out["index"] is None and out["valence"] is None and out["arousal"] is None:
        return None
    return out


def sample_set_folders(root: str) -> list[str]:
    if not os.path.isdir(root):
        raise DataError(f"--samples {root}: no such directory")
    if os.path.isfile(os.path.join(root, SAMPLES_JSON)):
        return [root]
    subs = sorted(os.path.join(root, d) for d in os.listdir(root)
                  if os.path.isfile(os.path.join(root, d, SAMPLES_JSON)))
    if not subs:
        raise DataError(f"--samples {root}: no samples.json in the folder or its subfolders")
    return subs


def load_sample_set(root: str, id_target: str = "auto", name: str | None = None) -> SampleSet:
    """Read one sample set (a folder with samples.json, or a folder of such folders) and resolve the
    targets of every image. Only files are checked here; no model runs."""
    root = os.path.abspath(root)
    s = SampleSet(name or os.path.basename(root.rstrip(os.sep)) or root, root, sample_set_folders(root))
    for folder in s.folders:
        meta_path = os.path.join(folder, SAMPLES_JSON)
        meta = _read_json(meta_path)
        images = meta.get("images")
        if not isinstance(images, list) or not images:
            raise DataError(f"{meta_path}: no 'images' list")
        controls = meta.get("controls") or {}
        if not isinstance(controls, dict):
            raise DataError(f"{meta_path}: 'controls' must be an object")
        for i, entry in enumerate(images):
            if not isinstance(entry, dict) or not isinstance(entry.get("file"), str):
                raise DataError(f"{meta_path}: images[{i}] has no 'file'")
            where = f"{meta_path} images[{i}]"
            path = need_file(_abs(folder, entry["file"]), f"{meta_path}: image")
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
    """An image file as uint8 RGB [H, W, 3] (:func:`facecrafter_jax.face.images.load_image`: EXIF, modes, alpha
    on white)."""
    from facecrafter_jax.face.images import SkipImage, load_image

    try:
        return load_image(path, min_side=1)
    except SkipImage as e:
        raise DataError(f"{path}: {e.reason.replace('_', ' ')}" + (f" ({e.detail})" if e.detail else "")) from None



def load_embedding(path: str) -> np.ndarray:
    try:
        a = np.load(path, allow_pickle=False)
    except Exception as e:
        raise DataError(f"identity embedding {path}: cannot read as .npy ({type(e).__name__}: {e})") from None
    if a.shape not in ((ID_DIM,), (1, ID_DIM)) or not np.issubdtype(a.dtype, np.number):
        raise DataError(f"identity embedding {path}: shape {list(a.shape)}, expected [{ID_DIM}] or [1, {ID_DIM}]")
    a = a.reshape(ID_DIM).astype(np.float64)
    n = np.linalg.norm(a)
    if not np.isfinite(n) or n < 1e-12:
        raise DataError(f"identity embedding {path}: zero, NaN or Inf")
    return a / n


def load_landmarks(path: str) -> np.ndarray:
    try:
        a = np.load(path, allow_pickle=False)
    except Exception as e:
        raise DataError(f"landmark target {path}: cannot read as .npy ({type(e).__name__}: {e})") from None
    if a.shape != (NUM_LANDMARKS, 3) or not np.issubdtype(a.dtype, np.number):
        raise DataError(f"landmark target {path}: shape {list(a.shape)}, expected [{NUM_LANDMARKS}, 3]")
    if not np.all(np.isfinite(a)):
        raise DataError(f"landmark target {path}: contains NaN or Inf")
    return a.astype(np.float64)


def check_target_files(s: SampleSet) -> None:
    """Load every .npy target once (shape errors before any model runs)."""
    for it in s.items:
        if it.identity and it.identity["kind"] == "file":
            load_embedding(it.identity["path"])
        if it.landmarks and it.landmarks["kind"] == "file":
            load_landmarks(it.landmarks["path"])


def write_samples_json(folder: str, meta: dict) -> str:
    """Write ``folder/samples.json`` (atomically) and check it reads back as a sample set; returns its path.

    The images, embeddings and landmark files it names must already be in ``folder``.
    """
    if not isinstance(meta.get("images"), list) or not meta["images"]:
        raise DataError(f"{folder}: samples.json needs a non-empty 'images' list")
    path = os.path.join(folder, SAMPLES_JSON)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(meta, f, indent=2)
    os.replace(tmp, path)
    check_target_files(load_sample_set(folder))
    return path
