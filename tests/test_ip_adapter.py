"""FaceCrafter controls as stock diffusers IP-Adapters (`to-diffusers` -> `pipe.load_ip_adapter`), against our Flax model.

A random SD1.5-shaped tiny UNet (4 levels, 2 layers per block: 16 cross-attention layers like SD1.5, so the
per-layer key numbering 1, 3, ..., 31 and diffusers' down / up / mid processor order are exercised), random
adapters perturbed away from their initialisation, exported by `facecrafter-convert to-diffusers` and loaded
by an unmodified diffusers `StableDiffusionPipeline.load_ip_adapter(..., image_encoder_folder=None)`.

* UNet outputs, ours (Flax) vs diffusers, same inputs, batch 2 with different conditions per sample: each
  control alone (one file loaded), both, scales != 1, an absent control (null input = zeros, branch on), a
  scale of 0 (branch off), and hidden widths that are not multiples of the input width (zero-padded export):
  within 1e-5 relative to max |output|.
* A 4-step DDIM StableDiffusionPipeline run (Arc2Face identity context as ``prompt_embeds``, the empty prompt
  as ``negative_prompt_embeds``, ``ip_adapter_image_embeds`` with the null input as the negative) equals our
  FaceCrafterPipeline at ``guidance_id == guidance_control`` with ``absent_controls="null_tokens"`` (the default) within 1e-5.
"""

import json
import os

import numpy as np
import pytest
import torch
import jax.numpy as jnp
from flax import nnx

from facecrafter_jax import schedulers as S
from facecrafter_jax.convert.cli import main as convert_main
from facecrafter_jax.convert.ip_adapter import (IP_ADAPTER_INDEX, IPAdapterExportError, check_ip_adapter_export,
                                                diffusers_cross_attention_order, export_ip_adapters,
                                                ip_adapter_weight_name)
from facecrafter_jax.models.control import AdapterLinear, control_features
from facecrafter_jax.models.facecrafter import FaceCrafter, FaceCrafterConfig
from facecrafter_jax.pretrained import load_pretrained, save_pretrained
from facecrafter_jax.testing import arc2face_context_torch
from facecrafter_jax.torch_ip_adapter import (arc2face_prompt_embeds, empty_prompt_embeds, ip_adapter_image_embeds,
                                              raw_control_input)
from tiny_models import tiny_clip, tiny_unet, tiny_vae
from conftest import perturb_adapters

