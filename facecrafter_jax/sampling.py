"""Jitted sampling: the whole denoising loop in one ``lax.scan``, chained classifier-free guidance, VAE decode.

Two layers:

* Generic, model-agnostic pieces (pure functions, usable inside any ``jit``):
  :func:`initial_noise` (seeded starting latents), :func:`concat_conditions`, :func:`combine_guidance`,
  :func:`guided_denoiser` and :func:`sample_latents`. The denoiser is any
  ``model_fn(latents [B, h, w, C], t, cond) -> eps`` where ``cond`` is a **pytree** (the context array
  for Arc2Face; a dict with control tokens / masks for FaceCrafter).
* :class:`Arc2FacePipeline`: ArcFace embeddings -> images with the Arc2Face UNet, CLIP identity
  encoder and VAE, compiled once per (batch, size, steps, scheduler, guidance on/off, decode on/off)
  with the model weights passed as arguments (``nnx.split``), never baked in as constants.

Guidance chain
--------------
Given conditions ``c_0`` (unconditional), ``c_1``, ..., ``c_K`` and scales ``g_1 .. g_K``::

    eps = e_0 + sum_k g_k * (e_k - e_{k-1}),        e_k = model_fn(x, t, c_k)

With ``K = 1`` this is standard CFG (``e_0 + g (e_1 - e_0)``, Arc2Face uses g = 3). With
``c_0 = uncond, c_1 = identity, c_2 = identity + controls`` the identity and the controls get separate
scales. All ``K + 1`` conditions are evaluated in **one** model call: the latents are tiled and every
leaf of the condition pytrees is concatenated along the batch axis (order ``c_0, c_1, ...``, as diffusers
puts ``[uncond, cond]``).

Seeds
-----
:func:`initial_noise`: image ``i`` starts from
``jax.random.normal(jax.random.fold_in(jax.random.key(seed), i), (h, w, C), float32)``, so the same seed
gives the same images and image ``i`` does not depend on the batch size or on how a long run is split
into batches (``first_index``). The values are stable for a given JAX version and PRNG configuration
(default ``threefry2x32``; ``samples.json`` of the CLI records the JAX version).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from facecrafter_jax import schedulers as S
from facecrafter_jax import tokens as _tokens

__all__ = [
    "SCHEDULERS", "Arc2FacePipeline", "SampleOutput", "combine_guidance", "concat_conditions",
    "guided_denoiser", "initial_noise", "make_plan", "sample_latents", "to_uint8",
]

SCHEDULERS: dict[str, type] = {
    "dpm++2m": S.DPMSolverMultistepScheduler,
    "ddim": S.DDIMScheduler,
    "euler": S.EulerDiscreteScheduler,
}
"""Sampler names accepted by the pipeline and the CLI (built from the scheduler config, SD1.5's by default)."""


# ----------------------------------------------------------------------------------------------------
# Generic pieces
# ----------------------------------------------------------------------------------------------------
def initial_noise(seed: int | jax.Array, num: int, shape: Sequence[int], *, first_index: int = 0,
                  dtype=jnp.float32) -> jax.Array:
    """Standard-normal starting latents ``[num, *shape]`` (NHWC), one independent stream per image.

    Image ``j`` of the result is ``normal(fold_in(key(seed), first_index + j), shape)``: it depends only on
    ``seed`` and its global index, not on ``num`` (so batching a long run changes nothing).
    ``seed`` is a Python int (or a PRNG key from ``jax.random.key``).
    """
    if num < 0:
        raise ValueError(f"num must be >= 0, got {num}")
    key = jax.random.key(seed) if not _is_key(seed) else seed
    idx = jnp.arange(first_index, first_index + num, dtype=jnp.uint32)
    keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(idx)
    return jax.vmap(lambda k: jax.random.normal(k, tuple(shape), jnp.float32))(keys).astype(dtype)


def _is_key(x) -> bool:
    return isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jax.dtypes.prng_key)


