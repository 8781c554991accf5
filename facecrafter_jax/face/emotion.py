"""EmoNet on aligned face crops: the crop geometry and a batched runner of our Flax port.

EmoNet (Toisoul et al. 2021) was trained on AffectNet face crops, which are tighter than the FFHQ framing
of our training images: its crop has the same centre and rotation as the FFHQ-style crop, scaled by
``crop_scale`` (default 0.75), at :data:`EMONET_SIZE` = 256 px, RGB in [0, 1] without mean / std.
"""

from __future__ import annotations

import numpy as np

from .align import ffhq_template

__all__ = ["EMONET_SIZE", "DEFAULT_EMONET_CROP_SCALE", "emonet_template", "EmotionModel"]

EMONET_SIZE = 256
DEFAULT_EMONET_CROP_SCALE = 0.75

_PREDICT = None


def emonet_template(scale: float) -> np.ndarray:
    """EmoNet crop template: the FFHQ template scaled by 1/``scale`` about the crop centre, at 256 px."""
    t = ffhq_template(1.0)
    return ((t - 0.5) / scale + 0.5) * EMONET_SIZE


def _predict():
    global _PREDICT
    if _PREDICT is None:  # one compilation per process and batch shape, shared by every EmotionModel
        from flax import nnx

        from facecrafter_jax.models.emonet import predict_emotion

        _PREDICT = nnx.jit(predict_emotion)
    return _PREDICT


class EmotionModel:
    """EmoNet from an official 8-class checkpoint; ``__call__`` maps uint8 RGB crops [N, 256, 256, 3] to the
    record's ``emotion`` [N, 10] (softmax over the 8 classes, valence, arousal clipped to [-1, 1]).

    Batches are zero-padded to ``batch_size`` so the model compiles once per run.
    """

    def __init__(self, checkpoint: str, batch_size: int):
        from facecrafter_jax.convert.emonet import load_emonet

        self.model = load_emonet(checkpoint)
        if self.model.n_expression != 8:
            raise ValueError(f"{checkpoint}: EmoNet has {self.model.n_expression} classes; the records need the "
                             "8-class model (emonet_8.pth)")
        self.batch_size = batch_size
        self._fn = _predict()

    def __call__(self, crops: np.ndarray) -> np.ndarray:
        n = len(crops)
        x = np.asarray(crops, np.float32) / 255.0
        size = max(self.batch_size, n)
        if n < size:
            x = np.concatenate([x, np.zeros((size - n,) + x.shape[1:], x.dtype)])
        return np.asarray(self._fn(self.model, x))[:n]
