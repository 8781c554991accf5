"""Train-step benchmark: our jitted FaceCrafter adapter-training step vs the equivalent PyTorch step.

Both sides train only the control adapters (token encoders + per-layer ``to_k_c``/``to_v_c``) on a
frozen UNet and CLIP text encoder, from the same architecture and the same weights (a random diffusers
UNet / transformers CLIP converted with ``facecrafter-convert from-diffusers``), batch and latent size:

* ours: ``facecrafter_jax.train.loop.Trainer`` (the real step: latents sampled from stored VAE moments,
  noise, timesteps, mixed conditioning, CLIP identity context, FaceCrafter forward + backward, AdamW with
  clipping), AOT-compiled, state donated. Run with the AD loss off (like-for-like) and on (extra row).
* PyTorch: diffusers ``UNet2DConditionModel`` with ``FaceCrafterAttnProcessor`` on every ``attn2`` and
  ``ControlTokenEncoder``s (``facecrafter_jax.torch_facecrafter``), ``requires_grad`` only on the adapters,
  CLIP forward under ``no_grad``, ``DDPMScheduler.add_noise``, MSE, ``clip_grad_norm_`` + ``torch.optim.AdamW``.

Timings interleave the two frameworks (median of ``--repeats``), fp32, after warm-up; ``--scaling`` times
the tiny config over 1/2/4/8 fake CPU devices (subprocesses running ``train.py``).

    .venv/bin/python bench/train.py --quick
    .venv/bin/python bench/train.py --configs reduced,sd15 --latent 32 --batch 1 --repeats 3
    .venv/bin/python bench/train.py --scaling
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
# Interleaving two frameworks in one process: OpenMP worker threads that spin after each parallel region
# (Intel OpenMP's default 200 ms block time) steal the cores from XLA's thread pool and vice versa. Make
# them sleep at once (set before torch is imported; an explicit environment setting wins).
os.environ.setdefault("KMP_BLOCKTIME", "0")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

CONFIGS = {
    # SD1.5's UNet structure at reduced width (the cross-attention width stays 768 = CLIP's).
    "reduced": dict(block_out_channels=[64, 128, 256, 256], attention_head_dim=8, norm_num_groups=32,
                    cross_attention_dim=768, clip_layers=2),
    "sd15": dict(block_out_channels=[320, 640, 1280, 1280], attention_head_dim=8, norm_num_groups=32,
                 cross_attention_dim=768, clip_layers=12),
}


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


def torch_step_factory(unet, text, fc_cfg: dict, batch: int, latent: int, seed: int = 0):
    """A PyTorch FaceCrafter adapter-training step (see the module docstring); returns ``step()``."""
    import torch
    from diffusers import DDPMScheduler

    from facecrafter_jax import tokens
    from facecrafter_jax.schedulers import SD15_SCHEDULER_CONFIG
    from facecrafter_jax.torch_facecrafter import (ControlTokenEncoder, FaceCrafterAttnProcessor,
                                                   FaceCrafterSelfAttnProcessor, encode_controls)

    g = torch.Generator().manual_seed(seed)
    unet.requires_grad_(False)
    text.requires_grad_(False)
    names = ("landmark", "emotion")
    dim = unet.config.cross_attention_dim
    procs = {}
    for pname, proc in unet.attn_processors.items():
        if pname.endswith("attn2.processor"):
            attn = unet.get_submodule(pname[: -len(".processor")])
            p = FaceCrafterAttnProcessor(attn.to_k.out_features, dim, names)
            with torch.no_grad():
                for n in names:
                    p.to_k_c[n].weight.copy_(attn.to_k.weight)
                    p.to_v_c[n].weight.copy_(attn.to_v.weight)
            procs[pname] = p
        else:
            procs[pname] = FaceCrafterSelfAttnProcessor()  # accepts (and ignores) the controls keyword
    adapters = [p for p in procs.values() if isinstance(p, torch.nn.Module)]
    unet.set_attn_processor(dict(procs))  # diffusers pops entries from the dict it is given
    encoders = torch.nn.ModuleDict({
        "landmark": ControlTokenEncoder("landmark", num_tokens=fc_cfg["landmark_tokens"],
                                        hidden_dim=fc_cfg["landmark_hidden_dim"], output_dim=dim),
        "emotion": ControlTokenEncoder("emotion", num_tokens=fc_cfg["emotion_tokens"],
                                       hidden_dim=fc_cfg["emotion_hidden_dim"], output_dim=dim)})
    params = list(encoders.parameters()) + [q for m in adapters for q in m.parameters()]
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
        loss = torch.nn.functional.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        return float(loss.detach())

    n_train = sum(p.numel() for p in params)
    return step, n_train


def build_ours(tmp: Path, unet, text, fc_cfg: dict, batch: int, latent: int, ad_weight: float, remat: bool = False):
    from facecrafter_jax.convert import load_text_encoder, load_unet
    from facecrafter_jax.pretrained import save_pretrained
    from facecrafter_jax.train.config import TrainConfig, from_dict
    from facecrafter_jax.train.loop import Trainer

    pre = tmp / "pretrained"
    if not (pre / "facecrafter.json").exists():
        unet.save_pretrained(str(tmp / "torch_unet"))
        text.save_pretrained(str(tmp / "torch_text"))
        save_pretrained(str(pre), unet=load_unet(str(tmp / "torch_unet")), text_encoder=load_text_encoder(str(tmp / "torch_text")))
    cfg = from_dict(TrainConfig, {
        "name": "bench", "run_dir": str(tmp / f"run_ad{ad_weight}_remat{remat}"), "steps": 1000,
        "model": {"pretrained": str(pre), "controls": ["landmark", "emotion"], "facecrafter": fc_cfg,
                  "remat": remat},
        "data": {"dir": "", "global_batch_size": batch, "device_prefetch": 1,  # synthetic set in <run_dir>/data
                 "synthetic": {"num_records": max(16, 4 * batch), "resolution": 8 * latent, "shard_size": 64,
                               "latent_dtype": "float16"}},
        "loss": {"ad_weight": ad_weight, "ad_reading": "orthogonality", "ad_layers": "all"},
        "optim": {"lr": 1e-4, "warmup_steps": 0, "schedule": "constant"},
        "checkpoint": {"every": 0}, "logging": {"tensorboard": False, "progress": False},
    })
    t = Trainer(cfg)
    t.pipeline = t.make_pipeline()
    t.compile()
    state = t.fresh_state()
    holder = {"state": state}

    def step():
        holder["state"], m = t.compiled(holder["state"], t.frozen, t.next_batch())
        return float(m["loss"])  # blocks until done

    return t, step


def _median_times(fns: dict, repeats: int) -> dict:
    times = {k: [] for k in fns}
    for _ in range(repeats):  # interleaved
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def bench_config(name: str, latent: int, batch: int, repeats: int, threads: int, with_ad: bool = True) -> list[dict]:
    import jax
    import torch

    torch.set_num_threads(threads)
    spec = CONFIGS[name]
    fc_cfg = {"landmark_tokens": 4, "emotion_tokens": 4, "landmark_hidden_dim": 1024, "emotion_hidden_dim": 512}
    rows = []
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        unet, text = build_torch(spec, latent)
        t_ours, ours = build_ours(tmp, unet, text, fc_cfg, batch, latent, ad_weight=0.0)
        compile_s = t_ours.compile_seconds
        flops = t_ours.step_flops
        n_ours = sum(v.size for v in t_ours.world.params.values())
        trainers = [t_ours]
        fns = {"ours": ours}
        if with_ad:  # a second Trainer (another copy of the frozen weights): skipped for sd15 by default
            t_ad, ours_ad = build_ours(tmp, unet, text, fc_cfg, batch, latent, ad_weight=0.1)
            trainers.append(t_ad)
            fns["ours_ad"] = ours_ad
        torch_step, n_torch = torch_step_factory(unet, text, fc_cfg, batch, latent)
        fns["torch"] = torch_step
        for _ in range(3):  # warm-up (PyTorch/oneDNN needs a few calls to reach its steady state)
            for f in fns.values():
                f()
        med = _median_times(fns, repeats)
        rows.append({"config": name, "latent": latent, "batch": batch, "ours_s": med["ours"], "torch_s": med["torch"],
                     "ratio": med["ours"] / med["torch"], "ours_ad_s": med.get("ours_ad", float("nan")),
                     "compile_s": compile_s,
                     "compile_ad_s": trainers[1].compile_seconds if with_ad else float("nan"),
                     "gflop": (flops or 0) / 1e9, "trainable_ours": n_ours, "trainable_torch": n_torch,
                     "device": str(jax.devices()[0])})
        for t in trainers:
            t.pipeline.close()
    return rows


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
    p.add_argument("--configs", default="reduced")
    p.add_argument("--latent", type=int, default=32)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--quick", action="store_true", help="reduced config, 16x16 latents, batch 1, 2 repeats")
    p.add_argument("--sd15-ad", action="store_true", help="also time the AD-loss step on sd15 (more memory)")
    p.add_argument("--scaling", action="store_true", help="tiny config over 1/2/4/8 fake devices (subprocesses)")
    p.add_argument("--stage-c-sd15", action="store_true",
                   help="full SD1.5 stage-c step at batch 1, 64x64: compile time and memory, without and with remat "
                        "(each in its own subprocess)")
    p.add_argument("--_one", choices=["remat", "noremat"], help=argparse.SUPPRESS)
    p.add_argument("--json", help="also write the rows to this file")
    a = p.parse_args(argv)
    from facecrafter_jax.runtime import configure_cpu

    configure_cpu()  # the same XLA:CPU defaults as train.py (before JAX starts its CPU backend)
    rows = []
    if a._one:
        print("RESULT " + json.dumps(stage_c_sd15(a._one == "remat", latent=a.latent, batch=a.batch)), flush=True)
        return 0
    if a.stage_c_sd15:
        import subprocess

        for mode in ("noremat", "remat"):
            r = subprocess.run([sys.executable, __file__, "--_one", mode, "--latent", str(a.latent), "--batch",
                                str(a.batch)], capture_output=True, text=True)
            line = [l for l in r.stdout.splitlines() if l.startswith("RESULT ")]
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
        configs = ["reduced"] if a.quick else a.configs.split(",")
        latent, batch, repeats = (16, 1, 2) if a.quick else (a.latent, a.batch, a.repeats)
        for name in configs:
            rows += bench_config(name, latent, batch, repeats, a.threads, with_ad=(name != "sd15") or a.sd15_ad)
            print(_table(rows, ["config", "latent", "batch", "ours_s", "torch_s", "ratio", "ours_ad_s", "compile_s",
                                "compile_ad_s", "gflop", "trainable_ours", "trainable_torch"]), flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
