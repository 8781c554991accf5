"""Export of FaceCrafter to PyTorch: the adapters component, `to-diffusers` adapter files, the diffusers
processors + encoders against our Flax model, and the `params` report against a closed form."""

import json
import os
import re

import numpy as np
import pytest
import torch
import jax.numpy as jnp
from flax import nnx

from facecrafter_jax import torch_facecrafter as tfc
from facecrafter_jax.convert.cli import main
from facecrafter_jax.convert import adapters as fca
from facecrafter_jax.convert.adapters import adapter_key_map, load_adapter_state
from facecrafter_jax.models import control
from facecrafter_jax.models.control import FROZEN
from facecrafter_jax.models.facecrafter import FaceCrafter, FaceCrafterConfig
from facecrafter_jax.pretrained import load_pretrained, save_pretrained
from tiny_models import tiny_unet

from conftest import nchw_to_nhwc, nhwc_to_nchw, perturb_adapters

SMALL = FaceCrafterConfig(landmark_tokens=3, emotion_tokens=2, landmark_hidden_dim=32, emotion_hidden_dim=16)




def _flat(model, filt):
    return {".".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model, filt))}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("fcx")
    ref = tiny_unet(0)
    ref.save_pretrained(str(root / "torch_unet"))
    assert main(["from-diffusers", "--unet", str(root / "torch_unet"), "--out", str(root / "base")]) == 0
    model = FaceCrafter(load_pretrained(str(root / "base"), components=("unet",)).unet, SMALL, rngs=nnx.Rngs(1))
    perturb_adapters(model, 2)  # random adapter weights, far from the copy initialisation
    save_pretrained(str(root / "fc"), unet=model.unet, adapters=model)
    assert main(["to-diffusers", str(root / "fc"), str(root / "out")]) == 0
    return root, ref, model


def _inputs(seed=0, b=2):
    r = np.random.default_rng(seed)
    x = r.normal(size=(b, 4, 16, 16)).astype(np.float32)
    t = np.array([10, 700][:b])
    ctx = r.normal(size=(b, 77, 64)).astype(np.float32)
    lmk = r.uniform(size=(b, 478, 3)).astype(np.float32)
    emo = np.concatenate([r.dirichlet(np.ones(8), size=b), r.uniform(-1, 1, size=(b, 2))], 1).astype(np.float32)
    return x, t, ctx, lmk, emo


def _torch_unet(root):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(str(root / "out/unet")).eval()


def test_round_trip_with_adapters_is_bit_identical(exported):
    root, ref, model = exported
    assert json.load(open(root / "fc/facecrafter.json"))["components"] == ["unet", "adapters"]
    unet = _torch_unet(root)
    a, b = ref.state_dict(), unet.state_dict()
    assert set(a) == set(b)
    assert all(torch.equal(a[k], b[k]) for k in a)  # the base is untouched by the adapters

    from safetensors.numpy import load_file

    exported_state = load_file(str(root / "out" / tfc.ADAPTERS_FILE))
    assert set(exported_state) == {r.torch_key for r in adapter_key_map(model)}
    assert "down_blocks.0.attentions.0.transformer_blocks.0.attn2.processor.to_k_c.landmark.weight" in exported_state
    assert "landmark_encoder.proj_in.weight" in exported_state and "emotion_encoder.norm.weight" in exported_state
    meta = json.load(open(root / "out" / tfc.ADAPTERS_CONFIG_FILE))
    assert meta["format"] == tfc.ADAPTERS_FORMAT and FaceCrafterConfig.from_dict(meta["config"]) == model.config

    encoders = tfc.load_facecrafter_adapters(unet, str(root / "out"))
    installed = {k: v for k, v in unet.state_dict().items() if ".processor." in k}
    installed.update({f"{n}_encoder.{k}": v for n, e in encoders.items() for k, v in e.state_dict().items()})
    assert set(installed) == set(exported_state)
    for k, v in exported_state.items():
        assert np.array_equal(installed[k].numpy(), v), k

    # PyTorch layout -> Flax again, and the converted folder reloads to the same parameters.
    fresh = FaceCrafter(load_pretrained(str(root / "base"), components=("unet",)).unet, SMALL, rngs=nnx.Rngs(7))
    load_adapter_state(fresh, {k: v.numpy() for k, v in installed.items()})
    reloaded = load_pretrained(str(root / "fc"), components=("unet", "adapters"))
    assert reloaded.adapters.unet is reloaded.unet
    want = _flat(model, nnx.Param)
    for other in (fresh, reloaded.adapters):
        got = _flat(other, nnx.Param)
        assert set(got) == set(want)
        for k in want:
            np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    # The frozen folder component alone is a plain UNet without adapters.
    plain = load_pretrained(str(root / "fc"), components=("unet",)).unet
    assert plain.control_names == () and set(_flat(plain, nnx.Param)) == {k[len("unet."):] for k in _flat(model, FROZEN)}