def concat_conditions(conds: Sequence[Any], batch: int) -> Any:
    """Concatenate condition pytrees along axis 0 (order kept) -> one pytree with ``len(conds) * batch`` rows.

    Every condition must have the same tree structure. A leaf whose leading size is 1 is broadcast to
    ``batch`` first (e.g. the empty-prompt context ``[1, 77, D]``); any other leading size than 1 or
    ``batch`` is an error naming the leaf.
    """
    if not conds:
        raise ValueError("need at least one condition")
    structs = [jax.tree.structure(c) for c in conds]
    for k, s in enumerate(structs[1:], 1):
        if s != structs[0]:
            raise ValueError(f"condition {k} has tree structure {s}, condition 0 has {structs[0]}")

    def fit(path, leaf):
        leaf = jnp.asarray(leaf)
        if leaf.ndim == 0:
            raise ValueError(f"condition leaf {jax.tree_util.keystr(path)} is a scalar; it needs a batch axis")
        if leaf.shape[0] == batch:
            return leaf
        if leaf.shape[0] == 1:
            return jnp.broadcast_to(leaf, (batch,) + leaf.shape[1:])
        raise ValueError(f"condition leaf {jax.tree_util.keystr(path)} has batch {leaf.shape[0]}, expected {batch} or 1")

    fitted = [jax.tree_util.tree_map_with_path(fit, c) for c in conds]
    return jax.tree.map(lambda *xs: jnp.concatenate(xs, axis=0), *fitted)


def combine_guidance(eps: Sequence[jax.Array], scales: Sequence[float] | jax.Array) -> jax.Array:
    """``e_0 + sum_k g_k (e_k - e_{k-1})`` in float32 (``len(scales) == len(eps) - 1``)."""
    eps = [jnp.asarray(e, jnp.float32) for e in eps]
    if len(scales) != len(eps) - 1:
        raise ValueError(f"{len(eps)} conditions need {len(eps) - 1} guidance scales, got {len(scales)}")
    out = eps[0]
    for k in range(1, len(eps)):
        out = out + jnp.asarray(scales[k - 1], jnp.float32) * (eps[k] - eps[k - 1])
    return out


def guided_denoiser(model_fn: Callable[[jax.Array, jax.Array, Any], jax.Array], conds: Sequence[Any],
                    scales: Sequence[float] | jax.Array) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """Wrap ``model_fn(x, t, cond)`` into ``denoise(x, t)`` applying the guidance chain in one model call.

    ``conds = [c_0, ..., c_K]`` (pytrees with batch axis 0, see :func:`concat_conditions`), ``scales`` has
    ``K`` entries (Python floats or a traced ``[K]`` array, so changing them does not recompile). With a
    single condition the model runs once on it, unguided.
    """
    n = len(conds)
    if len(scales) != n - 1:
        raise ValueError(f"{n} conditions need {n - 1} guidance scales, got {len(scales)}")

    def denoise(x: jax.Array, t: jax.Array) -> jax.Array:
        batch = x.shape[0]
        cond = concat_conditions(conds, batch)
        xx = jnp.concatenate([x] * n, axis=0) if n > 1 else x
        out = model_fn(xx, t, cond)
        if n == 1:
            return out
        return combine_guidance(jnp.split(out, n, axis=0), scales)

    return denoise


def sample_latents(model_fn: Callable[[jax.Array, jax.Array, Any], jax.Array], plan, noise: jax.Array,
                   conds: Sequence[Any], scales: Sequence[float] | jax.Array = (), *,
                   key: jax.Array | None = None, return_intermediates: bool = False):
    """Run the whole guided sampling chain (one ``lax.scan``); jittable.

    Args:
        model_fn: ``model_fn(latents, t, cond) -> model output`` (NHWC), ``t`` a scalar timestep.
        plan: a scheduler plan (``scheduler.set_timesteps(n)``); see :func:`make_plan`.
        noise: starting latents, standard normal ``[B, h, w, C]`` (scaled by ``plan.init_noise_sigma``
            here, like diffusers scales its ``latents=`` argument).
        conds, scales: the guidance chain (see the module docstring and :func:`guided_denoiser`).
        key: PRNG key for stochastic plans only (DDIM eta > 0, sde-dpmsolver++).
        return_intermediates: also return the latents after every step ``[num_steps, B, h, w, C]``.

    Returns:
        The final latents ``[B, h, w, C]`` in the dtype of ``noise`` (scaled latents, what ``vae.decode`` takes).
    """
    return S.sample_loop(plan, guided_denoiser(model_fn, conds, scales), noise, key=key,
                         return_intermediates=return_intermediates)


@functools.lru_cache(maxsize=64)
def _plan_cached(name: str, config_items: tuple, num_steps: int):
    return SCHEDULERS[name].from_config(dict(config_items)).set_timesteps(num_steps)


def _freeze(v):
    if isinstance(v, (list, tuple)):
        return tuple(_freeze(x) for x in v)
    if isinstance(v, dict):
        return tuple(sorted((k, _freeze(x)) for k, x in v.items()))
    return v


