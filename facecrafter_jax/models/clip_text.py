"""CLIP text encoder (transformers ``CLIPTextModel``) in Flax NNX, with Arc2Face's identity path.

Attribute names mirror transformers exactly (``embeddings.token_embedding``,
``encoder.layers[i].self_attn.q_proj``, ``final_layer_norm`` ...), so the PyTorch key of every
parameter follows mechanically (see :mod:`facecrafter_jax.convert.clip`).

Architecture: token + learned position embeddings, ``num_hidden_layers`` pre-LayerNorm blocks with
causal self-attention (each token sees itself and the tokens before it; no padding mask, as in
Stable Diffusion and Arc2Face), final LayerNorm. The output is the whole ``last_hidden_state``
``[B, L, hidden_size]``, which is what SD / Arc2Face feed to the UNet's cross-attention; there is no
pooled output and no projection (``projection_dim`` is read from the config and ignored).

Precision: parameters are float32. ``dtype`` is the compute dtype of the matmuls (e.g. bfloat16);
the residual stream, the LayerNorms and the attention softmax stay in float32, and the result is
returned in ``dtype``.

Arc2Face identity path (:meth:`CLIPTextModel.encode_id`), as in the official code
(``arc2face/utils.py: project_face_embs`` with ``arc2face/models.py: CLIPTextModelWrapper``): the
prompt ``"photo of a id person"`` is tokenised to 77 ids; the *token* embedding at every position
holding the ``id`` token is replaced by the L2-normalised ArcFace vector zero-padded to
``hidden_size``; then the position embeddings are added and the usual causal encoder and final
LayerNorm run. (In the official code the caller normalises the ArcFace vector; here
``encode_id`` does it, which is idempotent for an already normalised vector.)
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from facecrafter_jax import tokens as _tokens
from facecrafter_jax.models.ops import linear

__all__ = ["CLIPTextConfig", "CLIPTextModel", "CLIPTextEmbeddings", "CLIPAttention", "CLIPMLP",
           "CLIPEncoderLayer", "CLIPEncoder"]

_SUPPORTED_ACTS = ("quick_gelu", "gelu")

# Keys a transformers config.json may carry that do not change the text encoder's forward pass.
_IGNORED_KEYS = frozenset({
    # bookkeeping
    "architectures", "transformers_version", "model_type", "torch_dtype", "dtype", "_name_or_path",
    "_commit_hash", "name_or_path", "initializer_range", "initializer_factor", "_attn_implementation",
    "_attn_implementation_autoset", "attn_implementation", "output_attentions", "output_hidden_states",
    "return_dict", "use_return_dict", "torchscript", "use_bfloat16", "tokenizer_class", "id2label",
    "label2id", "num_labels", "problem_type", "finetuning_task", "prefix", "task_specific_params",
    "chunk_size_feed_forward", "tie_word_embeddings", "is_encoder_decoder", "is_decoder",
    "add_cross_attention", "cross_attention_hidden_size", "tie_encoder_decoder", "sep_token_id",
    "decoder_start_token_id", "tf_legacy_loss",
    # generation settings dumped by older transformers versions
    "max_length", "min_length", "do_sample", "early_stopping", "num_beams", "num_beam_groups",
    "diversity_penalty", "temperature", "top_k", "top_p", "typical_p", "repetition_penalty",
    "length_penalty", "no_repeat_ngram_size", "encoder_no_repeat_ngram_size", "bad_words_ids",
    "num_return_sequences", "output_scores", "return_dict_in_generate", "forced_bos_token_id",
    "forced_eos_token_id", "remove_invalid_values", "exponential_decay_length_penalty",
    "suppress_tokens", "begin_suppress_tokens",
})


@dataclass(frozen=True)
class CLIPTextConfig:
    """Hyper-parameters of a transformers ``CLIPTextModel`` (defaults = transformers' defaults).

    Build it from a ``config.json`` with :meth:`from_dict` / :meth:`from_json_file`; use
    :meth:`sd15` for the CLIP ViT-L/14 text tower of Stable Diffusion 1.5 and Arc2Face.
    """

    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    projection_dim: int | None = 512  # read and ignored: the text model has no projection
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    attention_dropout: float = 0.0  # must be 0: this port is the frozen, deterministic encoder
    bos_token_id: int | None = 49406  # informational (only the pooled output, not computed here, uses them)
    eos_token_id: int | tuple[int, ...] | None = 49407
    pad_token_id: int | None = 1

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "max_position_embeddings"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"CLIPTextConfig.{name} must be a positive int, got {v!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"CLIPTextConfig.hidden_size ({self.hidden_size}) is not a multiple of "
                             f"num_attention_heads ({self.num_attention_heads})")
        if self.hidden_act not in _SUPPORTED_ACTS:
            raise ValueError(f"CLIPTextConfig.hidden_act={self.hidden_act!r} is not supported (expected one of {_SUPPORTED_ACTS})")
        if not (isinstance(self.layer_norm_eps, (int, float)) and self.layer_norm_eps > 0):
            raise ValueError(f"CLIPTextConfig.layer_norm_eps must be > 0, got {self.layer_norm_eps!r}")
        if self.attention_dropout != 0:
            raise ValueError(f"CLIPTextConfig.attention_dropout={self.attention_dropout!r} is not supported: "
                             "this port implements the frozen (inference) encoder without dropout; set it to 0")
        if isinstance(self.eos_token_id, list):
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))

    @classmethod
    def sd15(cls) -> "CLIPTextConfig":
        """CLIP ViT-L/14 text tower (Stable Diffusion 1.5 ``text_encoder``, Arc2Face ``encoder``)."""
        return cls(hidden_size=768, intermediate_size=3072, projection_dim=768, num_hidden_layers=12,
                   num_attention_heads=12)

    @classmethod
    def from_dict(cls, d: dict) -> "CLIPTextConfig":
        """Parse a transformers ``CLIPTextModel`` config dict.

        Bookkeeping keys (``architectures``, ``transformers_version``, ``torch_dtype`` ...) are
        ignored; missing keys take transformers' defaults; an unknown key, ``dropout`` /
        ``attention_dropout`` other than 0, non-empty ``pruned_heads`` or an unsupported
        ``hidden_act`` raise ``ValueError`` naming the key.
        """
        if not isinstance(d, dict):
            raise ValueError(f"CLIPTextConfig.from_dict expects a dict, got {type(d).__name__}")
        d = dict(d)
        if d.get("model_type", "clip_text_model") not in ("clip_text_model", "clip"):
            raise ValueError(f"config key 'model_type'={d['model_type']!r}: not a CLIP text model")
        if "text_config" in d:
            raise ValueError("config key 'text_config': this is a full CLIPModel config; pass its 'text_config' dict")
        dropout = d.pop("dropout", 0.0)
        if dropout != 0:
            raise ValueError(f"config key 'dropout'={dropout!r} is not supported: the encoder runs without dropout; set it to 0")
        pruned = d.pop("pruned_heads", {})
        if pruned:
            raise ValueError(f"config key 'pruned_heads'={pruned!r} is not supported (pruned attention heads)")
        fields = {f.name for f in dataclasses.fields(cls)}
        kwargs = {}
        for k, v in d.items():
            if k in fields:
                kwargs[k] = v
            elif k not in _IGNORED_KEYS:
                raise ValueError(f"unknown CLIP text config key {k!r}")
        return cls(**kwargs)

    @classmethod
    def from_json_file(cls, path: str) -> "CLIPTextConfig":
        """Read ``config.json`` (see :meth:`from_dict`)."""
        with open(path) as f:
            return cls.from_dict(json.load(f))

    def to_dict(self) -> dict:
        """JSON-serialisable dict in transformers' ``config.json`` format (round-trips through :meth:`from_dict`)."""
        out = dataclasses.asdict(self)
        if isinstance(out["eos_token_id"], tuple):
            out["eos_token_id"] = list(out["eos_token_id"])
        out["model_type"] = "clip_text_model"
        out["architectures"] = ["CLIPTextModel"]
        return out

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


def _linear(d_in: int, d_out: int, dtype, rngs: nnx.Rngs) -> nnx.Linear:
    return linear(d_in, d_out, dtype, rngs)


def _layer_norm(n: int, eps: float, rngs: nnx.Rngs) -> nnx.LayerNorm:
    # Always float32 (input is the float32 residual stream); two-pass variance like PyTorch.
    return nnx.LayerNorm(n, epsilon=eps, dtype=jnp.float32, param_dtype=jnp.float32,
                         use_fast_variance=False, rngs=rngs)


class CLIPTextEmbeddings(nnx.Module):
    """Token embedding + learned absolute position embedding (float32)."""

    def __init__(self, config: CLIPTextConfig, *, rngs: nnx.Rngs):
        init = nnx.initializers.normal(0.02)
        self.token_embedding = nnx.Embed(config.vocab_size, config.hidden_size, dtype=jnp.float32,
                                         param_dtype=jnp.float32, embedding_init=init, rngs=rngs)
        self.position_embedding = nnx.Embed(config.max_position_embeddings, config.hidden_size, dtype=jnp.float32,
                                            param_dtype=jnp.float32, embedding_init=init, rngs=rngs)

    def __call__(self, input_ids: jax.Array | None = None, inputs_embeds: jax.Array | None = None) -> jax.Array:
        """``inputs_embeds`` (token embeddings, possibly edited) take precedence over ``input_ids``."""
        if inputs_embeds is None:
            inputs_embeds = self.token_embedding(input_ids)
        seq_len = inputs_embeds.shape[-2]
        positions = self.position_embedding.embedding[...][:seq_len]
        return inputs_embeds.astype(jnp.float32) + positions


class CLIPAttention(nnx.Module):
    """Multi-head self-attention; softmax in float32."""

    def __init__(self, config: CLIPTextConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        d = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.scale = self.head_dim ** -0.5
        self.dtype = dtype
        self.k_proj = _linear(d, d, dtype, rngs)
        self.v_proj = _linear(d, d, dtype, rngs)
        self.q_proj = _linear(d, d, dtype, rngs)
        self.out_proj = _linear(d, d, dtype, rngs)

    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        """``x`` [B, L, D]; ``mask`` boolean, broadcastable to [B, heads, L, L], True = attend."""
        b, n, _ = x.shape
        split = lambda t: t.reshape(b, n, self.num_heads, self.head_dim)
        q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) * self.scale
        if mask is not None:
            logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, n, self.num_heads * self.head_dim)
        return self.out_proj(out)


