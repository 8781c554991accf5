"""EmoNet (Toisoul et al., "Estimation of continuous valence and arousal levels from faces in naturalistic
conditions", Nature Machine Intelligence 2021) in Flax NNX, inference only.

Structure and attribute names mirror the official PyTorch model (``face-analysis/emonet``) so the
checkpoint key map is mechanical (see :mod:`facecrafter_jax.convert.emonet`):

* a face-alignment network (FAN): ``conv1`` (7x7/2, bias) -> ``bn1`` -> ReLU -> ``conv2`` (ConvBlock
  64->128) -> 2x2 max pool -> ``conv3`` -> ``conv4`` (-> 256 channels at 64x64), then ``num_modules``
  stacked depth-4 hourglasses ``m<i>`` with ``top_m_<i>``, ``conv_last<i>``, ``bn_end<i>``, the 68-heatmap
  head ``l<i>`` and the inter-stack convs ``bl<i>`` / ``al<i>``;
* the emotion head: hourglass features times the summed last heatmaps (attention), concatenated with the
  backbone features, ``conv1x1_input_emo_2`` -> ``emo_net_2`` (4 x [ConvBlock, MaxPool]) -> 4x4 average pool
  -> ``emo_fc_2`` (Linear, BatchNorm1d, ReLU, Linear) giving ``n_expression`` logits, valence, arousal.

Every normalisation layer is a BatchNorm with running statistics (the official code rebinds
``nn.InstanceNorm2d`` to ``nn.BatchNorm2d``), applied here in inference mode only. Input: RGB images
NHWC, 256x256, values in [0, 1] (no mean / std normalisation). Parameters are float32; ``dtype`` is the
compute dtype; BatchNorm is applied in float32.

The official model's temporal smoothing (video demo, CUDA only) is not part of this port.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from facecrafter_jax.face.vocabulary import EMOTION_CLASSES

EMOTION_CLASSES_8 = EMOTION_CLASSES  # the 8-class model's order is the records' order
EMOTION_CLASSES_5 = ("neutral", "happy", "sad", "surprise", "fear")
INPUT_SIZE = 256

__all__ = ["EmoNet", "ConvBlock", "HourGlass", "BatchNorm", "EMOTION_CLASSES_8", "predict_emotion", "INPUT_SIZE"]


class BatchNorm(nnx.Module):
    """Inference-mode BatchNorm (``BatchNorm1d`` / ``BatchNorm2d``) over the last axis, statistics in float32.

    Parameters ``scale`` / ``bias`` (PyTorch ``weight`` / ``bias``) and batch statistics ``mean`` / ``var``
    (PyTorch ``running_mean`` / ``running_var``).
    """

    def __init__(self, num_features: int, *, eps: float = 1e-5, dtype=jnp.float32, rngs: nnx.Rngs | None = None):
        self.eps = eps
        self.dtype = dtype
        self.scale = nnx.Param(jnp.ones((num_features,), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((num_features,), jnp.float32))
        self.mean = nnx.BatchStat(jnp.zeros((num_features,), jnp.float32))
        self.var = nnx.BatchStat(jnp.ones((num_features,), jnp.float32))

    def __call__(self, x: jax.Array) -> jax.Array:
        inv = self.scale[...] * jax.lax.rsqrt(self.var[...] + self.eps)
        shift = self.bias[...] - self.mean[...] * inv
        return (x.astype(jnp.float32) * inv + shift).astype(self.dtype)


class ReLU(nnx.Module):
    """Parameter-free placeholder so list indices line up with the PyTorch ``nn.Sequential``."""

    def __call__(self, x):
        return jax.nn.relu(x)


class MaxPool2d(nnx.Module):
    """2x2 / stride 2 max pool (NHWC), placeholder in ``emo_net_2`` like ``nn.MaxPool2d(2, 2)``."""

    def __call__(self, x):
        return max_pool2(x)


def max_pool2(x: jax.Array) -> jax.Array:
    b, h, w, c = x.shape
    x = x[:, : h // 2 * 2, : w // 2 * 2]  # PyTorch floors odd sizes
    return x.reshape(b, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


def upsample_nearest2(x: jax.Array) -> jax.Array:
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


def _conv(cin, cout, k, *, stride=1, padding=0, bias=True, dtype, rngs):
    return nnx.Conv(cin, cout, kernel_size=(k, k), strides=(stride, stride), padding=((padding, padding), (padding, padding)),
                    use_bias=bias, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)


class ConvBlock(nnx.Module):
    """FAN bottleneck: BN-ReLU-conv3x3 to out/2, out/4, out/4 channels, concatenated, plus (projected) input."""

    def __init__(self, in_planes: int, out_planes: int, *, dtype=jnp.float32, rngs: nnx.Rngs):
        half, quarter = out_planes // 2, out_planes // 4
        self.bn1 = BatchNorm(in_planes, dtype=dtype)
        self.conv1 = _conv(in_planes, half, 3, padding=1, bias=False, dtype=dtype, rngs=rngs)
        self.bn2 = BatchNorm(half, dtype=dtype)
        self.conv2 = _conv(half, quarter, 3, padding=1, bias=False, dtype=dtype, rngs=rngs)
        self.bn3 = BatchNorm(quarter, dtype=dtype)
        self.conv3 = _conv(quarter, quarter, 3, padding=1, bias=False, dtype=dtype, rngs=rngs)
        if in_planes != out_planes:
            self.downsample = nnx.List([BatchNorm(in_planes, dtype=dtype), ReLU(),
                                        _conv(in_planes, out_planes, 1, bias=False, dtype=dtype, rngs=rngs)])
        else:
            self.downsample = None

    def __call__(self, x: jax.Array) -> jax.Array:
        out1 = self.conv1(jax.nn.relu(self.bn1(x)))
        out2 = self.conv2(jax.nn.relu(self.bn2(out1)))
        out3 = self.conv3(jax.nn.relu(self.bn3(out2)))
        residual = x
        if self.downsample is not None:
            for layer in self.downsample:
                residual = layer(residual)
        return jnp.concatenate([out1, out2, out3], axis=-1) + residual


class HourGlass(nnx.Module):
    """Depth-``depth`` hourglass; children ``b1_<l>``, ``b2_<l>``, ``b3_<l>`` per level and ``b2_plus_1``."""

    def __init__(self, num_modules: int, depth: int, num_features: int, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.num_modules = num_modules
        self.depth = depth
        self.features = num_features
        for level in range(depth, 0, -1):
            setattr(self, f"b1_{level}", ConvBlock(num_features, num_features, dtype=dtype, rngs=rngs))
            setattr(self, f"b2_{level}", ConvBlock(num_features, num_features, dtype=dtype, rngs=rngs))
            if level == 1:
                setattr(self, f"b2_plus_{level}", ConvBlock(num_features, num_features, dtype=dtype, rngs=rngs))
            setattr(self, f"b3_{level}", ConvBlock(num_features, num_features, dtype=dtype, rngs=rngs))

    def _forward(self, level: int, x: jax.Array) -> jax.Array:
        up1 = getattr(self, f"b1_{level}")(x)
        low1 = getattr(self, f"b2_{level}")(max_pool2(x))
        if level > 1:
            low2 = self._forward(level - 1, low1)
        else:
            low2 = getattr(self, f"b2_plus_{level}")(low1)
        low3 = getattr(self, f"b3_{level}")(low2)
        return up1 + upsample_nearest2(low3)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self._forward(self.depth, x)


class EmoNet(nnx.Module):
    """EmoNet; ``__call__`` returns a dict like the official model (``heatmap`` is NHWC [B, 64, 64, 68]).

    Args:
        num_modules: stacked hourglasses (2 in the released models).
        n_expression: number of emotion classes (8 or 5 in the released models).
        n_reg: regression outputs (valence, arousal).
        n_blocks: (ConvBlock, MaxPool) pairs in the emotion head.
        dtype: compute dtype.
    """

    def __init__(self, num_modules: int = 2, n_expression: int = 8, n_reg: int = 2, n_blocks: int = 4, *,
                 dtype=jnp.float32, rngs: nnx.Rngs):
        self.num_modules = num_modules
        self.n_expression = n_expression
        self.n_reg = n_reg
        self.dtype = dtype
        self.conv1 = _conv(3, 64, 7, stride=2, padding=3, dtype=dtype, rngs=rngs)
        self.bn1 = BatchNorm(64, dtype=dtype)
        self.conv2 = ConvBlock(64, 128, dtype=dtype, rngs=rngs)
        self.conv3 = ConvBlock(128, 128, dtype=dtype, rngs=rngs)
        self.conv4 = ConvBlock(128, 256, dtype=dtype, rngs=rngs)
        for i in range(num_modules):
            setattr(self, f"m{i}", HourGlass(1, 4, 256, dtype=dtype, rngs=rngs))
            setattr(self, f"top_m_{i}", ConvBlock(256, 256, dtype=dtype, rngs=rngs))
            setattr(self, f"conv_last{i}", _conv(256, 256, 1, dtype=dtype, rngs=rngs))
            setattr(self, f"bn_end{i}", BatchNorm(256, dtype=dtype))
            setattr(self, f"l{i}", _conv(256, 68, 1, dtype=dtype, rngs=rngs))
            if i < num_modules - 1:
                setattr(self, f"bl{i}", _conv(256, 256, 1, dtype=dtype, rngs=rngs))
                setattr(self, f"al{i}", _conv(68, 256, 1, dtype=dtype, rngs=rngs))
        self.conv1x1_input_emo_2 = _conv(256 * (num_modules + 1), 256, 1, dtype=dtype, rngs=rngs)
        layers = []
        for _ in range(n_blocks):
            layers += [ConvBlock(256, 256, dtype=dtype, rngs=rngs), MaxPool2d()]
        self.emo_net_2 = nnx.List(layers)
        self.emo_fc_2 = nnx.List([
            nnx.Linear(256, 128, dtype=dtype, param_dtype=jnp.float32, rngs=rngs),
            BatchNorm(128, dtype=dtype),
            ReLU(),
            nnx.Linear(128, n_expression + n_reg, dtype=dtype, param_dtype=jnp.float32, rngs=rngs),
        ])

    def __call__(self, images: jax.Array) -> dict[str, jax.Array]:
        """``images``: [B, 256, 256, 3] RGB in [0, 1]. Returns ``expression`` logits [B, n_expression],
        ``valence`` [B], ``arousal`` [B] (unclipped, float32) and ``heatmap`` [B, 64, 64, 68]."""
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"EmoNet expects NHWC RGB images [B, H, W, 3], got shape {images.shape}")
        if images.shape[1:3] != (INPUT_SIZE, INPUT_SIZE):
            raise ValueError(f"EmoNet expects {INPUT_SIZE}x{INPUT_SIZE} images, got {images.shape[1]}x{images.shape[2]}")
        x = images.astype(self.dtype)
        x = jax.nn.relu(self.bn1(self.conv1(x)))
        x = max_pool2(self.conv2(x))
        x = self.conv4(self.conv3(x))
        previous = x
        features = []
        heatmap = None
        for i in range(self.num_modules):
            ll = getattr(self, f"top_m_{i}")(getattr(self, f"m{i}")(previous))
            ll = jax.nn.relu(getattr(self, f"bn_end{i}")(getattr(self, f"conv_last{i}")(ll)))
            heatmap = getattr(self, f"l{i}")(ll)
            if i < self.num_modules - 1:
                ll = getattr(self, f"bl{i}")(ll)
                previous = previous + ll + getattr(self, f"al{i}")(heatmap)
            features.append(ll)
        mask = jnp.sum(heatmap.astype(jnp.float32), axis=-1, keepdims=True).astype(self.dtype)
        emo = jnp.concatenate([x, jnp.concatenate(features, axis=-1) * mask], axis=-1)
        h = self.conv1x1_input_emo_2(emo)
        for layer in self.emo_net_2:
            h = layer(h)
        b, hh, ww, c = h.shape
        if (hh, ww) != (4, 4):
            raise ValueError(f"emotion features must be 4x4 before the 4x4 average pool, got {hh}x{ww}")
        h = jnp.mean(h.astype(jnp.float32), axis=(1, 2)).astype(self.dtype)
        for layer in self.emo_fc_2:
            h = layer(h)
        out = h.astype(jnp.float32)
        return {"heatmap": heatmap.astype(jnp.float32), "expression": out[:, : self.n_expression],
                "valence": out[:, -2], "arousal": out[:, -1]}


def predict_emotion(model: EmoNet, images: jax.Array) -> jax.Array:
    """The record's ``emotion`` vector: [B, n_expression + 2] = softmax class probabilities (float32
    softmax), then valence and arousal clipped to [-1, 1] (as the official evaluation does)."""
    out = model(images)
    probs = jax.nn.softmax(out["expression"].astype(jnp.float32), axis=-1)
    va = jnp.clip(jnp.stack([out["valence"], out["arousal"]], axis=-1), -1.0, 1.0)
    return jnp.concatenate([probs, va], axis=-1)
