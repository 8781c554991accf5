"""FaceCrafter controls as stock diffusers IP-Adapters: one ``.safetensors`` file per control.

``facecrafter-convert to-diffusers CHECKPOINT OUT`` writes ``OUT/ip_adapters/facecrafter_<control>.safetensors``
(and ``OUT/ip_adapters/facecrafter_ip_adapters.json``, what each file expects). Stock diffusers loads them
without any code from this package::

    pipe.load_ip_adapter("OUT", subfolder="ip_adapters", image_encoder_folder=None,
                         weight_name=["facecrafter_landmark.safetensors", "facecrafter_emotion.safetensors"])
    pipe.set_ip_adapter_scale([1.0, 1.0])                      # lambda_landmark, lambda_emotion
    pipe(prompt_embeds=..., negative_prompt_embeds=..., ip_adapter_image_embeds=[lmk, emo])

Each file holds the keys diffusers' loader reads (``loaders/unet.py``):

``image_proj.*`` -- the token encoder as diffusers' ``IPAdapterFaceIDImageProjection`` (the key set
    ``proj.0`` / ``proj.2`` / ``norm`` selects it: ``FeedForward(in, N * D, mult=hidden // in, "gelu")``,
    reshape to ``[N, D]``, ``LayerNorm(D)``), exactly our ``proj_in -> GELU(erf) -> proj_out -> reshape -> norm``.
    Two things make it exact:

    * the input is the *raw* flattened condition (landmarks ``[478 * 3]`` as data_prep stores them, emotion
      ``[10]``): our fixed normalisation ``x - c`` is affine, so it is folded into the first bias,
      ``b1' = b1 - c @ W1`` (:func:`~facecrafter_jax.models.control.feature_offset`). The null condition is
      then exactly ``zeros`` on the diffusers side too (IP-Adapter's and Arc2Face's convention).
    * diffusers sizes the hidden layer as ``in * (hidden // in)``, so the hidden width must be a multiple of
      the input width (the defaults are: 1434 = 1 x 1434 for landmarks, 510 = 51 x 10 for emotion). Any other
      width is zero-padded up to the next multiple: the added units have zero weights and bias, give
      GELU(0) = 0 and feed zero weights, so the function is unchanged (the index file records the padding).
``ip_adapter.<k>.to_k_ip.weight`` / ``to_v_ip.weight`` -- the layer's ``to_k_c[control]`` / ``to_v_c[control]``,
    with ``k = 2 i + 1`` for the ``i``-th cross-attention layer in the order of diffusers'
    ``unet.attn_processors`` (down blocks, then up blocks, then the mid block: SD1.5 uses 1, 3, ..., 31).

diffusers' processor computes ``Attn(Q, K_id, V_id) + scale * Attn(Q, K_ip, V_ip)`` per loaded adapter, the
same decoupled cross-attention as ours. Not expressible (a :class:`IPAdapterExportError` says why): K/V
projections with a bias (diffusers' ``to_k_ip`` / ``to_v_ip`` have none), cross-attention layers of different
context widths. Per-sample masks and scales are a runtime matter: diffusers has one scale per adapter (0
switches it off).
"""

from __future__ import annotations

import json
import os

import numpy as np

from facecrafter_jax.errors import CheckpointError
from facecrafter_jax.models.control import CONTROL_INPUT_DIMS, LAYER_NORM_EPS, feature_offset

__all__ = ["IP_ADAPTER_SUBFOLDER", "IP_ADAPTER_INDEX", "IP_ADAPTER_FORMAT", "IPAdapterExportError",
           "ip_adapter_weight_name", "diffusers_cross_attention_order", "ip_adapter_state", "check_ip_adapter_export",
           "export_ip_adapters"]

IP_ADAPTER_SUBFOLDER = "ip_adapters"
IP_ADAPTER_INDEX = "facecrafter_ip_adapters.json"
IP_ADAPTER_FORMAT = "facecrafter-ip-adapters"

