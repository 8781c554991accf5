#!/usr/bin/env python
"""Sample face images from a converted Arc2Face / FaceCrafter checkpoint (``python sample.py --help``).

The command line lives in :mod:`facecrafter_jax.sampling.cli`; docs/sampling.md describes every flag.
"""

import sys

from facecrafter_jax.sampling.cli import main

if __name__ == "__main__":
    sys.exit(main())
