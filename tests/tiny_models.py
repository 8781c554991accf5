"""Test-side alias of :mod:`facecrafter_jax.testing` (tiny random PyTorch reference models)."""

from facecrafter_jax.testing import *  # noqa: F401,F403
from facecrafter_jax.testing import randomize_  # noqa: F401