# What each control's diffusers input is (recorded in the index file and the safetensors metadata).
INPUT_DESCRIPTIONS = {
    "landmark": "MediaPipe's 478 landmarks [478, 3] flattened to 1434 (x, y in [0, 1] of the aligned crop, z "
                "MediaPipe's relative depth; as data_prep stores them, no centring); null input: zeros",
    "emotion": "[10]: 8 EmoNet class probabilities, valence, arousal; null input: zeros",
}


class IPAdapterExportError(CheckpointError):
    """A FaceCrafter checkpoint that cannot be written as a diffusers IP-Adapter (the message says why)."""


def ip_adapter_weight_name(control: str) -> str:
    """File name of one control's IP-Adapter: ``facecrafter_<control>.safetensors``."""
    return f"facecrafter_{control}.safetensors"


_GROUP_RANK = {"down_blocks": 0, "up_blocks": 1, "mid_block": 2}


def diffusers_cross_attention_order(unet) -> list[tuple[str, object]]:
    """``(dotted name, attn2)`` of every cross-attention layer in the order of diffusers' ``unet.attn_processors``.

    diffusers registers ``down_blocks`` and ``up_blocks`` before ``mid_block`` and walks children in
    registration order, so its order is down, up, mid (ours, ``layer_index``, is down, mid, up).
    """
    layers = list(unet._walk_cross_attention())
    return sorted(layers, key=lambda item: _GROUP_RANK[item[0].split(".")[0]])  # stable: keeps order within a group


def check_ip_adapter_export(model) -> None:
    """Raise :class:`IPAdapterExportError` naming the reason when ``model`` (a FaceCrafter) has no exact
    diffusers IP-Adapter form; return None otherwise."""
    layers = model.unet.cross_attention_layers()
    dims = {int(a.to_k.kernel.shape[0]) for a in layers}
    if len(dims) != 1:
        raise IPAdapterExportError(f"cross-attention layers take contexts of different widths {sorted(dims)}; "
                                   "one IP-Adapter token set cannot feed them all")
    for name in model.controls:
        for attn in layers:
            for proj in ("to_k_c", "to_v_c"):
                if getattr(attn, proj)[name].bias is not None:
                    raise IPAdapterExportError(
                        f"{attn.layer_name}.{proj}.{name} has a bias; diffusers' IP-Adapter projections "
                        f"(to_k_ip / to_v_ip) have none, so the {name} control cannot be written as an IP-Adapter "
                        "(use the facecrafter_adapters.safetensors export with facecrafter_jax.torch_facecrafter, "
                        "or facecrafter-convert to-diffusers --no-ip-adapter)")
        enc = model.encoder(name)
        if enc.norm.eps != LAYER_NORM_EPS:
            raise IPAdapterExportError(f"{name}_encoder.norm has eps {enc.norm.eps}; diffusers' projection uses "
                                       f"torch.nn.LayerNorm's {LAYER_NORM_EPS}")


def _np(var) -> np.ndarray:
    return np.asarray(var.get_value(), dtype=np.float32)


