"""Custom-VJP linear / conv primitives (facecrafter_jax.models.ops) against PyTorch autograd, and what XLA computes."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax import lax

from facecrafter_jax.models import ops

NHWC = lax.ConvDimensionNumbers((0, 3, 1, 2), (3, 2, 0, 1), (0, 3, 1, 2))  # what nnx.Conv passes


def _rand(seed, *shape):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def _conv(x, w, stride=1):
    k = w.shape[0]
    pad = k // 2
    return ops.conv_general_dilated(x, w, (stride, stride), [(pad, pad), (pad, pad)], lhs_dilation=(1, 1),
                                    rhs_dilation=(1, 1), dimension_numbers=NHWC, feature_group_count=1)


def _torch_conv_grads(x, w, g, stride=1):
    tx = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()).requires_grad_(True)
    tw = torch.from_numpy(w.transpose(3, 2, 0, 1).copy()).requires_grad_(True)
    y = torch.nn.functional.conv2d(tx, tw, stride=stride, padding=w.shape[0] // 2)
    dx, dw = torch.autograd.grad(y, (tx, tw), torch.from_numpy(g.transpose(0, 3, 1, 2).copy()))
    return y.detach().numpy().transpose(0, 2, 3, 1), dx.numpy().transpose(0, 2, 3, 1), dw.numpy().transpose(2, 3, 1, 0)


@pytest.mark.parametrize("shape,kernel,stride,taps", [
    ((1, 4, 4, 96), (3, 3, 96, 40), 1, True),      # few positions, many channels: GEMM + shifts on CPU
    ((2, 3, 5, 64), (3, 3, 64, 48), 1, True),      # non-square, batch 2
    ((1, 16, 16, 8), (3, 3, 8, 12), 1, False),     # JAX's own rule
    ((2, 4, 4, 96), (1, 1, 96, 40), 1, None),      # 1x1: a linear layer over channels
    ((1, 8, 8, 96), (3, 3, 96, 40), 2, True),      # stride 2 (the downsamplers), GEMM + strided placement
    ((2, 7, 9, 96), (3, 3, 96, 40), 2, True),      # stride 2, odd sizes
    ((1, 8, 8, 16), (3, 3, 16, 16), 2, False),     # stride 2, JAX's own rule
])
def test_conv_value_and_gradients_match_torch(shape, kernel, stride, taps):
    x, w = _rand(0, *shape), _rand(1, *kernel) * 0.1
    y = np.asarray(jax.jit(lambda x, w: _conv(x, w, stride))(x, w))
    if taps is not None:
        assert ops._taps_favoured(y.shape, kernel) is taps
    g = _rand(2, *y.shape)
    dx, dw = jax.jit(jax.grad(lambda x, w: jnp.sum(_conv(x, w, stride) * g), (0, 1)))(x, w)
    ref_y, ref_dx, ref_dw = _torch_conv_grads(x, w, g, stride)
    for mine, ref in ((y, ref_y), (dx, ref_dx), (dw, ref_dw)):
        assert mine.shape == ref.shape
        assert np.abs(np.asarray(mine) - ref).max() <= 1e-5 * max(1.0, np.abs(ref).max())


@pytest.mark.parametrize("x_shape,w_shape", [((2, 8, 256), (256, 96)),   # in_features >= 2 x tokens: swapped
                                             ((64, 32), (32, 48))])      # JAX's own rule
def test_linear_gradients_match_torch(x_shape, w_shape):
    x, w = _rand(3, *x_shape), _rand(4, *w_shape) * 0.1
    dn = (((x.ndim - 1,), (0,)), ((), ()))
    g = _rand(5, *x_shape[:-1], w_shape[1])
    dx, dw = jax.jit(jax.grad(lambda x, w: jnp.sum(ops.dot_general(x, w, dn) * g), (0, 1)))(x, w)
    tx, tw = torch.from_numpy(x).requires_grad_(True), torch.from_numpy(w).requires_grad_(True)
    ref_dx, ref_dw = torch.autograd.grad(tx @ tw, (tx, tw), torch.from_numpy(g))
    assert np.abs(np.asarray(dx) - ref_dx.numpy()).max() <= 1e-5 * np.abs(ref_dx.numpy()).max()
    assert np.abs(np.asarray(dw) - ref_dw.numpy()).max() <= 1e-5 * np.abs(ref_dw.numpy()).max()


def _hlo(fn, *args) -> str:
    return jax.jit(fn).lower(*args).compile().as_text()


def test_frozen_conv_backward_copies_no_kernel_and_skips_the_weight_gradient():
    # The case the train step hits at the 8x8 / 4x4 levels: gradient w.r.t. the input only, kernel frozen.
    x, w = jnp.asarray(_rand(6, 1, 4, 4, 256)), jnp.asarray(_rand(7, 3, 3, 256, 256))
    text = _hlo(jax.grad(lambda x, w: jnp.sum(jnp.sin(_conv(x, w)))), x, w)
    assert "reverse(" not in text  # no spatially flipped kernel
    assert not re.search(r"f32\[3,3,256,256\]\{[0-9,]+\} (copy|transpose|fusion)\(", text)  # no kernel re-layout
    assert "convolution(" in text and text.count("convolution(") == 1  # the forward only: dx is a GEMM
    # JAX's own rule, for contrast, flips and re-lays out the whole kernel
    plain = _hlo(jax.grad(lambda x, w: jnp.sum(jnp.sin(lax.conv_general_dilated(
        x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"))))), x, w)
    assert re.search(r"f32\[3,3,256,256\]\{[0-9,]+\} (copy|transpose|fusion)\(", plain)
    # no weight-gradient product when only x is differentiated (a dot producing the [(3, 3, 256), 256]
    # kernel gradient appears only when w is differentiated too)
    dw_product = re.compile(r"= f32\[2304,256\]\{1,0\} (dot|fusion)\(")
    assert not dw_product.search(text)
    both = _hlo(jax.grad(lambda x, w: jnp.sum(jnp.sin(_conv(x, w))), (0, 1)), x, w)
    assert dw_product.search(both)


def test_wide_linear_input_gradient_streams_the_weight():
    x, w = jnp.asarray(_rand(8, 4, 512)), jnp.asarray(_rand(9, 512, 2048))
    dn = (((1,), (0,)), ((), ()))
    text = _hlo(jax.grad(lambda x: jnp.sum(jnp.sin(ops.dot_general(x, w, dn)))), x)
    # dx^T = W [512, 2048] @ g^T [2048, 4]: the weight is the left operand, contracted on its minor axis
    assert re.search(r"f32\[512,4\]\{1,0\} (dot|fusion)\(", text), text


def test_upsample_matches_torch_nearest_and_its_gradient_is_no_reduction():
    x = _rand(14, 2, 3, 5, 4)
    g = _rand(15, 2, 6, 10, 4)
    y, vjp = jax.vjp(ops.upsample_nearest_2x, jnp.asarray(x))
    tx = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()).requires_grad_(True)
    ty = torch.nn.functional.interpolate(tx, scale_factor=2.0, mode="nearest")
    (tdx,) = torch.autograd.grad(ty, tx, torch.from_numpy(g.transpose(0, 3, 1, 2).copy()))
    np.testing.assert_array_equal(np.asarray(y), ty.detach().numpy().transpose(0, 2, 3, 1))
    np.testing.assert_allclose(np.asarray(vjp(jnp.asarray(g))[0]), tdx.numpy().transpose(0, 2, 3, 1), atol=1e-6)
    text = _hlo(jax.grad(lambda x: jnp.sum(jnp.sin(ops.upsample_nearest_2x(x)))), jnp.asarray(x))
    assert " reduce(" not in text


def test_unsupported_arguments_fall_back_to_lax():
    x, w = jnp.asarray(_rand(10, 1, 6, 6, 4)), jnp.asarray(_rand(11, 3, 3, 4, 4))
    got = ops.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    ref = lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    np.testing.assert_array_equal(np.asarray(got), np.asarray(ref))
    a, b = jnp.asarray(_rand(12, 2, 3, 5)), jnp.asarray(_rand(13, 2, 5, 4))
    batched = (((2,), (1,)), ((0,), (0,)))
    np.testing.assert_array_equal(np.asarray(ops.dot_general(a, b, batched)), np.asarray(lax.dot_general(a, b, batched)))
