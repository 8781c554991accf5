"""CLIP text encoder + Arc2Face identity path against transformers' CLIPTextModel (tiny random models, fp32)."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax import nnx
from transformers import CLIPTextConfig as TorchCLIPTextConfig
from transformers import CLIPTextModel as TorchCLIPTextModel

from facecrafter_jax import tokens
from facecrafter_jax.convert.clip import (
    detect_text_encoder_prefix, export_text_encoder_state, load_text_encoder, load_text_encoder_state,
    text_encoder_key_map,
)
from facecrafter_jax.convert.weights import WeightConversionError
from facecrafter_jax.models.clip_text import CLIPTextConfig, CLIPTextModel

HIDDEN = 64
TOL = 1e-4


def make_torch_clip(seed: int, *, hidden=HIDDEN, layers=2, heads=4, act="quick_gelu") -> TorchCLIPTextModel:
    torch.manual_seed(seed)
    cfg = TorchCLIPTextConfig(vocab_size=49408, hidden_size=hidden, intermediate_size=2 * hidden,
                              num_hidden_layers=layers, num_attention_heads=heads, max_position_embeddings=77,
                              projection_dim=32, hidden_act=act)
    model = TorchCLIPTextModel(cfg).eval()
    model.set_attn_implementation("eager")  # Arc2Face's transformers 4.34 wrapper used eager attention
    with torch.no_grad():  # non-trivial LayerNorm parameters and biases
        for name, p in model.named_parameters():
            if "layer_norm" in name or name.endswith("bias"):
                p.add_(0.3 * torch.randn_like(p))
    return model


def old_style_config(tm: TorchCLIPTextModel) -> dict:
    """config.json as transformers 4.x wrote it for SD1.5 / Arc2Face (old special ids, dropout key)."""
    c = tm.config
    return {
        "_name_or_path": "openai/clip-vit-large-patch14", "architectures": ["CLIPTextModel"], "attention_dropout": 0.0,
        "bos_token_id": 0, "dropout": 0.0, "eos_token_id": 2, "hidden_act": c.hidden_act, "hidden_size": c.hidden_size,
        "initializer_factor": 1.0, "initializer_range": 0.02, "intermediate_size": c.intermediate_size,
        "layer_norm_eps": 1e-05, "max_position_embeddings": 77, "model_type": "clip_text_model",
        "num_attention_heads": c.num_attention_heads, "num_hidden_layers": c.num_hidden_layers, "pad_token_id": 1,
        "projection_dim": 32, "torch_dtype": "float32", "transformers_version": "4.34.1", "vocab_size": 49408,
    }


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A random transformers CLIPTextModel saved in both layouts."""
    tm = make_torch_clip(0)
    new = tmp_path_factory.mktemp("clip_new")
    tm.save_pretrained(new)  # model.safetensors, keys without 'text_model.'
    old = tmp_path_factory.mktemp("clip_old")
    sd = {"text_model." + k: v.clone() for k, v in tm.state_dict().items()}
    sd["text_model.embeddings.position_ids"] = torch.arange(77).expand(1, -1).clone()  # old persistent buffer
    torch.save(sd, old / "pytorch_model.bin")
    (old / "config.json").write_text(json.dumps(old_style_config(tm)))
    return {"torch": tm, "new": str(new), "old": str(old)}


@pytest.fixture(scope="module")
def model(ckpt):
    return load_text_encoder(ckpt["new"])


def prompt_ids():
    return np.stack([tokens.ARC2FACE_PROMPT_IDS, tokens.EMPTY_PROMPT_IDS])


def arc2face_reference(tm: TorchCLIPTextModel, arcface: torch.Tensor) -> torch.Tensor:
    """Arc2Face's project_face_embs + CLIPTextModelWrapper.forward, one identity at a time as in the official code.

    The caller L2-normalises (as in the official README). Token embeddings from the model's own
    nn.Embedding, the `id` token's embedding overwritten, then embeddings(inputs_embeds=...) adds
    positions, the encoder runs with the causal mask only, then the final LayerNorm.
    """
    hidden = tm.config.hidden_size
    input_ids = torch.from_numpy(tokens.ARC2FACE_PROMPT_IDS[None].astype(np.int64))
    outs = []
    with torch.no_grad():
        for emb in arcface:
            padded = F.pad(emb[None], (0, hidden - emb.shape[-1]), "constant", 0)
            token_embs = tm.embeddings.token_embedding(input_ids)
            token_embs[input_ids == tokens.ID_TOKEN_ID] = padded
            h = tm.embeddings(input_ids=input_ids, inputs_embeds=token_embs)
            n = input_ids.shape[-1]
            causal = torch.full((n, n), torch.finfo(h.dtype).min).triu(1)[None, None]
            h = tm.encoder(inputs_embeds=h, attention_mask=causal).last_hidden_state
            outs.append(tm.final_layer_norm(h))
    return torch.cat(outs)


