"""Sampling speed: our jitted Arc2FacePipeline against diffusers' StableDiffusionPipeline, same weights, CPU.

For each config it builds the PyTorch UNet / CLIP text encoder / VAE with seeded random weights, imports
them into our models in-process (no files), and runs Arc2Face-style sampling with both: identity context
from ArcFace-like 512-d embeddings (``prompt_embeds`` computed by the PyTorch encoder with the `id`
token substituted, ``negative_prompt_embeds`` = the empty prompt), DPM-Solver++ 2M (SD1.5 scheduler
config), guidance 3.0, the same starting latents and batch, VAE decode to images included on both
sides. It reports our compile time (trace + lower + XLA compile, ahead of time) twice: cold (empty
persistent compilation cache) and warm (the same program again in a new pipeline after
``jax.clear_caches()``, loaded from the persistent cache: what a second ``sample.py`` run pays), then
``--repeats`` interleaved timed runs of each after one untimed warm-up run of each, the ratio
ours / diffusers, the peak memory of one run of each (process RSS high-water mark minus RSS before the
run, ``bench/_common.py``) and the max difference of the final latents (relative to their max magnitude)
as a sanity check.

Configs (SD1.5 topology, cross-attention 768):

* ``reduced``: UNet widths (160, 320, 640, 640) (about a quarter of SD1.5's FLOPs), 4-layer CLIP,
  VAE widths (64, 128, 256, 256);
* ``small`` (``--quick``): widths (32, 64, 128, 128), one layer per block, 2-layer CLIP, for a smoke run;
* ``sd15``: the full SD1.5 UNet (860M parameters), the 12-layer CLIP ViT-L/14 text tower and the SD VAE.
  Needs ~12 GB of memory and minutes per run on 2 cores: run it on a quiet machine.

Latents 32x32 (256 px images) by default. Examples::

    .venv/bin/python bench/sample.py --quick          # smoke run (small config, 16x16 latents, 5 steps)
    .venv/bin/python bench/sample.py --configs reduced
    .venv/bin/python bench/sample.py --configs sd15 --batch 1

Clocks (``--clock``): ``wall`` elapsed time with every CPU (PyTorch ``--threads``, XLA one intra-op thread
per CPU); ``cpu`` process CPU time pinned to one CPU (``--pin``: both single-threaded, robust to other
load); ``both`` (default) runs the wall-clock table here and the CPU-time table in a pinned subprocess,
one table with both ratios. PyTorch gets ``OMP_WAIT_POLICY=PASSIVE`` / ``KMP_BLOCKTIME=0`` unless the
environment sets them: on a machine shared with other jobs, OpenMP's busy-waiting threads made the PyTorch
run 20-50x slower and erratic (measured here). The load average is printed at the start and the end.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from _common import prepare_process  # noqa: E402

prepare_process(sys.argv)  # before JAX / PyTorch start their thread pools

import numpy as np  # noqa: E402

from _common import PeakRSS, load_average, markdown_table, mb, run_pinned_child  # noqa: E402

UNET_SD15 = dict(
    sample_size=64, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32,
)
CLIP_SD15 = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                 max_position_embeddings=77, hidden_act="quick_gelu", bos_token_id=49406, eos_token_id=49407,
                 pad_token_id=49407)
VAE_SD15 = dict(in_channels=3, out_channels=3, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                latent_channels=4, norm_num_groups=32, sample_size=512)
CONFIGS = {
    "sd15": dict(unet=UNET_SD15, clip=CLIP_SD15, vae=VAE_SD15),
    "reduced": dict(unet=dict(UNET_SD15, block_out_channels=(160, 320, 640, 640)),
                    clip=dict(CLIP_SD15, num_hidden_layers=4),
                    vae=dict(VAE_SD15, block_out_channels=(64, 128, 256, 256))),
    # smoke-test size (--quick): same topology, tiny widths
    "small": dict(unet=dict(UNET_SD15, block_out_channels=(32, 64, 128, 128), layers_per_block=1),
                  clip=dict(CLIP_SD15, num_hidden_layers=2),
                  vae=dict(VAE_SD15, block_out_channels=(32, 32, 64, 64), layers_per_block=1)),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", default="reduced", help="comma list of: small, reduced, sd15 (default reduced)")
    p.add_argument("--latent", type=int, default=32, help="latent side (default 32 = 256 px images)")
    p.add_argument("--batch", type=int, default=1, help="identities per run (the UNet sees 2x with guidance)")
    p.add_argument("--steps", type=int, default=25, help="DPM-Solver++ steps (default 25)")
    p.add_argument("--guidance", type=float, default=3.0)
    p.add_argument("--repeats", type=int, default=3, help="timed runs of each, interleaved (median reported)")
    p.add_argument("--clock", choices=("both", "wall", "cpu"), default="both",
                   help="wall: all CPUs, elapsed time; cpu: pinned to one CPU (--pin), process CPU time; both "
                        "(default): wall here, then cpu in a pinned subprocess, one table")
    p.add_argument("--pin", action="store_true", help="run on one CPU (needed by --clock cpu)")
    p.add_argument("--json", help="also write the rows to this file")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="PyTorch intra-op threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="smoke run: small config, 16x16 latents, 5 steps")
    args = p.parse_args(argv)
    if args.quick:
        args.configs, args.latent, args.steps, args.clock = "small", 16, 5, "wall"
    if args.clock == "cpu" and not args.pin:
        p.error("--clock cpu needs --pin (one CPU; CPU time of several threads counts their spin-waiting)")
    args.argv = list(argv if argv is not None else sys.argv[1:])
    args.configs = [c for c in args.configs.split(",") if c]
    bad = [c for c in args.configs if c not in CONFIGS]
    if bad:
        p.error(f"unknown config(s) {bad}; choose from {sorted(CONFIGS)}")
    if args.latent % 8 or args.latent <= 0:
        p.error("--latent must be a positive multiple of 8")
    return args


def _perturb(model, seed: int, std: float):
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for prm in model.parameters():
            prm.add_(std * torch.randn(prm.shape, generator=g))
    return model.eval()


def build_torch(cfg: dict, seed: int):
    """diffusers UNet / VAE and transformers CLIP with default init moved by seeded noise (no zero layer)."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    unet = _perturb(UNet2DConditionModel(**cfg["unet"]), seed + 1, 0.02)
    clip = _perturb(CLIPTextModel(CLIPTextConfig(**cfg["clip"])), seed + 2, 0.02)
    vae = _perturb(AutoencoderKL(**cfg["vae"]), seed + 3, 0.02)
    for m in (unet, clip, vae):
        m.requires_grad_(False)
    return unet, clip, vae