def make_plan(scheduler: str | S.DDIMScheduler | S.DPMSolverMultistepScheduler | S.EulerDiscreteScheduler,
              num_steps: int, config: dict | None = None):
    """A sampling plan: ``scheduler`` is a name from :data:`SCHEDULERS` (built from ``config``, default
    SD1.5's scheduler config) or a scheduler instance."""
    if isinstance(scheduler, str):
        if scheduler not in SCHEDULERS:
            raise ValueError(f"unknown scheduler {scheduler!r}; choose one of {sorted(SCHEDULERS)}")
        cfg = S.SD15_SCHEDULER_CONFIG if config is None else config
        try:
            return _plan_cached(scheduler, tuple(sorted((k, _freeze(v)) for k, v in cfg.items())), int(num_steps))
        except TypeError:  # unhashable values: build directly
            return SCHEDULERS[scheduler].from_config(cfg).set_timesteps(num_steps)
    if config is not None:
        raise ValueError("pass either a scheduler instance or a config, not both")
    return scheduler.set_timesteps(num_steps)


def to_uint8(images: jax.Array | np.ndarray) -> np.ndarray:
    """Images in [0, 1] -> uint8 ``round(x * 255)`` (diffusers' ``numpy_to_pil``)."""
    x = np.clip(np.asarray(images, np.float32), 0.0, 1.0)
    return (x * 255.0).round().astype(np.uint8)


# ----------------------------------------------------------------------------------------------------
# Arc2Face pipeline
# ----------------------------------------------------------------------------------------------------
@dataclass
class SampleOutput:
    """What :class:`Arc2FacePipeline` returns.

    Attributes:
        images: ``[B, H, W, 3]`` uint8 (``output_type='uint8'``), float32 in [0, 1] (``'float'``), or None
            (``'latent'``).
        latents: final scaled latents ``[B, h, w, C]`` float32 (diffusers' ``output_type='latent'`` numbers, NHWC).
        noise: the starting noise used ``[B, h, w, C]`` (unscaled standard normal).
    """

    images: np.ndarray | None
    latents: np.ndarray
    noise: np.ndarray


def _latent_factor(unet) -> int:
    return 2 ** (len(unet.config.block_out_channels) - 1)


def _vae_factor(vae) -> int:
    return 2 ** (len(vae.config.block_out_channels) - 1)


def _arc2face_program(unet_def, text_def, vae_def, use_uncond: bool, decode: bool,
                      unet_state, text_state, vae_state, arcface, noise, plan, scales):
    """The jitted body of :class:`Arc2FacePipeline` (static: graphdefs and flags)."""
    unet = nnx.merge(unet_def, unet_state)
    text_encoder = nnx.merge(text_def, text_state)
    context = text_encoder.encode_id(arcface)  # L2-normalises, [B, 77, D]
    conds = [context]
    if use_uncond:
        empty = text_encoder.encode_ids(np.asarray(_tokens.EMPTY_PROMPT_IDS)[None])  # [1, 77, D]
        conds = [empty, context]
    latents = sample_latents(lambda x, t, c: unet(x, t, c), plan, noise, conds, scales)
    if not decode:
        return latents, None
    vae = nnx.merge(vae_def, vae_state)
    images = jnp.clip(vae.decode(latents) / 2.0 + 0.5, 0.0, 1.0)  # diffusers' postprocess (denormalize)
    return latents, images


