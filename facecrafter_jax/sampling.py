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
* :class:`FaceCrafterPipeline`: the same plus landmark / emotion controls (FaceCrafter adapters), with
  separate guidance scales for the identity and the controls (``e(null) + g_id (e(id) - e(null)) +
  g_ctl (e(id+controls) - e(id))``); :func:`emotion_vector` builds an emotion target from a class name.

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
    "NULL_CONTROL_MODES", "SCHEDULERS", "Arc2FacePipeline", "FaceCrafterPipeline", "emotion_table", "emotion_vector",
    "guidance_branches", "SampleOutput", "combine_guidance", "concat_conditions",
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

    def _noise(self, batch: int, latents, seed: int, first_index: int, height: int | None,
               width: int | None) -> jax.Array:
        """The starting noise: explicit ``latents`` (checked) or :func:`initial_noise` of ``seed``."""
        if latents is None:
            return initial_noise(seed, batch, self.latent_shape(height, width), first_index=first_index)
        noise = jnp.asarray(latents, jnp.float32)
        if noise.ndim != 4 or noise.shape[0] != batch or noise.shape[-1] != self.unet.config.in_channels:
            raise ValueError(f"latents must be NHWC [{batch}, h, w, {self.unet.config.in_channels}], "
                             f"got shape {tuple(noise.shape)}")
        self.latent_shape(noise.shape[1] * self.vae_scale_factor, noise.shape[2] * self.vae_scale_factor)
        if height is not None or width is not None:
            want = self.latent_shape(height, width)
            if want != tuple(noise.shape[1:]):
                raise ValueError(f"latents shape {tuple(noise.shape[1:])} does not match height/width {height}x{width}")
        return noise

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
        noise = self._noise(batch, latents, seed, first_index, height, width)
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


# ----------------------------------------------------------------------------------------------------
# FaceCrafter: identity + landmark / emotion controls
# ----------------------------------------------------------------------------------------------------
NULL_CONTROL_MODES = ("auto", "tokens", "off")
"""How the unconditional branch treats the control modules (see :class:`FaceCrafterPipeline`)."""


def emotion_table() -> dict[str, tuple[float, float]]:
    """``{class name: (valence, arousal)}`` for the 8 EmoNet classes, in ``EMOTION_CLASSES`` order.

    The values are the toy world's circumplex table (:data:`facecrafter_jax.toy.world.VALENCE_AROUSAL`:
    Russell's circumplex / AffectNet class means, rounded), so sampling, the toy world and evaluation use
    one table.
    """
    from facecrafter_jax.data.records import EMOTION_CLASSES
    from facecrafter_jax.toy.world import VALENCE_AROUSAL

    return {name: (float(v), float(a)) for name, (v, a) in zip(EMOTION_CLASSES, VALENCE_AROUSAL)}


def emotion_vector(emotion: str | int | None = None, valence: float | None = None,
                   arousal: float | None = None) -> tuple[np.ndarray, dict]:
    """The emotion condition ``[10]`` (8 class probabilities, valence, arousal) for a target emotion.

    * ``emotion`` (a class name of ``EMOTION_CLASSES`` or its index): a one-hot probability vector, with
      that class's (valence, arousal) from :func:`emotion_table` unless ``valence`` / ``arousal`` are
      given (they override, both together).
    * only ``valence`` and ``arousal``: the class is the nearest one on the circumplex (Euclidean distance
      to the table; ties to the lower index), one-hot, with the given valence / arousal.

    Valence and arousal must be in [-1, 1]. Returns ``(vector float32 [10], description)`` where the
    description holds ``name``, ``index``, ``valence``, ``arousal`` and ``class_from`` ("name" or
    "nearest valence/arousal") for ``samples.json``.
    """
    from facecrafter_jax.data.records import EMOTION_CLASSES

    table = emotion_table()
    if (valence is None) != (arousal is None):
        raise ValueError("valence and arousal go together: give both or neither")
    for what, v in (("valence", valence), ("arousal", arousal)):
        if v is not None and (not np.isfinite(v) or not -1.0 <= float(v) <= 1.0):
            raise ValueError(f"{what} {v} must be in [-1, 1]")
    if emotion is None and valence is None:
        raise ValueError("give an emotion class, or valence and arousal")
    if emotion is not None:
        if isinstance(emotion, (int, np.integer)) and not isinstance(emotion, bool):
            if not 0 <= int(emotion) < len(EMOTION_CLASSES):
                raise ValueError(f"emotion index {emotion} out of range 0..{len(EMOTION_CLASSES) - 1}")
            index = int(emotion)
        elif isinstance(emotion, str) and emotion.lower() in EMOTION_CLASSES:
            index = EMOTION_CLASSES.index(emotion.lower())
        else:
            raise ValueError(f"unknown emotion {emotion!r}; choose one of {', '.join(EMOTION_CLASSES)}")
        class_from = "name"
        if valence is None:
            valence, arousal = table[EMOTION_CLASSES[index]]
    else:
        va = np.asarray([table[n] for n in EMOTION_CLASSES], np.float64)
        index = int(np.argmin(np.sum((va - np.asarray([valence, arousal], np.float64)) ** 2, axis=1)))
        class_from = "nearest valence/arousal"
    vec = np.zeros(len(EMOTION_CLASSES) + 2, np.float32)
    vec[index] = 1.0
    vec[-2:] = (valence, arousal)
    desc = {"name": EMOTION_CLASSES[index], "index": index, "valence": float(valence), "arousal": float(arousal),
            "class_from": class_from}
    return vec, desc


