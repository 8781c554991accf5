"""Shared test fixtures. Tests run on CPU; PyTorch models are the reference (created with random weights)."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Entry points run in-process (sample.py, train.py) must not fill the user's persistent compilation cache
# (~/.cache/facecrafter_jax/xla); tests/test_runtime.py checks the cache in a temporary folder.
os.environ.setdefault("FACECRAFTER_COMPILATION_CACHE", "off")

import pathlib

import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
# Real model files shipped beside the repository (see ../shared/models/README.md); override with FACECRAFTER_SHARED_MODELS.
SHARED_MODELS = pathlib.Path(os.environ.get("FACECRAFTER_SHARED_MODELS", REPO.parent / "shared" / "models"))


@pytest.fixture(scope="session")
def shared_models() -> pathlib.Path:
    if not (SHARED_MODELS / "face_landmarker.task").exists():
        pytest.fail(f"face_landmarker.task not found in {SHARED_MODELS}; set FACECRAFTER_SHARED_MODELS")
    return SHARED_MODELS


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


def nchw_to_nhwc(x):
    return np.transpose(np.asarray(x), (0, 2, 3, 1))


def nhwc_to_nchw(x):
    return np.transpose(np.asarray(x), (0, 3, 1, 2))
