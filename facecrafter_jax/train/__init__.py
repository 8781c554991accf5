"""FaceCrafter training: ``python train.py --config configs/NAME.yaml [key=value ...]`` (docs/training.md).

Modules: :mod:`~facecrafter_jax.train.config` (YAML + dotted overrides -> frozen dataclasses),
:mod:`~facecrafter_jax.train.mesh` (the one place deciding shardings), :mod:`~facecrafter_jax.train.state`
(model split into trainable adapters / frozen base, optimiser, train state), :mod:`~facecrafter_jax.train.step`
(the pure train step), :mod:`~facecrafter_jax.train.checkpoint` (orbax manager and resume checks),
:mod:`~facecrafter_jax.train.logging` (JSONL / TensorBoard / tqdm), :mod:`~facecrafter_jax.train.samples`
(sample grids), :mod:`~facecrafter_jax.train.loop` (``Trainer`` and ``run``),
:mod:`~facecrafter_jax.train.testing` (subprocess launch helpers for tests and benchmarks),
:mod:`~facecrafter_jax.train.cli` (``train.py``'s argument parsing and error path),
:mod:`~facecrafter_jax.train.distributed` (``jax.distributed`` init, lost peers) and
:mod:`~facecrafter_jax.train.supervise` (one-line report of a runtime abort in multi-process runs).
Faults and what the trainer does about them: docs/reliability.md.
"""
