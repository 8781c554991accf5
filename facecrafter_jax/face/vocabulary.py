"""The face vocabulary every part of the project shares: sizes, emotion classes and the circumplex table.

Nothing here imports JAX, MediaPipe or ONNX, so the command lines can validate their input cheaply.

* :data:`ID_DIM`: the ArcFace identity embedding (512-d, L2-normalised by its users).
* :data:`NUM_LANDMARKS`: MediaPipe's face mesh with irises (478 points, ``[478, 3]``: x, y in [0, 1] of
  the image width / height, z a relative depth in the units of x).
* :data:`EMOTION_CLASSES`: EmoNet's 8 classes in its (AffectNet) order, which is also the order of the
  ``emotion`` record field; :data:`EMOTION_DIM` = 8 class probabilities + valence + arousal.
* :data:`VALENCE_AROUSAL`: each class's (valence, arousal) at full intensity, after Russell's circumplex
  model and the AffectNet class means (rounded): pleasant / unpleasant on x, calm / excited on y. The
  samplers' emotion targets (:func:`emotion_vector`) and the toy world use this one table.
"""

from __future__ import annotations

import numpy as np

__all__ = ["ID_DIM", "NUM_LANDMARKS", "LANDMARK_FEATURES", "EMOTION_CLASSES", "NUM_EMOTIONS", "EMOTION_DIM",
           "VALENCE_AROUSAL", "CONTROL_INPUT_DIMS", "emotion_table", "emotion_vector"]

ID_DIM = 512
NUM_LANDMARKS = 478
LANDMARK_FEATURES = NUM_LANDMARKS * 3
EMOTION_CLASSES = ("neutral", "happy", "sad", "surprise", "fear", "disgust", "anger", "contempt")
NUM_EMOTIONS = len(EMOTION_CLASSES)
EMOTION_DIM = NUM_EMOTIONS + 2
CONTROL_INPUT_DIMS = {"landmark": LANDMARK_FEATURES, "emotion": EMOTION_DIM}
"""Flattened raw input width of each FaceCrafter control (what its token encoder / IP-Adapter projection takes)."""

VALENCE_AROUSAL = np.array([
    [0.0, 0.0],     # neutral
    [0.8, 0.5],     # happy
    [-0.7, -0.4],   # sad
    [0.3, 0.8],     # surprise
    [-0.6, 0.7],    # fear
    [-0.7, 0.3],    # disgust
    [-0.6, 0.8],    # anger
    [-0.5, 0.2],    # contempt
], np.float32)
VALENCE_AROUSAL.setflags(write=False)


def emotion_table() -> dict[str, tuple[float, float]]:
    """``{class name: (valence, arousal)}`` for the 8 classes, in :data:`EMOTION_CLASSES` order."""
    return {name: (float(v), float(a)) for name, (v, a) in zip(EMOTION_CLASSES, VALENCE_AROUSAL)}


def emotion_vector(emotion: str | int | None = None, valence: float | None = None,
                   arousal: float | None = None) -> tuple[np.ndarray, dict]:
    """The emotion condition ``[EMOTION_DIM]`` (8 class probabilities, valence, arousal) for a target emotion.

    * ``emotion`` (a class name of :data:`EMOTION_CLASSES`, any case, or its index): a one-hot probability
      vector, with that class's (valence, arousal) from :func:`emotion_table` unless ``valence`` /
      ``arousal`` are given (they override, both together).
    * only ``valence`` and ``arousal``: the class is the nearest one on the circumplex (Euclidean distance
      to the table; ties to the lower index), one-hot, with the given valence / arousal.

    Valence and arousal must be in [-1, 1]; a bad input raises ``ValueError``. Returns ``(vector float32,
    description)``; the description holds ``name``, ``index``, ``valence``, ``arousal`` and ``class_from``
    ("name" or "nearest valence/arousal"), as ``samples.json`` records it.
    """
    table = emotion_table()
    if (valence is None) != (arousal is None):
        raise ValueError("valence and arousal go together: give both or neither")
    for what, v in (("valence", valence), ("arousal", arousal)):
        if v is not None and (not np.isfinite(v) or not -1.0 <= float(v) <= 1.0):
            raise ValueError(f"{what} {v} must be in [-1, 1]")
    if emotion is None and valence is None:
        raise ValueError("give an emotion class, or valence and arousal")
    if emotion is not None:
        if isinstance(emotion, (int, np.integer)) and not isinstance(emotion, bool):
            if not 0 <= int(emotion) < NUM_EMOTIONS:
                raise ValueError(f"emotion index {emotion} out of range 0..{NUM_EMOTIONS - 1}")
            index = int(emotion)
        elif isinstance(emotion, str) and emotion.lower() in EMOTION_CLASSES:
            index = EMOTION_CLASSES.index(emotion.lower())
        else:
            raise ValueError(f"unknown emotion {emotion!r}; choose one of {', '.join(EMOTION_CLASSES)}")
        class_from = "name"
        if valence is None:
            valence, arousal = table[EMOTION_CLASSES[index]]
    else:
        va = VALENCE_AROUSAL.astype(np.float64)
        index = int(np.argmin(np.sum((va - np.asarray([valence, arousal], np.float64)) ** 2, axis=1)))
        class_from = "nearest valence/arousal"
    vec = np.zeros(EMOTION_DIM, np.float32)
    vec[index] = 1.0
    vec[-2:] = (valence, arousal)
    desc = {"name": EMOTION_CLASSES[index], "index": index, "valence": float(valence), "arousal": float(arousal),
            "class_from": class_from}
    return vec, desc
