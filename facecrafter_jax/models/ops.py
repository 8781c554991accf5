"""Linear-layer and convolution primitives with backward passes that suit XLA:CPU.

:func:`dot_general` and :func:`conv_general_dilated` are drop-in replacements for the ``jax.lax``
functions of the same names, passed to ``nnx.Linear(dot_general=...)`` / ``nnx.Conv(conv_general_dilated=...)``
by :func:`linear` and :func:`conv2d`. Their forward pass is the ``jax.lax`` primitive, unchanged. Their
gradient is a ``jax.custom_vjp`` that, **on CPU only** (chosen at lowering time with
:func:`jax.lax.platform_dependent`; GPU / TPU get JAX's own transpose rules), computes:

* the input gradient of ``x @ W`` with a weight much larger than the activations (few tokens, wide
  layers: the feed-forward layers of the 8x8 / 16x16 UNet levels) as ``(W @ g^T)^T``. JAX's rule emits
  ``dot(g, W)`` contracting ``W``'s minor axis, which XLA:CPU's Eigen GEMM runs ~10x slower than the
  forward product (it repacks the whole weight); the swapped product streams ``W`` in its own layout and
  transposes only the small activations.
* the input gradient of a 3x3 convolution (stride 1 or 2) with a kernel much larger than its activations
  (the 1280-channel levels) as one GEMM ``W[(kh, kw, I), O] @ g^T[O, P]`` followed by nine shifted adds,
  instead of a convolution with the spatially flipped, in/out-swapped kernel: XLA materialises that
  kernel with a strided transpose on every step (for the SD1.5 train step at 32x32 latents 44% of the
  step's time went into these copies), and for a frozen weight it is recomputed every step.
* the weight gradient of such a convolution as one GEMM of the stacked shifted activations with ``g``.

Which form is used is decided per call from static shapes (thresholds measured on the SD1.5 layer
shapes, docs/performance.md); outside those ranges the gradient is JAX's. The math is the same sum of
products in another order (agreement with JAX's rule to float32 rounding, tested).
:func:`jax.lax.optimization_barrier` keeps XLA's algebraic simplifier from folding the swapped products
back into the slow orientation.

Unused cotangents (a frozen weight's gradient) are never computed: XLA removes them as dead code.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

__all__ = ["dot_general", "conv_general_dilated", "upsample_nearest_2x", "linear", "conv2d", "SWAP_RATIO",
           "CONV_TAPS_RATIO"]

SWAP_RATIO = 2
"""Linear input gradient as ``(W @ g^T)^T`` on CPU when ``in_features >= SWAP_RATIO * tokens``."""

CONV_TAPS_RATIO = 6
"""3x3 convolution gradients as GEMMs + shifts on CPU when the kernel has at least this many times more
elements than ``positions * (in + out channels)`` (i.e. few positions, many channels)."""

_NHWC = lax.ConvDimensionNumbers((0, 3, 1, 2), (3, 2, 0, 1), (0, 3, 1, 2))  # ("NHWC", "HWIO", "NHWC")


def _barrier(x):
    return lax.optimization_barrier(x)


# --------------------------------------------------------------------------------------------
# x @ W (nnx.Linear)
# --------------------------------------------------------------------------------------------


def _mm(a, b):  # plain [M, K] @ [K, N]
    return lax.dot_general(a, b, (((1,), (0,)), ((), ())))


@jax.custom_vjp
def _linear_vjp(x, w):
    return lax.dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())))


def _linear_fwd(x, w):
    return _linear_vjp(x, w), (x, w)


def _linear_dx_cpu(g2, w):  # (W @ g^T)^T: W [K, N] streamed in its layout, g^T [N, M] small
    return _barrier(_mm(w, _barrier(g2.T))).T


def _linear_dx_default(g2, w):  # g @ W^T (JAX's rule)
    return lax.dot_general(g2, w, (((1,), (1,)), ((), ())))


def _linear_bwd(res, g):
    x, w = res
    k, n = w.shape
    m = math.prod(x.shape[:-1])
    g2 = g.reshape(m, n)
    if k >= SWAP_RATIO * m:
        dx = lax.platform_dependent(g2, w, cpu=_linear_dx_cpu, default=_linear_dx_default)
    else:
        dx = _linear_dx_default(g2, w)
    dw = lax.dot_general(x.reshape(m, k), g2, (((0,), (0,)), ((), ())))
    return dx.reshape(x.shape).astype(x.dtype), dw.astype(w.dtype)


_linear_vjp.defvjp(_linear_fwd, _linear_bwd)


def dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, **kwargs):
    """``jax.lax.dot_general`` with the CPU-friendly gradient for the ``nnx.Linear`` case.

    That case is ``x [..., K]`` contracted with ``W [K, N]`` (no batch dimensions, default precision, same
    dtype); anything else goes to ``jax.lax.dot_general`` unchanged.
    """
    (lc, rc), (lb, rb) = dimension_numbers
    simple = (rhs.ndim == 2 and tuple(lc) == (lhs.ndim - 1,) and tuple(rc) == (0,) and not lb and not rb
              and precision is None and lhs.dtype == rhs.dtype
              and preferred_element_type in (None, lhs.dtype) and kwargs.get("out_sharding") is None)
    if not simple:
        return lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                               preferred_element_type=preferred_element_type, **kwargs)
    return _linear_vjp(lhs, rhs)


# --------------------------------------------------------------------------------------------
# NHWC convolution (nnx.Conv)
# --------------------------------------------------------------------------------------------


def _conv(x, w, pad, stride=1):
    return lax.conv_general_dilated(x, w, (stride, stride), ((pad, pad), (pad, pad)), dimension_numbers=_NHWC)


def _taps_favoured(out_shape, w_shape) -> bool:
    kh, kw, i, o = w_shape
    positions = math.prod(out_shape[:-1])
    return kh * kw * i * o >= CONV_TAPS_RATIO * positions * (i + o)


def _conv3_dx_cpu(g, w, x_shape, stride):
    """Input gradient of a 3x3 / pad 1 conv with stride ``s``: ``Y = W[(a, b, I), O] @ g^T[O, P]`` (one GEMM
    streaming the kernel in its layout), then ``dx_pad[s i + a, s j + b] += Y[a, b][i, j]`` (nine
    strided placements, one fused loop) and ``dx = dx_pad[1:-1, 1:-1]``."""
    b, ho, wo, o = g.shape
    _, h, wd, i = x_shape
    gt = _barrier(jnp.transpose(g, (3, 0, 1, 2)).reshape(o, b * ho * wo))
    y = _mm(w.reshape(9 * i, o), gt).reshape(3, 3, i, b, ho, wo)
    zero = jnp.zeros((), y.dtype)
    acc = 0
    for a in range(3):
        for c in range(3):
            rows = (a, h + 2 - a - stride * (ho - 1) - 1, stride - 1)
            cols = (c, wd + 2 - c - stride * (wo - 1) - 1, stride - 1)
            acc = acc + lax.pad(y[a, c], zero, ((0, 0, 0), (0, 0, 0), rows, cols))
    return jnp.transpose(acc[:, :, 1:h + 1, 1:wd + 1], (1, 2, 3, 0))


def _conv3_dw_cpu(x, g, stride):
    """Weight gradient of a 3x3 / pad 1 conv with stride ``s``: the nine (strided) shifted copies of ``x^T``
    stacked to ``[(a, b, I), P]`` times ``g [P, O]`` gives ``[3, 3, I, O]`` directly in the kernel's layout."""
    b, ho, wo, o = g.shape
    i = x.shape[-1]
    xt = jnp.transpose(jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0))), (3, 0, 1, 2))
    taps = [xt[:, :, a:a + stride * (ho - 1) + 1:stride, c:c + stride * (wo - 1) + 1:stride].reshape(i, b * ho * wo)
            for a in range(3) for c in range(3)]
    return _mm(_barrier(jnp.stack(taps).reshape(9 * i, b * ho * wo)), g.reshape(-1, o)).reshape(3, 3, i, o)


