"""The analyser interface of the evaluation and the registry of analyser backends.

An analyser backend turns generated images into the quantities the metrics compare: identity embeddings,
landmarks and head pose, emotion. The built-in backend is ``real`` (:mod:`.real`: MediaPipe + ArcFace + EmoNet).
Other packages register theirs with :func:`register_backend` or, without being imported by this library, with an
entry point in the group :data:`ENTRY_POINT_GROUP`; ``--analysers package.module:factory`` loads a factory by
path.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from facecrafter_jax.errors import ConfigError

__all__ = ["Analysers", "Backend", "BACKENDS", "ENTRY_POINT_GROUP", "register_backend", "get_backend"]


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


@dataclass(frozen=True)
class Backend:
    """An analyser backend: ``build(options) -> Analysers``. ``options`` holds ``arcface``, ``landmarker``,
    ``emonet`` (paths or None), ``batch_size`` and ``extra`` (the ``--analyser-option KEY=VALUE`` pairs)."""

    name: str
    build: Callable[[dict], Analysers]
    help: str = ""


BACKENDS: dict[str, Backend] = {}
ENTRY_POINT_GROUP = "facecrafter_jax.analysers"
"""Packages add backends without editing this library by declaring an entry point in this group (name ->
``module:factory``), e.g. the toy world's ``toy`` backend in this project's pyproject.toml."""


def register_backend(name: str, build: Callable[[dict], Analysers], help: str = "") -> None:
    """Register an analyser backend under ``name`` (selected with ``--analysers NAME``)."""
    if not name or ":" in name:
        raise ValueError(f"backend name must be non-empty and without ':', got {name!r}")
    BACKENDS[name] = Backend(name, build, help)


def _load_plugins() -> None:
    """Register every entry point of :data:`ENTRY_POINT_GROUP` (the built-in ``real`` backend registers itself when
    :mod:`facecrafter_jax.evaluation` is imported)."""
    from importlib.metadata import entry_points

    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name not in BACKENDS:
            BACKENDS[ep.name] = Backend(ep.name, _lazy(ep), f"entry point {ep.value}")


def _lazy(ep):
    def build(options: dict) -> Analysers:
        try:
            factory = ep.load()
        except ImportError as e:
            raise ConfigError(f"--analysers {ep.name}: cannot import {ep.value} ({type(e).__name__}: {e})") from None
        return factory(options)

    return build


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
            raise ConfigError(f"--analysers {name}: cannot import ({type(e).__name__}: {e})") from None
        return Backend(name, fn, "")
    raise ConfigError(f"--analysers {name!r}: unknown backend; choose one of {', '.join(sorted(BACKENDS))} "
                   "or give package.module:factory")
