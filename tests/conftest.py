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


def perturb_adapters(model, seed: int, std: float = 0.1):
    """Move every ``AdapterParam`` of ``model`` off its initial value by seeded Gaussian noise (copy- or
    zero-initialised branches would otherwise mimic the identity branch / do nothing)."""
    import jax
    from flax import nnx

    from facecrafter_jax.models.control import AdapterParam

    state = nnx.state(model, AdapterParam)
    key = jax.random.key(seed)
    for i, (_, var) in enumerate(nnx.to_flat_state(state)):
        v = var.get_value()
        var.set_value(v + std * jax.random.normal(jax.random.fold_in(key, i), v.shape, v.dtype))
    nnx.update(model, state)
