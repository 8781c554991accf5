"""PyTorch <-> Flax NNX weight conversion: reading checkpoint files and the explicit key map.

Our Flax modules mirror diffusers / transformers attribute names (``down_blocks[0].resnets[1].conv1``,
``to_out[0]``, ``ff.net[2]`` ...), so a Flax parameter path and its PyTorch key differ only in the
leaf name and the tensor layout. :func:`build_key_map` walks a module's parameters and returns one
:class:`KeyRule` per parameter: the Flax path, the PyTorch key, and the layout transform. The same
table is used in both directions (:func:`load_torch_state` / :func:`export_torch_state`), so
import and export cannot drift apart.

Layout rules (PyTorch -> Flax):

=============  =========================  ==========================  ===================
leaf in Flax   leaf in PyTorch            transform                   example
=============  =========================  ==========================  ===================
``kernel`` 4-D ``weight`` [O, I, kh, kw]  ``conv``: transpose 2,3,1,0 Conv2d -> HWIO
``kernel`` 2-D ``weight`` [O, I]          ``linear``: transpose 1,0   Linear -> [I, O]
``scale``      ``weight``                 ``identity``                GroupNorm, LayerNorm
``embedding``  ``weight``                 ``identity``                nn.Embedding
``bias``       ``bias``                   ``identity``
=============  =========================  ==========================  ===================

A PyTorch 1x1 conv stored as a Flax Linear (or the reverse) is not supported on purpose: every
module uses the layer type of its reference, so the table stays a pure function of the model.

Every key is accounted for: a Flax parameter with no PyTorch key (missing), a PyTorch key with no
Flax parameter (unused) and a shape mismatch each raise :class:`WeightConversionError` naming the key.
"""

from __future__ import annotations

import json
import os
import pickle
import re
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from facecrafter_jax.errors import DataError

__all__ = [
    "KeyRule",
    "WeightConversionError",
    "build_key_map",
    "read_torch_checkpoint",
    "load_torch_state",
    "export_torch_state",
    "read_json",
    "save_flax_params",
    "load_flax_params",
]


class WeightConversionError(DataError):
    """A checkpoint does not match the model or cannot be read safely: names the offending key(s) / file
    (a ``ValueError`` and a ``facecrafter_jax.errors.DataError``: CLIs report it as one line)."""


@dataclass(frozen=True)
class KeyRule:
    flax_path: tuple  # e.g. ('down_blocks', 0, 'resnets', 1, 'conv1', 'kernel')
    torch_key: str  # e.g. 'down_blocks.0.resnets.1.conv1.weight'
    transform: str  # 'conv' | 'linear' | 'identity'

    def to_flax(self, array: np.ndarray) -> np.ndarray:
        if self.transform == "conv":
            return np.transpose(array, (2, 3, 1, 0))
        if self.transform == "linear":
            return np.transpose(array, (1, 0))
        return array

    def to_torch(self, array: np.ndarray) -> np.ndarray:
        if self.transform == "conv":
            return np.transpose(array, (3, 2, 0, 1))
        if self.transform == "linear":
            return np.transpose(array, (1, 0))
        return array


_LEAF_TO_TORCH = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}


def flax_path_str(path: tuple) -> str:
    return ".".join(str(p) for p in path)


def build_key_map(
    module: nnx.Module,
    *,
    variable_type=nnx.Param,
    torch_prefix: str = "",
    rename: Callable[[str], str] | None = None,
) -> list[KeyRule]:
    """One rule per parameter of ``module`` (filtered by ``variable_type``).

    ``rename`` maps the dotted module path (without the leaf) to the PyTorch module path for the
    rare places where our structure differs from the reference; ``torch_prefix`` is prepended to
    every PyTorch key (e.g. ``'text_model.'``).
    """
    rules = []
    for path, var in nnx.to_flat_state(nnx.state(module, variable_type)):
        leaf = path[-1]
        if leaf not in _LEAF_TO_TORCH:
            raise WeightConversionError(f"no PyTorch name rule for parameter leaf {leaf!r} at {flax_path_str(path)}")
        ndim = np.ndim(var.get_value())
        if leaf == "kernel":
            transform = {4: "conv", 2: "linear"}.get(ndim)
            if transform is None:
                raise WeightConversionError(f"kernel of unsupported rank {ndim} at {flax_path_str(path)}")
        else:
            transform = "identity"
        module_path = flax_path_str(path[:-1])
        if rename is not None:
            module_path = rename(module_path)
        torch_key = torch_prefix + (module_path + "." if module_path else "") + _LEAF_TO_TORCH[leaf]
        rules.append(KeyRule(tuple(path), torch_key, transform))
    seen: dict[str, tuple] = {}
    for r in rules:
        if r.torch_key in seen:
            raise WeightConversionError(f"two parameters map to PyTorch key {r.torch_key!r}: {seen[r.torch_key]} and {r.flax_path}")
        seen[r.torch_key] = r.flax_path
    return rules