# ------------------------------------------------------------------------------------------------
# Plain prompts
# ------------------------------------------------------------------------------------------------


def test_encode_ids_matches_transformers_both_layouts(ckpt, model):
    ids = prompt_ids()
    with torch.no_grad():
        ref = ckpt["torch"](torch.from_numpy(ids.astype(np.int64))).last_hidden_state.numpy()
    out = np.asarray(model.encode_ids(ids))
    assert out.shape == (2, 77, HIDDEN) and out.dtype == np.float32
    err = np.abs(out - ref).max()
    assert err <= TOL, err
    old = load_text_encoder(ckpt["old"])  # .bin, 'text_model.' prefix, position_ids buffer, old-style config
    out_old = np.asarray(old.encode_ids(ids))
    assert np.abs(out_old - ref).max() <= TOL
    np.testing.assert_array_equal(out_old, out)


def test_gelu_activation_matches_transformers(tmp_path):
    tm = make_torch_clip(3, hidden=32, layers=1, heads=2, act="gelu")
    tm.save_pretrained(tmp_path)
    m = load_text_encoder(str(tmp_path))
    ids = prompt_ids()
    with torch.no_grad():
        ref = tm(torch.from_numpy(ids.astype(np.int64))).last_hidden_state.numpy()
    assert np.abs(np.asarray(m.encode_ids(ids)) - ref).max() <= TOL
    # quick_gelu != gelu: with the other activation the output must differ (the switch is real)
    m.encoder.layers[0].mlp.hidden_act = "quick_gelu"
    assert np.abs(np.asarray(m.encode_ids(ids)) - ref).max() > 1e-3


def test_input_checks(model):
    with pytest.raises(ValueError, match="out of range"):
        model.encode_ids(np.full((1, 5), 49408))
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model.encode_ids(np.zeros((1, 78), np.int32))
    with pytest.raises(ValueError, match=r"\[batch, seq\]"):
        model.encode_ids(tokens.EMPTY_PROMPT_IDS)


# ------------------------------------------------------------------------------------------------
# Arc2Face identity path
# ------------------------------------------------------------------------------------------------


def test_encode_id_matches_official_arc2face_procedure(ckpt, model):
    tm = ckpt["torch"]
    # The reference procedure itself: without substitution it reproduces the model's own forward.
    ids = torch.from_numpy(tokens.ARC2FACE_PROMPT_IDS[None].astype(np.int64))
    with torch.no_grad():
        plain = tm(ids).last_hidden_state
        same = arc2face_reference(tm, tm.embeddings.token_embedding.weight[tokens.ID_TOKEN_ID][None].clone())
    assert torch.abs(plain - same).max().item() <= 1e-5

    rng = np.random.default_rng(1)
    for dim in (48, HIDDEN):  # ArcFace 512 < 768 in the real model; any dim <= hidden works
        arc = (3.0 * rng.standard_normal((3, dim))).astype(np.float32)  # un-normalised on purpose
        arc_t = torch.from_numpy(arc)
        ref = arc2face_reference(tm, arc_t / torch.norm(arc_t, dim=1, keepdim=True)).numpy()
        out = np.asarray(model.encode_id(arc))
        assert out.shape == (3, 77, HIDDEN)
        err = np.abs(out - ref).max()
        assert err <= TOL, (dim, err)
        # normalize=False on a pre-normalised vector is the same computation
        pre = arc / np.linalg.norm(arc, axis=1, keepdims=True)
        np.testing.assert_allclose(np.asarray(model.encode_id(pre, normalize=False)), out, atol=1e-5)

    # the identity changes only positions >= ID_TOKEN_POSITION (causal attention)
    a, b = (model.encode_id(rng.standard_normal((1, 48)).astype(np.float32)) for _ in range(2))
    diff = np.abs(np.asarray(a) - np.asarray(b)).max(axis=(0, 2))
    assert diff[: tokens.ID_TOKEN_POSITION].max() == 0.0
    assert diff[tokens.ID_TOKEN_POSITION:].min() > 1e-4