def ip_adapter_state(model, control: str) -> tuple[dict[str, np.ndarray], dict]:
    """One control of ``model`` as a diffusers IP-Adapter state dict (``image_proj.*``, ``ip_adapter.*``; float32).

    Returns ``(state, info)``; ``info`` holds the input width, hidden width (ours and as written),
    ``mult``, token count and width, and the number of layers.
    """
    check_ip_adapter_export(model)
    enc = model.encoder(control)
    w1, b1 = _np(enc.proj_in.kernel), _np(enc.proj_in.bias)  # [in, h], [h]
    w2, b2 = _np(enc.proj_out.kernel), _np(enc.proj_out.bias)  # [h, N * D], [N * D]
    in_dim, hidden = w1.shape
    if in_dim != CONTROL_INPUT_DIMS[control]:  # pragma: no cover - the encoder is built from the same table
        raise IPAdapterExportError(f"{control}_encoder.proj_in takes {in_dim} inputs, expected {CONTROL_INPUT_DIMS[control]}")
    # Fold the fixed normalisation x - c into the bias (float64, then rounded once).
    c = feature_offset(control).astype(np.float64)
    b1 = (b1.astype(np.float64) - c @ w1.astype(np.float64)).astype(np.float32)
    mult = -(-hidden // in_dim)
    padded = mult * in_dim
    if padded != hidden:  # zero units: GELU(0) = 0 into zero weights, the function is unchanged
        w1 = np.concatenate([w1, np.zeros((in_dim, padded - hidden), np.float32)], axis=1)
        b1 = np.concatenate([b1, np.zeros((padded - hidden,), np.float32)])
        w2 = np.concatenate([w2, np.zeros((padded - hidden, w2.shape[1]), np.float32)], axis=0)
    state = {
        "image_proj.proj.0.weight": w1.T,
        "image_proj.proj.0.bias": b1,
        "image_proj.proj.2.weight": w2.T,
        "image_proj.proj.2.bias": b2,
        "image_proj.norm.weight": _np(enc.norm.scale),
        "image_proj.norm.bias": _np(enc.norm.bias),
    }
    order = diffusers_cross_attention_order(model.unet)
    for i, (_, attn) in enumerate(order):
        state[f"ip_adapter.{2 * i + 1}.to_k_ip.weight"] = _np(attn.to_k_c[control].kernel).T
        state[f"ip_adapter.{2 * i + 1}.to_v_ip.weight"] = _np(attn.to_v_c[control].kernel).T
    state = {k: np.ascontiguousarray(v) for k, v in state.items()}
    info = {"input_dim": int(in_dim), "hidden_dim": int(hidden), "written_hidden_dim": int(padded), "mult": int(mult),
            "num_tokens": int(enc.num_tokens), "token_dim": int(enc.output_dim), "layers": len(order),
            "input": INPUT_DESCRIPTIONS[control]}
    return state, info


def export_ip_adapters(model, out: str) -> list[str]:
    """Write ``OUT/ip_adapters/facecrafter_<control>.safetensors`` for every control of ``model`` and the
    index ``OUT/ip_adapters/facecrafter_ip_adapters.json``; returns the paths written.

    Raises :class:`IPAdapterExportError` (before writing anything) when the model cannot be expressed.
    """
    from safetensors.numpy import save_file

    check_ip_adapter_export(model)
    folder = os.path.join(out, IP_ADAPTER_SUBFOLDER)
    os.makedirs(folder, exist_ok=True)
    written, entries = [], {}
    for control in model.controls:
        state, info = ip_adapter_state(model, control)
        path = os.path.join(folder, ip_adapter_weight_name(control))
        save_file(state, path, metadata={"format": "pt", "facecrafter_control": control,
                                         "facecrafter_info": json.dumps(info, sort_keys=True)})
        written.append(path)
        entries[control] = {"weight_name": ip_adapter_weight_name(control), **info}
    index = {
        "format": IP_ADAPTER_FORMAT, "version": 1,
        "controls": list(model.controls),
        "weight_names": [ip_adapter_weight_name(c) for c in model.controls],
        "adapters": entries,
        "usage": ("pipe.load_ip_adapter(OUT, subfolder='ip_adapters', weight_name=weight_names, "
                  "image_encoder_folder=None); pipe.set_ip_adapter_scale([...]); "
                  "ip_adapter_image_embeds=[one [2B, 1, input_dim] tensor per control, zeros (null) first]"),
        "config": model.config.to_dict(),
    }
    path = os.path.join(folder, IP_ADAPTER_INDEX)
    with open(path, "w") as f:
        json.dump(index, f, indent=2)
    written.append(path)
    return written
