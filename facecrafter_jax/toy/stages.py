"""The toy pipeline's stage names and output folders (shared by the pipeline, its report and the ablation)."""

from __future__ import annotations

__all__ = ["STAGE_NAMES", "TRAIN_STAGES", "EXPORTS"]

STAGE_NAMES = ("render", "analysers", "vae", "records", "base", "landmark", "emotion", "joint", "evaluate")
"""Every stage of ``python train.py``, in the order they run."""

TRAIN_STAGES = {"base": "base", "landmark": "stage_a", "emotion": "stage_b", "joint": "stage_c"}
"""Training stage -> its run folder under the pipeline's ``out``."""

EXPORTS = {"base": "base_model", "landmark": "stage_a_model", "emotion": "stage_b_model", "joint": "facecrafter"}
"""Training stage -> the converted model folder (``facecrafter-convert from-run``) the report samples."""
