"""Arc2Face sampling: ArcFace embeddings -> face images (SD1.5 UNet + CLIP identity encoder + VAE).

:class:`Arc2FacePipeline` compiles the whole sampling chain (identity encoding, guided ``lax.scan`` loop, VAE
decode) once per (batch, size, steps, scheduler, guidance on/off, decode on/off), with the model weights passed
as arguments (``nnx.split``), never baked in as constants.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from facecrafter_jax import schedulers as S
from facecrafter_jax import tokens as _tokens

from .guidance import SCHEDULERS, initial_noise, make_plan, sample_latents, to_uint8

__all__ = ["SampleOutput", "Arc2FacePipeline"]


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
        decode, noise, plan = self._prepare(arcface, output_type, latents, seed, first_index, height, width,
                                            num_steps, scheduler)
        guidance_scale = float(guidance_scale)
        use_uncond = guidance_scale != 1.0
        scales = jnp.asarray([guidance_scale] if use_uncond else [], jnp.float32)
        program = self._program(arcface, noise, plan, scales, use_uncond, decode)
        out = program(self._states["unet"], self._states["text_encoder"], self._states.get("vae"), arcface, noise,
                      plan, scales)
        return self._output(out, noise, output_type)

    def _prepare(self, arcface, output_type, latents, seed, first_index, height, width, num_steps, scheduler):
        """Checks the identity batch; returns (decode flag, starting noise, plan)."""
        if arcface.shape[1] > self.text_encoder.config.hidden_size:
            raise ValueError(f"identity dimension {arcface.shape[1]} exceeds the text encoder width "
                             f"{self.text_encoder.config.hidden_size}")
        if not bool(jnp.all(jnp.isfinite(arcface))):
            raise ValueError("arcface_embeddings contain NaN or Inf")
        decode = self._decode_flag(output_type)
        noise = self._noise(arcface.shape[0], latents, seed, first_index, height, width)
        plan = make_plan(scheduler or self.scheduler, num_steps, self.scheduler_config)
        if plan.stochastic:
            raise ValueError("stochastic samplers are not supported by the pipeline (use eta = 0 / dpmsolver++)")
        return decode, noise, plan

    @staticmethod
    def _output(out, noise, output_type: str) -> SampleOutput:
        out_latents, images = out
        if images is not None:
            images = np.asarray(images)
            if output_type == "uint8":
                images = to_uint8(images)
        return SampleOutput(images=images, latents=np.asarray(out_latents), noise=np.asarray(noise))