def _make_conv(pad: int, stride: int):
    @jax.custom_vjp
    def conv(x, w):
        return _conv(x, w, pad, stride)

    def fwd(x, w):
        return _conv(x, w, pad, stride), (x, w)

    def default_grads(x, w, g):
        return jax.vjp(lambda x_, w_: _conv(x_, w_, pad, stride), x, w)[1](g)

    def bwd(res, g):
        x, w = res
        kh, kw, i, o = w.shape
        if (kh, kw, stride) == (1, 1, 1):  # a linear layer over channels
            dx, dw = _linear_bwd((x.reshape(-1, i), w.reshape(i, o)), g.reshape(-1, o))
            return dx.reshape(x.shape), dw.reshape(w.shape)
        if (kh, kw, pad) == (3, 3, 1) and _taps_favoured(g.shape, w.shape):
            def cpu(x, w, g):
                return (_conv3_dx_cpu(g, w, x.shape, stride).astype(x.dtype),
                        _conv3_dw_cpu(x, g, stride).astype(w.dtype))

            return lax.platform_dependent(x, w, g, cpu=cpu, default=default_grads)
        return default_grads(x, w, g)

    conv.defvjp(fwd, bwd)
    return conv


_CONVS = {(pad, stride): _make_conv(pad, stride) for pad, stride in ((0, 1), (1, 1), (1, 2))}


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1, batch_group_count=1, precision=None,
                         preferred_element_type=None, **kwargs):
    """``jax.lax.conv_general_dilated`` with the CPU-friendly gradient for NHWC / HWIO 1x1 (stride 1) and
    3x3 (padding 1, stride 1 or 2) kernels (same dtype, no dilation, one group); anything else goes to
    ``jax.lax.conv_general_dilated`` unchanged."""
    def ones(v):
        return v is None or all(int(s) == 1 for s in v)

    dn = dimension_numbers
    nhwc = (tuple(map(tuple, dn)) == tuple(map(tuple, _NHWC)) if isinstance(dn, lax.ConvDimensionNumbers)
            else dn == ("NHWC", "HWIO", "NHWC"))
    k = tuple(rhs.shape[:2]) if rhs.ndim == 4 else None
    pad = {(1, 1): 0, (3, 3): 1}.get(k)
    stride = int(window_strides[0]) if len(window_strides) == 2 and window_strides[0] == window_strides[1] else 0
    simple = (nhwc and lhs.ndim == 4 and (pad, stride) in _CONVS and ones(lhs_dilation)
              and ones(rhs_dilation) and feature_group_count == 1 and batch_group_count == 1 and precision is None
              and lhs.dtype == rhs.dtype and preferred_element_type in (None, lhs.dtype)
              and kwargs.get("out_sharding") is None and not isinstance(padding, str)
              and [tuple(int(v) for v in p) for p in padding] == [(pad, pad), (pad, pad)])
    if not simple:
        return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
                                        rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
                                        feature_group_count=feature_group_count, batch_group_count=batch_group_count,
                                        precision=precision, preferred_element_type=preferred_element_type, **kwargs)
    return _CONVS[pad, stride](lhs, rhs)


