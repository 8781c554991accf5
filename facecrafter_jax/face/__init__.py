"""Faces: the shared vocabulary and the one analysis path (detection, alignment, ArcFace / EmoNet crops).

============================  =====================================================================
``face.vocabulary``           sizes, emotion classes, the valence / arousal table, emotion vectors (no JAX)
``face.geometry``             head pose <-> rotation matrices
``face.images``               robust photo decoding (EXIF, modes, truncation) with skip reasons
``face.align``                Umeyama similarity, ArcFace / FFHQ templates, warping
``face.landmarker``           MediaPipe face landmarker (Tasks API), largest face, five points
``face.analysis``             :class:`FaceAnalyser`: detect -> largest face -> crops / aligned landmarks
``face.arcface``              ArcFace ONNX runner
``face.emotion``              EmoNet crop geometry and runner
============================  =====================================================================

Only the vocabulary is imported here; the other modules load MediaPipe / onnxruntime / JAX when used.
"""

from .vocabulary import (EMOTION_CLASSES, EMOTION_DIM, ID_DIM, LANDMARK_FEATURES, NUM_EMOTIONS, NUM_LANDMARKS,
                         VALENCE_AROUSAL, emotion_table, emotion_vector)

__all__ = ["EMOTION_CLASSES", "EMOTION_DIM", "ID_DIM", "LANDMARK_FEATURES", "NUM_EMOTIONS", "NUM_LANDMARKS",
           "VALENCE_AROUSAL", "emotion_table", "emotion_vector"]
