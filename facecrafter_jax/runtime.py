"""Runtime defaults: the one place where XLA:CPU flags and the persistent compilation cache are chosen.

Call :func:`configure_cpu` before JAX creates its CPU backend (i.e. before the first computation;
importing ``jax`` earlier is fine) and :func:`enable_compilation_cache` before the first compilation.
Entry points (``train.py``, ``sample.py``) and benches call them; library code never does. Flags already
in ``XLA_FLAGS`` win over ours, so a user can always override a default. See ``docs/performance.md`` for
the measurements behind each choice.
"""

from __future__ import annotations

import os

__all__ = ["CPU_XLA_FLAGS", "configure_cpu", "CACHE_ENV", "default_cache_dir", "enable_compilation_cache"]

# flag -> value. Only flags that measured faster on the SD1.5 UNet at fp32 and keep parity.
# ``xla_cpu_enable_fast_math`` stays false (its default): fast math breaks the 1e-4 parity with PyTorch.
CPU_XLA_FLAGS: dict[str, str] = {
    # YNNPACK library fusions: jaxlib 0.10 enables INDIVIDUAL_DOT, INDIVIDUAL_CONVOLUTION and REDUCE.
    # Its convolutions are 3-5x slower than XLA's own (Eigen) ones at SD1.5 widths (3x3, 320-1280
    # channels) and its standalone dots are no faster than Eigen's; its REDUCE fusions (a dot feeding
    # max/exp/sum, i.e. the attention logits + softmax) are a win. Keep REDUCE only.
    # SD1.5 forward, 32x32 latent, 1 thread: 0.66x PyTorch with this, 0.70x with no YNN at all,
    # 1.26x with the default (docs/performance.md).
    "xla_cpu_experimental_ynn_fusion_type": "reduce",
}


def configure_cpu(extra: dict[str, str] | None = None) -> str:
    """Merge :data:`CPU_XLA_FLAGS` (and ``extra``) into ``XLA_FLAGS``; user-set flags are kept unchanged.

    Returns the resulting ``XLA_FLAGS`` string. Has no effect on a CPU backend that already exists.
    """
    current = os.environ.get("XLA_FLAGS", "").split()
    present = {f.split("=", 1)[0].lstrip("-") for f in current}
    wanted = dict(CPU_XLA_FLAGS, **(extra or {}))
    added = [f"--{k}={v}" for k, v in wanted.items() if k not in present]
    os.environ["XLA_FLAGS"] = " ".join(current + added)
    return os.environ["XLA_FLAGS"]


CACHE_ENV = "FACECRAFTER_COMPILATION_CACHE"
"""Environment variable: the cache folder, or ``0`` / ``off`` / ``none`` to disable the cache."""


def default_cache_dir() -> str:
    """``$FACECRAFTER_COMPILATION_CACHE``, else ``$XDG_CACHE_HOME/facecrafter_jax/xla`` (``~/.cache/...``)."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return os.path.expanduser(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "facecrafter_jax", "xla")


def enable_compilation_cache(path: str | os.PathLike | None = None, *, min_compile_seconds: float = 1.0) -> str | None:
    """Turn on JAX's persistent compilation cache so a program compiled once loads from disk next time.

    ``path`` defaults to :func:`default_cache_dir`; ``$FACECRAFTER_COMPILATION_CACHE=off`` (or ``0`` /
    ``none``) disables it, and a cache folder already configured (``JAX_COMPILATION_CACHE_DIR`` or
    ``jax.config``) is kept. Programs that compiled in less than ``min_compile_seconds`` are not stored.
    The key covers the program, the XLA flags, the JAX / jaxlib version and the device, so a stale entry
    is never used; delete the folder to reclaim the space. Returns the folder in use, or None.
    """
    import jax

    env = os.environ.get(CACHE_ENV, "")
    if path is None and env.lower() in ("0", "off", "none", "false"):
        return None
    current = jax.config.jax_compilation_cache_dir
    if path is None and current:
        return current
    folder = os.fspath(path) if path is not None else default_cache_dir()
    os.makedirs(folder, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", folder)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_seconds))
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return folder
