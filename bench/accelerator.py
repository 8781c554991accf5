"""One-command accelerator benchmark (GPU / TPU host): SD1.5 stage-c training and 25-step sampling.

    python bench/accelerator.py                 # SD1.5, bf16, 64x64 latents (512 px); <= ~8 minutes on one H100
    python bench/accelerator.py --smoke         # tiny models, fp32, 16x16 latents, any machine (CPU: ~1 minute)

Training (each case in its own subprocess, so device memory and its peak counter start from zero):
the real ``Trainer`` step of stage c (both control modules trained on the frozen SD1.5 UNet + CLIP ViT-L,
mixed conditioning, AD loss on all 16 cross-attention layers, AdamW), random weights, synthetic records,
``model.dtype`` bf16 (fp32 parameters and optimizer), without and with block remat. Attention: the fused
path (``--attention``, default ``auto``: cuDNN where JAX supports it, else XLA's) everywhere except the
cross-attention layers the AD loss reads, which compute their softmax explicitly. Batch: as large as
fits (``--batch`` skips the search): the step is compiled at ``--probe-batch``, XLA's buffer plan
(``memory_analysis``) gives the fixed and per-sample bytes, the largest multiple of ``--batch-multiple``
that fits in ``--memory-fraction`` of the device memory is compiled and run (halved until it runs).
Reported: images/s, step time (median of ``--steps`` after 2 warm-up steps), MFU = FLOPs of one step
from XLA's cost analysis / step time / the device's peak (the peak used is printed; ``--peak-tflops``
overrides the table; XLA counts custom calls such as cuDNN attention as 0 FLOPs, so MFU is then a lower
bound), peak device memory (``memory_stats()['peak_bytes_in_use']``; process RSS on CPU) and XLA's plan.

Sampling: ``Arc2FacePipeline`` (25 DPM++ 2M steps, guidance 3, VAE decode, batch ``--sample-batch``)
on random SD1.5-shaped UNet / CLIP / VAE, images/s after one warm-up call; against diffusers'
``StableDiffusionPipeline`` on the same weights, latents and device when PyTorch with CUDA is importable
(on CPU only with ``--smoke``), with the final-latent difference as a sanity check.

Output: one markdown table per part, the device, the peak FLOP/s used, the load average, and all rows
as JSON (``--json``). The persistent compilation cache (``facecrafter_jax.runtime``) makes a rerun skip
the compiles; ``--no-cache`` measures cold compiles.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(BENCH))
# PyTorch on CPU (--smoke): OpenMP threads must not spin between ops while XLA runs (set before torch loads).
os.environ.setdefault("KMP_BLOCKTIME", "0")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from _common import load_average, markdown_table  # noqa: E402

# Peak dense bf16 FLOP/s per chip (vendor datasheets), matched against jax's device_kind (lower case).
PEAK_TFLOPS = [("h100 pcie", 756.0), ("h100", 989.4), ("h200", 989.4), ("h800", 989.4), ("gh200", 989.4),
               ("b200", 2250.0), ("a100", 312.0), ("a800", 312.0), ("l40s", 362.0), ("l4", 121.0),
               ("a10", 125.0), ("v100", 125.0), ("tpu v6 lite", 918.0), ("tpu v6e", 918.0),
               ("tpu v5 lite", 197.0), ("tpu v5e", 197.0), ("tpu v5p", 459.0), ("tpu v5", 459.0),
               ("tpu v4", 275.0), ("tpu v3", 123.0)]

SD15_UNET = dict(in_channels=4, out_channels=4, block_out_channels=[320, 640, 1280, 1280], layers_per_block=2,
                 down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
                 up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3, cross_attention_dim=768,
                 attention_head_dim=8, norm_num_groups=32)
SD15_CLIP = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                 num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
                 bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
SD15_VAE = dict(in_channels=3, out_channels=3, block_out_channels=[128, 256, 512, 512], layers_per_block=2,
                down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                latent_channels=4, norm_num_groups=32, sample_size=512)
# --smoke: the same topology kinds at toy size (CLIP keeps hidden 512: the ArcFace vector is its id token).
SMOKE_UNET = dict(SD15_UNET, block_out_channels=[32, 64], layers_per_block=1,
                  down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
                  up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"], cross_attention_dim=512,
                  attention_head_dim=2, norm_num_groups=16)
SMOKE_CLIP = dict(SD15_CLIP, hidden_size=512, intermediate_size=512, num_hidden_layers=1, num_attention_heads=8)
SMOKE_VAE = dict(SD15_VAE, block_out_channels=[16, 32], layers_per_block=1,
                 down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                 norm_num_groups=8, sample_size=32)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--smoke", action="store_true", help="tiny models, fp32, 16x16 latents: runs anywhere in ~1 min")
    p.add_argument("--latent", type=int, default=None, help="latent side (default 64; --smoke 16)")
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default=None, help="compute dtype (default bf16; "
                   "--smoke float32)")
    p.add_argument("--attention", choices=("auto", "cudnn", "xla"), default="auto",
                   help="fused attention path of the layers the AD loss does not read")
    p.add_argument("--batch", type=int, default=None, help="train batch (default: the largest that fits)")
    p.add_argument("--probe-batch", type=int, default=None, help="batch of the memory probe compile (default 8; "
                   "--smoke 1)")
    p.add_argument("--batch-multiple", type=int, default=None, help="the batch is a multiple of this (default 8; "
                   "--smoke 1)")
    p.add_argument("--max-batch", type=int, default=None, help="upper bound of the batch search (default 256; "
                   "--smoke 2)")
    p.add_argument("--memory-fraction", type=float, default=0.85, help="share of device memory the plan may use")
    p.add_argument("--steps", type=int, default=None, help="timed train steps (default 5; --smoke 2)")
    p.add_argument("--remat", default="off,on", help="comma list of: off, on")
    p.add_argument("--sample-batch", type=int, default=None, help="sampling batch (default 8; --smoke 2)")
    p.add_argument("--sample-steps", type=int, default=None, help="sampler steps (default 25; --smoke 3)")
    p.add_argument("--skip-train", action="store_true")
    p.add_argument("--skip-sample", action="store_true")
    p.add_argument("--no-torch", action="store_true", help="skip the diffusers comparison")
    p.add_argument("--peak-tflops", type=float, default=None, help="device peak (dense, compute dtype) per chip")
    p.add_argument("--no-cache", action="store_true", help="do not use the persistent compilation cache")
    p.add_argument("--json", help="write all rows to this file")
    p.add_argument("--_case", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    smoke = a.smoke
    for name, full, small in (("latent", 64, 16), ("dtype", "bfloat16", "float32"), ("probe_batch", 8, 1),
                              ("batch_multiple", 8, 1), ("max_batch", 256, 2), ("steps", 5, 2),
                              ("sample_batch", 8, 2), ("sample_steps", 25, 3)):
        if getattr(a, name) is None:
            setattr(a, name, small if smoke else full)
    a.remat = [r for r in a.remat.split(",") if r]
    if any(r not in ("off", "on") for r in a.remat):
        p.error(f"--remat takes off / on, got {a.remat}")
    a.argv = list(argv if argv is not None else sys.argv[1:])
    return a


# --------------------------------------------------------------------------------------------
# Device facts
# --------------------------------------------------------------------------------------------


def device_facts(peak_override: float | None) -> dict:
    import jax

    d = jax.devices()[0]
    kind = getattr(d, "device_kind", d.platform)
    peak, source = peak_override, "--peak-tflops"
    if peak is None:
        for key, tf in PEAK_TFLOPS:
            if key in kind.lower():
                peak, source = tf, f"table ({key})"
                break
    stats = d.memory_stats() if hasattr(d, "memory_stats") else None
    limit = (stats or {}).get("bytes_limit")
    if limit is None:  # CPU: what the OS says is available
        from _common import available_bytes

        limit = available_bytes()
    return {"platform": d.platform, "device_kind": kind, "devices": jax.device_count(), "peak_tflops": peak,
            "peak_source": source if peak is not None else "unknown (pass --peak-tflops)", "memory_bytes": int(limit)}


def peak_memory_bytes() -> int:
    import jax

    stats = jax.devices()[0].memory_stats() if hasattr(jax.devices()[0], "memory_stats") else None
    if stats and "peak_bytes_in_use" in stats:
        return int(stats["peak_bytes_in_use"])
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # CPU: process peak RSS


# --------------------------------------------------------------------------------------------
# Training case (runs in a subprocess)
# --------------------------------------------------------------------------------------------


def make_trainer(a, tmp: Path, batch: int, remat: bool):
    from facecrafter_jax.train.config import TrainConfig, from_dict
    from facecrafter_jax.train.loop import Trainer

    unet = dict(SMOKE_UNET if a.smoke else SD15_UNET, sample_size=a.latent)
    clip = SMOKE_CLIP if a.smoke else SD15_CLIP
    cfg = from_dict(TrainConfig, {
        "name": "accelerator", "stage": "joint", "run_dir": str(tmp / f"run_{batch}_{remat}"), "steps": 1000,
        "model": {"pretrained": None, "unet": unet, "text_encoder": clip, "controls": ["landmark", "emotion"],
                  "dtype": a.dtype, "remat": remat, "attention_implementation": a.attention},
        "data": {"dir": "", "global_batch_size": batch, "device_prefetch": 2,  # synthetic set in <run_dir>/data
                 "synthetic": {"num_records": max(16, a.max_batch), "resolution": 8 * a.latent, "shard_size": 256,
                               "latent_dtype": "float16"}},
        "loss": {"ad_weight": 0.1, "ad_reading": "orthogonality", "ad_layers": "all"},
        "optim": {"lr": 1e-5, "warmup_steps": 0, "schedule": "constant"},
        "checkpoint": {"every": 0}, "logging": {"tensorboard": False, "progress": False},
    })
    return Trainer(cfg)


def _plan(compiled) -> tuple[int, int]:
    """(bytes that grow with the batch: temporaries + outputs, fixed bytes: arguments) of XLA's plan."""
    m = compiled.memory_analysis()
    if m is None:
        return 0, 0
    alias = getattr(m, "alias_size_in_bytes", 0)  # donated state: counted in arguments and outputs
    return int(m.temp_size_in_bytes + m.output_size_in_bytes - alias), int(m.argument_size_in_bytes)


