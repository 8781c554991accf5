"""Attention, feed-forward and the spatial transformer of the SD UNet (names mirror diffusers).

The attention *implementation* is chosen in exactly one place, :func:`attend`:

``"explicit"``
    ``softmax(Q K^T / sqrt(d)) V`` written out with einsums; logits and softmax in float32 whatever the
    compute dtype; can return the probabilities ``[B, heads, Lq, Lk]``. Used by the cross-attention
    layers whose maps are needed (AD loss, visualisation).
``"xla"`` / ``"cudnn"`` / ``"auto"``
    :func:`jax.nn.dot_product_attention` (fused kernels where available; ``"auto"`` lets JAX pick).
    Outputs only.

Attention probabilities leave the model through Flax NNX intermediates: an :class:`Attention` whose
implementation is ``"explicit"`` sows them as :class:`AttentionProbs` under the name ``"probs"`` when (and
only when) it runs inside ``nnx.capture(..., AttentionProbs)``; outside a capture nothing is stored, so
there is no cost when maps are not requested. This works inside ``nnx.jit`` / ``nnx.remat``.

FaceCrafter control branches (decoupled cross-attention, see :meth:`Attention.add_control_branches` and
``docs/method.md``): a cross-attention layer with control adapters (``to_k_c[name]``, ``to_v_c[name]``,
installed by :func:`facecrafter_jax.models.control.add_control_adapters`) adds one attention branch per
control passed in ``controls``. Explicit layers then also sow ``"probs_<name>"`` (:class:`AttentionProbs`)
and the per-branch outputs before ``to_out`` as :class:`BranchOutputs` (``"out_id"``, ``"out_<name>"``).

All tensors are ``[B, L, C]`` (tokens last-dim channels); heads are split once to ``[B, L, heads, d]``.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from .ops import conv2d, linear
from .resnet import group_norm

__all__ = [
    "ATTENTION_IMPLEMENTATIONS",
    "AttentionProbs",
    "BranchOutputs",
    "attend",
    "layer_norm",
    "Attention",
    "GEGLU",
    "FeedForward",
    "BasicTransformerBlock",
    "Transformer2DModel",
]

ATTENTION_IMPLEMENTATIONS = ("explicit", "xla", "cudnn", "auto")


class AttentionProbs(nnx.Intermediate):
    """Variable type of sown attention probabilities (capture it with ``nnx.capture(fn, AttentionProbs)``)."""


class BranchOutputs(nnx.Intermediate):
    """Variable type of sown per-branch cross-attention outputs ``[B, Lq, heads, d]`` (before ``to_out``).

    Sown only by explicit layers that run control branches, inside ``nnx.capture(..., BranchOutputs)``.
    """


CPU_LOGITS_BUDGET = 1 << 21
"""float32 logits per block of the CPU attention path (8 MB)."""


def _check_implementation(implementation: str) -> None:
    if implementation not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(f"unknown attention implementation {implementation!r}; expected one of {ATTENTION_IMPLEMENTATIONS}")


def attend(q: jax.Array, k: jax.Array, v: jax.Array, *, implementation: str = "xla", return_probs: bool = False,
           scale: float | None = None):
    """Scaled dot-product attention on head-split tensors.

    Args:
      q: ``[B, Lq, heads, d]``; k, v: ``[B, Lk, heads, d]`` (same dtype).
      implementation: ``"explicit"`` (float32 logits/softmax, can return probabilities) or a fused
        :func:`jax.nn.dot_product_attention` path: ``"xla"``, ``"cudnn"``, ``"auto"`` (JAX chooses).
      return_probs: also return the probabilities ``[B, heads, Lq, Lk]`` (float32); explicit path only.
      scale: logit scale, default ``d ** -0.5``.

    Returns:
      ``[B, Lq, heads, d]`` in ``v.dtype``, or ``(output, probs)`` with ``return_probs``.

    On CPU, ``"xla"`` and ``"auto"`` run a query-blocked attention instead of
    :func:`jax.nn.dot_product_attention` (chosen per platform at lowering time with
    :func:`jax.lax.platform_dependent`; other platforms are unchanged): heads-major layout, the scale
    folded into ``q``, and, when the float32 logits of the whole call exceed 8 MB, a ``lax.map`` over
    batch elements and blocks of queries sized so that one block's logits ``[heads, block, Lk]``
    stay around 8 MB (instead of the whole ``[B, heads, Lq, Lk]`` map: 2-4x faster for 1024-4096
    tokens, see ``docs/performance.md``). Each query row
    still sees all keys, so the result is the same softmax (float32 logits and sums); the output is
    normalised after the value product. Its gradient is a ``jax.custom_vjp`` in the style of flash
    attention: only the output and the per-row log-sum-exp are kept, and the backward pass recomputes
    each block's probabilities (memory linear in the sequence length; reverse mode only).
    """
    _check_implementation(implementation)
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"attend expects [B, L, heads, d] tensors, got q{q.shape} k{k.shape} v{v.shape}")
    if scale is None:
        scale = q.shape[-1] ** -0.5
    if implementation == "explicit":
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * jnp.float32(scale)
        probs = jax.nn.softmax(logits, axis=-1)
        out = jnp.einsum("bhqk,bkhd->bqhd", probs.astype(v.dtype), v)
        return (out, probs) if return_probs else out
    if return_probs:
        raise ValueError(f"attention probabilities need implementation='explicit', not {implementation!r}")

    def fused(q, k, v):
        return jax.nn.dot_product_attention(q, k, v, scale=scale,
                                            implementation=None if implementation == "auto" else implementation)

    if implementation == "cudnn":
        return fused(q, k, v)

    def blocked(q, k, v):  # the CPU path (see the docstring)
        b, lq, h, d = q.shape
        lk = k.shape[1]
        budget = CPU_LOGITS_BUDGET  # float32 logits per block
        fits = b * h * lq * lk <= budget  # one block for everything; else per batch element, in query blocks
        n = 1 if fits else -(-lq // max(16, budget // (h * lk)))  # (>= 16 rows for the matmuls)
        size = -(-lq // n)
        pad = n * size - lq  # the last block is padded with zero queries (their outputs are dropped)

        def fwd_block(qb, kb, vb):  # [..., n, d], [..., Lk, d] -> float32 out [..., n, d], logsumexp [..., n]
            logits = jnp.einsum("...qd,...kd->...qk", qb, kb, preferred_element_type=jnp.float32)
            m = jnp.max(logits, axis=-1, keepdims=True)
            e = jnp.exp(logits - m)
            s = jnp.sum(e, axis=-1, keepdims=True)
            out = jnp.einsum("...qk,...kd->...qd", e.astype(vb.dtype), vb, preferred_element_type=jnp.float32)
            return out / s, (m + jnp.log(s))[..., 0]

        def t_matmul(a, b):  # a [..., q, k], b [..., q, d] -> [..., k, d] as (b^T a)^T
            # XLA:CPU runs "contract the major axis of both" ~5-12x slower than this orientation
            # (transposed small operand, the [q, k] block streamed in its own layout); the barriers keep
            # the algebraic simplifier from folding it back (docs/performance.md).
            bt = jax.lax.optimization_barrier(jnp.swapaxes(b, -1, -2))
            out = jnp.einsum("...dq,...qk->...dk", bt, a, preferred_element_type=jnp.float32)
            return jnp.swapaxes(jax.lax.optimization_barrier(out), -1, -2)

        def bwd_block(qb, kb, vb, dob, lseb, deltab):  # recomputes the block's probabilities
            logits = jnp.einsum("...qd,...kd->...qk", qb, kb, preferred_element_type=jnp.float32)
            p = jnp.exp(logits - lseb[..., None])
            dv = t_matmul(p.astype(dob.dtype), dob)
            dp = jnp.einsum("...qd,...kd->...qk", dob, vb, preferred_element_type=jnp.float32)
            ds = p * (dp - deltab[..., None])
            dq = jnp.einsum("...qk,...kd->...qd", ds.astype(kb.dtype), kb, preferred_element_type=jnp.float32)
            dk = t_matmul(ds.astype(qb.dtype), qb)
            return dq, dk, dv

        def split(x):  # [h, Lq, ...] -> [n, h, size, ...]
            x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2)) if pad else x
            return jnp.swapaxes(x.reshape((h, n, size) + x.shape[2:]), 0, 1)

        def merge(x):  # [n, h, size, ...] -> [h, Lq, ...]
            return jnp.swapaxes(x, 0, 1).reshape((h, n * size) + x.shape[3:])[:, :lq]

        def forward(qh, kh, vh):
            if fits:
                return fwd_block(qh, kh, vh)

            def one(args):
                qi, ki, vi = args
                if n == 1:
                    return fwd_block(qi, ki, vi)
                out, lse = jax.lax.map(lambda qb: fwd_block(qb, ki, vi), split(qi))
                return merge(out), merge(lse)

            return jax.lax.map(one, (qh, kh, vh))

        def backward(res, dout):  # flash-attention style: nothing [Lq, Lk]-sized was kept
            qh, kh, vh, out, lse = res
            delta = jnp.sum(dout.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)
            if fits:
                dq, dk, dv = bwd_block(qh, kh, vh, dout, lse, delta)
            else:
                def one(args):
                    qi, ki, vi, doi, lsei, deltai = args
                    if n == 1:
                        return bwd_block(qi, ki, vi, doi, lsei, deltai)

                    def step(carry, blk):
                        dqb, dkb, dvb = bwd_block(blk[0], ki, vi, blk[1], blk[2], blk[3])
                        return (carry[0] + dkb, carry[1] + dvb), dqb

                    zeros = jnp.zeros(ki.shape, jnp.float32)
                    (dk, dv), dq = jax.lax.scan(step, (zeros, zeros), tuple(map(split, (qi, doi, lsei, deltai))))
                    return merge(dq), dk, dv

                dq, dk, dv = jax.lax.map(one, (qh, kh, vh, dout, lse, delta))
            return dq.astype(qh.dtype), dk.astype(kh.dtype), dv.astype(vh.dtype)

        @jax.custom_vjp
        def attention(qh, kh, vh):  # [B, h, L, d], q already scaled
            return forward(qh, kh, vh)[0].astype(v.dtype)

        def attention_fwd(qh, kh, vh):
            out, lse = forward(qh, kh, vh)
            out = out.astype(v.dtype)
            return out, (qh, kh, vh, out, lse)

        attention.defvjp(attention_fwd, backward)
        qh = jnp.swapaxes(q, 1, 2) * jnp.asarray(scale, q.dtype)
        return jnp.swapaxes(attention(qh, jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)), 1, 2)

    return jax.lax.platform_dependent(q, k, v, cpu=blocked, default=fused)


def _capturing(module: nnx.Module) -> bool:
    # nnx.capture installs `__captures__` on every submodule for the duration of the call; outside a
    # capture, Module.sow would instead store the value as a new attribute (deprecated), which we avoid.
    return hasattr(module, "__captures__")


def layer_norm(dim: int, eps: float, dtype, rngs: nnx.Rngs) -> nnx.LayerNorm:
    """LayerNorm with float32 parameters; statistics are computed in float32 by Flax for any ``dtype``."""
    return nnx.LayerNorm(dim, epsilon=eps, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)


def _linear(i: int, o: int, dtype, rngs: nnx.Rngs, *, bias: bool = True) -> nnx.Linear:
    return linear(i, o, dtype, rngs, bias=bias)


class Attention(nnx.Module):
    """Multi-head (self- or cross-) attention: ``to_q``, ``to_k``, ``to_v`` (no bias), ``to_out = [Linear, Dropout]``.

    The forward pass is split into small steps so that extra key/value sets can reuse the query
    (IP-Adapter-style decoupled cross-attention)::

        q = attn.project_query(x)                          # [B, L, heads, d], computed once
        out = attn.attend(q, *attn.project_key_value(ctx))  # main branch, sows "probs"
        k_c, v_c = attn.project_key_value(tokens, attn.to_k_c, attn.to_v_c)
        out = out + lam * attn.attend(q, k_c, v_c, probs_name="probs_c")
        y = attn.project_out(out)

    Attributes set by the UNet: ``layer_index`` (0..N-1 for cross-attention layers in down -> mid -> up
    order, ``None`` otherwise), ``layer_name`` (the dotted module path) and ``implementation``.
    """

    def __init__(self, query_dim: int, cross_attention_dim: int | None = None, *, heads: int, dim_head: int,
                 dropout: float = 0.0, bias: bool = False, out_bias: bool = True, implementation: str = "xla",
                 dtype=jnp.float32, rngs: nnx.Rngs):
        _check_implementation(implementation)
        inner = heads * dim_head
        kv_dim = cross_attention_dim if cross_attention_dim is not None else query_dim
        self.heads, self.dim_head = heads, dim_head
        self.scale = dim_head ** -0.5
        self.is_cross_attention = cross_attention_dim is not None
        self.implementation = implementation
        self.layer_index: int | None = None
        self.layer_name: str | None = None
        self.dtype = dtype
        self.to_q = _linear(query_dim, inner, dtype, rngs, bias=bias)
        self.to_k = _linear(kv_dim, inner, dtype, rngs, bias=bias)
        self.to_v = _linear(kv_dim, inner, dtype, rngs, bias=bias)
        self.to_out = nnx.List([
            _linear(inner, query_dim, dtype, rngs, bias=out_bias),
            nnx.Dropout(dropout, rngs=rngs if dropout > 0 else None),
        ])

    # -- the steps -------------------------------------------------------------------------------
    def split_heads(self, x: jax.Array) -> jax.Array:
        """``[B, L, heads * d] -> [B, L, heads, d]`` (diffusers' head order)."""
        return x.reshape(x.shape[0], x.shape[1], self.heads, self.dim_head)

    def project_query(self, hidden_states: jax.Array) -> jax.Array:
        return self.split_heads(self.to_q(hidden_states))

    def project_key_value(self, context: jax.Array, to_k: Callable | None = None,
                          to_v: Callable | None = None) -> tuple[jax.Array, jax.Array]:
        """Keys and values of ``context`` (``[B, S, D]``) with this layer's or the given projections."""
        to_k = self.to_k if to_k is None else to_k
        to_v = self.to_v if to_v is None else to_v
        return self.split_heads(to_k(context)), self.split_heads(to_v(context))

    def attend(self, q: jax.Array, k: jax.Array, v: jax.Array, *, probs_name: str = "probs") -> jax.Array:
        """Attend ``q`` to one ``(k, v)`` set with this layer's implementation -> ``[B, L, heads, d]``.

        On the explicit path, the probabilities ``[B, heads, Lq, Lk]`` (float32) are sown as
        :class:`AttentionProbs` under ``probs_name`` when running inside ``nnx.capture``.
        """
        if self.implementation == "explicit":
            out, probs = attend(q, k, v, implementation="explicit", return_probs=True, scale=self.scale)
            if _capturing(self):
                self.sow(AttentionProbs, probs_name, probs)
            return out
        return attend(q, k, v, implementation=self.implementation, scale=self.scale)

    def project_out(self, out: jax.Array) -> jax.Array:
        """``[B, L, heads, d] -> [B, L, query_dim]`` through ``to_out``."""
        out = out.reshape(out.shape[0], out.shape[1], self.heads * self.dim_head)
        return self.to_out[1](self.to_out[0](out))

    def add_control_branches(self, q: jax.Array, out: jax.Array, controls) -> jax.Array:
        """Decoupled cross-attention: ``out + sum_c w_c * Attn(q, to_k_c[c](tokens_c), to_v_c[c](tokens_c))``.

        ``controls`` maps a control name to ``(tokens [B, N, D], weight [B])`` where ``weight`` is the
        per-sample ``mask * scale`` (float32). Branches run in the order the adapters were installed, so
        the sum is deterministic; a weight of 0 adds exactly 0. On the explicit path (inside
        ``nnx.capture``) the control probabilities are sown as ``"probs_<name>"`` and the branch outputs
        (before weighting and ``to_out``) as :class:`BranchOutputs` ``"out_id"`` / ``"out_<name>"``.
        """
        to_k_c = getattr(self, "to_k_c", None)
        to_v_c = getattr(self, "to_v_c", None)
        names = tuple(to_k_c.keys()) if to_k_c is not None else ()
        unknown = sorted(set(controls) - set(names))
        if unknown:
            raise ValueError(f"{self.layer_name or 'attention layer'}: no control adapter for {unknown} "
                             f"(installed: {list(names)})")
        expose = self.implementation == "explicit" and _capturing(self)
        if expose:
            self.sow(BranchOutputs, "out_id", out)
        for name in names:
            if name not in controls:
                continue
            tokens, weight = controls[name]
            k_c, v_c = self.project_key_value(tokens, to_k_c[name], to_v_c[name])
            out_c = self.attend(q, k_c, v_c, probs_name=f"probs_{name}")
            if expose:
                self.sow(BranchOutputs, f"out_{name}", out_c)
            out = out + weight.astype(out.dtype)[:, None, None, None] * out_c
        return out

    def __call__(self, hidden_states: jax.Array, context: jax.Array | None = None, *, controls=None) -> jax.Array:
        """Self-attention when ``context`` is None, cross-attention to ``context`` otherwise.

        ``controls`` (cross-attention only): ``{name: (tokens [B, N, D], weight [B])}`` for
        :meth:`add_control_branches`; None (default) runs the plain layer with no extra work.
        """
        q = self.project_query(hidden_states)
        k, v = self.project_key_value(hidden_states if context is None else context)
        out = self.attend(q, k, v)
        if controls:
            out = self.add_control_branches(q, out, controls)
        return self.project_out(out)


class GEGLU(nnx.Module):
    """``proj`` to ``2 * dim_out``, split into (hidden, gate), output ``hidden * gelu(gate)`` (exact erf GELU)."""

    def __init__(self, dim_in: int, dim_out: int, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.proj = _linear(dim_in, dim_out * 2, dtype, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        hidden, gate = jnp.split(self.proj(x), 2, axis=-1)
        return hidden * jax.nn.gelu(gate, approximate=False)


class FeedForward(nnx.Module):
    """``net = [GEGLU(dim, mult * dim), Dropout, Linear(mult * dim, dim)]``."""

    def __init__(self, dim: int, *, mult: int = 4, dropout: float = 0.0, dtype=jnp.float32, rngs: nnx.Rngs):
        inner = dim * mult
        self.net = nnx.List([
            GEGLU(dim, inner, dtype=dtype, rngs=rngs),
            nnx.Dropout(dropout, rngs=rngs if dropout > 0 else None),
            _linear(inner, dim, dtype, rngs),
        ])

    def __call__(self, x: jax.Array) -> jax.Array:
        for layer in self.net:
            x = layer(x)
        return x


class BasicTransformerBlock(nnx.Module):
    """Pre-LayerNorm block: ``x += attn1(norm1 x)``; ``x += attn2(norm2 x, context)``; ``x += ff(norm3 x)``."""

    def __init__(self, dim: int, num_attention_heads: int, attention_head_dim: int, *, cross_attention_dim: int,
                 dropout: float = 0.0, norm_eps: float = 1e-5, attention_implementation: str = "xla",
                 dtype=jnp.float32, rngs: nnx.Rngs):
        self.norm1 = layer_norm(dim, norm_eps, dtype, rngs)
        self.attn1 = Attention(dim, None, heads=num_attention_heads, dim_head=attention_head_dim, dropout=dropout,
                               implementation=attention_implementation, dtype=dtype, rngs=rngs)
        self.norm2 = layer_norm(dim, norm_eps, dtype, rngs)
        self.attn2 = Attention(dim, cross_attention_dim, heads=num_attention_heads, dim_head=attention_head_dim,
                               dropout=dropout, implementation=attention_implementation, dtype=dtype, rngs=rngs)
        self.norm3 = layer_norm(dim, norm_eps, dtype, rngs)
        self.ff = FeedForward(dim, dropout=dropout, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array, context: jax.Array, *, controls=None) -> jax.Array:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context, controls=controls)
        return x + self.ff(self.norm3(x))


class Transformer2DModel(nnx.Module):
    """Spatial transformer on NHWC maps: GroupNorm(eps 1e-6) -> proj_in -> blocks -> proj_out, plus residual.

    ``proj_in`` / ``proj_out`` are 1x1 convs, or Linears with ``use_linear_projection`` (as in the reference).
    """

    def __init__(self, num_attention_heads: int, attention_head_dim: int, in_channels: int, *, num_layers: int = 1,
                 cross_attention_dim: int, norm_num_groups: int = 32, use_linear_projection: bool = False,
                 dropout: float = 0.0, attention_implementation: str = "xla", dtype=jnp.float32, rngs: nnx.Rngs):
        inner = num_attention_heads * attention_head_dim
        self.use_linear_projection = use_linear_projection
        self.inner_dim = inner
        self.norm = group_norm(in_channels, norm_num_groups, 1e-6, dtype, rngs)
        if use_linear_projection:
            self.proj_in = _linear(in_channels, inner, dtype, rngs)
            self.proj_out = _linear(inner, in_channels, dtype, rngs)
        else:
            self.proj_in = conv2d(in_channels, inner, 1, dtype, rngs)
            self.proj_out = conv2d(inner, in_channels, 1, dtype, rngs)
        self.transformer_blocks = nnx.List([
            BasicTransformerBlock(inner, num_attention_heads, attention_head_dim, cross_attention_dim=cross_attention_dim,
                                  dropout=dropout, attention_implementation=attention_implementation, dtype=dtype, rngs=rngs)
            for _ in range(num_layers)
        ])

    def __call__(self, x: jax.Array, context: jax.Array, *, controls=None) -> jax.Array:
        """``controls``: optional FaceCrafter control inputs for every block's ``attn2`` (see :class:`Attention`)."""
        b, h, w, _ = x.shape
        residual = x
        x = self.norm(x)
        if self.use_linear_projection:
            x = self.proj_in(x.reshape(b, h * w, -1))
        else:
            x = self.proj_in(x).reshape(b, h * w, self.inner_dim)
        for block in self.transformer_blocks:
            x = block(x, context, controls=controls)
        if self.use_linear_projection:
            x = self.proj_out(x).reshape(b, h, w, -1)
        else:
            x = self.proj_out(x.reshape(b, h, w, self.inner_dim))
        return x + residual
