"""Train-step benchmark: our jitted training step vs the equivalent PyTorch step, same weights, one command.

Two steps, from the same architecture and the same weights (a random diffusers UNet / transformers CLIP
converted with our importer), batch and latent size, fp32:

* ``adapter`` (stage c): frozen UNet + CLIP, both control modules trained (token encoders + per-layer
  ``to_k_c``/``to_v_c``), AD loss on (orthogonality reading, all 16 cross-attention layers, weight 0.1).
  Ours: the real ``facecrafter_jax.train.loop.Trainer`` step (latents sampled from stored VAE moments,
  noise, timesteps, mixed conditioning, CLIP identity context, FaceCrafter forward + backward, AdamW with
  clipping), AOT-compiled, state donated. PyTorch: diffusers ``UNet2DConditionModel`` with
  ``FaceCrafterAttnProcessor`` on every ``attn2`` (capturing the branch outputs for the same AD loss) and
  ``ControlTokenEncoder``s (``facecrafter_jax.torch_facecrafter``), ``requires_grad`` only on the adapters,
  CLIP under ``no_grad``, ``DDPMScheduler.add_noise``, MSE + 0.1 AD, ``clip_grad_norm_`` + ``AdamW``.
* ``base``: the Arc2Face base itself, UNet + CLIP trained (all but the token-embedding table), identity
  dropped to the empty prompt with probability 0.1. Same on both sides, CLIP forward with gradients.

Clocks (``--clock``): ``wall`` = elapsed time with every CPU (what a user sees; both frameworks use all
cores); ``cpu`` = process CPU time with the process pinned to one CPU (``--pin``; both single-threaded),
robust to other load on a shared machine; ``both`` (default) runs the wall-clock table here, then itself
pinned in a subprocess for the CPU-time table, and prints one table with both ratios. Every timing is
the median of ``--repeats`` interleaved steps (ours, torch, torch, ours, ...) after 3 warm-up rounds
(oneDNN needs ~3 calls to reach its steady state); the load average is printed at the start and end.

Memory: "peak MB" is the process RSS high-water mark during one step minus the RSS before it
(``bench/_common.py``), per framework; "XLA temp MB" is XLA's buffer plan for the compiled step.

    .venv/bin/python bench/train.py --quick                                  # reduced, 16x16, batch 1, wall
    .venv/bin/python bench/train.py --configs reduced,sd15 --latent 32 --batch 1,4   # the docs table
    .venv/bin/python bench/train.py --scaling                                # tiny config on 1/2/4/8 fake devices
    .venv/bin/python bench/train.py --stage-c-sd15 --latent 64 --batch 1     # full SD1.5 stage-c step: compile + memory
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import PeakRSS, load_average, markdown_table, mb, prepare_process, run_pinned_child  # noqa: E402

prepare_process(sys.argv)  # before JAX / PyTorch start their thread pools

CONFIGS = {
    # SD1.5's UNet structure at reduced width (the cross-attention width stays 768 = CLIP's).
    "reduced": dict(block_out_channels=[64, 128, 256, 256], attention_head_dim=8, norm_num_groups=32,
                    cross_attention_dim=768, clip_layers=2),
    "sd15": dict(block_out_channels=[320, 640, 1280, 1280], attention_head_dim=8, norm_num_groups=32,
                 cross_attention_dim=768, clip_layers=12),
}
# step kind -> AD loss reading of our adapter step (None: no AD loss; "base": the base step). The PyTorch
# reference of every adapter kind is the same step with the orthogonality reading (the one PyTorch has), so the
# adapter_* rows side by side give the cost of each reading (across_setups runs 2B rows: the setups and their pairs).
STEPS = {"adapter": "orthogonality", "base": "base", "adapter_no_ad": None, "adapter_map_overlap": "map_overlap",
         "adapter_across_setups": "across_setups"}
AD_WEIGHT = 0.1
FC_CFG = {"landmark_tokens": 4, "emotion_tokens": 4, "landmark_hidden_dim": 1024, "emotion_hidden_dim": 512}


def _unet_config(spec: dict, latent: int) -> dict:
    return dict(sample_size=latent, in_channels=4, out_channels=4, block_out_channels=spec["block_out_channels"],
                layers_per_block=2, down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
                up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
                cross_attention_dim=spec["cross_attention_dim"], attention_head_dim=spec["attention_head_dim"],
                norm_num_groups=spec["norm_num_groups"])


def _clip_config(spec: dict) -> dict:
    return dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=spec["clip_layers"],
                num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
                bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)


def build_torch(spec: dict, latent: int, seed: int = 0):
    import torch
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**_unet_config(spec, latent)).eval()
    text = CLIPTextModel(CLIPTextConfig(**_clip_config(spec))).eval()
    return unet, text


# --------------------------------------------------------------------------------------------
# PyTorch steps
# --------------------------------------------------------------------------------------------


def _ad_processor():
    """``FaceCrafterAttnProcessor`` that also keeps each branch's output (before ``to_out``) for the AD loss."""
    import torch.nn.functional as F

    from facecrafter_jax.torch_facecrafter import FaceCrafterAttnProcessor, _weight

    class Capture(FaceCrafterAttnProcessor):
        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                     controls=None):
            b = hidden_states.shape[0]
            q = attn.to_q(hidden_states)
            k, v = attn.to_k(encoder_hidden_states), attn.to_v(encoder_hidden_states)
            d = k.shape[-1] // attn.heads

            def heads(x):
                return x.view(b, -1, attn.heads, d).transpose(1, 2)

            q = heads(q)
            out = F.scaled_dot_product_attention(q, heads(k), heads(v))
            self.captured = {"id": out}
            for name in self.to_k_c.keys():
                if name in controls:
                    tokens, mask, scale = controls[name]
                    out_c = F.scaled_dot_product_attention(q, heads(self.to_k_c[name](tokens)),
                                                           heads(self.to_v_c[name](tokens)))
                    self.captured[name] = out_c
                    out = out + _weight(mask, scale, b, out_c, name) * out_c
            out = out.transpose(1, 2).reshape(b, -1, attn.heads * d)
            return attn.to_out[1](attn.to_out[0](out))

    return Capture


