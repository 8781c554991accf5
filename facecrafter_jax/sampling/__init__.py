"""Jitted sampling: the whole denoising loop in one ``lax.scan``, chained classifier-free guidance, VAE decode.

==============================  =================================================================
``sampling.guidance``           seeded noise, the guidance chain in one model call, plans, the loop
``sampling.arc2face``           :class:`Arc2FacePipeline`: ArcFace embeddings -> images
``sampling.facecrafter``        :class:`FaceCrafterPipeline`: identity + landmark / emotion controls
``sampling.cli``                ``sample.py``: photos / embeddings -> PNGs + ``samples.json``
==============================  =================================================================

Emotion targets (:func:`~facecrafter_jax.face.vocabulary.emotion_vector`) live in the face vocabulary.
"""

from .arc2face import Arc2FacePipeline, SampleOutput
from .facecrafter import FaceCrafterPipeline, branch_setups
from .guidance import (SCHEDULERS, combine_guidance, concat_conditions, guidance_branches, guided_denoiser,
                       initial_noise, make_plan, sample_latents, to_uint8)

__all__ = [
    "SCHEDULERS", "Arc2FacePipeline", "FaceCrafterPipeline", "branch_setups", "guidance_branches",
    "SampleOutput", "combine_guidance", "concat_conditions", "guided_denoiser", "initial_noise", "make_plan",
    "sample_latents", "to_uint8",
]
