"""FaceCrafter sampling: identity + landmark / emotion controls, with separate guidance for identity and controls.

``eps = e(null) + g_id (e(id) - e(null)) + g_ctl (e(id + controls) - e(id))``, one model call per step; the
conditions of the branches come from :func:`facecrafter_jax.conditioning.setup_conditions`, the one builder the
train step and the training sample grids use too.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from facecrafter_jax import tokens as _tokens
from facecrafter_jax.conditioning import ABSENT_CONTROLS, Setup, controls_run, setup_conditions
from facecrafter_jax.face.vocabulary import EMOTION_DIM, NUM_LANDMARKS

from .arc2face import Arc2FacePipeline, SampleOutput
from .guidance import guidance_branches, make_plan, sample_latents

__all__ = ["FaceCrafterPipeline", "branch_setups"]

def branch_setups(branches: tuple[int, ...], given: Sequence[str], absent: str) -> tuple[Setup, ...]:
    """The :class:`~facecrafter_jax.conditioning.Setup` of each guidance branch (0 = null, 1 = id, 2 = id + controls).

    ``absent="null_tokens"``: every control that a branch does not give runs on its null tokens (training's semantics;
    the null branch is the all-null setup, the id branch ID-only with null tokens). ``absent="switched_off"``: absent
    controls are switched off, except that the null branch uses the null tokens when some control is given
    (then a call without controls is Arc2Face's exactly).
    """
    if absent not in ABSENT_CONTROLS:
        raise ValueError(f"absent_controls must be one of {ABSENT_CONTROLS}, got {absent!r}")
    null_branch = "null_tokens" if absent == "null_tokens" or given else "switched_off"
    table = {0: Setup(identity=False, absent=null_branch),
             1: Setup(identity=True, absent=absent),
             2: Setup(identity=True, controls=tuple(given), absent=absent)}
    return tuple(table[b] for b in branches)


def _facecrafter_program(model_def, text_def, vae_def, setups: tuple[Setup, ...], decode: bool, model_state, text_state,
                         vae_state, arcface, inputs, weights, noise, plan, scales):
    """The jitted body of :class:`FaceCrafterPipeline` (static: graphdefs, the branches' setups, decode).

    Only used when some control branch runs; otherwise the pipeline runs Arc2Face's program.
    """
    model = nnx.merge(model_def, model_state)
    text_encoder = nnx.merge(text_def, text_state)
    context = text_encoder.encode_id(arcface)  # [B, 77, D]
    empty = text_encoder.encode_ids(np.asarray(_tokens.EMPTY_PROMPT_IDS)[None])  # [1, 77, D]
    conds = setup_conditions(model, setups, context, empty, inputs=inputs, weights=weights)
    latents = sample_latents(model.predict, plan, noise, conds, scales)
    if not decode:
        return latents, None
    vae = nnx.merge(vae_def, vae_state)
    images = jnp.clip(vae.decode(latents) / 2.0 + 0.5, 0.0, 1.0)
    return latents, images


class FaceCrafterPipeline(Arc2FacePipeline):
    """Identity (ArcFace) + optional landmark / emotion controls -> face images with FaceCrafter.

    Args:
        model: a :class:`~facecrafter_jax.models.facecrafter.FaceCrafter` (the Arc2Face UNet with control
            adapters and token encoders, e.g. ``load_pretrained(dir, components=(..., "adapters")).adapters``),
            or a plain UNet (then only ID-only sampling is possible).
        text_encoder, vae, scheduler, scheduler_config: as :class:`Arc2FacePipeline`.

    Guidance (one model call per step, branches concatenated on the batch axis)::

        eps = e(null) + g_id (e(id) - e(null)) + g_ctl (e(id + controls) - e(id))

    * ``id``: the Arc2Face identity context, every control of the model on its null tokens (the all-zero raw
      input through its encoder, weight 1): the ID-only setup training uses.
    * ``id + controls``: the same context plus the given controls at scale ``lambda_c``
      (``landmark_scale`` / ``emotion_scale``); a control not given stays on its null tokens.
    * ``null``: the empty-prompt context, every control on its null tokens (the all-null setup).

    ``absent_controls="switched_off"`` (an ablation, not the default) switches the controls a branch does not give off
    instead: then the ``id`` branch is exactly the base Arc2Face prediction, the ``null`` branch uses the null
    tokens only when some control is given, and a call without controls is exactly :class:`Arc2FacePipeline`.
    A model without control modules always samples as :class:`Arc2FacePipeline`.

    Branches with a zero coefficient are not computed (:func:`guidance_branches`); ``guidance_control``
    defaults to ``guidance_id`` (then ``eps = e(null) + g (e(id + controls) - e(null))``: 2 branches).
    Programs are compiled per (batch, size, steps, sampler, branches, controls given, absent mode, decode);
    the guidance values, the control inputs, the scales and the weights are traced arguments.
    """

    def __init__(self, model: nnx.Module, text_encoder: nnx.Module, vae: nnx.Module | None = None, *,
                 scheduler: str = "dpm++2m", scheduler_config: dict | None = None):
        unet = getattr(model, "unet", model)
        super().__init__(unet, text_encoder, vae, scheduler=scheduler, scheduler_config=scheduler_config)
        self.model = model
        self.controls: tuple[str, ...] = tuple(getattr(model, "controls", ()) or ())
        self._defs["model"], self._states["model"] = nnx.split(model)

    def null_branch(self, has_controls: bool, absent_controls: str = "null_tokens") -> str:
        """What the unconditional branch is for these settings (recorded by sample.py in samples.json)."""
        if not self.controls:
            return "empty prompt (no control modules)"
        tokens = absent_controls == "null_tokens" or has_controls
        return "empty prompt + control branches on their null tokens" if tokens else "empty prompt, control branches off"

    # -- inputs -----------------------------------------------------------------------------------------
    def _control_input(self, name: str, value, batch: int) -> jax.Array | None:
        if value is None:
            return None
        if name not in self.controls:
            have = f"controls: {list(self.controls)}" if self.controls else "no control modules"
            raise ValueError(f"{name} given but this model has no {name} module ({have})")
        x = jnp.asarray(value, jnp.float32)
        tail = (NUM_LANDMARKS, 3) if name == "landmark" else (EMOTION_DIM,)
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

    def _fc_program(self, arcface, inputs, weights, noise, plan, scales, setups, decode):
        key = ("facecrafter", arcface.shape, str(arcface.dtype), noise.shape, jax.tree.structure(plan),
               tuple(sorted(inputs)), setups, decode)
        compiled = self._compiled.get(key)
        if compiled is None:
            fn = functools.partial(_facecrafter_program, self._defs["model"], self._defs["text_encoder"],
                                   self._defs.get("vae"), setups, decode)
            t0 = time.perf_counter()
            compiled = jax.jit(fn).lower(self._states["model"], self._states["text_encoder"], self._states.get("vae"),
                                         arcface, inputs, weights, noise, plan, scales).compile()
            self.compile_log.append({"batch": int(arcface.shape[0]), "latent_shape": tuple(noise.shape[1:]),
                                     "plan": type(plan).__name__, "num_steps": plan.num_steps, "setups": setups,
                                     "controls": controls_run(self.controls, setups), "given": tuple(sorted(inputs)),
                                     "decode": decode, "seconds": time.perf_counter() - t0})
            self._compiled[key] = compiled
        return compiled

    def _setup(self, arcface, landmarks, emotion, guidance_id, guidance_control, landmark_scale, emotion_scale,
               absent_controls):
        arcface = jnp.asarray(arcface, jnp.float32)
        if arcface.ndim != 2:
            raise ValueError(f"arcface_embeddings must be [batch, dim], got shape {tuple(arcface.shape)}")
        batch = arcface.shape[0]
        if absent_controls not in ABSENT_CONTROLS:
            raise ValueError(f"absent_controls must be one of {ABSENT_CONTROLS}, got {absent_controls!r}")
        inputs = {n: v for n, v in (("landmark", self._control_input("landmark", landmarks, batch)),
                                    ("emotion", self._control_input("emotion", emotion, batch))) if v is not None}
        g1 = float(guidance_id)
        g2 = g1 if guidance_control is None else float(guidance_control)
        if not (np.isfinite(g1) and np.isfinite(g2)):
            raise ValueError(f"guidance scales must be finite, got {g1}, {g2}")
        branches, chain = guidance_branches(g1, g2, bool(inputs))
        scales_in = {"landmark": landmark_scale, "emotion": emotion_scale}
        weights = {n: self._scale(n, scales_in[n], batch) for n in inputs}  # validated even when unused
        # inputs of a branch that is not computed (g_ctl = 0) are dropped: same program as ID-only
        if 2 not in branches:
            inputs, weights = {}, {}
        setups = branch_setups(branches, tuple(n for n in self.controls if n in inputs), absent_controls)
        run = controls_run(self.controls, setups)  # none: the plain UNet, Arc2Face's program
        return arcface, inputs, weights, jnp.asarray(chain, jnp.float32), setups, run, g1

    def compile(self, batch: int, *, num_steps: int = 25, scheduler: str | None = None, guidance_id: float = 3.0,
                guidance_control: float | None = None, controls: Sequence[str] = (), absent_controls: str = "null_tokens",
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
        lmk = np.zeros((batch, NUM_LANDMARKS, 3), np.float32) if "landmark" in controls else None
        emo = np.zeros((batch, EMOTION_DIM), np.float32) if "emotion" in controls else None
        arcface, inputs, weights, chain, setups, run, g1 = self._setup(
            np.zeros((batch, id_dim), np.float32), lmk, emo, guidance_id, guidance_control, 1.0, 1.0, absent_controls)
        noise = jnp.zeros((batch,) + self.latent_shape(height, width), jnp.float32)
        plan = make_plan(scheduler or self.scheduler, num_steps, self.scheduler_config)
        decode = self._decode_flag(output_type)
        if not run:  # no control branch runs: Arc2Face's program (see __call__)
            use_uncond = g1 != 1.0
            self._program(arcface, noise, plan, jnp.asarray([g1] if use_uncond else [], jnp.float32), use_uncond, decode)
            return self.compile_log[-1]["seconds"] if len(self.compile_log) > n else 0.0
        self._fc_program(arcface, inputs, weights, noise, plan, chain, setups, decode)
        return self.compile_log[-1]["seconds"] if len(self.compile_log) > n else 0.0

    # -- sampling ---------------------------------------------------------------------------------------
    def __call__(self, arcface_embeddings, *, landmarks=None, emotion=None, guidance_id: float = 3.0,
                 guidance_control: float | None = None, landmark_scale=1.0, emotion_scale=1.0,
                 absent_controls: str = "null_tokens", num_steps: int = 25, scheduler: str | None = None, seed: int = 0,
                 first_index: int = 0, latents=None, height: int | None = None, width: int | None = None,
                 output_type: str = "uint8", guidance_scale: float | None = None) -> SampleOutput:
        """Sample one image per identity embedding, with optional landmark / emotion targets.

        Args:
            arcface_embeddings: ``[B, d]`` ArcFace vectors (L2-normalised inside).
            landmarks: ``[478, 3]`` (shared) or ``[B, 478, 3]`` MediaPipe landmarks in the aligned crop's frame
                (x, y in [0, 1], z relative depth), as data_prep stores them; None: no landmark control.
            emotion: ``[10]`` or ``[B, 10]`` (8 class probabilities, valence, arousal; see
                :func:`facecrafter_jax.face.vocabulary.emotion_vector`); None: no emotion control.
            guidance_id: ``g_id``, identity against the null branch (Arc2Face: 3.0).
            guidance_control: ``g_ctl``, controls on top of the identity (default: ``guidance_id``).
            landmark_scale, emotion_scale: ``lambda_c`` of the decoupled attention, a number or ``[B]``.
            absent_controls: ``"null_tokens"`` (default: controls not given run on their null tokens) or
                ``"switched_off"``
                (switched off; see the class docstring).
            guidance_scale: alias of ``guidance_id`` (the :class:`Arc2FacePipeline` name).
            The others: as :meth:`Arc2FacePipeline.__call__`.

        Returns:
            :class:`SampleOutput`.
        """
        if guidance_scale is not None:
            guidance_id = guidance_scale
        arcface, inputs, weights, chain, setups, run, g1 = self._setup(
            arcface_embeddings, landmarks, emotion, guidance_id, guidance_control, landmark_scale, emotion_scale,
            absent_controls)
        if not run:
            # no control branch runs (no control modules, or absent_controls="switched_off" without controls): Arc2Face,
            # e0 + g_id (e1 - e0), with its compiled program
            return super().__call__(arcface, num_steps=num_steps, guidance_scale=g1, scheduler=scheduler, seed=seed,
                                    first_index=first_index, latents=latents, height=height, width=width,
                                    output_type=output_type)
        decode, noise, plan = self._prepare(arcface, output_type, latents, seed, first_index, height, width,
                                            num_steps, scheduler)
        program = self._fc_program(arcface, inputs, weights, noise, plan, chain, setups, decode)
        out = program(self._states["model"], self._states["text_encoder"], self._states.get("vae"), arcface, inputs,
                      weights, noise, plan, chain)
        return self._output(out, noise, output_type)