def _torch_ad_loss(procs, masks, eps: float = 1e-6):
    """Our orthogonality reading (``facecrafter_jax.losses.orthogonality_loss``) on the captured outputs."""
    import torch

    num = den = 0.0
    for p in procs:
        x = p.captured["id"].transpose(1, 2).flatten(2)  # [B, L, heads * d]
        for name, active in masks.items():
            y = p.captured[name].transpose(1, 2).flatten(2)
            cos2 = (x * y).sum(-1).square() / torch.clamp(x.square().sum(-1) * y.square().sum(-1), min=eps * eps)
            num = num + (cos2.mean(1) * active).sum()
            den = den + active.sum()
    return num / torch.clamp(torch.as_tensor(den), min=1.0)


def torch_adapter_step(unet, text, batch: int, latent: int, seed: int = 0):
    """The PyTorch stage-c step (see the module docstring); returns ``(step, n_trainable)``."""
    import torch
    from diffusers import DDPMScheduler

    from facecrafter_jax import tokens
    from facecrafter_jax.schedulers import SD15_SCHEDULER_CONFIG
    from facecrafter_jax.torch_facecrafter import ControlTokenEncoder, FaceCrafterSelfAttnProcessor, encode_controls

    g = torch.Generator().manual_seed(seed)
    unet.requires_grad_(False)
    text.requires_grad_(False)
    names = ("landmark", "emotion")
    dim = unet.config.cross_attention_dim
    procs, cross = {}, []
    Capture = _ad_processor()
    for pname in unet.attn_processors:
        if pname.endswith("attn2.processor"):
            attn = unet.get_submodule(pname[: -len(".processor")])
            p = Capture(attn.to_k.out_features, dim, names)
            with torch.no_grad():
                for n in names:
                    p.to_k_c[n].weight.copy_(attn.to_k.weight)
                    p.to_v_c[n].weight.copy_(attn.to_v.weight)
            procs[pname] = p
            cross.append(p)
        else:
            procs[pname] = FaceCrafterSelfAttnProcessor()  # accepts (and ignores) the controls keyword
    unet.set_attn_processor(dict(procs))  # diffusers pops entries from the dict it is given
    encoders = torch.nn.ModuleDict({
        "landmark": ControlTokenEncoder("landmark", num_tokens=FC_CFG["landmark_tokens"],
                                        hidden_dim=FC_CFG["landmark_hidden_dim"], output_dim=dim),
        "emotion": ControlTokenEncoder("emotion", num_tokens=FC_CFG["emotion_tokens"],
                                       hidden_dim=FC_CFG["emotion_hidden_dim"], output_dim=dim)})
    params = list(encoders.parameters()) + [q for m in cross for q in m.parameters()]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01)
    sched = DDPMScheduler.from_config(SD15_SCHEDULER_CONFIG)
    ids = torch.tensor(tokens.ARC2FACE_PROMPT_IDS.tolist(), dtype=torch.long)[None].repeat(batch, 1)
    moments = torch.randn(batch, 8, latent, latent, generator=g)
    landmarks = torch.rand(batch, 478, 3, generator=g)
    emotion = torch.rand(batch, 10, generator=g)

    def step():
        with torch.no_grad():
            ctx = text(ids).last_hidden_state
            mean, logvar = moments.chunk(2, dim=1)
            x0 = (mean + torch.exp(0.5 * logvar.clamp(-30, 20)) * torch.randn_like(mean)) * 0.18215
            noise = torch.randn_like(x0)
            t = torch.randint(0, 1000, (batch,))
            noisy = sched.add_noise(x0, noise, t)
            masks = {n: (torch.rand(batch) < 0.5).float() for n in names}
        controls = encode_controls(encoders, landmarks=landmarks, emotion=emotion, masks=masks)
        pred = unet(noisy, t, ctx, cross_attention_kwargs={"controls": controls}).sample
        loss = torch.nn.functional.mse_loss(pred, noise) + AD_WEIGHT * _torch_ad_loss(cross, masks)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        return float(loss.detach())

    return step, sum(p.numel() for p in params)


