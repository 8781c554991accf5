"""FaceCrafter in JAX / Flax NNX: Arc2Face backbone, landmark / emotion control modules, training and sampling."""

__version__ = "0.1.0"