def import_models(unet_t, clip_t, vae_t):
    """Our UNet / CLIP / VAE holding the PyTorch weights (strict key maps, in memory)."""
    from flax import nnx

    from facecrafter_jax.convert.clip import load_text_encoder_state
    from facecrafter_jax.convert.unet import unet_key_map
    from facecrafter_jax.convert.vae import vae_key_map
    from facecrafter_jax.convert.weights import load_torch_state
    from facecrafter_jax.models.clip_text import CLIPTextConfig, CLIPTextModel
    from facecrafter_jax.models.unet_2d_condition import UNet2DConditionConfig, UNet2DConditionModel
    from facecrafter_jax.models.vae import AutoencoderKL, AutoencoderKLConfig

    def sd(m):
        return {k: v.detach().numpy() for k, v in m.state_dict().items()}

    unet = UNet2DConditionModel.create_abstract(UNet2DConditionConfig.from_diffusers_config(dict(unet_t.config)))
    load_torch_state(unet, sd(unet_t), unet_key_map(unet))
    ccfg = CLIPTextConfig.from_dict(clip_t.config.to_diff_dict())  # what save_pretrained writes
    clip = nnx.eval_shape(lambda: CLIPTextModel(ccfg, rngs=nnx.Rngs(0)))
    load_text_encoder_state(clip, sd(clip_t))
    vcfg = AutoencoderKLConfig.from_dict({k: v for k, v in dict(vae_t.config).items() if not k.startswith("_")})
    vae = nnx.eval_shape(lambda: AutoencoderKL(vcfg, rngs=nnx.Rngs(0)))
    load_torch_state(vae, sd(vae_t), vae_key_map(vae))
    return unet, clip, vae