def torch_base_step(unet, text, batch: int, latent: int, seed: int = 0):
    """The PyTorch base step (UNet + CLIP trained, identity dropout 0.1); returns ``(step, n_trainable)``."""
    import torch
    import torch.nn.functional as F
    from diffusers import DDPMScheduler
    from diffusers.models.attention_processor import AttnProcessor2_0

    from facecrafter_jax import tokens
    from facecrafter_jax.schedulers import SD15_SCHEDULER_CONFIG

    g = torch.Generator().manual_seed(seed)
    unet.set_attn_processor(AttnProcessor2_0())
    params = list(unet.parameters()) + [p for n, p in text.named_parameters() if "token_embedding" not in n]
    unet.requires_grad_(True)
    text.requires_grad_(True)
    text.embeddings.token_embedding.requires_grad_(False)
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01)
    sched = DDPMScheduler.from_config(SD15_SCHEDULER_CONFIG)
    ids = torch.tensor(tokens.ARC2FACE_PROMPT_IDS.tolist(), dtype=torch.long)[None].repeat(batch, 1)
    empty = torch.tensor(tokens.EMPTY_PROMPT_IDS.tolist(), dtype=torch.long)[None]
    moments = torch.randn(batch, 8, latent, latent, generator=g)
    arcface = torch.randn(batch, 512, generator=g)
    hidden = text.config.hidden_size
    causal = torch.full((77, 77), torch.finfo(torch.float32).min).triu(1)[None, None]
    tm = text  # transformers 5: CLIPTextModel holds embeddings / encoder / final_layer_norm itself

    def step():
        with torch.no_grad():
            mean, logvar = moments.chunk(2, dim=1)
            x0 = (mean + torch.exp(0.5 * logvar.clamp(-30, 20)) * torch.randn_like(mean)) * 0.18215
            noise = torch.randn_like(x0)
            t = torch.randint(0, 1000, (batch,))
            noisy = sched.add_noise(x0, noise, t)
            drop = (torch.rand(batch) < 0.1).view(batch, 1, 1)
        tok = tm.embeddings.token_embedding(ids)
        a = F.pad(F.normalize(arcface, dim=1), (0, hidden - arcface.shape[1]))
        tok = torch.where((ids == tokens.ID_TOKEN_ID)[..., None], a[:, None, :], tok)
        h = tm.embeddings(input_ids=ids, inputs_embeds=tok)
        id_ctx = tm.final_layer_norm(tm.encoder(inputs_embeds=h, attention_mask=causal).last_hidden_state)
        ctx = torch.where(drop, text(empty).last_hidden_state, id_ctx)
        loss = F.mse_loss(unet(noisy, t, ctx).sample, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        return float(loss.detach())

    return step, sum(p.numel() for p in params if p.requires_grad)


# --------------------------------------------------------------------------------------------
# Our step
# --------------------------------------------------------------------------------------------


def pretrained_dir(tmp: Path, unet, text) -> Path:
    """Our checkpoint folder holding the PyTorch weights (through the diffusers / transformers files)."""
    from facecrafter_jax.convert import load_text_encoder, load_unet
    from facecrafter_jax.pretrained import save_pretrained

    pre = tmp / "pretrained"
    if not (pre / "facecrafter.json").exists():
        unet.save_pretrained(str(tmp / "torch_unet"))
        text.save_pretrained(str(tmp / "torch_text"))
        save_pretrained(str(pre), unet=load_unet(str(tmp / "torch_unet")),
                        text_encoder=load_text_encoder(str(tmp / "torch_text")))
    return pre


def build_ours(tmp: Path, pre: Path, kind: str, batch: int, latent: int, remat: bool = False):
    """The real ``Trainer`` for ``kind`` (a key of :data:`STEPS`: ``adapter*`` = stage c with the kind's AD
    reading, ``base``), compiled; returns
    ``(trainer, step)``. The batches are read before timing (the data pipeline is closed)."""
    from facecrafter_jax.train.config import TrainConfig, from_dict
    from facecrafter_jax.train.loop import Trainer

    model = {"pretrained": str(pre), "remat": remat, "controls": []}
    loss = {}
    adapter = kind != "base"
    if adapter:
        model.update(controls=["landmark", "emotion"], facecrafter=FC_CFG)
        reading = STEPS[kind]
        loss = {"ad_weight": AD_WEIGHT if reading else 0.0, "ad_reading": reading or "orthogonality", "ad_layers": "all"}
    cfg = from_dict(TrainConfig, {
        "name": "bench", "stage": "joint" if adapter else "base",
        "run_dir": str(tmp / f"run_{kind}_{batch}_{latent}"), "steps": 1000, "model": model,
        "data": {"dir": "", "global_batch_size": batch, "device_prefetch": 1,  # synthetic set in <run_dir>/data
                 "synthetic": {"num_records": max(16, 4 * batch), "resolution": 8 * latent, "shard_size": 64,
                               "latent_dtype": "float16"}},
        "loss": loss, "optim": {"lr": 1e-4, "warmup_steps": 0, "schedule": "constant"},
        "checkpoint": {"every": 0}, "logging": {"tensorboard": False, "progress": False},
    })
    t = Trainer(cfg)
    t.pipeline = t.make_pipeline()
    t.compile()
    batches = [t.next_batch() for _ in range(2)]
    t.pipeline.close()
    holder = {"state": t.fresh_state(), "i": 0}

    def step():
        holder["i"] += 1
        holder["state"], m = t.compiled(holder["state"], t.frozen, batches[holder["i"] % 2])
        return float(m["loss"])  # blocks until done

    return t, step


# --------------------------------------------------------------------------------------------
# Measurement
# --------------------------------------------------------------------------------------------


def measure(fns: dict, repeats: int, clock: str) -> tuple[dict, dict]:
    """Warm-up (3 rounds), peak RSS of one call each, then ``repeats`` interleaved timings -> medians."""
    from _common import interleaved_timings

    for _ in range(3):
        for f in fns.values():
            f()
    peaks = {}
    for k, f in fns.items():
        gc.collect()
        with PeakRSS() as p:
            f()
        peaks[k] = mb(p.delta)
    times = interleaved_timings(fns, repeats, clock=clock)
    return {k: statistics.median(v) for k, v in times.items()}, peaks


def bench_rows(a) -> list[dict]:
    import jax
    import torch

    torch.set_num_threads(1 if a.pin else a.threads)
    rows = []
    for name in a.configs:
        with tempfile.TemporaryDirectory() as d:
            tmp = Path(d)
            unet, text = build_torch(CONFIGS[name], a.latent)
            pre = pretrained_dir(tmp, unet, text)
            for kind in a.steps:
                for batch in a.batch:
                    t, ours = build_ours(tmp, pre, kind, batch, a.latent)
                    factory = torch_base_step if kind == "base" else torch_adapter_step
                    theirs, n_torch = factory(unet, text, batch, a.latent)
                    med, peaks = measure({"ours": ours, "torch": theirs}, a.repeats, a.clock)
                    mem = t.compiled.memory_analysis()
                    row = {"config": name, "step": kind, "latent": a.latent, "batch": batch, "clock": a.clock,
                           "ours_s": med["ours"], "torch_s": med["torch"], "ratio": med["ours"] / med["torch"],
                           "ours_peak_mb": peaks["ours"], "torch_peak_mb": peaks["torch"],
                           "xla_temp_mb": mb(mem.temp_size_in_bytes) if mem is not None else float("nan"),
                           "compile_s": t.compile_seconds, "gflop": (t.step_flops or 0) / 1e9,
                           "trainable_ours": int(sum(v.size for v in t.world.params.values())),
                           "trainable_torch": int(n_torch), "device": str(jax.devices()[0]), "load": load_average()}
                    print(f"# {name} {kind} {a.latent}x{a.latent} b{batch} ({a.clock}): ours {row['ours_s']:.3f} s, "
                          f"torch {row['torch_s']:.3f} s, ratio {row['ratio']:.2f}, compile {row['compile_s']:.1f} s, "
                          f"trainable {row['trainable_ours']:,} / {row['trainable_torch']:,}, load {row['load']}",
                          flush=True)
                    rows.append(row)
                    del t, ours, theirs
                    gc.collect()
            del unet, text
            gc.collect()
    return rows


def combined_table(wall: list[dict], cpu: list[dict]) -> str:
    """One row per (config, step, latent, batch): wall-clock ratio (all cores) and CPU-time ratio (1 thread)."""
    def key(r):
        return r["config"], r["step"], r["latent"], r["batch"]

    by_wall, by_cpu = {key(r): r for r in wall}, {key(r): r for r in cpu}

    def f(r, k, fmt="{:.3f}"):
        return fmt.format(r[k]) if k in r else "-"

    rows = []
    for k in dict.fromkeys([key(r) for r in wall + cpu]):
        w, c = by_wall.get(k, {}), by_cpu.get(k, {})
        m = w or c  # memory / compile columns: from the wall-clock run when there is one
        rows.append([k[0], k[1], f"{k[2]}x{k[2]}", k[3], f(w, "ours_s"), f(w, "torch_s"), f(w, "ratio", "**{:.2f}**"),
                     f(c, "ours_s"), f(c, "torch_s"), f(c, "ratio", "**{:.2f}**"), f(m, "ours_peak_mb", "{:.0f}"),
                     f(m, "torch_peak_mb", "{:.0f}"), f(m, "xla_temp_mb", "{:.0f}"), f(m, "compile_s", "{:.0f}"),
                     f(m, "gflop", "{:.0f}")])
    headers = ["config", "step", "latent", "batch", "wall ours s", "wall torch s", "wall ours/torch",
               "1-thread CPU ours s", "1-thread CPU torch s", "CPU ours/torch", "peak MB ours", "peak MB torch",
               "XLA temp MB", "compile s", "GFLOP/step"]
    return markdown_table(headers, rows)


def scaling(repeats_steps: int = 6) -> list[dict]:
    from facecrafter_jax.train.logging import read_metrics
    from facecrafter_jax.train.testing import run_train

    rows = []
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        layouts = [(1, 1, 1), (2, 2, 1), (4, 4, 1), (8, 8, 1), (2, 1, 2), (4, 1, 4), (8, 1, 8), (8, 2, 4)]
        for devices, data, fsdp in layouts:
            run_dir = tmp / f"n{devices}_{data}x{fsdp}"
            t0 = time.perf_counter()
            run_train(REPO / "configs" / "tiny_cpu.yaml",
                      [f"run_dir={run_dir}", f"steps={repeats_steps}", "checkpoint.every=0",
                       f"mesh.data={data}", f"mesh.fsdp={fsdp}", "logging.tensorboard=false"],
                      devices=devices, fast_compile=False)
            m = read_metrics(run_dir)
            times = [m[s]["step_time_s"] for s in sorted(m)[2:]]
            rows.append({"devices": devices, "mesh": f"{data}x{fsdp}", "step_s": statistics.median(times),
                         "wall_s": time.perf_counter() - t0})
    return rows


class _PeakRSS:
    """Peak resident set size of this process (sampled every 5 ms from /proc/self/statm) during a block."""

    def __init__(self):
        import threading

        self._stop = threading.Event()
        self.peak = 0
        self._t = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            time.sleep(0.005)

    def __enter__(self):
        self.peak = self.rss()
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, self.rss())