class Arc2FacePipeline:
    """ArcFace embeddings -> face images with Arc2Face (SD1.5 UNet + identity CLIP encoder + VAE).

    Args:
        unet, text_encoder, vae: our NNX models (e.g. from :func:`facecrafter_jax.pretrained.load_pretrained`);
            ``vae`` may be None (then only latents can be produced).
        scheduler: default sampler name (``'dpm++2m'``, ``'ddim'``, ``'euler'``), overridable per call.
        scheduler_config: diffusers scheduler config dict (default SD1.5's, as Arc2Face uses).

    The models are split once (``nnx.split``); every call passes their states to a program compiled per
    (batch, latent size, steps, scheduler, guidance on/off, decode on/off) and cached on the pipeline
    (``compile_log`` lists every compilation with its time in seconds).
    """

    def __init__(self, unet: nnx.Module, text_encoder: nnx.Module, vae: nnx.Module | None = None, *,
                 scheduler: str = "dpm++2m", scheduler_config: dict | None = None):
        if scheduler not in SCHEDULERS:
            raise ValueError(f"unknown scheduler {scheduler!r}; choose one of {sorted(SCHEDULERS)}")
        xdim = unet.config.cross_attention_dim
        xdim = xdim if isinstance(xdim, int) else xdim[0]
        if text_encoder.config.hidden_size != xdim:
            raise ValueError(f"text encoder hidden_size {text_encoder.config.hidden_size} != UNet cross_attention_dim {xdim}")
        if vae is not None and vae.config.latent_channels != unet.config.in_channels:
            raise ValueError(f"VAE latent_channels {vae.config.latent_channels} != UNet in_channels {unet.config.in_channels}")
        self.unet, self.text_encoder, self.vae = unet, text_encoder, vae
        self.scheduler = scheduler
        self.scheduler_config = dict(S.SD15_SCHEDULER_CONFIG if scheduler_config is None else scheduler_config)
        for name in SCHEDULERS:  # validate once, early (unknown keys / unsupported options are errors)
            SCHEDULERS[name].from_config(self.scheduler_config)
        self._defs = {}
        self._states = {}
        for name, m in (("unet", unet), ("text_encoder", text_encoder), ("vae", vae)):
            if m is not None:
                self._defs[name], self._states[name] = nnx.split(m)
        self._compiled: dict[tuple, Any] = {}
        self.compile_log: list[dict] = []

    # -- sizes ------------------------------------------------------------------------------------------
    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent cell (8 for SD); from the VAE, or 8 when there is none."""
        return _vae_factor(self.vae) if self.vae is not None else 8

    def default_size(self) -> tuple[int, int]:
        """(height, width) in pixels: the UNet's ``sample_size`` times :attr:`vae_scale_factor` (512 for SD1.5)."""
        s = self.unet.config.sample_size
        if s is None:
            raise ValueError("the UNet config has no sample_size: pass height and width")
        h, w = (s, s) if isinstance(s, int) else tuple(s)
        return h * self.vae_scale_factor, w * self.vae_scale_factor

    def latent_shape(self, height: int | None = None, width: int | None = None) -> tuple[int, int, int]:
        """``(h, w, C)`` of the latents for an image size; checks the size is allowed."""
        dh, dw = self.default_size() if height is None or width is None else (None, None)
        height = dh if height is None else int(height)
        width = dw if width is None else int(width)
        f = self.vae_scale_factor
        m = f * _latent_factor(self.unet)
        if height <= 0 or width <= 0 or height % m or width % m:
            raise ValueError(f"height and width must be positive multiples of {m} for this model, got {height}x{width}")
        return height // f, width // f, self.unet.config.in_channels

    # -- compilation ------------------------------------------------------------------------------------
    def _program(self, arcface, noise, plan, scales, use_uncond: bool, decode: bool):
        key = (arcface.shape, str(arcface.dtype), noise.shape, str(noise.dtype), jax.tree.structure(plan),
               scales.shape, use_uncond, decode)
        compiled = self._compiled.get(key)
        if compiled is None:
            fn = functools.partial(_arc2face_program, self._defs["unet"], self._defs["text_encoder"],
                                   self._defs.get("vae"), use_uncond, decode)
            t0 = time.perf_counter()
            compiled = jax.jit(fn).lower(self._states["unet"], self._states["text_encoder"], self._states.get("vae"),
                                         arcface, noise, plan, scales).compile()
            dt = time.perf_counter() - t0
            self.compile_log.append({"batch": int(arcface.shape[0]), "latent_shape": tuple(noise.shape[1:]),
                                     "plan": type(plan).__name__, "num_steps": plan.num_steps,
                                     "guidance": use_uncond, "decode": decode, "seconds": dt})
            self._compiled[key] = compiled
        return compiled

    def compile(self, batch: int, *, num_steps: int = 25, scheduler: str | None = None, guidance_scale: float = 3.0,
                height: int | None = None, width: int | None = None, output_type: str = "uint8",
                id_dim: int = 512) -> float:
        """Compile ahead of time for these settings (no sampling); returns the compile time in seconds
        (0.0 if already compiled)."""
        n = len(self.compile_log)
        arcface = jnp.zeros((batch, id_dim), jnp.float32)
        noise = jnp.zeros((batch,) + self.latent_shape(height, width), jnp.float32)
        plan = make_plan(scheduler or self.scheduler, num_steps, self.scheduler_config)
        use_uncond = float(guidance_scale) != 1.0
        scales = jnp.asarray([guidance_scale] if use_uncond else [], jnp.float32)
        self._program(arcface, noise, plan, scales, use_uncond, self._decode_flag(output_type))
        return self.compile_log[-1]["seconds"] if len(self.compile_log) > n else 0.0

    def _decode_flag(self, output_type: str) -> bool:
        if output_type not in ("uint8", "float", "latent"):
            raise ValueError(f"output_type must be 'uint8', 'float' or 'latent', got {output_type!r}")
        decode = output_type != "latent"
        if decode and self.vae is None:
            raise ValueError("this pipeline has no VAE: use output_type='latent'")
        return decode

    # -- sampling ---------------------------------------------------------------------------------------
    def __call__(self, arcface_embeddings, *, num_steps: int = 25, guidance_scale: float = 3.0,
                 scheduler: str | None = None, seed: int = 0, first_index: int = 0, latents=None,
                 height: int | None = None, width: int | None = None, output_type: str = "uint8") -> SampleOutput:
        """Sample one image per identity embedding.

        Args:
            arcface_embeddings: ``[B, d]`` ArcFace vectors (d <= the encoder width; 512 for Arc2Face). They
                are L2-normalised inside (Arc2Face's convention).
            num_steps: sampler steps (Arc2Face: 25).
            guidance_scale: CFG scale on the identity against the empty prompt (Arc2Face: 3.0). Exactly
                1.0 skips the unconditional branch (same result, half the UNet work).
            scheduler: ``'dpm++2m'`` (default), ``'ddim'`` or ``'euler'``.
            seed, first_index: starting noise of image ``j`` is :func:`initial_noise` index ``first_index + j``.
            latents: explicit starting noise ``[B, h, w, C]`` (NHWC, standard normal; scaled by the sampler's
                ``init_noise_sigma`` like diffusers' ``latents=``). Overrides ``seed``; sets the size.
            height, width: image size in pixels (default :meth:`default_size`).
            output_type: ``'uint8'`` images, ``'float'`` images in [0, 1], or ``'latent'`` (no VAE decode).

        Returns:
            :class:`SampleOutput`.
        """
        arcface = jnp.asarray(arcface_embeddings, jnp.float32)
        if arcface.ndim != 2:
            raise ValueError(f"arcface_embeddings must be [batch, dim], got shape {tuple(arcface.shape)}")
        if arcface.shape[1] > self.text_encoder.config.hidden_size:
            raise ValueError(f"identity dimension {arcface.shape[1]} exceeds the text encoder width "
                             f"{self.text_encoder.config.hidden_size}")
        if not bool(jnp.all(jnp.isfinite(arcface))):
            raise ValueError("arcface_embeddings contain NaN or Inf")
        batch = arcface.shape[0]
        decode = self._decode_flag(output_type)
        if latents is not None:
            noise = jnp.asarray(latents, jnp.float32)
            if noise.ndim != 4 or noise.shape[0] != batch or noise.shape[-1] != self.unet.config.in_channels:
                raise ValueError(f"latents must be NHWC [{batch}, h, w, {self.unet.config.in_channels}], "
                                 f"got shape {tuple(noise.shape)}")
            self.latent_shape(noise.shape[1] * self.vae_scale_factor, noise.shape[2] * self.vae_scale_factor)
            if height is not None or width is not None:
                want = self.latent_shape(height, width)
                if want != tuple(noise.shape[1:]):
                    raise ValueError(f"latents shape {tuple(noise.shape[1:])} does not match height/width {height}x{width}")
        else:
            noise = initial_noise(seed, batch, self.latent_shape(height, width), first_index=first_index)
        plan = make_plan(scheduler or self.scheduler, num_steps, self.scheduler_config)
        if plan.stochastic:
            raise ValueError("stochastic samplers are not supported by the pipeline (use eta = 0 / dpmsolver++)")
        guidance_scale = float(guidance_scale)
        use_uncond = guidance_scale != 1.0
        scales = jnp.asarray([guidance_scale] if use_uncond else [], jnp.float32)
        program = self._program(arcface, noise, plan, scales, use_uncond, decode)
        out_latents, images = program(self._states["unet"], self._states["text_encoder"], self._states.get("vae"),
                                      arcface, noise, plan, scales)
        out_latents = np.asarray(out_latents)
        if images is not None:
            images = np.asarray(images)
            if output_type == "uint8":
                images = to_uint8(images)
        return SampleOutput(images=images, latents=out_latents, noise=np.asarray(noise))