def torch_contexts(clip_t, arcface: np.ndarray):
    """Arc2Face identity context (id token embedding := normalised, zero-padded ArcFace vector) and the
    empty-prompt negative, with the PyTorch encoder."""
    import torch
    import torch.nn.functional as F

    from facecrafter_jax import tokens

    ids = torch.from_numpy(np.broadcast_to(tokens.ARC2FACE_PROMPT_IDS, (len(arcface), 77)).astype(np.int64))
    a = torch.from_numpy(arcface)
    a = a / a.norm(dim=1, keepdim=True)
    with torch.no_grad():
        tok = clip_t.embeddings.token_embedding(ids)
        tok[ids == tokens.ID_TOKEN_ID] = F.pad(a, (0, clip_t.config.hidden_size - a.shape[1]))
        h = clip_t.embeddings(input_ids=ids, inputs_embeds=tok)
        causal = torch.full((77, 77), torch.finfo(h.dtype).min).triu(1)[None, None]
        ctx = clip_t.final_layer_norm(clip_t.encoder(inputs_embeds=h, attention_mask=causal).last_hidden_state)
        empty = torch.from_numpy(np.broadcast_to(tokens.EMPTY_PROMPT_IDS, (len(arcface), 77)).astype(np.int64))
        neg = clip_t(empty).last_hidden_state
    return ctx, neg