def guidance_branches(guidance_id: float, guidance_control: float, has_controls: bool) -> tuple[tuple[int, ...], list[float]]:
    """Which of the branches ``0 = null, 1 = id, 2 = id + controls`` the chain
    ``e0 + g_id (e1 - e0) + g_ctl (e2 - e1)`` needs, and the chain scales over the kept branches.

    A branch whose coefficient is exactly 0 is dropped (algebraically the same result, less UNet work):
    ``g_id == 1`` drops e0, ``g_ctl == 0`` (or no controls) drops e2, ``g_id == g_ctl`` drops e1
    (``e0 + g (e2 - e0)``, standard CFG on the full condition).
    """
    g1, g2 = float(guidance_id), float(guidance_control)
    need2 = has_controls and g2 != 0.0
    coef = {0: 1.0 - g1, 1: (g1 - g2) if need2 else g1, 2: g2 if need2 else 0.0}
    branches = tuple(k for k in (0, 1, 2) if coef[k] != 0.0)
    if not branches:  # e.g. g_id = 0 and no controls: eps = e0
        branches = (0,)
    scales = [g1 if k == 1 else g2 for k in branches[1:]]
    return branches, scales


def _facecrafter_program(model_def, text_def, vae_def, branches: tuple[int, ...], run: tuple[str, ...],
                         null_tokens: bool, decode: bool, model_state, text_state, vae_state, arcface, inputs,
                         weights, noise, plan, scales):
    """The jitted body of :class:`FaceCrafterPipeline` (static: graphdefs, branches, controls run, null mode)."""
    model = nnx.merge(model_def, model_state)
    text_encoder = nnx.merge(text_def, text_state)
    context = text_encoder.encode_id(arcface)  # [B, 77, D]
    empty = text_encoder.encode_ids(np.asarray(_tokens.EMPTY_PROMPT_IDS)[None])  # [1, 77, D]
    unet = model.unet if run else getattr(model, "unet", model)

    null = {}
    given = {}
    for name in run:
        enc = model.encoder(name)
        zero = jnp.zeros((1,) + ((_NUM_LANDMARKS, 3) if name == "landmark" else (_EMOTION_DIM,)), jnp.float32)
        null[name] = enc(zero)  # [1, N, D]: the learned null tokens (training's null condition)
        if name in inputs:
            given[name] = enc(inputs[name])  # [B, N, D]

    def cond(branch: int):
        c = {"ctx": empty if branch == 0 else context}
        if run:
            toks, w = {}, {}
            for name in run:
                if branch == 2 and name in given:
                    toks[name], w[name] = given[name], weights[name]
                else:
                    on = branch == 0 and null_tokens
                    toks[name], w[name] = null[name], jnp.full((1,), 1.0 if on else 0.0, jnp.float32)
            c["tokens"], c["weight"] = toks, w
        return c

    def model_fn(x, t, c):
        controls = {n: (c["tokens"][n], None, c["weight"][n]) for n in run} if run else None
        return unet(x, t, c["ctx"], controls=controls)

    latents = sample_latents(model_fn, plan, noise, [cond(b) for b in branches], scales)
    if not decode:
        return latents, None
    vae = nnx.merge(vae_def, vae_state)
    images = jnp.clip(vae.decode(latents) / 2.0 + 0.5, 0.0, 1.0)
    return latents, images


_NUM_LANDMARKS = 478
_EMOTION_DIM = 10