def test_exported_pytorch_model_matches_flax(exported):
    root, _, _ = exported
    model = load_pretrained(str(root / "fc"), components=("unet", "adapters")).adapters
    unet = _torch_unet(root)
    x, t, ctx, lmk, emo = _inputs(3)
    with torch.no_grad():
        stock = unet(torch.tensor(x), torch.tensor(t), torch.tensor(ctx)).sample.numpy()
    encoders = tfc.load_facecrafter_adapters(unet, str(root / "out" / tfc.ADAPTERS_FILE))

    with torch.no_grad():
        tok = {n: encoders[n](torch.tensor(v)).numpy() for n, v in (("landmark", lmk), ("emotion", emo))}
    ours_tok = {"landmark": np.asarray(model.landmark_encoder(jnp.asarray(lmk))),
                "emotion": np.asarray(model.emotion_encoder(jnp.asarray(emo)))}
    for n in tok:
        assert np.abs(tok[n] - ours_tok[n]).max() < 1e-5, n

    run = nnx.jit(lambda m, x, t, c, kw: m(x, t, c, **kw))
    cases = {
        "all_on": dict(masks={}, scales={}),
        "mixed": dict(masks={"landmark": [1.0, 0.0], "emotion": [0.0, 1.0]}, scales={"landmark": [0.5, 2.0], "emotion": 1.5}),
        "all_off": dict(masks={"landmark": [0.0, 0.0], "emotion": [0.0, 0.0]}, scales={}),
        # absent controls run on their null tokens (the zero input, branch on); off is explicit (scale 0)
        "emotion_absent": dict(masks={}, scales={}, given=("landmark",)),
        "none_given": dict(masks={}, scales={}, given=()),
        "emotion_off": dict(masks={}, scales={"emotion": 0.0}, given=("landmark",)),
    }
    errors = {}
    outs = {}
    for name, case in cases.items():
        given = case.get("given", ("landmark", "emotion"))
        with torch.no_grad():
            controls = tfc.encode_controls(encoders, landmarks=torch.tensor(lmk) if "landmark" in given else None,
                                           emotion=torch.tensor(emo) if "emotion" in given else None,
                                           masks={k: torch.tensor(v) for k, v in case["masks"].items()},
                                           scales={k: torch.tensor(v) if isinstance(v, list) else v
                                                   for k, v in case["scales"].items()}, batch_size=2)
            assert set(controls) == {"landmark", "emotion"}  # every loaded control runs
            want = unet(torch.tensor(x), torch.tensor(t), torch.tensor(ctx),
                        cross_attention_kwargs={"controls": controls}).sample.numpy()
        kw = {"landmarks": jnp.asarray(lmk if "landmark" in given else np.zeros_like(lmk)),
              "emotion": jnp.asarray(emo if "emotion" in given else np.zeros_like(emo))}
        kw.update({f"{k}_mask": jnp.asarray(v) for k, v in case["masks"].items()})
        kw.update({f"{k}_scale": jnp.asarray(v) for k, v in case["scales"].items()})
        got = nhwc_to_nchw(run(model, jnp.asarray(nchw_to_nhwc(x)), jnp.asarray(t), jnp.asarray(ctx), kw))
        errors[name] = float(np.abs(got - want).max())
        outs[name] = want
    print("max |flax - torch|:", errors)
    assert all(e < 1e-4 for e in errors.values()), errors
    assert np.abs(outs["all_on"] - stock).max() > 1e-2  # the controls matter
    assert np.abs(outs["all_off"] - stock).max() < 1e-6  # all-off is the stock diffusers UNet
    # Mixed: sample 0 has no emotion, sample 1 no landmark -> each differs from all-on.
    assert np.abs(outs["mixed"] - outs["all_on"]).reshape(2, -1).max(1).min() > 1e-3
    # The null tokens are not "off": an absent emotion differs from a switched-off one.
    assert np.abs(outs["emotion_absent"] - outs["emotion_off"]).max() > 1e-3
    assert np.abs(outs["none_given"] - stock).max() > 1e-3
    with pytest.raises(ValueError, match="pass batch_size"):
        tfc.encode_controls(encoders)
    with pytest.raises(ValueError, match="different batch sizes"):
        tfc.encode_controls(encoders, landmarks=torch.tensor(lmk), emotion=torch.tensor(emo[:1]))

    # Attribute route (pipelines that drop cross_attention_kwargs) == keyword route.
    with torch.no_grad():
        controls = tfc.encode_controls(encoders, landmarks=torch.tensor(lmk), emotion=torch.tensor(emo))
        tfc.set_controls(unet, controls)
        via_attr = unet(torch.tensor(x), torch.tensor(t), torch.tensor(ctx)).sample.numpy()
        tfc.set_controls(unet, None)
        cleared = unet(torch.tensor(x), torch.tensor(t), torch.tensor(ctx)).sample.numpy()
    np.testing.assert_array_equal(via_attr, outs["all_on"])
    assert np.abs(cleared - stock).max() < 1e-6


