"""FaceCrafter control modules: token encoders, the adapter parameter type and adapter installation.

Everything FaceCrafter trains is an :class:`AdapterParam` (a subclass of ``nnx.Param``), so the
trainable / frozen split is a type filter, never a name match::

    TRAINABLE = AdapterParam                                  # token encoders + per-layer to_k_c / to_v_c
    FROZEN = nnx.All(nnx.Param, nnx.Not(AdapterParam))        # the Arc2Face UNet
    grads = nnx.grad(loss, argnums=nnx.DiffState(0, TRAINABLE))(model, ...)

Token encoder (IP-Adapter style), one per control, ``raw condition -> [B, N, D]``::

    features (fixed normalisation) -> proj_in (Linear) -> GELU (erf) -> proj_out (Linear) -> reshape [B, N, D] -> norm (LayerNorm)

Inputs and their fixed normalisation (:func:`control_features`):

``landmark``
    MediaPipe's 478 face landmarks ``[B, 478, 3]`` as the records store them (x, y in [0, 1] of the
    image width / height, z MediaPipe's relative depth); x and y are centred (``- 0.5``), z is kept;
    flattened to 1434 values. ``[B, 1434]`` is accepted too.
``emotion``
    ``[B, 10]``: EmoNet's 8 class probabilities, then valence and arousal (in [-1, 1]); used as is.

A dropped ("null") condition is the all-zero raw input fed through the encoder, so the null tokens are
learned (IP-Adapter). Zero is never a real input (probabilities sum to 1; all landmarks in one corner).

Decoupled cross-attention (:func:`add_control_adapters`): every cross-attention layer gets
``to_k_c[name]`` / ``to_v_c[name]`` (``D -> heads * d``, no bias; ``nnx.Dict`` so the Flax path is
``...attn2.to_k_c.landmark.kernel``), initialised as copies of that layer's ``to_k`` / ``to_v``.
"""

from __future__ import annotations

from typing import Iterable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from facecrafter_jax.face.vocabulary import CONTROL_INPUT_DIMS, EMOTION_DIM, NUM_LANDMARKS

__all__ = [
    "AdapterParam",
    "TRAINABLE",
    "FROZEN",
    "CONTROL_INPUT_DIMS",
    "NUM_LANDMARKS",
    "AdapterLinear",
    "AdapterLayerNorm",
    "ControlTokenEncoder",
    "control_features",
    "null_input",
    "feature_offset",
    "add_control_adapters",
    "ADAPTER_VALUE_INITS",
    "count_params",
]

LAYER_NORM_EPS = 1e-5  # torch.nn.LayerNorm's default, used on both sides of the export


class AdapterParam(nnx.Param):
    """A trainable FaceCrafter parameter (token encoders and decoupled K/V projections)."""


TRAINABLE = AdapterParam
FROZEN = nnx.All(nnx.Param, nnx.Not(AdapterParam))


def count_params(module: nnx.Module, variable_filter=nnx.Param) -> int:
    """Number of scalar parameters of ``module`` selected by ``variable_filter`` (works on abstract models)."""
    return sum(int(np.prod(v.get_value().shape)) for _, v in nnx.to_flat_state(nnx.state(module, variable_filter)))


# --------------------------------------------------------------------------------------------
# Small layers whose parameters are AdapterParam (leaf names kernel / bias / scale, like nnx)
# --------------------------------------------------------------------------------------------


class AdapterLinear(nnx.Module):
    """``y = x @ kernel + bias`` with ``kernel [in, out]`` stored as :class:`AdapterParam` (float32).

    Either random (LeCun normal kernel, zero bias, from ``rngs``) or initialised from given arrays
    (``kernel`` / ``bias``; copied, so no buffer is shared with the source).
    """

    def __init__(self, in_features: int, out_features: int, *, use_bias: bool = True, dtype=jnp.float32,
                 rngs: nnx.Rngs | None = None, kernel: jax.Array | None = None, bias: jax.Array | None = None):
        self.in_features, self.out_features = in_features, out_features
        self.dtype = dtype
        if kernel is None:
            if rngs is None:
                raise ValueError("AdapterLinear needs rngs for a random initialisation (or a kernel to copy)")
            kernel = nnx.initializers.lecun_normal()(rngs.params(), (in_features, out_features), jnp.float32)
        else:
            kernel = jnp.array(kernel, dtype=jnp.float32, copy=True)
        if tuple(kernel.shape) != (in_features, out_features):
            raise ValueError(f"AdapterLinear kernel must be [{in_features}, {out_features}], got {tuple(kernel.shape)}")
        self.kernel = AdapterParam(kernel)
        if use_bias:
            bias = jnp.zeros((out_features,), jnp.float32) if bias is None else jnp.array(bias, dtype=jnp.float32, copy=True)
            self.bias = AdapterParam(bias)
        else:
            if bias is not None:
                raise ValueError("AdapterLinear: bias given with use_bias=False")
            self.bias = None

    def __call__(self, x: jax.Array) -> jax.Array:
        y = jnp.dot(x.astype(self.dtype), self.kernel[...].astype(self.dtype))
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


