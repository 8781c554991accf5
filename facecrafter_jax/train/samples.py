"""Periodic sample grids during training (``sample.every > 0``).

Rows: the first ``sample.num_identities`` records of the dataset (storage order, so the same faces for
the whole run and across resumes). Columns: one per conditioning setup the model has, in order
``ID``, ``ID+LMK``, ``ID+EMO``, ``ID+LMK+EMO`` (those whose controls exist), each with the record's own
landmarks / emotion. Every image starts from the same seeded noise per row
(:func:`facecrafter_jax.sampling.initial_noise`), so columns differ only by the conditions.
Sampling: ``sample.scheduler`` with ``sample.num_steps`` steps and classifier-free guidance
``sample.guidance_scale`` against the null condition (empty-prompt identity, every control on its null tokens);
a column's absent controls are their null tokens too. The conditions come from
:func:`facecrafter_jax.conditioning.setup_conditions`, as in the samplers.
The trained parameters used are the EMA copy when the run keeps one.

Written to ``<run_dir>/samples/step_XXXXXXX.png`` (and TensorBoard). Without a VAE in the model config
the grid shows the first three latent channels, min-max normalised per image.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

__all__ = ["sample_setups", "fixed_conditions", "generate", "write_sample_grid"]


def sample_setups(controls) -> list[tuple[str, tuple[str, ...]]]:
    """``[(label, active controls)]`` for the grid columns."""
    out = [("ID", ())]
    if "landmark" in controls:
        out.append(("ID+LMK", ("landmark",)))
    if "emotion" in controls:
        out.append(("ID+EMO", ("emotion",)))
    if "landmark" in controls and "emotion" in controls:
        out.append(("ID+LMK+EMO", ("landmark", "emotion")))
    return out


def fixed_conditions(data_dir, num: int) -> dict[str, np.ndarray]:
    """The first ``num`` records (arcface, landmarks, emotion) in storage order."""
    from facecrafter_jax.data import iter_records

    rows = []
    for rec in iter_records(data_dir):
        rows.append(rec)
        if len(rows) == num:
            break
    if not rows:
        raise ValueError(f"{data_dir} has no records to sample from")
    return {k: np.stack([r[k] for r in rows]).astype(np.float32) for k in ("arcface", "landmarks", "emotion")}


def generate(trainer, params, conds: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Final latents ``[rows, cols, h, w, 4]``, images ``[rows, cols, H, W, 3]`` in [0, 1] (or latent
    previews without a VAE) and the column labels."""
    import jax
    import jax.numpy as jnp

    from facecrafter_jax import conditioning as C
    from facecrafter_jax import sampling as SP
    from facecrafter_jax import tokens as _tokens

    cfg = trainer.cfg
    world = trainer.world
    controls = world.controls
    setups = sample_setups(controls)
    rows = conds["arcface"].shape[0]
    lat = _latent_hw(trainer)
    plan = SP.make_plan(cfg.sample.scheduler, cfg.sample.num_steps)
    noise = SP.initial_noise(cfg.sample.seed, rows, lat)

    def program(params, frozen, arcface, landmarks, emotion, noise):
        model = world.merge(params, frozen)
        text = model.text_encoder
        ctx = text.encode_id(arcface)
        empty = text.encode_ids(np.asarray(_tokens.EMPTY_PROMPT_IDS)[None])
        inputs = {"landmark": landmarks, "emotion": emotion}
        outs = []
        for _, active in setups:
            if controls:
                conds = C.setup_conditions(model.denoiser, [C.Setup(identity=False), C.Setup(controls=active)], ctx,
                                           empty, inputs={c: inputs[c] for c in active})
                model_fn = model.denoiser.predict
            else:
                conds, model_fn = [empty, ctx], model.denoiser
            outs.append(SP.sample_latents(model_fn, plan, noise, conds, [cfg.sample.guidance_scale]))
        return jnp.stack(outs, axis=1)  # [rows, cols, h, w, 4]

    # Replicated output: every process can read it (the parameters may be sharded across hosts).
    latents = jax.jit(program, out_shardings=trainer.replicated)(
        params, trainer.frozen, conds["arcface"], conds["landmarks"], conds["emotion"], noise)
    latents = np.asarray(latents.addressable_data(0))
    vae = world.vae
    if vae is not None:
        flat = latents.reshape((-1,) + latents.shape[2:])
        imgs = np.asarray(jax.jit(lambda z: jnp.clip(vae.decode(z) / 2 + 0.5, 0, 1))(flat))
        images = imgs.reshape(latents.shape[:2] + imgs.shape[1:])
    else:
        x = latents[..., :3]
        lo = x.min(axis=(2, 3, 4), keepdims=True)
        hi = x.max(axis=(2, 3, 4), keepdims=True)
        images = (x - lo) / np.maximum(hi - lo, 1e-6)
    return latents, images, [label for label, _ in setups]


def _latent_hw(trainer) -> tuple[int, int, int]:
    from facecrafter_jax.data import records as R

    info = R.read_dataset_info(trainer.data_dir)
    s = int(info.get("latent_side") or R.latent_side(info["resolution"]))
    return (s, s, 4)


def write_sample_grid(trainer, step: int, logger) -> Path | None:
    """Generate and write the grid for ``step`` (all processes compute; the primary writes)."""
    from PIL import Image

    from facecrafter_jax.image_grid import image_grid

    if not hasattr(trainer, "_sample_conds"):
        trainer._sample_conds = fixed_conditions(trainer.data_dir, trainer.cfg.sample.num_identities)
    params = trainer.state["ema"] if trainer.state["ema"] else trainer.state["params"]
    _, images, labels = generate(trainer, params, trainer._sample_conds)
    if not trainer.primary:
        return None
    grid = image_grid(images)
    out = Path(trainer.run_dir) / "samples"
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"step_{step:07d}.png"
    Image.fromarray(grid).save(path)
    logger.image("samples/" + "|".join(labels), grid, step)
    return path
