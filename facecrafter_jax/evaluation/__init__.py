"""Evaluation of generated faces with the FaceCrafter paper's metrics (``python -m facecrafter_jax.evaluation``).

============================  ==========================================================================
``evaluation.analysers``      the :class:`Analysers` interface and the backend registry (entry points)
``evaluation.real``           the ``real`` backend: MediaPipe + ArcFace + EmoNet on the training crops
``evaluation.evaluate``       metrics assembly per sample set (``samples.json``: :mod:`facecrafter_jax.sample_set`)
``evaluation.report``         ``OUT.json`` / ``OUT.md``
``evaluation.cli``            the command line
============================  ==========================================================================
"""

from .analysers import BACKENDS, ENTRY_POINT_GROUP, Analysers, Backend, get_backend, register_backend
from .evaluate import METRIC_COLUMNS, Analysis, analyse, evaluate, evaluate_set
from .real import RealAnalysers  # registers the built-in "real" backend

__all__ = ["Analysers", "Backend", "BACKENDS", "ENTRY_POINT_GROUP", "register_backend", "get_backend",
           "METRIC_COLUMNS", "Analysis", "analyse", "evaluate", "evaluate_set", "RealAnalysers"]