def run_config(name: str, args) -> dict:
    import torch
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    from facecrafter_jax import schedulers as S
    from facecrafter_jax.sampling import Arc2FacePipeline

    cfg = CONFIGS[name]
    t0 = time.perf_counter()
    unet_t, clip_t, vae_t = build_torch(cfg, args.seed)
    unet, clip, vae = import_models(unet_t, clip_t, vae_t)
    n_unet = sum(p.numel() for p in unet_t.parameters())
    print(f"# {name}: UNet {n_unet / 1e6:.0f}M parameters; built + imported in {time.perf_counter() - t0:.1f} s",
          flush=True)

    rng = np.random.default_rng(args.seed)
    arcface = rng.standard_normal((args.batch, 512)).astype(np.float32)
    lat = rng.standard_normal((args.batch, 4, args.latent, args.latent)).astype(np.float32)
    f = 2 ** (len(cfg["vae"]["block_out_channels"]) - 1)
    size = args.latent * f

    import jax

    from facecrafter_jax.runtime import enable_compilation_cache

    def compiled_pipeline():
        p = Arc2FacePipeline(unet, clip, vae)
        return p, p.compile(args.batch, num_steps=args.steps, guidance_scale=args.guidance, height=size, width=size,
                            output_type="float")

    with tempfile.TemporaryDirectory() as cache:
        enable_compilation_cache(cache)  # empty: the first compile is cold
        _, compile_s = compiled_pipeline()
        jax.clear_caches()
        pipe, compile_warm_s = compiled_pipeline()  # a new process would find the program on disk the same way
        jax.config.update("jax_compilation_cache_dir", None)
    sd = StableDiffusionPipeline(vae=vae_t, text_encoder=clip_t, tokenizer=None, unet=unet_t,
                                 scheduler=DPMSolverMultistepScheduler.from_config(S.SD15_SCHEDULER_CONFIG),
                                 safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    sd.set_progress_bar_config(disable=True)

    def ours():
        return pipe(arcface, latents=lat.transpose(0, 2, 3, 1), num_steps=args.steps, guidance_scale=args.guidance,
                    output_type="float")

    def theirs(output_type="np"):
        # The identity / empty-prompt encodings are part of the timed work, as in our pipeline.
        with torch.no_grad():
            ctx, neg = torch_contexts(clip_t, arcface)
            return sd(prompt_embeds=ctx, negative_prompt_embeds=neg, latents=torch.from_numpy(lat.copy()),
                      num_inference_steps=args.steps, guidance_scale=args.guidance, height=size, width=size,
                      output_type=output_type).images

    # warm-up + sanity check (final latents, before decode)
    warm = ours()
    ref_lat = theirs("latent").numpy().transpose(0, 2, 3, 1)
    rel = float(np.abs(warm.latents - ref_lat).max() / max(1.0, np.abs(ref_lat).max()))
    theirs()
    del warm
    gc.collect()

    peaks = {}
    for who, fn in (("ours", ours), ("diffusers", theirs)):
        gc.collect()
        with PeakRSS() as m:
            fn()
        peaks[who] = mb(m.delta)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    times = {"ours": [], "diffusers": []}
    for r in range(args.repeats):
        order = ("ours", "diffusers") if r % 2 == 0 else ("diffusers", "ours")
        for who in order:
            t1 = clock()
            ours() if who == "ours" else theirs()  # both return host arrays (finished work)
            times[who].append(clock() - t1)
    ours_s, theirs_s = float(np.median(times["ours"])), float(np.median(times["diffusers"]))
    row = dict(config=name, latent=args.latent, batch=args.batch, steps=args.steps, unet_params_m=n_unet / 1e6,
               ours_s=ours_s, diffusers_s=theirs_s, ratio=ours_s / theirs_s, compile_s=compile_s,
               compile_warm_s=compile_warm_s, rel_err=rel, ours_peak_mb=peaks["ours"],
               diffusers_peak_mb=peaks["diffusers"], clock=args.clock, load=load_average())
    print(f"# {name} ({args.clock}): ours {ours_s:.2f} s {[round(t, 2) for t in times['ours']]}, diffusers "
          f"{theirs_s:.2f} s {[round(t, 2) for t in times['diffusers']]}, ours/diffusers {row['ratio']:.2f}, compile "
          f"{compile_s:.1f} s (warm {compile_warm_s:.1f} s), final-latent rel err {rel:.1e}, load {row['load']}",
          flush=True)
    gc.collect()
    return row


def table(wall: list[dict], cpu: list[dict]) -> str:
    by_wall, by_cpu = {r["config"]: r for r in wall}, {r["config"]: r for r in cpu}

    def f(r, k, fmt="{:.2f}"):
        return fmt.format(r[k]) if k in r else "-"

    out = []
    for name in dict.fromkeys([r["config"] for r in wall + cpu]):
        w, c = by_wall.get(name, {}), by_cpu.get(name, {})
        m = w or c
        out.append([f"{name} ({m['unet_params_m']:.0f}M UNet)", f"{m['latent']}x{m['latent']}", m["batch"], m["steps"],
                    f(w, "ours_s"), f(w, "diffusers_s"), f(w, "ratio", "**{:.2f}**"), f(c, "ours_s"),
                    f(c, "diffusers_s"), f(c, "ratio", "**{:.2f}**"), f(m, "compile_s", "{:.1f}"),
                    f(m, "compile_warm_s", "{:.1f}"), f(m, "ours_peak_mb", "{:.0f}"), f(m, "diffusers_peak_mb", "{:.0f}"),
                    f(m, "rel_err", "{:.1e}")])
    headers = ["config", "latent", "batch", "steps", "wall ours s", "wall diffusers s", "wall ours/diffusers",
               "1-thread CPU ours s", "1-thread CPU diffusers s", "CPU ours/diffusers", "our compile s (cold)",
               "our compile s (warm cache)", "peak MB ours", "peak MB diffusers", "final-latent rel err"]
    return markdown_table(headers, out)


def main(argv=None):
    args = parse_args(argv)
    from facecrafter_jax.runtime import configure_cpu

    configure_cpu()
    import jax
    import torch

    torch.set_num_threads(1 if args.pin else args.threads)
    print(f"# jax {jax.__version__} ({jax.devices()[0].platform}), torch {torch.__version__}, torch threads "
          f"{torch.get_num_threads()}, OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}, CPUs usable "
          f"{len(os.sched_getaffinity(0))} of {os.cpu_count()}, clock {args.clock}, load average {load_average()}, "
          f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}", flush=True)
    wall, cpu = [], []
    if args.clock == "cpu":
        cpu = [run_config(name, args) for name in args.configs]
    else:
        wall = [run_config(name, argparse.Namespace(**{**vars(args), "clock": "wall"})) for name in args.configs]
        if args.clock == "both":
            with tempfile.TemporaryDirectory() as d:
                cpu = run_pinned_child(__file__, args.argv, os.path.join(d, "cpu.json"))
    print(f"\n# load average at the end {load_average()}; wall = all {len(os.sched_getaffinity(0))} CPUs, "
          "CPU = process CPU time pinned to one CPU; ratios < 1: ours faster\n")
    print(table(wall, cpu), flush=True)
    rows = wall + cpu
    if args.json:
        import json

        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
