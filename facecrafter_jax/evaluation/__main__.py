"""``python -m facecrafter_jax.evaluation``: see :mod:`facecrafter_jax.evaluation.cli`."""

import sys

from .cli import main

sys.exit(main())