class AdapterLayerNorm(nnx.Module):
    """LayerNorm over the last axis with ``scale`` / ``bias`` as :class:`AdapterParam`; statistics in float32."""

    def __init__(self, dim: int, *, eps: float = LAYER_NORM_EPS, dtype=jnp.float32):
        self.dim, self.eps, self.dtype = dim, eps, dtype
        self.scale = AdapterParam(jnp.ones((dim,), jnp.float32))
        self.bias = AdapterParam(jnp.zeros((dim,), jnp.float32))

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(jnp.float32)
        mean = jnp.mean(x, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
        y = (x - mean) * jax.lax.rsqrt(var + self.eps) * self.scale[...] + self.bias[...]
        return y.astype(self.dtype)


# --------------------------------------------------------------------------------------------
# Token encoders
# --------------------------------------------------------------------------------------------


def null_input(control: str, batch: int = 1) -> jax.Array:
    """The null raw input of a control: zeros ``[batch, 478, 3]`` (landmark) or ``[batch, 10]`` (emotion).

    Fed through the control's encoder it gives the learned null tokens: what an absent condition is.
    """
    shapes = {"landmark": (NUM_LANDMARKS, 3), "emotion": (EMOTION_DIM,)}
    if control not in shapes:
        raise ValueError(f"unknown control {control!r}; known: {sorted(shapes)}")
    return jnp.zeros((batch,) + shapes[control], jnp.float32)


def control_features(kind: str, condition: jax.Array) -> jax.Array:
    """Fixed normalisation of a raw condition to the encoder input ``[B, CONTROL_INPUT_DIMS[kind]]`` (float32).

    ``landmark``: ``[B, 478, 3]`` or ``[B, 1434]``; x, y centred by ``- 0.5``, z unchanged.
    ``emotion``: ``[B, 10]`` unchanged. An all-zero raw input is the null condition.
    """
    x = jnp.asarray(condition, jnp.float32)
    if kind == "landmark":
        if x.ndim == 2 and x.shape[1] == NUM_LANDMARKS * 3:
            x = x.reshape(x.shape[0], NUM_LANDMARKS, 3)
        if x.ndim != 3 or x.shape[1:] != (NUM_LANDMARKS, 3):
            raise ValueError(f"landmarks must be [B, {NUM_LANDMARKS}, 3] (or [B, {NUM_LANDMARKS * 3}]), got shape {x.shape}")
        x = x.reshape(x.shape[0], NUM_LANDMARKS * 3)
    elif kind == "emotion":
        if x.ndim != 2 or x.shape[1] != CONTROL_INPUT_DIMS["emotion"]:
            raise ValueError(f"emotion must be [B, 10] (8 class probabilities, valence, arousal), got shape {x.shape}")
    offset = feature_offset(kind)
    return x - jnp.asarray(offset) if offset.any() else x


def feature_offset(kind: str) -> np.ndarray:
    """The constant ``c`` with ``control_features(kind, x) = flatten(x) - c`` (float32 ``[CONTROL_INPUT_DIMS[kind]]``).

    ``landmark``: ``(0.5, 0.5, 0)`` per point; ``emotion``: zeros. Being affine, the normalisation folds into
    the encoder's first bias (``b1 - c @ W1``), which is how the diffusers IP-Adapter export takes raw inputs
    (:mod:`facecrafter_jax.convert.ip_adapter`).
    """
    if kind not in CONTROL_INPUT_DIMS:
        raise ValueError(f"unknown control {kind!r}; known controls: {sorted(CONTROL_INPUT_DIMS)}")
    if kind == "landmark":
        return np.tile(np.asarray([0.5, 0.5, 0.0], np.float32), NUM_LANDMARKS)
    return np.zeros((CONTROL_INPUT_DIMS[kind],), np.float32)


class ControlTokenEncoder(nnx.Module):
    """``raw condition -> [B, num_tokens, output_dim]`` tokens for one control (``kind``: landmark / emotion).

    ``features -> proj_in -> GELU -> proj_out -> reshape -> norm``; every parameter is an :class:`AdapterParam`.
    """

    def __init__(self, kind: str, *, num_tokens: int, hidden_dim: int, output_dim: int, dtype=jnp.float32,
                 rngs: nnx.Rngs):
        if kind not in CONTROL_INPUT_DIMS:
            raise ValueError(f"unknown control {kind!r}; known controls: {sorted(CONTROL_INPUT_DIMS)}")
        for what, v in (("num_tokens", num_tokens), ("hidden_dim", hidden_dim), ("output_dim", output_dim)):
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"ControlTokenEncoder({kind!r}): {what} must be a positive int, got {v!r}")
        self.kind = kind
        self.num_tokens, self.hidden_dim, self.output_dim = num_tokens, hidden_dim, output_dim
        self.dtype = dtype
        self.proj_in = AdapterLinear(CONTROL_INPUT_DIMS[kind], hidden_dim, dtype=dtype, rngs=rngs)
        self.proj_out = AdapterLinear(hidden_dim, num_tokens * output_dim, dtype=dtype, rngs=rngs)
        self.norm = AdapterLayerNorm(output_dim, dtype=dtype)

    def __call__(self, condition: jax.Array) -> jax.Array:
        x = control_features(self.kind, condition)
        h = jax.nn.gelu(self.proj_in(x), approximate=False)
        tokens = self.proj_out(h).reshape(x.shape[0], self.num_tokens, self.output_dim)
        return self.norm(tokens)


