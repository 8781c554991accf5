"""Importer for the official EmoNet PyTorch checkpoints (``emonet_8.pth`` / ``emonet_5.pth``).

The files are ``torch.save`` pickles of a state dict, saved from ``nn.DataParallel`` (keys prefixed
``module.``). They are read with ``torch.load(weights_only=True)`` only. Key layout: the official module
names (``conv2.bn1.weight``, ``m1.b2_plus_1.downsample...``, ``emo_net_2.<i>...``, ``emo_fc_2.<i>...``).
All "InstanceNorm2d" layers of the official code are ``BatchNorm2d`` (the code rebinds the name), so
their entries are BatchNorm entries: ``weight``, ``bias``, ``running_mean``, ``running_var`` and
``num_batches_tracked``; the first four map to ``scale``, ``bias``, ``mean``, ``var`` of our
:class:`~facecrafter_jax.models.emonet.BatchNorm`, ``num_batches_tracked`` is ignored.

Unlike the official demo (``load_state_dict(strict=False)``), loading is strict: a missing, unused or
mis-shaped key raises :class:`~facecrafter_jax.convert.weights.WeightConversionError` naming it.
"""

from __future__ import annotations

import os
from typing import Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from facecrafter_jax.convert.weights import (
    KeyRule, WeightConversionError, build_key_map, export_torch_state, flax_path_str, load_torch_state,
    read_torch_checkpoint,
)
from facecrafter_jax.models.emonet import EmoNet

__all__ = ["load_emonet", "emonet_key_map", "load_emonet_state", "export_emonet_state"]

_STAT_NAMES = {"mean": "running_mean", "var": "running_var"}


def emonet_key_map(model: EmoNet) -> tuple[list[KeyRule], list[KeyRule]]:
    """(parameter rules, batch-statistics rules) mapping every Flax variable to its official PyTorch key."""
    params = build_key_map(model)
    stats = []
    for path, _ in nnx.to_flat_state(nnx.state(model, nnx.BatchStat)):
        leaf = path[-1]
        if leaf not in _STAT_NAMES:
            raise WeightConversionError(f"no PyTorch name for batch statistic {flax_path_str(path)}")
        stats.append(KeyRule(tuple(path), flax_path_str(path[:-1]) + "." + _STAT_NAMES[leaf], "identity"))
    return params, stats


def _strip_prefix(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    keys = list(state)
    if keys and all(k.startswith("module.") for k in keys):
        return {k[len("module."):]: v for k, v in state.items()}
    return dict(state)


def load_emonet_state(model: EmoNet, state: Mapping[str, np.ndarray]) -> None:
    """Copy an official-layout state dict (with or without the ``module.`` prefix) into ``model``, strictly."""
    state = _strip_prefix(state)
    param_rules, stat_rules = emonet_key_map(model)
    ignore_always = [k for k in state if k.endswith(".num_batches_tracked")]
    param_keys = [r.torch_key for r in param_rules]
    stat_keys = [r.torch_key for r in stat_rules]
    load_torch_state(model, state, param_rules, ignore=ignore_always + stat_keys, variable_type=nnx.Param)
    load_torch_state(model, state, stat_rules, ignore=ignore_always + param_keys, variable_type=nnx.BatchStat)


def export_emonet_state(model: EmoNet) -> dict[str, np.ndarray]:
    """The inverse of :func:`load_emonet_state` (official key names, no ``module.`` prefix, no ``num_batches_tracked``)."""
    param_rules, stat_rules = emonet_key_map(model)
    out = export_torch_state(model, param_rules)
    out.update(export_torch_state(model, stat_rules, variable_type=nnx.BatchStat))
    return out


def load_emonet(path: str | os.PathLike, *, n_expression: int | None = None, dtype=jnp.float32) -> EmoNet:
    """Build an :class:`EmoNet` from an official checkpoint file (``.pth``; ``.safetensors`` also accepted).

    ``n_expression`` (8 or 5 for the released files) is inferred from ``emo_fc_2.3.weight`` when not given;
    a given value that disagrees with the checkpoint raises.
    """
    path = os.fspath(path)
    state = _strip_prefix(read_torch_checkpoint(path))
    head = state.get("emo_fc_2.3.weight")
    if head is None:
        raise WeightConversionError(f"{path}: not an EmoNet checkpoint (missing key 'emo_fc_2.3.weight')")
    inferred = int(head.shape[0]) - 2
    if n_expression is not None and n_expression != inferred:
        raise WeightConversionError(
            f"{path}: n_expression={n_expression} requested but 'emo_fc_2.3.weight' has {head.shape[0]} outputs "
            f"(= {inferred} classes + valence + arousal)")
    num_modules = sum(1 for k in state if k.startswith("m") and k.endswith(".b1_4.bn1.weight") and k.split(".")[0][1:].isdigit())
    model = EmoNet(num_modules=max(num_modules, 1), n_expression=inferred, dtype=dtype, rngs=nnx.Rngs(0))
    load_emonet_state(model, state)
    return model
