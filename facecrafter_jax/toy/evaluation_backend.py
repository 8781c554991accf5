"""The toy world's analyser backend for the evaluation CLI: ``--analysers toy --analyser-option dir=ANALYSERS``.

Registered through the ``facecrafter_jax.analysers`` entry point (pyproject.toml), so the evaluation library
never names the toy package. ``dir`` is a folder written by :meth:`ToyAnalysers.save` (the toy pipeline's
``runs/toy/analysers``). Identity embeddings are offered when the analysers' embedding has the ArcFace width;
landmarks have z = 0 unless the analysers were trained with ``landmark_depth`` (then their predicted z).
"""

from __future__ import annotations

import os

import numpy as np

from facecrafter_jax.errors import ConfigError
from facecrafter_jax.evaluation.analysers import Analysers
from facecrafter_jax.face.vocabulary import ID_DIM

__all__ = ["ToyBackend", "build_toy_analysers"]


class ToyBackend(Analysers):
    """:class:`~facecrafter_jax.toy.analysers.ToyAnalysers` behind the evaluation's analyser interface."""

    name = "toy"

    def __init__(self, directory: str, batch_size: int = 64):
        from .analysers import ToyAnalysers

        self.directory = os.path.abspath(directory)
        self.batch_size = int(batch_size)
        self.toy = ToyAnalysers.load(directory)
        caps = {"landmarks", "emotion"}
        if self.toy.config.embed_dim == ID_DIM:
            caps.add("identity")
        self.capabilities = frozenset(caps)

    @staticmethod
    def _stack(images) -> np.ndarray:
        shapes = {np.shape(im) for im in images}
        if len(shapes) != 1:
            raise ValueError(f"toy analysers need images of one size, got {sorted(shapes)}")
        return np.stack([np.asarray(im, np.uint8) for im in images])

    def identity(self, images):
        if "identity" not in self.capabilities:
            return super().identity(images)
        return self.toy.embed(self._stack(images), self.batch_size).astype(np.float64)

    def landmarks(self, images):
        pose, xy = self.toy.pose_landmarks(self._stack(images), self.batch_size)
        lmk = xy if xy.shape[-1] == 3 else np.concatenate([xy, np.zeros(xy.shape[:2] + (1,), xy.dtype)], axis=-1)
        return lmk.astype(np.float64), np.asarray(pose, np.float64)

    def emotion(self, images):
        probs, va = self.toy.emotion(self._stack(images), self.batch_size)
        return np.asarray(probs, np.float64), np.asarray(va[:, 0], np.float64), np.asarray(va[:, 1], np.float64)

    def describe(self):
        return {**super().describe(), "dir": self.directory, "batch_size": self.batch_size}


def build_toy_analysers(options: dict) -> ToyBackend:
    """Factory of the ``toy`` backend; options: ``--analyser-option dir=FOLDER`` (required)."""
    extra = dict(options.get("extra") or {})
    directory = extra.pop("dir", None)
    if extra:
        raise ConfigError(f"--analyser-option: unknown option(s) {sorted(extra)} for the toy analysers (known: dir)")
    if not directory:
        raise ConfigError("the toy analysers need --analyser-option dir=FOLDER (a saved ToyAnalysers folder, e.g. "
                          "runs/toy/analysers)")
    if not os.path.isfile(os.path.join(directory, "config.json")):
        raise ConfigError(f"--analyser-option dir={directory}: no toy analysers there (no config.json)")
    return ToyBackend(directory, options.get("batch_size", 64))