# --------------------------------------------------------------------------------------------
# Decoupled cross-attention adapters
# --------------------------------------------------------------------------------------------


def _check_name(name) -> str:
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"control name must be a Python identifier string, got {name!r}")
    return name


ADAPTER_VALUE_INITS = ("copy", "zeros")


def add_control_adapters(unet, names: Iterable[str], *, value_init: str = "copy") -> None:
    """Install decoupled key/value projections for ``names`` in every cross-attention layer of ``unet``.

    Each ``attn2`` gains ``to_k_c[name]`` and ``to_v_c[name]`` (:class:`AdapterLinear`, no bias when the
    layer's ``to_k`` has none), initialised as copies of that layer's ``to_k`` / ``to_v``: at
    initialisation a control branch attends like the identity branch, to the control tokens. Works on
    a loaded (converted) UNet; calling it again with new names adds them (stage a, then stage b).
    Adapters compute in the layer's dtype. Raises if a name is already installed.

    ``value_init="zeros"`` starts every ``to_v_c`` at zero instead (``to_k_c`` still a copy): a new branch
    then adds exactly nothing and grows only where it lowers the loss, instead of first having to undo the
    perturbation a copied value projection adds (the toy pipeline's short adapter stages use it; IP-Adapter
    and the paper copy).
    """
    if value_init not in ADAPTER_VALUE_INITS:
        raise ValueError(f"add_control_adapters: value_init must be one of {ADAPTER_VALUE_INITS}, got {value_init!r}")
    names = [_check_name(n) for n in names]
    if not names:
        raise ValueError("add_control_adapters: no control names given")
    if len(set(names)) != len(names):
        raise ValueError(f"add_control_adapters: duplicate control names in {names}")
    layers = unet.cross_attention_layers()
    if not layers:
        raise ValueError("add_control_adapters: the UNet has no cross-attention layers")
    dims = {attn.to_k.kernel.shape[0] for attn in layers}
    if len(dims) != 1:
        raise ValueError(f"add_control_adapters: cross-attention layers have different context widths {sorted(dims)}; "
                         "one set of control tokens cannot feed them all")
    for attn in layers:
        existing = getattr(attn, "to_k_c", None)
        clash = [n for n in names if existing is not None and n in existing]
        if clash:
            raise ValueError(f"{attn.layer_name}: control adapter(s) {clash} already installed")

    def copy(linear: nnx.Linear) -> AdapterLinear:
        k = linear.kernel.get_value()
        b = linear.bias.get_value() if linear.bias is not None else None
        return AdapterLinear(k.shape[0], k.shape[1], use_bias=b is not None, dtype=linear.dtype, kernel=k, bias=b)

    for attn in layers:
        if getattr(attn, "to_k_c", None) is None:
            attn.to_k_c = nnx.Dict({})
            attn.to_v_c = nnx.Dict({})
        for n in names:
            attn.to_k_c[n] = copy(attn.to_k)
            attn.to_v_c[n] = copy(attn.to_v)
            if value_init == "zeros":
                v = attn.to_v_c[n]
                v.kernel.set_value(jnp.zeros_like(v.kernel.get_value()))
                if v.bias is not None:
                    v.bias.set_value(jnp.zeros_like(v.bias.get_value()))