def stage_c_sd15(remat: bool, latent: int = 64, batch: int = 1, steps: int = 2) -> dict:
    """The stage-c step (both controls, mixed conditioning, AD loss on all 16 layers) on the full SD1.5 UNet +
    CLIP ViT-L text encoder (random weights), fp32 on CPU: compile time, XLA's buffer plan, peak RSS."""
    from facecrafter_jax.train.config import TrainConfig, from_dict
    from facecrafter_jax.train.loop import Trainer

    spec = CONFIGS["sd15"]
    unet = _unet_config(spec, latent)
    with tempfile.TemporaryDirectory() as d:
        cfg = from_dict(TrainConfig, {
            "name": "sd15_stage_c", "stage": "joint", "run_dir": str(Path(d) / "run"), "steps": 100,
            "model": {"pretrained": None, "unet": unet, "text_encoder": _clip_config(spec),
                      "controls": ["landmark", "emotion"], "remat": remat},
            "data": {"dir": "", "global_batch_size": batch, "device_prefetch": 1,  # synthetic set in <run_dir>/data
                     "synthetic": {"num_records": 4 * batch, "resolution": 8 * latent, "shard_size": 64,
                                   "latent_dtype": "float16"}},
            "loss": {"ad_weight": 0.1, "ad_reading": "orthogonality", "ad_layers": "all"},
            "optim": {"ema_decay": 0.999}, "checkpoint": {"every": 0},
            "logging": {"tensorboard": False, "progress": False},
        })
        rss0 = _PeakRSS.rss()
        t0 = time.perf_counter()
        t = Trainer(cfg)
        build_s = time.perf_counter() - t0
        t.pipeline = t.make_pipeline()
        state = t.fresh_state()
        rss_model = _PeakRSS.rss()
        with _PeakRSS() as peak:
            t.compile()
            mem = t.compiled.memory_analysis()
            times = []
            for _ in range(steps):
                t1 = time.perf_counter()
                state, m = t.compiled(state, t.frozen, t.next_batch())
                loss = float(m["loss"])
                times.append(time.perf_counter() - t1)
        t.pipeline.close()
        return {"remat": remat, "latent": latent, "batch": batch, "build_s": build_s,
                "compile_s": t.compile_seconds, "step_s": times[-1], "first_step_s": times[0], "loss": loss,
                "xla_temp_gb": mem.temp_size_in_bytes / 2**30, "xla_args_gb": mem.argument_size_in_bytes / 2**30,
                "rss_model_gb": (rss_model - rss0) / 2**30, "rss_peak_gb": peak.peak / 2**30,
                "rss_peak_over_model_gb": (peak.peak - rss_model) / 2**30, "gflop": (t.step_flops or 0) / 1e9,
                "trainable": int(sum(v.size for v in t.world.params.values())),
                "frozen": int(sum(v.size for v in t.world.frozen.values()))}