def test_short_context_encoder_cuts_the_padding_exactly(ckpt, tmp_path):
    """A CLIP with 8 positions (the toy Arc2Face) takes the 77-id prompts: the padded tail is cut, and its
    outputs equal the first 8 positions of the 77-position model (causal mask) and transformers' short model."""
    tm = ckpt["torch"]
    cfg = TorchCLIPTextConfig(**{**tm.config.to_dict(), "max_position_embeddings": 8})
    short = TorchCLIPTextModel(cfg).eval()
    sd = {k: v.clone() for k, v in tm.state_dict().items()}
    sd["text_model.embeddings.position_embedding.weight" if "text_model.embeddings.position_embedding.weight" in sd
       else "embeddings.position_embedding.weight"] = tm.embeddings.position_embedding.weight[:8].detach().clone()
    sd = {k: v for k, v in sd.items() if "position_ids" not in k}
    short.load_state_dict(sd)
    short.save_pretrained(tmp_path)
    model = load_text_encoder(str(tmp_path))
    arc = np.random.default_rng(3).standard_normal((2, 48)).astype(np.float32)
    arc_t = torch.from_numpy(arc)
    ref = arc2face_reference(tm, arc_t / torch.norm(arc_t, dim=1, keepdim=True)).numpy()[:, :8]
    out = np.asarray(model.encode_id(arc))
    assert out.shape == (2, 8, HIDDEN)
    assert np.abs(out - ref).max() <= TOL
    with torch.no_grad():
        ref_ids = short(torch.from_numpy(prompt_ids()[:, :8].astype(np.int64))).last_hidden_state.numpy()
    assert np.abs(np.asarray(model.encode_ids(prompt_ids())) - ref_ids).max() <= TOL
    ids = prompt_ids().copy()
    ids[0, 20] = 1125  # a real token beyond the context: not padding, not cut
    with pytest.raises(ValueError, match="max_position_embeddings=8"):
        model.encode_ids(ids)


