"""FaceCrafter for diffusers users (PyTorch): token encoders and the decoupled-attention processor.

Needs the ``torch`` extra (torch, diffusers); imports no JAX. Runs the adapters exported by
``facecrafter-convert to-diffusers CHECKPOINT OUT`` on a stock diffusers ``UNet2DConditionModel``::

    from diffusers import UNet2DConditionModel
    from facecrafter_jax.torch_facecrafter import load_facecrafter_adapters, encode_controls

    unet = UNet2DConditionModel.from_pretrained("OUT/unet")
    encoders = load_facecrafter_adapters(unet, "OUT/facecrafter_adapters.safetensors")
    controls = encode_controls(encoders, landmarks=lmk, emotion=emo,            # lmk [B, 478, 3], emo [B, 10]
                               masks={"landmark": m_lmk}, scales={"emotion": 0.8})
    eps = unet(latents, t, id_context, cross_attention_kwargs={"controls": controls}).sample
    # or, for pipelines that do not forward cross_attention_kwargs: set_controls(unet, controls)

``controls`` maps a control name to ``(tokens [B, N, D], mask [B] or None, scale float or [B])``; each
cross-attention layer computes ``Attn(Q, K_id, V_id) + sum_c scale_c * mask_c * Attn(Q, K_c, V_c)``
before its output projection (``docs/method.md``). The token batch must match the UNet batch (for
classifier-free guidance, concatenate the unconditional and conditional controls like the latents).
:func:`encode_controls` gives every loaded control: one left as None runs on its null tokens (the
all-zero raw input through its encoder, branch on), which is also the unconditional side of CFG; a branch is
switched off only explicitly (scale or mask 0). A control missing from a hand-made ``controls`` dict is off.

Stock diffusers (no code from this package) runs the same adapters as IP-Adapters: see
:mod:`facecrafter_jax.convert.ip_adapter` and :mod:`facecrafter_jax.torch_ip_adapter`.

State-dict keys: ``<attn2 processor path>.to_k_c.<name>.weight`` (e.g.
``down_blocks.0.attentions.0.transformer_blocks.0.attn2.processor.to_k_c.landmark.weight``, the key the
installed processor has in ``unet.state_dict()``) and ``<name>_encoder.{proj_in,proj_out,norm}.{weight,bias}``.
"""

from __future__ import annotations

import json
import os
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from facecrafter_jax.face.vocabulary import CONTROL_INPUT_DIMS, NUM_LANDMARKS

__all__ = [
    "ADAPTERS_FILE",
    "ADAPTERS_CONFIG_FILE",
    "ADAPTERS_FORMAT",
    "ControlTokenEncoder",
    "FaceCrafterAttnProcessor",
    "FaceCrafterSelfAttnProcessor",
    "control_features",
    "null_input",
    "load_facecrafter_adapters",
    "encode_controls",
    "set_controls",
]

ADAPTERS_FILE = "facecrafter_adapters.safetensors"
ADAPTERS_CONFIG_FILE = "facecrafter_adapters.json"
ADAPTERS_FORMAT = "facecrafter-adapters"
LAYER_NORM_EPS = 1e-5


def control_features(kind: str, condition: torch.Tensor) -> torch.Tensor:
    """Same fixed normalisation as the Flax side: landmarks x, y centred (``- 0.5``), flattened; emotion as is."""
    if kind not in CONTROL_INPUT_DIMS:
        raise ValueError(f"unknown control {kind!r}; known controls: {sorted(CONTROL_INPUT_DIMS)}")
    x = torch.as_tensor(condition, dtype=torch.float32)
    if kind == "landmark":
        if x.ndim == 2 and x.shape[1] == NUM_LANDMARKS * 3:
            x = x.reshape(x.shape[0], NUM_LANDMARKS, 3)
        if x.ndim != 3 or tuple(x.shape[1:]) != (NUM_LANDMARKS, 3):
            raise ValueError(f"landmarks must be [B, {NUM_LANDMARKS}, 3] (or [B, {NUM_LANDMARKS * 3}]), got shape {tuple(x.shape)}")
        x = x - torch.tensor([0.5, 0.5, 0.0], dtype=x.dtype, device=x.device)
        return x.reshape(x.shape[0], NUM_LANDMARKS * 3)
    if x.ndim != 2 or x.shape[1] != CONTROL_INPUT_DIMS["emotion"]:
        raise ValueError(f"emotion must be [B, 10] (8 class probabilities, valence, arousal), got shape {tuple(x.shape)}")
    return x