SD15_SHAPED = dict(block_out_channels=(32, 32, 64, 64), layers_per_block=2, cross_attention_dim=64,
                   attention_head_dim=2, norm_num_groups=8, sample_size=16,
                   down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                   up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
# Hidden widths that are multiples of the inputs (1 x 1434, 2 x 10): the export is our parameters as they are.
EXACT = FaceCrafterConfig(landmark_tokens=3, emotion_tokens=2, landmark_hidden_dim=1434, emotion_hidden_dim=20)
# Widths that are not (an "older" checkpoint): exported zero-padded to 1434 and 20.
PADDED = FaceCrafterConfig(landmark_tokens=3, emotion_tokens=2, landmark_hidden_dim=32, emotion_hidden_dim=16)
ID_DIM = 48
REL_TOL = 1e-5
WEIGHTS = [ip_adapter_weight_name("landmark"), ip_adapter_weight_name("emotion")]




def rel_err(ours, ref):
    return float(np.abs(np.asarray(ours) - np.asarray(ref)).max() / max(1.0, np.abs(ref).max()))


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # OpenMP busy-waiting on the shared 2-core machine (see test_sampling.py)
    root = tmp_path_factory.mktemp("ip_adapter")
    tiny_unet(0, **SD15_SHAPED).save_pretrained(root / "torch/unet")
    tiny_clip(1).save_pretrained(root / "torch/text_encoder")
    tiny_vae(2).save_pretrained(root / "torch/vae")
    assert convert_main(["from-diffusers", "--unet", str(root / "torch/unet"), "--text-encoder",
                         str(root / "torch/text_encoder"), "--vae", str(root / "torch/vae"),
                         "--out", str(root / "base")]) == 0
    models = {}
    for name, cfg, seed in (("exact", EXACT, 2), ("padded", PADDED, 3)):
        m = load_pretrained(str(root / "base"))
        fc = FaceCrafter(m.unet, cfg, rngs=nnx.Rngs(seed))
        perturb_adapters(fc, seed)
        models[name] = fc
    m = load_pretrained(str(root / "base"))
    save_pretrained(str(root / "exact"), unet=models["exact"].unet, text_encoder=m.text_encoder, vae=m.vae,
                    adapters=models["exact"])
    assert convert_main(["to-diffusers", str(root / "exact"), str(root / "out")]) == 0  # the CLI path
    export_ip_adapters(models["padded"], str(root / "out_padded"))  # same base: only the adapter files differ

    rng = np.random.default_rng(0)
    lmk = rng.uniform(0.2, 0.8, size=(2, 478, 3)).astype(np.float32)
    lmk[..., 2] -= 0.5
    emo = np.concatenate([rng.dirichlet(np.ones(8), size=2), rng.uniform(-1, 1, size=(2, 2))], 1).astype(np.float32)
    x = rng.standard_normal((2, 16, 16, 4)).astype(np.float32)
    ctx = rng.standard_normal((2, 77, 64)).astype(np.float32)
    yield dict(root=root, models=models, text_encoder=m.text_encoder, vae=m.vae, lmk=lmk, emo=emo, x=x,
               t=np.array([30, 800]), ctx=ctx)
    torch.set_num_threads(threads)


def diffusers_pipe(root, adapters="out", weight_names=WEIGHTS):
    """An unmodified diffusers StableDiffusionPipeline from `to-diffusers` folders with our IP-Adapter files loaded."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL.from_pretrained(str(root / "out/vae")),
        text_encoder=CLIPTextModel.from_pretrained(str(root / "out/text_encoder")), tokenizer=None,
        unet=UNet2DConditionModel.from_pretrained(str(root / "out/unet")),
        scheduler=DDIMScheduler.from_config(S.SD15_SCHEDULER_CONFIG), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_ip_adapter(str(root / adapters), subfolder="ip_adapters", weight_name=list(weight_names),
                         image_encoder_folder=None)
    return pipe


_unet_fn = nnx.jit(lambda unet, x, t, c, controls: unet(x, t, c, controls=controls))


def ours(env, model, controls):
    """Our UNet with ``controls = {name: (raw input or None for the null input, scale)}``.

    Both branches are always passed (one compiled program); a control not in ``controls`` gets weight 0,
    which adds exactly ``0 * branch`` (bit-identical to not running it, tests/test_control.py).
    """
    enc = {}
    for name, ref in (("landmark", env["lmk"]), ("emotion", env["emo"])):
        raw, scale = controls.get(name, (None, 0.0))
        raw = np.zeros_like(ref) if raw is None else raw
        enc[name] = (model.encoder(name)(jnp.asarray(raw)), None, jnp.full((2,), scale, jnp.float32))
    out = _unet_fn(model.unet, jnp.asarray(env["x"]), jnp.asarray(env["t"]), jnp.asarray(env["ctx"]), enc)
    return np.asarray(out)


def theirs(env, pipe, embeds):
    with torch.no_grad():
        out = pipe.unet(torch.from_numpy(env["x"].transpose(0, 3, 1, 2).copy()), torch.from_numpy(env["t"]),
                        torch.from_numpy(env["ctx"]), added_cond_kwargs={"image_embeds": embeds}).sample
    return out.numpy().transpose(0, 2, 3, 1)


def test_files_keys_and_layer_numbering(env):
    """Key set (FaceID projection), per-layer numbering = diffusers' processor order, values bit-exact."""
    from safetensors.numpy import load_file

    root, model = env["root"], env["models"]["exact"]
    folder = root / "out" / "ip_adapters"
    index = json.loads((folder / IP_ADAPTER_INDEX).read_text())
    assert index["controls"] == ["landmark", "emotion"] and index["weight_names"] == WEIGHTS
    assert index["adapters"]["landmark"]["mult"] == 1 and index["adapters"]["emotion"]["mult"] == 2
    layers = diffusers_cross_attention_order(model.unet)
    assert len(layers) == 16
    state = load_file(str(folder / WEIGHTS[0]))
    want = {f"image_proj.{k}" for k in ("proj.0.weight", "proj.0.bias", "proj.2.weight", "proj.2.bias", "norm.weight",
                                        "norm.bias")}
    want |= {f"ip_adapter.{2 * i + 1}.{p}.weight" for i in range(16) for p in ("to_k_ip", "to_v_ip")}
    assert set(state) == want

    pipe = diffusers_pipe(root)
    from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0
    from diffusers.models.embeddings import IPAdapterFaceIDImageProjection

    procs = {k[: -len(".processor")]: p for k, p in pipe.unet.attn_processors.items() if ".attn2." in k}
    assert [n for n, _ in layers] == list(procs)  # our computed order is diffusers' order
    by_name = dict(model.unet._walk_cross_attention())
    for name, proc in procs.items():
        assert isinstance(proc, IPAdapterAttnProcessor2_0)
        for i, c in enumerate(("landmark", "emotion")):
            np.testing.assert_array_equal(proc.to_k_ip[i].weight.detach().numpy(),
                                          np.asarray(by_name[name].to_k_c[c].kernel.get_value()).T, err_msg=name)
            np.testing.assert_array_equal(proc.to_v_ip[i].weight.detach().numpy(),
                                          np.asarray(by_name[name].to_v_c[c].kernel.get_value()).T, err_msg=name)
    projections = pipe.unet.encoder_hid_proj.image_projection_layers
    assert all(isinstance(p, IPAdapterFaceIDImageProjection) for p in projections)
    # The projections are our token encoders on the raw inputs, the null input (zeros) included.
    for proj, name, raw in ((projections[0], "landmark", env["lmk"]), (projections[1], "emotion", env["emo"])):
        for x in (raw, np.zeros_like(raw)):
            with torch.no_grad():
                got = proj(raw_control_input(name, x)).numpy()
            ref = np.asarray(model.encoder(name)(jnp.asarray(x)))
            assert np.abs(got - ref).max() < 1e-5, name


CASES = {  # name: (files loaded, diffusers scales, our controls {name: (raw key or None, scale)})
    "landmark_alone": (["landmark"], [1.0], {"landmark": ("lmk", 1.0)}),
    "emotion_alone": (["emotion"], [1.0], {"emotion": ("emo", 1.0)}),
    "both": (["landmark", "emotion"], [1.0, 1.0], {"landmark": ("lmk", 1.0), "emotion": ("emo", 1.0)}),
    "both_scaled": (["landmark", "emotion"], [0.6, 1.7], {"landmark": ("lmk", 0.6), "emotion": ("emo", 1.7)}),
    "emotion_absent": (["landmark", "emotion"], [1.0, 1.0], {"landmark": ("lmk", 1.0), "emotion": (None, 1.0)}),
    "emotion_off": (["landmark", "emotion"], [1.3, 0.0], {"landmark": ("lmk", 1.3)}),
}


@pytest.mark.parametrize("which", ["exact", "padded"])
def test_unet_matches_diffusers_load_ip_adapter(env, which):
    root, model = env["root"], env["models"][which]
    inputs = {"lmk": env["lmk"], "emo": env["emo"]}
    plain = ours(env, model, {})
    errors = {}
    pipes = {}
    for case, (files, scales, controls) in CASES.items():
        key = tuple(files)
        if key not in pipes:
            pipes[key] = diffusers_pipe(root, "out" if which == "exact" else "out_padded",
                                        [ip_adapter_weight_name(c) for c in files])
        pipe = pipes[key]
        pipe.set_ip_adapter_scale(scales)
        given = {n: inputs[r] if r is not None else None for n, (r, _) in controls.items()}
        embeds = ip_adapter_image_embeds(**{k: v for k, v in (("landmarks", given.get("landmark")),
                                                               ("emotion", given.get("emotion")))},
                                         controls=files, do_classifier_free_guidance=False, batch_size=2)
        ref = theirs(env, pipe, embeds)
        got = ours(env, model, {n: (inputs[r] if r is not None else None, s) for n, (r, s) in controls.items()})
        errors[case] = rel_err(got, ref)
        assert np.abs(ref - plain).max() > 1e-2, case  # the controls change the output
    print(f"{which}: UNet rel err vs diffusers:", {k: f"{v:.1e}" for k, v in errors.items()})
    assert all(e <= REL_TOL for e in errors.values()), errors


def test_pipeline_matches_stable_diffusion_pipeline(env):
    """4 DDIM steps, g_id == g_ctl = 3: diffusers' CFG with zeros-input negatives == our two-branch chain."""
    from facecrafter_jax.sampling import FaceCrafterPipeline

    root = env["root"]
    pipe = FaceCrafterPipeline(env["models"]["exact"], env["text_encoder"], env["vae"], scheduler="ddim")
    rng = np.random.default_rng(1)
    arc = (2.0 * rng.standard_normal((2, ID_DIM))).astype(np.float32)
    noise = rng.standard_normal((2, 16, 16, 4)).astype(np.float32)
    lmk, emo = env["lmk"][0], env["emo"][1]  # one control set for the batch (diffusers repeats the embeds)
    got = pipe(arc, landmarks=lmk, emotion=emo, guidance_id=3.0, guidance_control=3.0, absent_controls="null_tokens",
               num_steps=4, latents=noise, output_type="latent").latents

    sd = diffusers_pipe(root)
    sd.set_ip_adapter_scale([1.0, 1.0])
    te = sd.text_encoder
    prompt = arc2face_prompt_embeds(te, arc)
    arc_t = torch.from_numpy(arc)
    # the batched helper equals the official one-identity-at-a-time procedure
    official = arc2face_context_torch(te, arc_t / arc_t.norm(dim=1, keepdim=True))
    assert torch.abs(prompt - official).max() < 1e-5
    with torch.no_grad():
        ref = sd(prompt_embeds=prompt, negative_prompt_embeds=empty_prompt_embeds(te, 2),
                 ip_adapter_image_embeds=ip_adapter_image_embeds(landmarks=lmk, emotion=emo),
                 latents=torch.from_numpy(noise.transpose(0, 3, 1, 2).copy()), num_inference_steps=4,
                 guidance_scale=3.0, output_type="latent").images.numpy().transpose(0, 2, 3, 1)
    err = rel_err(got, ref)
    print(f"FaceCrafterPipeline vs StableDiffusionPipeline + load_ip_adapter: rel err {err:.2e} "
          f"(max |latent| {np.abs(ref).max():.1f})")
    assert err <= REL_TOL
    no_ctl = pipe(arc, guidance_id=3.0, absent_controls="null_tokens", num_steps=4, latents=noise, output_type="latent").latents
    assert np.abs(no_ctl - ref).max() > 1e-2  # the controls matter


def test_embeds_helper_layout():
    lmk = np.random.default_rng(0).uniform(size=(478, 3)).astype(np.float32)
    out = ip_adapter_image_embeds(landmarks=lmk)
    assert [tuple(e.shape) for e in out] == [(2, 1, 1434), (2, 1, 10)]
    np.testing.assert_array_equal(out[0][1, 0].numpy(), lmk.reshape(-1))  # raw, not centred
    assert not out[0][0].any() and not out[1].any()  # negatives and the absent emotion: the null input
    no_cfg = ip_adapter_image_embeds(emotion=np.ones((3, 10)), controls=["emotion"], do_classifier_free_guidance=False)
    assert [tuple(e.shape) for e in no_cfg] == [(3, 1, 10)]
    with pytest.raises(ValueError, match="not among the loaded controls"):
        ip_adapter_image_embeds(landmarks=lmk, controls=["emotion"])
    with pytest.raises(ValueError, match="different batch sizes"):
        ip_adapter_image_embeds(landmarks=np.zeros((2, 478, 3)), emotion=np.zeros((3, 10)))
    with pytest.raises(ValueError, match="landmarks must be"):
        raw_control_input("landmark", np.zeros((478, 2)))
    # the raw input folded into the export is our control_features' input
    x = np.random.default_rng(1).uniform(size=(2, 478, 3)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(control_features("landmark", jnp.asarray(x))),
                               raw_control_input("landmark", x).numpy() - np.tile([0.5, 0.5, 0.0], 478), atol=1e-7)


def test_inexpressible_models_raise_and_no_ip_adapter_flag(env, tmp_path, capsys):
    root = env["root"]
    m = load_pretrained(str(root / "base"))
    fc = FaceCrafter(m.unet, EXACT, rngs=nnx.Rngs(0))
    check_ip_adapter_export(fc)  # fine as built
    attn = fc.unet.cross_attention_layers()[5]
    k = attn.to_k_c["emotion"]
    attn.to_k_c["emotion"] = AdapterLinear(k.in_features, k.out_features, kernel=k.kernel.get_value(),
                                           bias=np.zeros((k.out_features,), np.float32))
    with pytest.raises(IPAdapterExportError, match=r"to_k_c\.emotion has a bias"):
        check_ip_adapter_export(fc)
    assert convert_main(["to-diffusers", str(root / "exact"), str(tmp_path / "o"), "--no-ip-adapter"]) == 0
    assert os.path.isfile(tmp_path / "o/facecrafter_adapters.safetensors")
    assert not os.path.exists(tmp_path / "o/ip_adapters")