def test_encode_id_errors(model):
    with pytest.raises(ValueError, match="exceeds the text encoder hidden_size"):
        model.encode_id(np.ones((1, HIDDEN + 1), np.float32))
    with pytest.raises(ValueError, match=r"\[batch, dim\]"):
        model.encode_id(np.ones((HIDDEN,), np.float32))
    with pytest.raises(ValueError, match="without the id token"):
        model.encode_id(np.ones((1, 8), np.float32), input_ids=tokens.EMPTY_PROMPT_IDS[None])
    cfg = CLIPTextConfig(vocab_size=1000, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    small = nnx.eval_shape(lambda: CLIPTextModel(cfg, rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="vocab_size=1000"):
        small.encode_id(np.ones((1, 8), np.float32))


# ------------------------------------------------------------------------------------------------
# Key accounting, export
# ------------------------------------------------------------------------------------------------


def fresh(ckpt):
    cfg = CLIPTextConfig.from_json_file(ckpt["new"] + "/config.json")
    return nnx.eval_shape(lambda: CLIPTextModel(cfg, rngs=nnx.Rngs(1)))


def torch_state(ckpt, prefix=""):
    return {prefix + k: v.numpy().copy() for k, v in ckpt["torch"].state_dict().items()}


def test_key_accounting_errors_name_keys(ckpt):
    sd = torch_state(ckpt)
    del sd["encoder.layers.1.mlp.fc2.bias"]
    with pytest.raises(WeightConversionError, match=r"missing key.*encoder\.layers\.1\.mlp\.fc2\.bias"):
        load_text_encoder_state(fresh(ckpt), sd)

    sd = torch_state(ckpt)
    sd["encoder.layers.0.self_attn.extra.weight"] = np.zeros(3, np.float32)
    with pytest.raises(WeightConversionError, match=r"unused key.*encoder\.layers\.0\.self_attn\.extra\.weight"):
        load_text_encoder_state(fresh(ckpt), sd)

    sd = torch_state(ckpt)
    sd["encoder.layers.0.self_attn.q_proj.weight"] = sd["encoder.layers.0.self_attn.q_proj.weight"][:, :-1]
    with pytest.raises(WeightConversionError, match=r"shape mismatch.*encoder\.layers\.0\.self_attn\.q_proj\.weight"):
        load_text_encoder_state(fresh(ckpt), sd)

    sd = torch_state(ckpt)
    sd["text_model.final_layer_norm.weight"] = sd.pop("final_layer_norm.weight")
    with pytest.raises(WeightConversionError, match="mixes key layouts"):
        load_text_encoder_state(fresh(ckpt), sd)

    # position_ids is ignored only as the buffer of the detected layout
    sd = torch_state(ckpt)
    sd["embeddings.position_ids"] = np.arange(77)[None]
    assert load_text_encoder_state(fresh(ckpt), sd) == ""
    assert detect_text_encoder_prefix(torch_state(ckpt, "text_model.")) == "text_model."


def test_key_map_is_transformers_naming(ckpt, model):
    rules = text_encoder_key_map(model)
    assert {r.torch_key for r in rules} == set(ckpt["torch"].state_dict())
    by_key = {r.torch_key: r for r in rules}
    assert by_key["embeddings.token_embedding.weight"].flax_path == ("embeddings", "token_embedding", "embedding")
    assert by_key["encoder.layers.1.self_attn.out_proj.weight"].transform == "linear"
    assert by_key["final_layer_norm.weight"].flax_path == ("final_layer_norm", "scale")


def test_export_round_trip_exact(ckpt, model):
    for prefix in ("", "text_model."):
        exported = export_text_encoder_state(model, prefix=prefix)
        expected = torch_state(ckpt, prefix)
        assert set(exported) == set(expected)
        for k, v in expected.items():
            assert exported[k].dtype == np.float32
            np.testing.assert_array_equal(exported[k], v, err_msg=k)
    # and the exported dict drives a fresh transformers model to the same outputs
    tm2 = TorchCLIPTextModel(ckpt["torch"].config).eval()
    tm2.load_state_dict({k: torch.tensor(v) for k, v in export_text_encoder_state(model).items()}, strict=True)
    ids = torch.from_numpy(prompt_ids().astype(np.int64))
    with torch.no_grad():
        assert torch.equal(tm2(ids).last_hidden_state, ckpt["torch"](ids).last_hidden_state)
    with pytest.raises(ValueError, match="prefix"):
        export_text_encoder_state(model, prefix="model.")


# ------------------------------------------------------------------------------------------------
# Config
# ------------------------------------------------------------------------------------------------


def test_config_parsing_and_errors(ckpt):
    new = CLIPTextConfig.from_json_file(ckpt["new"] + "/config.json")
    old = CLIPTextConfig.from_json_file(ckpt["old"] + "/config.json")
    tc = ckpt["torch"].config
    for c in (new, old):
        assert (c.vocab_size, c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.num_attention_heads,
                c.max_position_embeddings, c.hidden_act, c.layer_norm_eps) == (
            tc.vocab_size, tc.hidden_size, tc.intermediate_size, tc.num_hidden_layers, tc.num_attention_heads,
            tc.max_position_embeddings, tc.hidden_act, tc.layer_norm_eps)
    assert (old.bos_token_id, old.eos_token_id) == (0, 2)
    # defaults follow transformers' CLIPTextConfig
    dflt, tdflt = CLIPTextConfig(), TorchCLIPTextConfig()
    for f in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "max_position_embeddings", "hidden_act", "layer_norm_eps", "pad_token_id", "bos_token_id", "eos_token_id"):
        assert getattr(dflt, f) == getattr(tdflt, f), f
    # JSON round trip, and transformers reads our dict back
    for c in (new, old, CLIPTextConfig.sd15(), CLIPTextConfig(eos_token_id=[49407, 2])):
        assert CLIPTextConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c
    t_back = TorchCLIPTextConfig(**{k: v for k, v in new.to_dict().items() if k not in ("model_type", "architectures")})
    assert (t_back.hidden_size, t_back.num_hidden_layers) == (new.hidden_size, new.num_hidden_layers)

    base = json.loads(open(ckpt["new"] + "/config.json").read())
    bad = [({"hidden_sizee": 64}, "hidden_sizee"), ({"hidden_act": "relu"}, "hidden_act"),
           ({"dropout": 0.1}, "dropout"), ({"attention_dropout": 0.1}, "attention_dropout"),
           ({"pruned_heads": {"0": [1]}}, "pruned_heads"), ({"num_attention_heads": 5}, "num_attention_heads"),
           ({"model_type": "bert"}, "model_type"), ({"hidden_size": "64"}, "hidden_size")]
    for patch, key in bad:
        with pytest.raises(ValueError, match=key):
            CLIPTextConfig.from_dict({**base, **patch})


# ------------------------------------------------------------------------------------------------
# bf16 compute
# ------------------------------------------------------------------------------------------------


def test_bf16_compute_close(ckpt, model):
    m16 = load_text_encoder(ckpt["new"], dtype=jnp.bfloat16)
    params = nnx.to_flat_state(nnx.state(m16, nnx.Param))
    assert all(v.get_value().dtype == jnp.float32 for _, v in params)
    ids = prompt_ids()
    ref = np.asarray(model.encode_ids(ids))
    out = m16.encode_ids(ids)
    assert out.dtype == jnp.bfloat16
    err = np.abs(np.asarray(out, np.float32) - ref).max()
    assert err < 0.05 * np.abs(ref).max(), err
    arc = np.random.default_rng(2).standard_normal((2, 48)).astype(np.float32)
    ref_id = np.asarray(model.encode_id(arc))
    err_id = np.abs(np.asarray(m16.encode_id(arc), np.float32) - ref_id).max()
    assert err_id < 0.05 * np.abs(ref_id).max(), err_id