# --------------------------------------------------------------------------------------------
# Nearest-neighbour 2x upsampling (Upsample2D)
# --------------------------------------------------------------------------------------------


@jax.custom_vjp
def upsample_nearest_2x(x):
    """``[B, H, W, C] -> [B, 2H, 2W, C]``, every pixel repeated 2x2 (one broadcast copy).

    The gradient sums each 2x2 block as four strided slices (an elementwise fusion). JAX's rule for the
    same broadcast is a reduction, which XLA:CPU hands to YNNPACK together with the convolution that
    produced the cotangent (the upsampler's own conv), and YNNPACK's convolutions are several times slower
    than XLA's (docs/performance.md).
    """
    b, h, w, c = x.shape
    return jnp.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c)).reshape(b, 2 * h, 2 * w, c)


def _upsample_fwd(x):
    return upsample_nearest_2x(x), None


def _upsample_bwd(_, g):
    return (g[:, 0::2, 0::2] + g[:, 0::2, 1::2] + g[:, 1::2, 0::2] + g[:, 1::2, 1::2],)


upsample_nearest_2x.defvjp(_upsample_fwd, _upsample_bwd)


# --------------------------------------------------------------------------------------------
# Layer factories (float32 parameters, compute dtype ``dtype``)
# --------------------------------------------------------------------------------------------


def linear(in_features: int, out_features: int, dtype, rngs: nnx.Rngs, *, bias: bool = True) -> nnx.Linear:
    """``nnx.Linear`` (float32 parameters, ``kernel [in, out]``) with :func:`dot_general`."""
    return nnx.Linear(in_features, out_features, use_bias=bias, dtype=dtype, param_dtype=jnp.float32,
                      dot_general=dot_general, rngs=rngs)


def conv2d(in_ch: int, out_ch: int, kernel: int, dtype, rngs: nnx.Rngs, *, stride: int = 1,
           padding: int | None = None) -> nnx.Conv:
    """NHWC ``nnx.Conv`` (float32 parameters, ``kernel [kh, kw, in, out]``) with :func:`conv_general_dilated`;
    ``padding`` defaults to ``kernel // 2`` on every side."""
    pad = kernel // 2 if padding is None else padding
    return nnx.Conv(in_ch, out_ch, kernel_size=(kernel, kernel), strides=(stride, stride),
                    padding=((pad, pad), (pad, pad)), dtype=dtype, param_dtype=jnp.float32,
                    conv_general_dilated=conv_general_dilated, rngs=rngs)