# --------------------------------------------------------------------------------------------
# Reading PyTorch checkpoint files
# --------------------------------------------------------------------------------------------

_WEIGHT_FILES = (
    "diffusion_pytorch_model.safetensors",
    "model.safetensors",
    "diffusion_pytorch_model.bin",
    "pytorch_model.bin",
)


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    try:
        return dict(load_file(path))
    except Exception as e:  # bf16 tensors are not representable by safetensors.numpy on old versions
        try:
            import torch
            from safetensors.torch import load_file as load_torch
        except ImportError:
            raise WeightConversionError(f"cannot read {path}: {e}") from e
        return {k: v.to(torch.float32).numpy() if v.dtype == torch.bfloat16 else v.numpy() for k, v in load_torch(path).items()}


def _read_pickle(path: str) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError as e:  # pragma: no cover - only without the torch extra
        raise WeightConversionError(f"{path} is a PyTorch pickle; install the 'torch' extra to read it") from e
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # the restricted unpickler met a global: the file would run code
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
        what = f"it would call {found.group(1)} while loading" if found else " ".join(str(e).split())[:200]
        raise WeightConversionError(f"{path}: refused to load this pickle: {what}. A weights file holds only "
                                    "tensors and is read with torch.load(weights_only=True); get the file from its "
                                    "official source (or convert a trusted copy to safetensors)") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    out = {}
    for k, v in state.items():
        if not hasattr(v, "detach"):
            raise WeightConversionError(f"{path}: entry {k!r} is not a tensor ({type(v).__name__})")
        v = v.detach()
        if v.dtype == torch.bfloat16:
            v = v.to(torch.float32)
        out[k] = v.numpy()
    return out


def read_torch_checkpoint(path: str) -> dict[str, np.ndarray]:
    """Read a PyTorch state dict as NumPy arrays from a file or a diffusers / transformers folder.

    Folders: the first of ``diffusion_pytorch_model.safetensors``, ``model.safetensors``,
    ``diffusion_pytorch_model.bin``, ``pytorch_model.bin`` found (sharded ``*.index.json``
    checkpoints are read shard by shard). ``.bin`` / ``.pth`` pickles load with
    ``torch.load(weights_only=True)`` only.
    """
    if os.path.isdir(path):
        for name in _WEIGHT_FILES:
            index = os.path.join(path, name + ".index.json")
            if os.path.exists(index):
                with open(index) as f:
                    shards = sorted(set(json.load(f)["weight_map"].values()))
                state = {}
                for shard in shards:
                    state.update(read_torch_checkpoint(os.path.join(path, shard)))
                return state
            if os.path.exists(os.path.join(path, name)):
                return read_torch_checkpoint(os.path.join(path, name))
        raise FileNotFoundError(f"no weights in {path}: expected one of {', '.join(_WEIGHT_FILES)}")
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.endswith(".safetensors"):
        return _read_safetensors(path)
    if path.endswith((".bin", ".pth", ".pt", ".ckpt")):
        return _read_pickle(path)
    raise WeightConversionError(f"unknown checkpoint format: {path} (expected .safetensors, .bin or .pth)")


def read_json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


# --------------------------------------------------------------------------------------------
# Applying / exporting with a key map
# --------------------------------------------------------------------------------------------