class ControlTokenEncoder(nn.Module):
    """``raw condition -> [B, num_tokens, output_dim]``: features -> proj_in -> GELU -> proj_out -> reshape -> norm."""

    def __init__(self, kind: str, *, num_tokens: int, hidden_dim: int, output_dim: int):
        super().__init__()
        if kind not in CONTROL_INPUT_DIMS:
            raise ValueError(f"unknown control {kind!r}; known controls: {sorted(CONTROL_INPUT_DIMS)}")
        self.kind, self.num_tokens, self.output_dim = kind, num_tokens, output_dim
        self.proj_in = nn.Linear(CONTROL_INPUT_DIMS[kind], hidden_dim)
        self.proj_out = nn.Linear(hidden_dim, num_tokens * output_dim)
        self.norm = nn.LayerNorm(output_dim, eps=LAYER_NORM_EPS)

    def forward(self, condition: torch.Tensor) -> torch.Tensor:
        x = control_features(self.kind, condition).to(self.proj_in.weight)
        h = F.gelu(self.proj_in(x))
        return self.norm(self.proj_out(h).reshape(x.shape[0], self.num_tokens, self.output_dim))


def _weight(mask, scale, batch: int, ref: torch.Tensor, name: str) -> torch.Tensor:
    out = torch.ones(batch, dtype=torch.float32, device=ref.device)
    for what, v in (("mask", mask), ("scale", scale)):
        if v is None:
            continue
        v = torch.as_tensor(v, dtype=torch.float32, device=ref.device)
        if v.ndim > 1 or (v.ndim == 1 and v.shape[0] not in (1, batch)):
            raise ValueError(f"controls[{name!r}] {what} must be a scalar or [B={batch}], got shape {tuple(v.shape)}")
        out = out * v.reshape(-1).expand(batch)
    return out.to(ref.dtype).view(batch, 1, 1, 1)


class FaceCrafterAttnProcessor(nn.Module):
    """diffusers attention processor for a cross-attention layer with FaceCrafter control branches.

    Holds ``to_k_c[name]`` / ``to_v_c[name]`` (``Linear(cross_attention_dim, hidden_size, bias=False)``).
    Controls come from the ``controls`` keyword (``cross_attention_kwargs={"controls": ...}``) or, when
    that is None, from the ``controls`` attribute (:func:`set_controls`). Without controls it computes
    exactly what diffusers' ``AttnProcessor2_0`` computes.
    """

    def __init__(self, hidden_size: int, cross_attention_dim: int, names, *, bias: bool = False):
        super().__init__()
        names = list(names)
        self.to_k_c = nn.ModuleDict({n: nn.Linear(cross_attention_dim, hidden_size, bias=bias) for n in names})
        self.to_v_c = nn.ModuleDict({n: nn.Linear(cross_attention_dim, hidden_size, bias=bias) for n in names})
        self.controls = None

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 controls: Mapping | None = None):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        batch = hidden_states.shape[0]
        seq = hidden_states.shape[1] if encoder_hidden_states is None else encoder_hidden_states.shape[1]
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, seq, batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        inner = key.shape[-1]
        head_dim = inner // attn.heads

        def heads(x):
            return x.view(batch, -1, attn.heads, head_dim).transpose(1, 2)

        query, key, value = heads(query), heads(key), heads(value)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False)

        controls = self.controls if controls is None else controls
        if controls:
            unknown = sorted(set(controls) - set(self.to_k_c.keys()))
            if unknown:
                raise ValueError(f"no FaceCrafter adapter for control(s) {unknown} (installed: {list(self.to_k_c.keys())})")
            for name in self.to_k_c.keys():
                if name not in controls:
                    continue
                tokens, mask, scale = controls[name]
                if tokens.ndim != 3 or tokens.shape[0] != batch:
                    raise ValueError(f"controls[{name!r}] tokens must be [B={batch}, N, D], got shape {tuple(tokens.shape)}")
                tokens = tokens.to(query.dtype)
                k_c, v_c = heads(self.to_k_c[name](tokens)), heads(self.to_v_c[name](tokens))
                out_c = F.scaled_dot_product_attention(query, k_c, v_c, dropout_p=0.0, is_causal=False)
                out = out + _weight(mask, scale, batch, out_c, name) * out_c

        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


