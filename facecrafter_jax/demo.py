"""End-to-end demo of the backbone, runnable on a fresh machine with no weights and no downloads.

    python -m facecrafter_jax.demo [--out runs/demo] [--steps 25] [--num-images 4] [--seed 0]

1. creates tiny random Arc2Face-shaped PyTorch models (diffusers UNet + VAE, transformers CLIP text
   encoder) and saves them with ``save_pretrained``, exactly like the real Arc2Face folders;
2. converts them with ``facecrafter-convert from-diffusers`` into our Flax checkpoint folder;
3. samples identities with our jitted Arc2Face pipeline (ArcFace vector -> CLIP identity context ->
   25-step DPM-Solver++ with guidance 3.0 -> VAE decode) and with diffusers' ``StableDiffusionPipeline``
   on the same weights and starting noise, and reports the difference;
4. writes ``OUT/grid.png`` (top row ours, bottom row diffusers) and ``OUT/demo.json``.

The weights are random, so the images are structured noise: the point is that every stage runs and
that the two implementations agree. The toy FaceCrafter world replaces this as the main job.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np


def run(out: str, *, steps: int = 25, num_images: int = 4, seed: int = 0, guidance: float = 3.0) -> dict:
    import torch
    from PIL import Image
    from tqdm import tqdm

    from facecrafter_jax import tokens
    from facecrafter_jax.image_grid import image_grid
    from facecrafter_jax.convert.cli import main as convert_main
    from facecrafter_jax.pretrained import load_pretrained
    from facecrafter_jax.sampling import Arc2FacePipeline
    from facecrafter_jax.schedulers import SD15_SCHEDULER_CONFIG
    from facecrafter_jax.testing import arc2face_context_torch, save_tiny_arc2face

    os.makedirs(out, exist_ok=True)
    stages = tqdm(total=4, desc="demo", unit="stage")
    timings = {}

    t0 = time.perf_counter()
    import pathlib

    torch_dir = pathlib.Path(out) / "torch"
    models = save_tiny_arc2face(torch_dir, seed=seed)
    timings["make_pytorch_models_s"] = time.perf_counter() - t0
    stages.update(1)

    t0 = time.perf_counter()
    flax_dir = os.path.join(out, "flax")
    rc = convert_main(["from-diffusers", "--unet", str(torch_dir / "unet"), "--text-encoder", str(torch_dir / "text_encoder"),
                       "--vae", str(torch_dir / "vae"), "--out", flax_dir])
    if rc != 0:
        raise RuntimeError("conversion failed")
    pre = load_pretrained(flax_dir)
    timings["convert_s"] = time.perf_counter() - t0
    stages.update(1)

    id_dim = min(512, pre.text_encoder.config.hidden_size)
    rng = np.random.default_rng(seed)
    arcface = rng.standard_normal((num_images, id_dim)).astype(np.float32)
    arcface /= np.linalg.norm(arcface, axis=1, keepdims=True)

    t0 = time.perf_counter()
    pipe = Arc2FacePipeline(pre.unet, pre.text_encoder, pre.vae)
    ours = pipe(arcface, num_steps=steps, guidance_scale=guidance, seed=seed, output_type="uint8")
    timings["ours_first_call_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    ours = pipe(arcface, num_steps=steps, guidance_scale=guidance, seed=seed, output_type="uint8")
    timings["ours_s"] = time.perf_counter() - t0
    stages.update(1)

    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    sd = StableDiffusionPipeline(vae=models["vae"], text_encoder=models["text_encoder"], tokenizer=None, unet=models["unet"],
                                 scheduler=DPMSolverMultistepScheduler.from_config(SD15_SCHEDULER_CONFIG),
                                 safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    sd.set_progress_bar_config(disable=True)
    prompt_embeds = arc2face_context_torch(models["text_encoder"], torch.from_numpy(arcface))
    with torch.no_grad():
        empty = models["text_encoder"](torch.from_numpy(tokens.EMPTY_PROMPT_IDS[None].astype(np.int64))).last_hidden_state
        noise = torch.from_numpy(np.asarray(ours.noise).transpose(0, 3, 1, 2).copy())
        t0 = time.perf_counter()
        ref_latents = sd(prompt_embeds=prompt_embeds, negative_prompt_embeds=empty.repeat(num_images, 1, 1), latents=noise.clone(),
                         num_inference_steps=steps, guidance_scale=guidance, output_type="latent").images
        timings["diffusers_s"] = time.perf_counter() - t0
        ref_images = sd.vae.decode(ref_latents / sd.vae.config.scaling_factor).sample
    ref_uint8 = np.clip((ref_images.numpy().transpose(0, 2, 3, 1) + 1) * 127.5 + 0.5, 0, 255).astype(np.uint8)
    latent_err = float(np.abs(np.asarray(ours.latents) - ref_latents.numpy().transpose(0, 2, 3, 1)).max())
    pixel_err = int(np.abs(np.asarray(ours.images).astype(int) - ref_uint8.astype(int)).max())
    stages.update(1)
    stages.close()

    scale = max(1, 128 // ours.images.shape[1])
    grid = image_grid(np.stack([np.asarray(ours.images), ref_uint8]))
    Image.fromarray(grid).resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST).save(os.path.join(out, "grid.png"))
    summary = {
        "steps": steps, "guidance": guidance, "num_images": num_images, "seed": seed, "scheduler": "dpm++2m",
        "image_size": list(ours.images.shape[1:3]),
        "max_abs_latent_diff_vs_diffusers": latent_err, "max_pixel_diff_vs_diffusers": pixel_err,
        "timings": {k: round(v, 3) for k, v in timings.items()},
        "outputs": {"grid": os.path.join(out, "grid.png"), "flax_checkpoint": flax_dir, "pytorch_models": str(torch_dir)},
    }
    with open(os.path.join(out, "demo.json"), "w") as f:
        json.dump(summary, f, indent=2)
    return summary


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m facecrafter_jax.demo", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--out", default="runs/demo", help="output folder (default: runs/demo)")
    p.add_argument("--steps", type=int, default=25, help="DPM-Solver++ steps (default 25, Arc2Face's)")
    p.add_argument("--num-images", type=int, default=4)
    p.add_argument("--guidance", type=float, default=3.0, help="classifier-free guidance scale (default 3.0)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.steps < 1 or args.num_images < 1:
        p.error("--steps and --num-images must be >= 1")
    s = run(args.out, steps=args.steps, num_images=args.num_images, seed=args.seed, guidance=args.guidance)
    print(json.dumps(s, indent=2))
    ok = s["max_abs_latent_diff_vs_diffusers"] < 1e-3
    print(("OK: " if ok else "MISMATCH: ") + f"ours vs diffusers max latent diff {s['max_abs_latent_diff_vs_diffusers']:.2e}, "
          f"max pixel diff {s['max_pixel_diff_vs_diffusers']}; grid at {s['outputs']['grid']}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
