"""The synthetic face world: a procedural face renderer with exact ground truth, and toy analysers.

No face dataset or pretrained analyser is available offline, so the toy pipeline trains and measures
everything on rendered faces whose identity, head pose, landmarks, expression and emotion are known exactly.

* :mod:`.landmarks` - MediaPipe's canonical face mesh (478-landmark layout) with identity-shape and
  expression bases, head pose and projection;
* :mod:`.render` - batched anti-aliased JAX renderer (:func:`render_faces`);
* :mod:`.world` - seeded identities, attribute sampling, emotion vectors, record writing (:class:`ToyWorld`);
* :mod:`.analysers` - small Flax NNX CNNs that play ArcFace, MediaPipe and EmoNet on rendered faces.

See ``docs/toy_world.md``.
"""

from .landmarks import EXPRESSION_PARAMS, KEY_POINTS, NUM_LANDMARKS, SHAPE_PARAMS
from .render import FaceParams, face_landmarks, render_faces
from .world import (EMOTION_CLASSES, EMOTION_EXPRESSIONS, VALENCE_AROUSAL, Attributes, Identities, ToyBatch,
                    ToyWorld, WorldConfig, emotion_vectors, write_records)

__all__ = [
    "EXPRESSION_PARAMS", "KEY_POINTS", "NUM_LANDMARKS", "SHAPE_PARAMS", "FaceParams",
    "face_landmarks", "render_faces", "save_png", "EMOTION_CLASSES", "EMOTION_EXPRESSIONS", "VALENCE_AROUSAL",
    "Attributes", "Identities", "ToyBatch", "ToyWorld", "WorldConfig", "emotion_vectors", "write_records",
]