class FaceCrafterSelfAttnProcessor:
    """diffusers' ``AttnProcessor2_0`` that also accepts (and ignores) ``controls``, for the self-attention
    layers: ``cross_attention_kwargs`` reach every processor, and stock ones would warn on each call."""

    def __init__(self):
        from diffusers.models.attention_processor import AttnProcessor2_0

        self._inner = AttnProcessor2_0()

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, controls=None):
        return self._inner(attn, hidden_states, encoder_hidden_states, attention_mask, temb)


def _read_adapters(path: str):
    from safetensors.torch import load_file

    if os.path.isdir(path):
        path = os.path.join(path, ADAPTERS_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no FaceCrafter adapters at {path}")
    config_path = os.path.splitext(path)[0] + ".json"
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"no adapter config {config_path} next to {path}")
    with open(config_path) as f:
        meta = json.load(f)
    if meta.get("format") != ADAPTERS_FORMAT:
        raise ValueError(f"{config_path}: format {meta.get('format')!r}, expected {ADAPTERS_FORMAT!r}")
    return load_file(path), meta["config"]


def load_facecrafter_adapters(unet, path: str) -> nn.ModuleDict:
    """Install FaceCrafter processors on a stock diffusers ``UNet2DConditionModel`` and return the encoders.

    ``path``: ``facecrafter_adapters.safetensors`` (its config ``facecrafter_adapters.json`` beside it) or
    the folder holding both. Every cross-attention layer (``attn2``) gets a :class:`FaceCrafterAttnProcessor`
    loaded from the file, every self-attention layer a :class:`FaceCrafterSelfAttnProcessor`; every key
    must be used and present (missing / unused keys raise ``ValueError`` naming them). Returns
    ``nn.ModuleDict({name: ControlTokenEncoder})`` on the UNet's device and dtype, in eval mode.
    """
    state, config = _read_adapters(path)
    names = list(config["controls"])
    dim = int(config["cross_attention_dim"])
    procs, used = {}, set()
    for pname, old in unet.attn_processors.items():
        if ".attn2." not in pname + ".":
            procs[pname] = FaceCrafterSelfAttnProcessor()
            continue
        prefix = pname + "."
        sub = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        wkey = f"to_k_c.{names[0]}.weight"
        if wkey not in sub:
            raise ValueError(f"adapters file has no key {prefix + wkey!r}")
        hidden = sub[wkey].shape[0]
        proc = FaceCrafterAttnProcessor(hidden, dim, names)
        missing, unexpected = proc.load_state_dict(sub, strict=False)
        if missing or unexpected:
            raise ValueError(f"adapter keys for {pname}: missing {[prefix + k for k in missing]}, "
                             f"unexpected {[prefix + k for k in unexpected]}")
        used.update(prefix + k for k in sub)
        procs[pname] = proc
    encoders = nn.ModuleDict()
    for name in names:
        enc = ControlTokenEncoder(name, num_tokens=int(config[f"{name}_tokens"]), hidden_dim=int(config[f"{name}_hidden_dim"]),
                                  output_dim=dim)
        prefix = f"{name}_encoder."
        sub = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        missing, unexpected = enc.load_state_dict(sub, strict=False)
        if missing or unexpected:
            raise ValueError(f"{name} encoder keys: missing {[prefix + k for k in missing]}, unexpected {[prefix + k for k in unexpected]}")
        used.update(prefix + k for k in sub)
        encoders[name] = enc
    unused = sorted(set(state) - used)
    if unused:
        raise ValueError(f"unused key(s) in adapters file: {unused[:20]}")
    unet.set_attn_processor(procs)
    param = next(unet.parameters())
    for p in procs.values():
        if isinstance(p, nn.Module):
            p.to(device=param.device, dtype=param.dtype)
    return encoders.to(device=param.device, dtype=param.dtype).eval()