def _table(rows: list[dict], cols: list[str]) -> str:
    def fmt(v):
        return f"{v:.3g}" if isinstance(v, float) else str(v)

    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    out += ["| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default="reduced", help="comma list of: reduced, sd15")
    p.add_argument("--steps", default="adapter,base",
                   help="comma list of: adapter (stage c, AD loss on: orthogonality reading), base, and for the cost "
                        "of each AD reading adapter_no_ad, adapter_map_overlap, adapter_across_setups (the PyTorch "
                        "reference of every adapter row: its step with the orthogonality reading)")
    p.add_argument("--latent", type=int, default=32)
    p.add_argument("--batch", default="1", help="batch sizes, comma list")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--clock", choices=("both", "wall", "cpu"), default="both",
                   help="wall: all CPUs, elapsed time; cpu: pinned to one CPU, CPU time; both (default): wall here, "
                        "then cpu in a pinned subprocess, one table")
    p.add_argument("--pin", action="store_true", help="run on one CPU (set automatically for the cpu clock)")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="PyTorch threads (wall clock)")
    p.add_argument("--quick", action="store_true", help="reduced config, 16x16 latents, batch 1, 2 repeats, wall")
    p.add_argument("--scaling", action="store_true", help="tiny config over 1/2/4/8 fake devices (subprocesses)")
    p.add_argument("--stage-c-sd15", action="store_true",
                   help="full SD1.5 stage-c step at batch 1, 64x64: compile time and memory, without and with remat "
                        "(each in its own subprocess)")
    p.add_argument("--_one", choices=["remat", "noremat"], help=argparse.SUPPRESS)
    p.add_argument("--json", help="also write the rows to this file")
    a = p.parse_args(argv)
    a.configs = [c for c in a.configs.split(",") if c]
    a.steps = [s for s in a.steps.split(",") if s]
    a.batch = [int(b) for b in a.batch.split(",") if b]
    bad = [c for c in a.configs if c not in CONFIGS] + [s for s in a.steps if s not in STEPS]
    if bad:
        p.error(f"unknown config / step {bad}; configs {sorted(CONFIGS)}, steps {list(STEPS)}")
    if a.quick:
        a.configs, a.latent, a.batch, a.repeats, a.clock = ["reduced"], 16, [1], 2, "wall"
    if a.clock == "cpu" and not a.pin:
        p.error("--clock cpu needs --pin (one CPU; CPU time of several threads counts their spin-waiting)")
    from facecrafter_jax.runtime import configure_cpu

    configure_cpu()  # the same XLA:CPU defaults as train.py (before JAX starts its CPU backend)
    rows = []
    if a._one:
        print("RESULT " + json.dumps(stage_c_sd15(a._one == "remat", latent=a.latent, batch=a.batch[0])), flush=True)
        return 0
    if a.stage_c_sd15:
        import subprocess

        for mode in ("noremat", "remat"):
            r = subprocess.run([sys.executable, __file__, "--_one", mode, "--latent", str(a.latent), "--batch",
                                str(a.batch[0])], capture_output=True, text=True)
            line = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
            if r.returncode != 0 or not line:
                print(f"{mode}: failed ({r.returncode})\n{r.stderr[-3000:]}", flush=True)
                continue
            rows.append(json.loads(line[0][len("RESULT "):]))
            print(_table(rows, ["remat", "latent", "batch", "compile_s", "first_step_s", "step_s", "gflop",
                                "xla_temp_gb", "xla_args_gb", "rss_model_gb", "rss_peak_gb", "rss_peak_over_model_gb",
                                "trainable", "frozen"]), flush=True)
    elif a.scaling:
        rows = scaling()
        print(_table(rows, ["devices", "mesh", "step_s", "wall_s"]))
    else:
        import jax
        import torch

        print(f"# jax {jax.__version__}, torch {torch.__version__}, CPUs usable {len(os.sched_getaffinity(0))}, "
              f"clock {a.clock}, load average {load_average()}, XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}",
              flush=True)
        wall, cpu = [], []
        if a.clock in ("both", "wall"):
            wall = bench_rows(argparse.Namespace(**{**vars(a), "clock": "wall"}))
        if a.clock == "cpu":
            cpu = bench_rows(a)
        elif a.clock == "both":
            with tempfile.TemporaryDirectory() as d:
                child = ["--configs", ",".join(a.configs), "--steps", ",".join(a.steps), "--latent", str(a.latent),
                         "--batch", ",".join(map(str, a.batch)), "--repeats", str(a.repeats)]
                cpu = run_pinned_child(__file__, child, str(Path(d) / "cpu.json"))
        rows = wall + cpu
        print(f"\n# load average at the end {load_average()}; wall = all {len(os.sched_getaffinity(0))} CPUs, "
              "CPU = process CPU time pinned to one CPU; ratios < 1: ours faster\n")
        print(combined_table(wall, cpu), flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