def _quick_gelu(x: jax.Array) -> jax.Array:
    return x * jax.nn.sigmoid(1.702 * x)


class CLIPMLP(nnx.Module):
    """fc1 -> activation (quick_gelu or exact gelu) -> fc2."""

    def __init__(self, config: CLIPTextConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.hidden_act = config.hidden_act
        self.fc1 = _linear(config.hidden_size, config.intermediate_size, dtype, rngs)
        self.fc2 = _linear(config.intermediate_size, config.hidden_size, dtype, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.fc1(x)
        h = _quick_gelu(h) if self.hidden_act == "quick_gelu" else jax.nn.gelu(h, approximate=False)
        return self.fc2(h)


class CLIPEncoderLayer(nnx.Module):
    """Pre-LN block: x + attn(LN1(x)), then x + mlp(LN2(x)); residual stream in float32."""

    def __init__(self, config: CLIPTextConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.dtype = dtype
        self.self_attn = CLIPAttention(config, dtype=dtype, rngs=rngs)
        self.layer_norm1 = _layer_norm(config.hidden_size, config.layer_norm_eps, rngs)
        self.mlp = CLIPMLP(config, dtype=dtype, rngs=rngs)
        self.layer_norm2 = _layer_norm(config.hidden_size, config.layer_norm_eps, rngs)

    def __call__(self, h: jax.Array, mask: jax.Array | None) -> jax.Array:
        h = h + self.self_attn(self.layer_norm1(h).astype(self.dtype), mask).astype(jnp.float32)
        h = h + self.mlp(self.layer_norm2(h).astype(self.dtype)).astype(jnp.float32)
        return h


class CLIPEncoder(nnx.Module):
    def __init__(self, config: CLIPTextConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.layers = nnx.List([CLIPEncoderLayer(config, dtype=dtype, rngs=rngs)
                                for _ in range(config.num_hidden_layers)])

    def __call__(self, h: jax.Array, mask: jax.Array | None) -> jax.Array:
        for layer in self.layers:
            h = layer(h, mask)
        return h


def _is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


class CLIPTextModel(nnx.Module):
    """transformers ``CLIPTextModel`` in Flax NNX (``last_hidden_state`` only) plus Arc2Face's ``encode_id``.

    Args:
        config: :class:`CLIPTextConfig`.
        dtype: compute dtype of the matmuls (parameters always float32; LayerNorm, softmax and the
            residual stream in float32). Outputs are returned in this dtype.
        rngs: initialisation RNG (weights are usually overwritten by :func:`~facecrafter_jax.convert.clip.load_text_encoder`).
    """

    def __init__(self, config: CLIPTextConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.config = config
        self.dtype = dtype
        self.embeddings = CLIPTextEmbeddings(config, rngs=rngs)
        self.encoder = CLIPEncoder(config, dtype=dtype, rngs=rngs)
        self.final_layer_norm = _layer_norm(config.hidden_size, config.layer_norm_eps, rngs)

    # ---------------------------------------------------------------------------------------------
    def encode_embeds(self, inputs_embeds: jax.Array) -> jax.Array:
        """Run the encoder from (possibly edited) token embeddings ``[B, L, D]`` -> ``[B, L, D]``.

        Position embeddings are added here, then the causal encoder and the final LayerNorm.
        """
        inputs_embeds = jnp.asarray(inputs_embeds)
        if inputs_embeds.ndim != 3 or inputs_embeds.shape[-1] != self.config.hidden_size:
            raise ValueError(f"inputs_embeds must be [batch, seq, {self.config.hidden_size}], got {inputs_embeds.shape}")
        self._check_len(inputs_embeds.shape[1])
        return _jit_encode_embeds(self, inputs_embeds)

    def _check_len(self, seq_len: int) -> None:
        if seq_len > self.config.max_position_embeddings:
            raise ValueError(f"sequence length {seq_len} exceeds max_position_embeddings={self.config.max_position_embeddings}")

    def _encode(self, inputs_embeds: jax.Array) -> jax.Array:
        seq_len = inputs_embeds.shape[1]
        h = self.embeddings(inputs_embeds=inputs_embeds)
        causal = jnp.tril(jnp.ones((seq_len, seq_len), dtype=bool))[None, None]
        h = self.encoder(h, causal)
        return self.final_layer_norm(h).astype(self.dtype)

    def _encode_tokens(self, ids: jax.Array, id_vectors: jax.Array | None, normalize: bool = False) -> jax.Array:
        tok = self.embeddings.token_embedding(ids)
        if id_vectors is not None:
            x = id_vectors.astype(jnp.float32)
            if normalize:
                x = x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
            id_vectors = jnp.pad(x, ((0, 0), (0, self.config.hidden_size - x.shape[-1])))
            tok = jnp.broadcast_to(tok, (id_vectors.shape[0],) + tok.shape[1:])
            tok = jnp.where((ids == _tokens.ID_TOKEN_ID)[..., None], id_vectors[:, None, :], tok)
        return self._encode(tok)

    def _cut_padding(self, input_ids):
        """Ids longer than ``max_position_embeddings`` whose tail beyond it is only padding (with an EOS
        kept) are cut to ``max_position_embeddings``: under the causal mask the kept positions' states are
        exactly those of the full sequence. This lets a short-context encoder (the toy Arc2Face, 8
        positions) take the standard 77-id prompts; anything else longer than the context is an error."""
        n = self.config.max_position_embeddings
        if input_ids.shape[-1] <= n or not _is_concrete(input_ids):
            return input_ids
        ids = np.asarray(input_ids)
        if ids.ndim == 2 and np.all(ids[:, n:] == _tokens.PAD_TOKEN_ID) and np.all(np.any(ids[:, :n] == _tokens.EOS_TOKEN_ID, axis=1)):
            return ids[:, :n]
        return input_ids

    def _check_ids(self, input_ids) -> jax.Array:
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
        input_ids = self._cut_padding(input_ids)
        self._check_len(input_ids.shape[1])
        if _is_concrete(input_ids):
            ids = np.asarray(input_ids)
            if not np.issubdtype(ids.dtype, np.integer):
                raise ValueError(f"input_ids must be integers, got {ids.dtype}")
            if ids.size and (ids.min() < 0 or ids.max() >= self.config.vocab_size):
                raise ValueError(f"input_ids out of range [0, {self.config.vocab_size}): min {ids.min()}, max {ids.max()}")
        return jnp.asarray(input_ids, dtype=jnp.int32)

    def encode_ids(self, input_ids: jax.Array) -> jax.Array:
        """Plain prompt encoding: ``input_ids`` [B, L] (L <= max_position_embeddings) -> ``last_hidden_state`` [B, L, D].

        Longer ids whose tail is only padding are cut to ``max_position_embeddings`` (exact under the
        causal mask; see :meth:`_cut_padding`), so ``L`` is then the model's context length.

        Equals transformers' ``CLIPTextModel(input_ids).last_hidden_state``. For Arc2Face's
        classifier-free guidance the negative is ``encode_ids(tokens.EMPTY_PROMPT_IDS[None])``.
        """
        return _jit_encode_tokens(self, self._check_ids(input_ids), None)

    __call__ = encode_ids

    def encode_id(self, arcface: jax.Array, *, input_ids: jax.Array | None = None, normalize: bool = True) -> jax.Array:
        """Arc2Face identity conditioning: ArcFace embeddings ``[B, d]`` -> ``[B, 77, D]`` (``[B, L, D]`` for a
        short-context encoder with ``max_position_embeddings = L < 77``: the padded tail is cut).

        The token embedding at every position holding :data:`~facecrafter_jax.tokens.ID_TOKEN_ID`
        in ``input_ids`` (default: ``"photo of a id person"`` padded to 77,
        :data:`~facecrafter_jax.tokens.ARC2FACE_PROMPT_IDS`) is replaced by the ArcFace vector,
        L2-normalised (if ``normalize``; a zero vector stays zero) and zero-padded from ``d`` to
        ``hidden_size`` (``d <= hidden_size``; 512 for ArcFace). Then position embeddings, causal
        encoder, final LayerNorm, as in :meth:`encode_ids`.
        """
        cfg = self.config
        arcface = jnp.asarray(arcface)
        if arcface.ndim != 2:
            raise ValueError(f"arcface must be [batch, dim], got shape {tuple(arcface.shape)}")
        batch, dim = arcface.shape
        if dim > cfg.hidden_size:
            raise ValueError(f"identity dimension {dim} exceeds the text encoder hidden_size {cfg.hidden_size}")
        if input_ids is None:
            if cfg.vocab_size < _tokens.VOCAB_SIZE:
                raise ValueError(f"the Arc2Face prompt needs the CLIP vocabulary ({_tokens.VOCAB_SIZE} ids); "
                                 f"this model has vocab_size={cfg.vocab_size}")
            input_ids = np.broadcast_to(_tokens.ARC2FACE_PROMPT_IDS, (batch, _tokens.MAX_LENGTH))
        ids = self._check_ids(input_ids)
        if ids.shape[0] not in (1, batch):
            raise ValueError(f"input_ids batch {ids.shape[0]} does not match arcface batch {batch}")
        if _is_concrete(ids) and not bool(np.all(np.any(np.asarray(ids) == _tokens.ID_TOKEN_ID, axis=-1))):
            raise ValueError(f"input_ids row without the id token {_tokens.ID_TOKEN_ID}: nothing to replace")
        return _jit_encode_tokens(self, ids, arcface, bool(normalize))


# Compiled once per (model structure, input shape); also fine to call inside an outer jit.
_jit_encode_embeds = nnx.jit(CLIPTextModel._encode)
_jit_encode_tokens = nnx.jit(CLIPTextModel._encode_tokens, static_argnums=(3,))
