"""Runtime defaults for running our models on XLA:CPU: the one place where XLA flags are chosen.

Call :func:`configure_cpu` before JAX creates its CPU backend (i.e. before the first computation;
importing ``jax`` earlier is fine). Benches and CLIs call it; library code never does. Flags already in
``XLA_FLAGS`` win over ours, so a user can always override a default. See ``docs/performance.md`` for
the measurements behind each choice.
"""

from __future__ import annotations

import os

__all__ = ["CPU_XLA_FLAGS", "configure_cpu"]

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