class FaceCrafterPipeline(Arc2FacePipeline):
    """Identity (ArcFace) + optional landmark / emotion controls -> face images with FaceCrafter.

    Args:
        model: a :class:`~facecrafter_jax.models.facecrafter.FaceCrafter` (the Arc2Face UNet with control
            adapters and token encoders, e.g. ``load_pretrained(dir, components=(..., "adapters")).adapters``),
            or a plain UNet (then only ID-only sampling is possible).
        text_encoder, vae, scheduler, scheduler_config: as :class:`Arc2FacePipeline`.

    Guidance (one model call per step, branches concatenated on the batch axis)::

        eps = e(null) + g_id (e(id) - e(null)) + g_ctl (e(id + controls) - e(id))

    * ``id``: the Arc2Face identity context with every control branch switched off (mask 0): exactly
      the base Arc2Face prediction.
    * ``id + controls``: the same context plus the given controls at scale ``lambda_c``
      (``landmark_scale`` / ``emotion_scale``); a control not given stays off.
    * ``null``: the empty-prompt context, and the controls per ``null_controls``: ``"tokens"`` runs
      every control branch of the model on its learned null tokens (the all-zero raw input, weight 1:
      the ``all_null`` setup training uses for the unconditional side, ``docs/method.md``); ``"off"``
      switches them off (Arc2Face's unconditional branch); ``"auto"`` (default) is ``"tokens"`` when a
      control is given and ``"off"`` otherwise, so a call without controls is exactly
      :class:`Arc2FacePipeline` (it runs the same compiled program).

    Branches with a zero coefficient are not computed (:func:`guidance_branches`); ``guidance_control``
    defaults to ``guidance_id`` (then ``eps = e(null) + g (e(id + controls) - e(null))``: 2 branches).
    Programs are compiled per (batch, size, steps, sampler, branches, controls given, null mode, decode);
    the guidance values, the control inputs, the scales and the weights are traced arguments.
    """

    def __init__(self, model: nnx.Module, text_encoder: nnx.Module, vae: nnx.Module | None = None, *,
                 scheduler: str = "dpm++2m", scheduler_config: dict | None = None):
        unet = getattr(model, "unet", model)
        super().__init__(unet, text_encoder, vae, scheduler=scheduler, scheduler_config=scheduler_config)
        self.model = model
        self.controls: tuple[str, ...] = tuple(getattr(model, "controls", ()) or ())
        self._defs["model"], self._states["model"] = nnx.split(model)

    def null_tokens_used(self, has_controls: bool, null_controls: str = "auto") -> bool:
        """Whether the null branch runs the control branches on their null tokens for these settings."""
        if null_controls not in NULL_CONTROL_MODES:
            raise ValueError(f"null_controls must be one of {NULL_CONTROL_MODES}, got {null_controls!r}")
        return bool(self.controls) and (null_controls == "tokens" or (null_controls == "auto" and has_controls))

    # -- inputs -----------------------------------------------------------------------------------------
    def _control_input(self, name: str, value, batch: int) -> jax.Array | None:
        if value is None:
            return None
        if name not in self.controls:
            have = f"controls: {list(self.controls)}" if self.controls else "no control modules"
            raise ValueError(f"{name} given but this model has no {name} module ({have})")
        x = jnp.asarray(value, jnp.float32)
        tail = (_NUM_LANDMARKS, 3) if name == "landmark" else (_EMOTION_DIM,)
        if x.shape == tail:
            x = x[None]
        if x.ndim != len(tail) + 1 or x.shape[1:] != tail or x.shape[0] not in (1, batch):
            want = f"[{', '.join(map(str, tail))}] or [{batch}, {', '.join(map(str, tail))}]"
            raise ValueError(f"{'landmarks' if name == 'landmark' else 'emotion'} must be {want}, got shape {tuple(x.shape)}")
        if not bool(jnp.all(jnp.isfinite(x))):
            raise ValueError(f"{'landmarks' if name == 'landmark' else 'emotion'} contain NaN or Inf")
        return jnp.broadcast_to(x, (batch,) + tail)

    @staticmethod
    def _scale(name: str, value, batch: int) -> jax.Array:
        s = jnp.asarray(value, jnp.float32)
        if s.ndim == 0:
            s = jnp.full((batch,), s)
        if s.shape != (batch,):
            raise ValueError(f"{name}_scale must be a number or [{batch}], got shape {tuple(s.shape)}")
        if not bool(jnp.all(jnp.isfinite(s))):
            raise ValueError(f"{name}_scale contains NaN or Inf")
        return s

    def _fc_program(self, arcface, inputs, weights, noise, plan, scales, branches, run, null_tokens, decode):
        key = ("facecrafter", arcface.shape, str(arcface.dtype), noise.shape, jax.tree.structure(plan),
               tuple(sorted(inputs)), branches, run, null_tokens, decode)
        compiled = self._compiled.get(key)
        if compiled is None:
            fn = functools.partial(_facecrafter_program, self._defs["model"], self._defs["text_encoder"],
                                   self._defs.get("vae"), branches, run, null_tokens, decode)
            t0 = time.perf_counter()
            compiled = jax.jit(fn).lower(self._states["model"], self._states["text_encoder"], self._states.get("vae"),
                                         arcface, inputs, weights, noise, plan, scales).compile()
            self.compile_log.append({"batch": int(arcface.shape[0]), "latent_shape": tuple(noise.shape[1:]),
                                     "plan": type(plan).__name__, "num_steps": plan.num_steps, "branches": branches,
                                     "controls": run, "given": tuple(sorted(inputs)), "null_tokens": null_tokens,
                                     "decode": decode, "seconds": time.perf_counter() - t0})
            self._compiled[key] = compiled
        return compiled

    def _setup(self, arcface, landmarks, emotion, guidance_id, guidance_control, landmark_scale, emotion_scale,
               null_controls):
        arcface = jnp.asarray(arcface, jnp.float32)
        if arcface.ndim != 2:
            raise ValueError(f"arcface_embeddings must be [batch, dim], got shape {tuple(arcface.shape)}")
        batch = arcface.shape[0]
        if null_controls not in NULL_CONTROL_MODES:
            raise ValueError(f"null_controls must be one of {NULL_CONTROL_MODES}, got {null_controls!r}")
        inputs = {n: v for n, v in (("landmark", self._control_input("landmark", landmarks, batch)),
                                    ("emotion", self._control_input("emotion", emotion, batch))) if v is not None}
        if null_controls == "tokens" and not self.controls:
            raise ValueError("null_controls='tokens' needs a model with control modules")
        null_tokens = null_controls == "tokens" or (null_controls == "auto" and bool(inputs))
        g1 = float(guidance_id)
        g2 = g1 if guidance_control is None else float(guidance_control)
        if not (np.isfinite(g1) and np.isfinite(g2)):
            raise ValueError(f"guidance scales must be finite, got {g1}, {g2}")
        branches, chain = guidance_branches(g1, g2, bool(inputs))
        # control branches the model call runs: all of the model's when the null branch uses null tokens,
        # else only the given ones (none at all: the plain UNet, Arc2Face's program)
        if null_tokens and 0 in branches:
            run = self.controls
        else:
            run = tuple(n for n in self.controls if n in inputs and 2 in branches)
        scales_in = {"landmark": landmark_scale, "emotion": emotion_scale}
        weights = {n: self._scale(n, scales_in[n], batch) for n in inputs}  # validated even when unused
        # inputs of a branch that is not computed (g_ctl = 0) are dropped: same program as ID-only
        inputs = {n: v for n, v in inputs.items() if n in run and 2 in branches}
        weights = {n: w for n, w in weights.items() if n in inputs}
        return arcface, inputs, weights, branches, jnp.asarray(chain, jnp.float32), run, null_tokens, g1, g2

    def compile(self, batch: int, *, num_steps: int = 25, scheduler: str | None = None, guidance_id: float = 3.0,
                guidance_control: float | None = None, controls: Sequence[str] = (), null_controls: str = "auto",
                height: int | None = None, width: int | None = None, output_type: str = "uint8",
                id_dim: int = 512, guidance_scale: float | None = None) -> float:
        """Compile ahead of time for these settings (``controls``: the names that will be given, e.g.
        ``("landmark", "emotion")``); returns the compile time in seconds (0.0 if already compiled)."""
        if guidance_scale is not None:
            guidance_id = guidance_scale
        n = len(self.compile_log)
        unknown = [c for c in controls if c not in ("landmark", "emotion")]
        if unknown:
            raise ValueError(f"unknown control(s) {unknown}")
        lmk = np.zeros((batch, _NUM_LANDMARKS, 3), np.float32) if "landmark" in controls else None
        emo = np.zeros((batch, _EMOTION_DIM), np.float32) if "emotion" in controls else None
        arcface, inputs, weights, branches, chain, run, null_tokens, g1, _ = self._setup(
            np.zeros((batch, id_dim), np.float32), lmk, emo, guidance_id, guidance_control, 1.0, 1.0, null_controls)
        noise = jnp.zeros((batch,) + self.latent_shape(height, width), jnp.float32)
        plan = make_plan(scheduler or self.scheduler, num_steps, self.scheduler_config)
        decode = self._decode_flag(output_type)
        if not run:  # no control branch runs: Arc2Face's program (see __call__)
            use_uncond = g1 != 1.0
            self._program(arcface, noise, plan, jnp.asarray([g1] if use_uncond else [], jnp.float32), use_uncond, decode)
            return self.compile_log[-1]["seconds"] if len(self.compile_log) > n else 0.0
        self._fc_program(arcface, inputs, weights, noise, plan, chain, branches, run, null_tokens, decode)
        return self.compile_log[-1]["seconds"] if len(self.compile_log) > n else 0.0

    # -- sampling ---------------------------------------------------------------------------------------
    def __call__(self, arcface_embeddings, *, landmarks=None, emotion=None, guidance_id: float = 3.0,
                 guidance_control: float | None = None, landmark_scale=1.0, emotion_scale=1.0,
                 null_controls: str = "auto", num_steps: int = 25, scheduler: str | None = None, seed: int = 0,
                 first_index: int = 0, latents=None, height: int | None = None, width: int | None = None,
                 output_type: str = "uint8", guidance_scale: float | None = None) -> SampleOutput:
        """Sample one image per identity embedding, with optional landmark / emotion targets.

        Args:
            arcface_embeddings: ``[B, d]`` ArcFace vectors (L2-normalised inside).
            landmarks: ``[478, 3]`` (shared) or ``[B, 478, 3]`` MediaPipe landmarks in the aligned crop's frame
                (x, y in [0, 1], z relative depth), as data_prep stores them; None: no landmark control.
            emotion: ``[10]`` or ``[B, 10]`` (8 class probabilities, valence, arousal; see
                :func:`emotion_vector`); None: no emotion control.
            guidance_id: ``g_id``, identity against the null branch (Arc2Face: 3.0).
            guidance_control: ``g_ctl``, controls on top of the identity (default: ``guidance_id``).
            landmark_scale, emotion_scale: ``lambda_c`` of the decoupled attention, a number or ``[B]``.
            null_controls: ``"auto"``, ``"tokens"`` or ``"off"`` (see the class docstring).
            guidance_scale: alias of ``guidance_id`` (the :class:`Arc2FacePipeline` name).
            The others: as :meth:`Arc2FacePipeline.__call__`.

        Returns:
            :class:`SampleOutput`.
        """
        if guidance_scale is not None:
            guidance_id = guidance_scale
        arcface, inputs, weights, branches, chain, run, null_tokens, g1, g2 = self._setup(
            arcface_embeddings, landmarks, emotion, guidance_id, guidance_control, landmark_scale, emotion_scale,
            null_controls)
        if not run:
            # no control branch runs (no controls, or g_ctl = 0 with null_controls off): exactly Arc2Face,
            # e0 + g_id (e1 - e0), with its compiled program
            return super().__call__(arcface, num_steps=num_steps, guidance_scale=g1, scheduler=scheduler, seed=seed,
                                    first_index=first_index, latents=latents, height=height, width=width,
                                    output_type=output_type)
        if arcface.shape[1] > self.text_encoder.config.hidden_size:
            raise ValueError(f"identity dimension {arcface.shape[1]} exceeds the text encoder width "
                             f"{self.text_encoder.config.hidden_size}")
        if not bool(jnp.all(jnp.isfinite(arcface))):
            raise ValueError("arcface_embeddings contain NaN or Inf")
        batch = arcface.shape[0]
        decode = self._decode_flag(output_type)
        noise = self._noise(batch, latents, seed, first_index, height, width)
        plan = make_plan(scheduler or self.scheduler, num_steps, self.scheduler_config)
        if plan.stochastic:
            raise ValueError("stochastic samplers are not supported by the pipeline (use eta = 0 / dpmsolver++)")
        program = self._fc_program(arcface, inputs, weights, noise, plan, chain, branches, run, null_tokens, decode)
        out_latents, images = program(self._states["model"], self._states["text_encoder"], self._states.get("vae"),
                                      arcface, inputs, weights, noise, plan, chain)
        out_latents = np.asarray(out_latents)
        if images is not None:
            images = np.asarray(images)
            if output_type == "uint8":
                images = to_uint8(images)
        return SampleOutput(images=images, latents=out_latents, noise=np.asarray(noise))