def train_case(a, remat: bool) -> dict:
    dev = device_facts(a.peak_tflops)
    n_dev = dev["devices"]
    mult = max(a.batch_multiple, n_dev)
    budget = a.memory_fraction * dev["memory_bytes"] * n_dev
    row = {"part": "train", "remat": "on" if remat else "off", "dtype": a.dtype, "latent": a.latent,
           "attention": a.attention}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        t0 = time.perf_counter()
        trainer = None
        if a.batch is not None:
            batch = a.batch
            row["batch_search"] = "given"
        else:
            probe = max(a.probe_batch, n_dev)
            trainer = make_trainer(a, tmp, probe, remat)
            trainer.compile()
            grow, fixed = _plan(trainer.compiled)
            per_sample = max(grow / probe, 1.0)
            fit = int((budget - fixed) // per_sample)
            batch = max(mult, min(a.max_batch, fit) // mult * mult)
            row.update(probe_batch=probe, probe_compile_s=trainer.compile_seconds, plan_fixed_gb=fixed / 2**30,
                       plan_per_sample_gb=per_sample / 2**30, batch_search=f"plan at {probe} -> fits {fit}")
            if batch == probe:
                row["batch_search"] += " (probe batch kept)"
            else:
                trainer = None
        while True:
            try:
                if trainer is None:
                    trainer = make_trainer(a, tmp, batch, remat)
                    trainer.compile()
                trainer.pipeline = trainer.make_pipeline()
                state = trainer.fresh_state()
                batches = [trainer.next_batch() for _ in range(2)]
                times = []
                for i in range(2 + a.steps):
                    t1 = time.perf_counter()
                    state, m = trainer.compiled(state, trainer.frozen, batches[i % 2])
                    loss = float(m["loss"])
                    times.append(time.perf_counter() - t1)
                break
            except Exception as e:  # noqa: BLE001 - out of memory at compile or run time: halve
                if batch <= mult or "RESOURCE_EXHAUSTED" not in str(e) and "out of memory" not in str(e).lower():
                    raise
                print(f"# batch {batch} does not fit ({type(e).__name__}); trying {batch // 2}", flush=True)
                trainer, batch = None, max(mult, batch // 2 // mult * mult)
            finally:
                if trainer is not None and trainer.pipeline is not None:
                    trainer.pipeline.close()
        step_s = statistics.median(times[2:])
        flops = trainer.step_flops
        grow, fixed = _plan(trainer.compiled)
        peak = dev["peak_tflops"]
        row.update(batch=batch, compile_s=trainer.compile_seconds, first_step_s=times[0], step_s=step_s,
                   images_per_s=batch / step_s, loss=loss, xla_tflop_per_step=(flops or 0) / 1e12,
                   tflops_per_s=(flops or 0) / step_s / 1e12,
                   mfu=(flops / step_s / (peak * 1e12 * n_dev)) if (flops and peak) else None,
                   peak_memory_gb=peak_memory_bytes() / 2**30, plan_gb=(grow + fixed) / 2**30,
                   trainable=int(sum(v.size for v in trainer.world.params.values())),
                   frozen=int(sum(v.size for v in trainer.world.frozen.values())),
                   wall_s=time.perf_counter() - t0)
        if not math.isfinite(loss):
            raise RuntimeError(f"train step gave a non-finite loss {loss}")
    return row


# --------------------------------------------------------------------------------------------
# Sampling case (runs in a subprocess)
# --------------------------------------------------------------------------------------------


def _torch_models(a):
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**dict(SMOKE_UNET if a.smoke else SD15_UNET, sample_size=a.latent)).eval()
    clip = CLIPTextModel(CLIPTextConfig(**(SMOKE_CLIP if a.smoke else SD15_CLIP))).eval()
    vae = AutoencoderKL(**(SMOKE_VAE if a.smoke else SD15_VAE)).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in (unet, clip, vae):
            m.requires_grad_(False)
            for prm in m.parameters():  # no zero layer (diffusers zero-initialises some outputs)
                prm.add_(0.02 * torch.randn(prm.shape, generator=g))
    return unet, clip, vae


def _import(unet_t, clip_t, vae_t, dtype):
    """Our UNet / CLIP / VAE holding the PyTorch weights (strict key maps), compute dtype ``dtype``."""
    from flax import nnx

    from facecrafter_jax.convert.clip import load_text_encoder_state
    from facecrafter_jax.convert.unet import unet_key_map
    from facecrafter_jax.convert.vae import vae_key_map
    from facecrafter_jax.convert.weights import load_torch_state
    from facecrafter_jax.models.clip_text import CLIPTextConfig, CLIPTextModel
    from facecrafter_jax.models.unet_2d_condition import UNet2DConditionConfig, UNet2DConditionModel
    from facecrafter_jax.models.vae import AutoencoderKL, AutoencoderKLConfig

    def sd(m):
        return {k: v.detach().float().cpu().numpy() for k, v in m.state_dict().items()}

    unet = UNet2DConditionModel.create_abstract(UNet2DConditionConfig.from_diffusers_config(dict(unet_t.config)),
                                                dtype=dtype)
    load_torch_state(unet, sd(unet_t), unet_key_map(unet))
    ccfg = CLIPTextConfig.from_dict(clip_t.config.to_diff_dict())  # what save_pretrained writes
    clip = nnx.eval_shape(lambda: CLIPTextModel(ccfg, dtype=dtype, rngs=nnx.Rngs(0)))
    load_text_encoder_state(clip, sd(clip_t))
    vcfg = AutoencoderKLConfig.from_dict({k: v for k, v in dict(vae_t.config).items() if not k.startswith("_")})
    vae = nnx.eval_shape(lambda: AutoencoderKL(vcfg, dtype=dtype, rngs=nnx.Rngs(0)))
    load_torch_state(vae, sd(vae_t), vae_key_map(vae))
    return unet, clip, vae


def sample_case(a) -> list[dict]:
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    from facecrafter_jax.sampling import Arc2FacePipeline

    dtype = jnp.bfloat16 if a.dtype == "bfloat16" else jnp.float32
    unet_t, clip_t, vae_t = _torch_models(a)
    unet, clip, vae = _import(unet_t, clip_t, vae_t, dtype)
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    size = a.latent * factor
    b, steps = a.sample_batch, a.sample_steps
    rng = np.random.default_rng(0)
    arcface = rng.standard_normal((b, 512)).astype(np.float32)
    lat = rng.standard_normal((b, a.latent, a.latent, 4)).astype(np.float32)
    pipe = Arc2FacePipeline(unet, clip, vae)
    compile_s = pipe.compile(b, num_steps=steps, guidance_scale=3.0, height=size, width=size, output_type="float")

    def ours():
        return pipe(arcface, latents=lat, num_steps=steps, guidance_scale=3.0, output_type="float")

    out = ours()  # warm-up
    t0 = time.perf_counter()
    out = ours()
    ours_s = time.perf_counter() - t0
    rows = [{"part": "sample", "who": "ours (JAX)", "dtype": a.dtype, "latent": a.latent, "batch": b, "steps": steps,
             "compile_s": compile_s, "s_per_call": ours_s, "images_per_s": b / ours_s,
             "peak_memory_gb": peak_memory_bytes() / 2**30, "device": jax.devices()[0].device_kind}]
    cuda = torch.cuda.is_available()
    if not a.no_torch and (cuda or a.smoke):
        from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

        from facecrafter_jax import schedulers as S
        from facecrafter_jax import tokens

        dev = "cuda" if cuda else "cpu"
        tdtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[a.dtype]
        sd = StableDiffusionPipeline(vae=vae_t, text_encoder=clip_t, tokenizer=None, unet=unet_t,
                                     scheduler=DPMSolverMultistepScheduler.from_config(S.SD15_SCHEDULER_CONFIG),
                                     safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        sd = sd.to(dev, tdtype)
        sd.set_progress_bar_config(disable=True)
        ids = torch.from_numpy(np.broadcast_to(tokens.ARC2FACE_PROMPT_IDS, (b, 77)).astype(np.int64)).to(dev)
        empty = torch.from_numpy(np.broadcast_to(tokens.EMPTY_PROMPT_IDS, (b, 77)).astype(np.int64)).to(dev)
        arc_t = torch.from_numpy(arcface).to(dev)
        causal = torch.full((77, 77), torch.finfo(tdtype).min, device=dev).triu(1)[None, None].to(tdtype)

        def theirs(output_type="np"):
            with torch.no_grad():
                tok = clip_t.embeddings.token_embedding(ids)
                v = torch.nn.functional.pad(torch.nn.functional.normalize(arc_t, dim=1),
                                            (0, clip_t.config.hidden_size - 512)).to(tdtype)
                tok = torch.where((ids == tokens.ID_TOKEN_ID)[..., None], v[:, None, :], tok)
                h = clip_t.embeddings(input_ids=ids, inputs_embeds=tok)
                ctx = clip_t.final_layer_norm(clip_t.encoder(inputs_embeds=h, attention_mask=causal).last_hidden_state)
                neg = clip_t(empty).last_hidden_state
                res = sd(prompt_embeds=ctx, negative_prompt_embeds=neg,
                         latents=torch.from_numpy(lat.transpose(0, 3, 1, 2).copy()).to(dev, tdtype),
                         num_inference_steps=steps, guidance_scale=3.0, height=size, width=size,
                         output_type=output_type).images
                if cuda:
                    torch.cuda.synchronize()
                return res

        ref = theirs("latent").float().cpu().numpy().transpose(0, 2, 3, 1)  # warm-up + sanity check
        rel = float(np.abs(np.asarray(out.latents, np.float32) - ref).max() / max(1.0, np.abs(ref).max()))
        theirs()
        t0 = time.perf_counter()
        theirs()
        th_s = time.perf_counter() - t0
        rows[0]["final_latent_rel_err"] = rel
        rows.append({"part": "sample", "who": f"diffusers (PyTorch {torch.__version__}, {dev})", "dtype": a.dtype,
                     "latent": a.latent, "batch": b, "steps": steps, "s_per_call": th_s, "images_per_s": b / th_s,
                     "peak_memory_gb": (torch.cuda.max_memory_allocated() / 2**30) if cuda else None})
        rows[0]["ours_over_diffusers"] = ours_s / th_s
    return rows


# --------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------


def _child(a, case: str) -> list[dict]:
    """Run one case in a fresh process (device memory and its peak counter start at zero)."""
    argv, skip = [], False
    for x in a.argv:  # the driver's --json must not reach the child
        if skip or x.startswith("--json="):
            skip = False
            continue
        skip = x == "--json"
        if not skip:
            argv.append(x)
    cmd = [sys.executable, __file__, *argv, "--_case", case]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True)
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
    if r.returncode != 0 or not lines:
        sys.stderr.write(r.stdout[-4000:] + r.stderr[-8000:])
        raise RuntimeError(f"case {case} failed (exit {r.returncode})")
    rows = json.loads(lines[-1][len("RESULT "):])
    print(f"# {case}: done in {time.perf_counter() - t0:.0f} s", flush=True)
    return rows


def _fmt(v, spec="{:.3g}"):
    return "-" if v is None else (spec.format(v) if isinstance(v, float) else str(v))


def main(argv=None) -> int:
    a = parse_args(argv)
    from facecrafter_jax.runtime import configure_cpu, enable_compilation_cache

    configure_cpu()  # XLA:CPU defaults (only used by --smoke on a CPU host; no effect on GPU / TPU)
    if not a.no_cache:
        enable_compilation_cache()
    if a._case:
        if a._case.startswith("train-"):
            rows = [train_case(a, remat=a._case == "train-on")]
        else:
            rows = sample_case(a)
        print("RESULT " + json.dumps(rows), flush=True)
        return 0

    import jax

    dev = device_facts(a.peak_tflops)
    t0 = time.perf_counter()
    print(f"# device: {dev['devices']} x {dev['device_kind']} ({dev['platform']}), "
          f"{dev['memory_bytes'] / 2**30:.1f} GiB each; peak {_fmt(dev['peak_tflops'])} TFLOP/s per chip from "
          f"{dev['peak_source']}; jax {jax.__version__}; load average {load_average()}"
          + (" [smoke: tiny models]" if a.smoke else ""), flush=True)
    rows = []
    if not a.skip_train:
        for r in a.remat:
            rows += _child(a, f"train-{r}")
    if not a.skip_sample:
        rows += _child(a, "sample")
    train = [r for r in rows if r["part"] == "train"]
    sample = [r for r in rows if r["part"] == "sample"]
    if train:
        print("\n" + markdown_table(
            ["remat", "dtype", "latent", "batch", "images/s", "step s", "XLA TFLOP/step", "TFLOP/s", "MFU",
             "peak device GiB", "XLA plan GiB", "compile s", "batch search"],
            [[r["remat"], r["dtype"], f"{r['latent']}x{r['latent']}", r["batch"], _fmt(r["images_per_s"]),
              _fmt(r["step_s"]), _fmt(r["xla_tflop_per_step"]), _fmt(r["tflops_per_s"]),
              _fmt(r["mfu"], "{:.1%}"), _fmt(r["peak_memory_gb"]), _fmt(r["plan_gb"]), _fmt(r["compile_s"], "{:.0f}"),
              r["batch_search"]] for r in train]))
    if sample:
        print("\n" + markdown_table(
            ["who", "dtype", "latent", "batch", "steps", "images/s", "s / call", "ours / diffusers", "compile s",
             "final-latent rel err"],
            [[r["who"], r["dtype"], f"{r['latent']}x{r['latent']}", r["batch"], r["steps"], _fmt(r["images_per_s"]),
              _fmt(r["s_per_call"]), _fmt(r.get("ours_over_diffusers"), "{:.2f}"), _fmt(r.get("compile_s"), "{:.0f}"),
              _fmt(r.get("final_latent_rel_err"), "{:.1e}")] for r in sample]))
    print(f"\n# peak used for MFU: {_fmt(dev['peak_tflops'])} TFLOP/s per chip ({dev['peak_source']}); total "
          f"{time.perf_counter() - t0:.0f} s; load average {load_average()}", flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps({"device": dev, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
