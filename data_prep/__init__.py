"""Data preparation: face photos -> FaceCrafter training records.

``python -m data_prep run --images DIR --out DIR --landmarker face_landmarker.task --arcface arcface.onnx
--emonet emonet_8.pth --vae sd15/vae`` extracts, per image, the ArcFace identity embedding, MediaPipe
landmarks in the aligned crop, head pose, EmoNet emotion and VAE latent moments, and writes them as record
shards (:mod:`facecrafter_jax.data.records`) plus ``manifest.jsonl``. ``python -m data_prep inspect DIR``
summarises a prepared folder. See ``docs/data.md`` (section "data_prep").

This package is imported by worker processes: keep its import light (no JAX here).
"""

__all__ = ["run", "inspect_dataset"]


def run(*args, **kwargs):
    """See :func:`data_prep.run.run`."""
    from data_prep.run import run as _run

    return _run(*args, **kwargs)


def inspect_dataset(directory):
    """See :func:`data_prep.inspect_cmd.inspect_dataset`."""
    from data_prep.inspect_cmd import inspect_dataset as _inspect

    return _inspect(directory)