def _check_keys(rules: list[KeyRule], state: Mapping[str, np.ndarray], ignore: Iterable[str]) -> None:
    ignore = set(ignore)
    wanted = {r.torch_key for r in rules}
    missing = sorted(wanted - set(state))
    unused = sorted(k for k in state if k not in wanted and k not in ignore)
    msgs = []
    if missing:
        msgs.append(f"missing key(s) in checkpoint: {', '.join(missing[:20])}" + (" ..." if len(missing) > 20 else ""))
    if unused:
        msgs.append(f"unused key(s) in checkpoint: {', '.join(unused[:20])}" + (" ..." if len(unused) > 20 else ""))
    if msgs:
        raise WeightConversionError("; ".join(msgs))


def load_torch_state(
    module: nnx.Module,
    state: Mapping[str, np.ndarray],
    rules: list[KeyRule],
    *,
    ignore: Iterable[str] = (),
    variable_type=nnx.Param,
) -> None:
    """Copy a PyTorch state dict into ``module`` in place, following ``rules``.

    Keys listed in ``ignore`` may be present in ``state`` without a Flax parameter (non-parameter
    buffers such as CLIP's ``position_ids``). Every other mismatch raises, naming the key.
    """
    _check_keys(rules, state, ignore)
    current = dict(nnx.to_flat_state(nnx.state(module, variable_type)))
    updates = {}
    for r in rules:
        value = r.to_flax(np.asarray(state[r.torch_key]))
        target = current[r.flax_path]
        target_value = target.get_value()
        if tuple(value.shape) != tuple(target_value.shape):
            raise WeightConversionError(
                f"shape mismatch for {r.torch_key!r}: checkpoint {tuple(state[r.torch_key].shape)} "
                f"-> {tuple(value.shape)} after '{r.transform}', model {flax_path_str(r.flax_path)} expects {tuple(target_value.shape)}"
            )
        updates[r.flax_path] = jnp.asarray(value, dtype=target_value.dtype)
    new_state = nnx.state(module, variable_type)
    for path, var in nnx.to_flat_state(new_state):
        var.set_value(updates[path])
    nnx.update(module, new_state)


def export_torch_state(module: nnx.Module, rules: list[KeyRule], *, variable_type=nnx.Param) -> dict[str, np.ndarray]:
    """The inverse of :func:`load_torch_state`: a PyTorch-layout state dict of NumPy arrays."""
    flat = dict(nnx.to_flat_state(nnx.state(module, variable_type)))
    out = {}
    for r in rules:
        var = flat[r.flax_path]
        out[r.torch_key] = np.ascontiguousarray(r.to_torch(np.asarray(var.get_value())))
    return out


# --------------------------------------------------------------------------------------------
# Our own Flax checkpoint format for converted models: <dir>/config.json + <dir>/model.safetensors
# keyed by dotted Flax paths. Plain, portable, and loadable without orbax.
# --------------------------------------------------------------------------------------------


def save_flax_params(module: nnx.Module, directory: str, config: dict, *, variable_type=nnx.Param) -> None:
    from safetensors.numpy import save_file

    os.makedirs(directory, exist_ok=True)
    flat = {flax_path_str(p): np.ascontiguousarray(np.asarray(v.get_value()))
            for p, v in nnx.to_flat_state(nnx.state(module, variable_type))}
    save_file(flat, os.path.join(directory, "model.safetensors"), metadata={"format": "facecrafter-flax"})
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)


def load_flax_params(module: nnx.Module, directory: str, *, variable_type=nnx.Param) -> None:
    """Load parameters written by :func:`save_flax_params` into ``module`` (strict, in place)."""
    from safetensors.numpy import load_file

    path = os.path.join(directory, "model.safetensors")
    if not os.path.exists(path):
        raise FileNotFoundError(f"no Flax checkpoint at {path}")
    stored = load_file(path)
    state = nnx.state(module, variable_type)
    flat = nnx.to_flat_state(state)
    wanted = {flax_path_str(p) for p, _ in flat}
    missing = sorted(wanted - set(stored))
    unused = sorted(set(stored) - wanted)
    if missing or unused:
        raise WeightConversionError(
            f"{path}: missing key(s) {missing[:20]}; unused key(s) {unused[:20]}")
    for p, var in flat:
        key = flax_path_str(p)
        cur = var.get_value()
        if tuple(stored[key].shape) != tuple(cur.shape):
            raise WeightConversionError(f"{path}: shape mismatch for {key!r}: stored {stored[key].shape}, model {cur.shape}")
        var.set_value(jnp.asarray(stored[key], dtype=cur.dtype))
    nnx.update(module, state)
