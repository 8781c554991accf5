"""Training logs: JSON lines, TensorBoard (tensorboardX), a tqdm progress bar, sample images.

Only the primary process (``jax.process_index() == 0``) writes. ``<run_dir>/metrics.jsonl`` gets one
object per logged step, ``{"step": completed steps, "time": unix seconds, <metric>: float, ...}``;
after a resume, steps after the restored checkpoint appear again (the later line wins).
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from .config import LoggingConfig

__all__ = ["MetricsLogger", "compiled_flops", "read_metrics"]


def compiled_flops(compiled) -> float | None:
    """FLOPs of one call of a compiled XLA executable (``cost_analysis()``), or None if unavailable."""
    try:
        cost = compiled.cost_analysis()
    except Exception:  # noqa: BLE001 - not every backend implements it
        return None
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    if not cost:
        return None
    flops = cost.get("flops")
    return float(flops) if flops is not None and flops > 0 else None


class MetricsLogger:
    """JSONL + TensorBoard + tqdm for one run (no-ops on non-primary processes)."""

    def __init__(self, run_dir: str | os.PathLike, cfg: LoggingConfig, *, total_steps: int, start_step: int,
                 primary: bool = True):
        self.cfg = cfg
        self.primary = primary
        self.run_dir = Path(run_dir)
        self._jsonl = None
        self._tb = None
        self._bar = None
        if not primary:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(self.run_dir / "metrics.jsonl", "a", buffering=1)
        if cfg.tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(str(self.run_dir / "tb"))
        if cfg.progress:
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Write one line / TensorBoard scalars for ``step`` (completed steps)."""
        if not self.primary:
            return
        clean = {}
        for k, v in metrics.items():
            v = float(np.asarray(v))
            clean[k] = v if math.isfinite(v) else str(v)
        self._jsonl.write(json.dumps({"step": int(step), "time": time.time(), **clean}) + "\n")
        if self._tb is not None:
            for k, v in clean.items():
                if isinstance(v, float):
                    self._tb.add_scalar(f"train/{k}", v, int(step))
        if self._bar is not None:
            shown = {k: clean[k] for k in ("loss", "lr", "images_per_s") if k in clean}
            self._bar.set_postfix({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in shown.items()},
                                  refresh=False)

    def advance(self, n: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def text(self, tag: str, text: str, step: int = 0) -> None:
        if self._tb is not None:
            self._tb.add_text(tag, text, step)

    def image(self, tag: str, image: np.ndarray, step: int) -> None:
        """An HWC uint8 image to TensorBoard."""
        if self._tb is not None:
            self._tb.add_image(tag, np.asarray(image), step, dataformats="HWC")

    def write(self, message: str) -> None:
        """A message that does not break the progress bar (primary only)."""
        if not self.primary:
            return
        if self._bar is not None:
            self._bar.write(message)
        else:
            print(message, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None


def read_metrics(run_dir: str | os.PathLike) -> dict[int, dict]:
    """``{step: metrics}`` from ``metrics.jsonl`` (the last line of a step wins, as after a resume)."""
    out: dict[int, dict] = {}
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return out
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            d = json.loads(line)
        except json.JSONDecodeError:  # a line cut by a kill
            continue
        out[int(d["step"])] = d
    return out