def _rewrite(src_dir, dst_dir, mutate):
    from safetensors.numpy import load_file, save_file

    os.makedirs(dst_dir, exist_ok=True)
    state = load_file(os.path.join(src_dir, tfc.ADAPTERS_FILE))
    mutate(state)
    save_file(state, os.path.join(dst_dir, tfc.ADAPTERS_FILE))
    with open(os.path.join(src_dir, tfc.ADAPTERS_CONFIG_FILE)) as f:
        (dst_dir / tfc.ADAPTERS_CONFIG_FILE).write_text(f.read())
    return str(dst_dir)


def test_adapter_file_errors_name_the_key(exported, tmp_path):
    root, _, _ = exported
    key = "up_blocks.1.attentions.0.transformer_blocks.0.attn2.processor.to_v_c.emotion.weight"
    missing = _rewrite(root / "out", tmp_path / "missing", lambda s: s.pop(key))
    with pytest.raises(ValueError, match=re.escape(key)):
        tfc.load_facecrafter_adapters(_torch_unet(root), missing)
    extra = _rewrite(root / "out", tmp_path / "extra", lambda s: s.update({"pose_encoder.proj_in.weight": np.zeros((2, 2), np.float32)}))
    with pytest.raises(ValueError, match="pose_encoder.proj_in.weight"):
        tfc.load_facecrafter_adapters(_torch_unet(root), extra)
    with pytest.raises(FileNotFoundError, match="no FaceCrafter adapters"):
        tfc.load_facecrafter_adapters(_torch_unet(root), str(tmp_path))
    with pytest.raises(ValueError, match="no FaceCrafter processors"):
        tfc.set_controls(_torch_unet(root), {})
    # Flax side: strict too.
    from facecrafter_jax.convert.weights import WeightConversionError
    from safetensors.numpy import load_file

    state = load_file(os.path.join(missing, tfc.ADAPTERS_FILE))
    fresh = FaceCrafter(load_pretrained(str(root / "base"), components=("unet",)).unet, SMALL, rngs=nnx.Rngs(0))
    with pytest.raises(WeightConversionError, match=re.escape(key)):
        load_adapter_state(fresh, state)
    with pytest.raises(ValueError, match="needs the unet"):
        save_pretrained(str(tmp_path / "x"), adapters=fresh)
    with pytest.raises(ValueError, match="needs the 'unet'"):
        load_pretrained(str(root / "fc"), components=("adapters",))


def test_to_diffusers_without_adapters_writes_no_adapter_files(exported):
    root, _, _ = exported
    assert main(["to-diffusers", str(root / "base"), str(root / "out_base")]) == 0
    assert os.path.isdir(root / "out_base/unet") and not os.path.exists(root / "out_base" / tfc.ADAPTERS_FILE)


def test_torch_and_flax_constants_agree():
    assert tfc.CONTROL_INPUT_DIMS == control.CONTROL_INPUT_DIMS and tfc.LAYER_NORM_EPS == control.LAYER_NORM_EPS
    assert (tfc.ADAPTERS_FILE, tfc.ADAPTERS_CONFIG_FILE, tfc.ADAPTERS_FORMAT) == \
           (fca.ADAPTERS_FILE, fca.ADAPTERS_CONFIG_FILE, fca.ADAPTERS_FORMAT)