def null_input(kind: str, batch: int, *, device=None) -> torch.Tensor:
    """The null (absent / unconditional) raw condition of ``kind``: all zeros, ``[B, 478, 3]`` or ``[B, 10]``."""
    if kind not in CONTROL_INPUT_DIMS:
        raise ValueError(f"unknown control {kind!r}; known controls: {sorted(CONTROL_INPUT_DIMS)}")
    shape = (batch, NUM_LANDMARKS, 3) if kind == "landmark" else (batch, CONTROL_INPUT_DIMS[kind])
    return torch.zeros(shape, dtype=torch.float32, device=device)


def encode_controls(encoders: Mapping[str, ControlTokenEncoder], *, landmarks=None, emotion=None,
                    masks: Mapping | None = None, scales: Mapping | None = None, batch_size: int | None = None) -> dict:
    """``{name: (tokens, mask, scale)}`` for **every** control in ``encoders``.

    A control whose input is None is *absent*: it runs on its null tokens (the all-zero raw input through its
    encoder, branch on), the project's convention and IP-Adapter's (the CFG negative is the zeros input with
    the adapter on). Switching a branch off is explicit: ``scales={name: 0.0}`` (or a 0 mask). The batch is
    that of the given inputs (they must agree), else ``batch_size``. ``masks`` / ``scales``: per control, a
    scalar or ``[B]`` (default: mask None = on, scale 1).
    """
    masks, scales = dict(masks or {}), dict(scales or {})
    raw = {"landmark": landmarks, "emotion": emotion}
    for what, d in (("masks", masks), ("scales", scales)):
        unknown = sorted(set(d) - set(encoders.keys()))
        if unknown:
            raise ValueError(f"{what} for control(s) {unknown} without an encoder (have {list(encoders.keys())})")
    for name, x in raw.items():
        if x is not None and name not in encoders:
            raise ValueError(f"a {name} input was given but there is no {name!r} encoder (have {list(encoders.keys())})")
    batches = {name: int(x.shape[0]) for name, x in raw.items() if x is not None}
    if len(set(batches.values())) > 1:
        raise ValueError(f"control inputs have different batch sizes {batches}")
    if batches:
        batch = next(iter(batches.values()))
        if batch_size is not None and batch_size != batch:
            raise ValueError(f"batch_size={batch_size} but the control inputs have batch {batch}")
    elif batch_size is None:
        raise ValueError("no control input given: pass batch_size so the null tokens can be made")
    else:
        batch = int(batch_size)
    out = {}
    for name, enc in encoders.items():
        x = raw.get(name)
        if x is None:
            x = null_input(name, batch, device=enc.proj_in.weight.device)
        out[name] = (enc(x), masks.get(name), scales.get(name, 1.0))
    return out


def set_controls(unet, controls: Mapping | None) -> None:
    """Set (or clear with None) the controls used by every FaceCrafter processor when no keyword is passed."""
    n = 0
    for proc in unet.attn_processors.values():
        if isinstance(proc, FaceCrafterAttnProcessor):
            proc.controls = controls
            n += 1
    if n == 0:
        raise ValueError("set_controls: the UNet has no FaceCrafter processors (call load_facecrafter_adapters first)")