# --------------------------------------------------------------------------------------------
# Parameter report
# --------------------------------------------------------------------------------------------


def _encoder_params(inputs, hidden, tokens, dim=768):
    return inputs * hidden + hidden + hidden * tokens * dim + tokens * dim + 2 * dim


def _numbers(text):
    out = {}
    for line in text.splitlines():
        m = re.match(r"\s*(.+?):\s+([\d,]+)", line)
        if m:
            out[m.group(1).strip()] = int(m.group(2).replace(",", ""))
    return out


def test_params_report_matches_closed_form(capsys):
    assert main(["params"]) == 0
    text = capsys.readouterr().out
    got = _numbers(text)
    # SD1.5: 16 cross-attention layers of widths 320 x 5, 640 x 5, 1280 x 6; K and V of 768 -> width.
    kv = 2 * 768 * (320 * 5 + 640 * 5 + 1280 * 6)
    assert kv == 19_169_280
    # default encoder widths: integer multiples of the inputs (1 x 1434, 51 x 10) for the IP-Adapter export
    assert (FaceCrafterConfig().landmark_hidden_dim, FaceCrafterConfig().emotion_hidden_dim) == (1434, 510)
    lmk, emo = _encoder_params(478 * 3, 1434, 4), _encoder_params(10, 510, 4)
    trainable = 2 * kv + lmk + emo
    assert got["frozen (UNet, nnx.Param)"] == 859_520_964
    assert got["landmark K/V (16 layers)"] == got["emotion K/V (16 layers)"] == kv
    assert got["landmark_encoder"] == lmk and got["emotion_encoder"] == emo
    assert got["trainable (AdapterParam)"] == trainable and got["total"] == 859_520_964 + trainable
    pct = float(re.search(r"\(([\d.]+)% of the UNet\)", text).group(1))
    assert abs(pct - 100 * trainable / 859_520_964) < 0.01 and pct <= 6.0

    assert main(["params", "--controls", "landmark", "--landmark-tokens", "8", "--landmark-hidden-dim", "256", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["trainable"] == kv + _encoder_params(478 * 3, 256, 8)
    assert report["breakdown"] == {"landmark K/V (16 layers)": kv, "landmark_encoder": _encoder_params(478 * 3, 256, 8)}


def test_params_report_on_a_unet_folder_and_errors(exported, capsys):
    root, ref, _ = exported
    assert main(["params", "--unet-config", str(root / "torch_unet"), "--controls", "emotion",
                 "--emotion-hidden-dim", "16", "--emotion-tokens", "2", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["unet"] == sum(p.numel() for p in ref.parameters())
    widths = [m.to_k.out_features for n, m in ref.named_modules() if n.endswith("attn2")]
    assert report["breakdown"]["emotion K/V (%d layers)" % len(widths)] == 2 * 64 * sum(widths)
    assert report["breakdown"]["emotion_encoder"] == _encoder_params(10, 16, 2, dim=64)
    assert main(["params", "--unet-config", str(root / "nowhere")]) == 2
    assert "--unet-config" in capsys.readouterr().err
    assert main(["params", "--controls", "pose"]) == 2
    assert "unknown control" in capsys.readouterr().err


def test_runs_on_old_default_widths_still_export():
    """A run whose config left the encoder widths at the defaults of its time (1024 / 512) keeps them."""
    from facecrafter_jax.train.export import _fill_encoder_widths

    config = {"model": {"facecrafter": {"landmark_tokens": 4}}}
    values = {"facecrafter.landmark_encoder.proj_in.kernel": np.zeros((1434, 1024), np.float32),
              "facecrafter.emotion_encoder.proj_in.kernel": np.zeros((10, 512), np.float32)}
    _fill_encoder_widths(config, values)
    assert config["model"]["facecrafter"] == {"landmark_tokens": 4, "landmark_hidden_dim": 1024, "emotion_hidden_dim": 512}
    explicit = {"model": {"facecrafter": {"landmark_hidden_dim": 256}}}
    _fill_encoder_widths(explicit, {"facecrafter.landmark_encoder.proj_in.kernel": np.zeros((1434, 256))})
    assert explicit["model"]["facecrafter"] == {"landmark_hidden_dim": 256}
