"""The train step: pure functions of (train state, frozen parameters, batch).

One step, for a global batch of records (``arcface``, ``landmarks``, ``emotion``, ``latent_moments``,
``sample_id``)::

    key_i      = fold_in(fold_in(fold_in(run_key, step), sample_id_i[0]), sample_id_i[1])   per sample
    x0_i       = VAE posterior sample from the stored moments (scaled)                        key_i / 0
    noise_i    ~ N(0, I)                                                                     key_i / 1
    t_i        ~ U{0, ..., T-1}                                                              key_i / 2
    conditions = mixed-conditioning draw (which controls are on, identity dropped)            key_i / 3
    ctx_i      = CLIP(arcface_i) (Arc2Face identity context), or the empty-prompt context if dropped
    pred       = FaceCrafter(add_noise(x0, noise, t), t, ctx, controls)
    loss       = mean_i w_i * mean((pred_i - target_i)^2)  +  ad_weight * AD(maps)
    params     = AdamW(clip(grad_params loss))       (only the AdapterParam parameters)

The ``base`` stage (training Arc2Face itself) has no controls: ``conditions`` only drops the identity
(probability ``conditioning.all_null``, default 0.1), the prediction is the bare UNet's, and UNet plus
text encoder are trained (so the identity context is computed inside the differentiated function).

Randomness depends on (run seed, step, record id) only, never on a sample's position in the batch, so
the same global batch gives the same losses on any mesh / process layout (up to the order of float
sums) and a resumed run repeats an uninterrupted one bit for bit. ``sample_id`` is a 64-bit hash of the
record's ``image_id`` (:func:`sample_ids`), computed on the host.
"""

from __future__ import annotations

import hashlib
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax

from facecrafter_jax import schedulers as S
from facecrafter_jax import tokens as _tokens
from facecrafter_jax.models.vae import sample_latents_from_moments

from .config import TrainConfig
from .state import World

__all__ = ["sample_ids", "make_noise_schedule", "per_sample_keys", "conditioning_config", "ad_loss_config",
           "draw_conditioning", "make_train_step", "BATCH_FIELDS",
           "BASE_ID_DROPOUT", "base_id_dropout", "skip_if_nonfinite"]

BATCH_FIELDS = ("image_id", "arcface", "landmarks", "emotion", "latent_moments")
"""Record fields the trainer reads (``image_id`` becomes ``sample_id`` on the host)."""


def sample_ids(image_ids) -> np.ndarray:
    """``[B]`` image ids (str) -> ``[B, 2]`` uint32: the first 8 bytes of their BLAKE2b digest."""
    out = np.empty((len(image_ids), 2), np.uint32)
    for i, s in enumerate(image_ids):
        d = hashlib.blake2b(str(s).encode("utf-8"), digest_size=8).digest()
        out[i] = np.frombuffer(d, dtype="<u4")
    return out


def make_noise_schedule(cfg: TrainConfig) -> S.NoiseSchedule:
    """SD1.5's training schedule (scaled_linear 0.00085..0.012, 1000 steps) with ``loss.prediction_type``;
    ``loss.scheduler`` may override schedule keys (diffusers names)."""
    if cfg.loss.prediction_type not in ("epsilon", "v_prediction"):
        raise ValueError(f"loss.prediction_type must be 'epsilon' or 'v_prediction', got {cfg.loss.prediction_type!r}")
    base = {**S.SD15_SCHEDULER_CONFIG, **dict(cfg.loss.scheduler)}
    return S.NoiseSchedule.from_config(base, prediction_type=cfg.loss.prediction_type)


def per_sample_keys(rng_data: jax.Array, step: jax.Array, sample_id: jax.Array) -> jax.Array:
    """``[B]`` typed keys: the run key folded with the step and each sample's 64-bit id."""
    step_key = jax.random.fold_in(jax.random.wrap_key_data(rng_data), step)
    return jax.vmap(lambda s: jax.random.fold_in(jax.random.fold_in(step_key, s[0]), s[1]))(sample_id)


def _ema_decay(decay: float, step: jax.Array) -> jax.Array:
    """diffusers ``EMAModel`` warm-up: ``min(decay, (1 + step) / (10 + step))``."""
    step = step.astype(jnp.float32)
    return jnp.minimum(jnp.float32(decay), (1.0 + step) / (10.0 + step))


def conditioning_config(controls: tuple[str, ...], overrides: Mapping[str, Any]):
    """The mixed-conditioning config of a run (``facecrafter_jax.conditioning.MixedConditioningConfig``).

    A section without setup probabilities takes the defaults: every combination for the joint stage,
    ``MixedConditioningConfig.single(control, all_null=..., absent=...)`` for a single-control stage (ID + control,
    ID-only, control without identity, all-null). Otherwise the section gives the setup probabilities (keys of
    ``MixedConditioningConfig``; setups it leaves out get 0), and ``controls`` always follows the model.
    """
    from facecrafter_jax import conditioning as C

    d = dict(overrides)
    if "controls" in d and tuple(d["controls"]) != tuple(controls):
        raise ValueError(f"conditioning.controls {list(d['controls'])} differs from model.controls {list(controls)}")
    d.pop("controls", None)
    if len(controls) == 1 and set(d) <= {"all_null", "absent"}:
        return C.MixedConditioningConfig.single(controls[0], **d)
    return C.MixedConditioningConfig.from_dict({**d, "controls": tuple(controls)})


def ad_loss_config(cfg: TrainConfig):
    """``facecrafter_jax.losses.ADLossConfig`` of the run (weight 1: the step applies ``loss.ad_weight``)."""
    from facecrafter_jax import losses as L

    layers = cfg.loss.ad_layers if cfg.loss.ad_layers == "all" else tuple(int(i) for i in cfg.loss.ad_layers)
    return L.ADLossConfig.from_dict({"kind": cfg.loss.ad_reading, "weight": 1.0, "layers": layers,
                                     "options": dict(cfg.loss.ad_options)})


BASE_ID_DROPOUT = 0.1
"""Default probability that the base stage replaces a sample's identity by the empty prompt."""


def base_id_dropout(overrides: Mapping[str, Any]) -> float:
    """The base stage's identity-dropout probability: ``conditioning.all_null`` (the only key it takes)."""
    unknown = sorted(set(overrides) - {"all_null"})
    if unknown:
        raise ValueError(f"the base stage takes only conditioning.all_null (identity dropout), got {unknown}")
    p = float(overrides.get("all_null", BASE_ID_DROPOUT))
    if not 0.0 <= p < 1.0:
        raise ValueError(f"conditioning.all_null must be in [0, 1), got {p}")
    return p


_AD_CAPTURE = {"orthogonality": ("out",), "map_overlap": ("probs",), "across_setups": ("out",)}


def skip_if_nonfinite(loss: jax.Array, grad_norm: jax.Array, new: dict, old: dict) -> tuple[dict, jax.Array]:
    """Non-finite guard (the tail of the step): if ``loss`` or ``grad_norm`` is not finite, the new state keeps
    ``old``'s parameters, optimiser state and EMA (only ``step`` advances: the batch is consumed). Returns the
    state and ``nonfinite`` (float32 1.0 / 0.0, the ``nonfinite`` metric the loop counts). A finite step is
    returned bit for bit (``where(True, new, old) == new``)."""
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    keep = {k: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new[k], old[k])
            for k in ("params", "opt_state", "ema") if k in new}
    return {**new, **keep}, 1.0 - finite.astype(jnp.float32)


def draw_conditioning(keys: jax.Array, config):
    """One mixed-conditioning draw per sample key (``[B]`` keys -> ``ConditioningSample`` with ``[B]`` leaves)."""
    from facecrafter_jax import conditioning as C

    draw = jax.vmap(lambda k: C.sample_conditioning(k, 1, config))(keys)
    return jax.tree.map(lambda x: x[:, 0], draw)


def make_train_step(world: World, cfg: TrainConfig, tx: optax.GradientTransformation,
                    lr_schedule: Callable[[jax.Array], jax.Array]) -> Callable:
    """``train_step(state, frozen, batch) -> (state, metrics)`` for this model and config (pure; jit it)."""
    from facecrafter_jax import conditioning as C
    from facecrafter_jax import losses as L

    schedule = make_noise_schedule(cfg)
    controls = world.controls
    if controls:
        cond_cfg = conditioning_config(controls, cfg.conditioning)
    else:  # base stage: only the identity is dropped (to the empty prompt), for classifier-free guidance
        p_drop = base_id_dropout(cfg.conditioning)
    ad_weight = float(cfg.loss.ad_weight)
    if ad_weight > 0 and not controls:
        raise ValueError("loss.ad_weight > 0 needs control modules (the base stage has none)")
    if ad_weight < 0:
        raise ValueError(f"loss.ad_weight must be >= 0, got {ad_weight}")
    ad_cfg = ad_loss_config(cfg) if ad_weight > 0 else None
    capture = _AD_CAPTURE.get(cfg.loss.ad_reading, ("probs", "out"))
    paired = ad_cfg is not None and ad_cfg.kind in L.PAIRED_READINGS
    gamma = cfg.loss.min_snr_gamma
    ema_decay = cfg.optim.ema_decay
    scaling, shift = world.vae_scaling_factor, world.vae_shift_factor
    empty_ids = np.asarray(_tokens.EMPTY_PROMPT_IDS)[None]

    def train_step(state: dict, frozen: dict, batch: Mapping[str, jax.Array]):
        moments = batch["latent_moments"]
        b = moments.shape[0]
        keys = per_sample_keys(state["rng"], state["step"], batch["sample_id"])
        sub = jax.vmap(lambda k: jax.random.split(k, 4))(keys)
        x0 = jax.vmap(lambda m, k: sample_latents_from_moments(m, k, scaling_factor=scaling, shift_factor=shift))(
            moments, sub[:, 0])
        noise = jax.vmap(lambda k: jax.random.normal(k, x0.shape[1:], jnp.float32))(sub[:, 1])
        t = jax.vmap(lambda k: jax.random.randint(k, (), 0, schedule.num_train_timesteps))(sub[:, 2])
        if controls:
            cond = draw_conditioning(sub[:, 3], cond_cfg)
            id_null = cond.id_null
        else:
            id_null = jax.vmap(lambda k: jax.random.bernoulli(k, p_drop))(sub[:, 3]).astype(jnp.float32)
        noisy = S.add_noise(schedule, x0, noise, t)
        target = S.training_target(schedule, x0, noise, t)
        weight = S.min_snr_weight(schedule, t, gamma) if gamma is not None else jnp.ones((b,), jnp.float32)

        def loss_fn(params):
            model = world.merge(params, frozen)
            # CLIP turns the stored ArcFace vectors into the Arc2Face identity context (frozen in the
            # control stages, trained in the base stage).
            text = model.text_encoder
            id_ctx, empty_ctx = text.encode_id(batch["arcface"]), text.encode_ids(empty_ids)
            ad = jnp.zeros((), jnp.float32)
            if controls:
                raw = {"landmark": batch["landmarks"], "emotion": batch["emotion"]}
                raw = {c: raw[c] for c in controls}
                if paired:
                    # reading C: the same (noisy latent, timestep, identity) under the sample's own setup and with
                    # every control on its null tokens, stacked into one forward of 2B rows
                    both = jax.tree.map(lambda a, r: jnp.concatenate([a, r]), cond,
                                        C.without_controls(cond, cond_cfg.absent))
                    condition = C.draw_condition(model.facecrafter, both, jnp.concatenate([id_ctx, id_ctx]),
                                                 empty_ctx, {c: jnp.concatenate([x, x]) for c, x in raw.items()})
                    pred2, maps = model.facecrafter.predict_with_maps(
                        jnp.concatenate([noisy, noisy]), jnp.concatenate([t, t]), condition, capture=capture)
                    pred = pred2[:b]
                    ad = L.ad_loss(ad_cfg, maps, C.active_controls(cond),
                                   weights={c: w for c, (_, w) in condition.controls.items()})
                else:
                    condition = C.draw_condition(model.facecrafter, cond, id_ctx, empty_ctx, raw)
                    if ad_cfg is not None:
                        pred, maps = model.facecrafter.predict_with_maps(noisy, t, condition, capture=capture)
                        ad = L.ad_loss(ad_cfg, maps, C.active_controls(cond))
                    else:
                        pred = model.facecrafter.predict(noisy, t, condition)
            else:
                context = jnp.where(id_null[:, None, None] > 0, jnp.broadcast_to(empty_ctx, id_ctx.shape), id_ctx)
                pred = model.unet(noisy, t, context)
            mse = jnp.mean(jnp.square(pred.astype(jnp.float32) - target.astype(jnp.float32)), axis=(1, 2, 3))
            diffusion = jnp.mean(weight * mse)
            return diffusion + ad_weight * ad, {"diffusion_loss": diffusion, "ad_loss": ad}

        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        new = {**state, "step": state["step"] + 1, "params": params, "opt_state": opt_state}
        if ema_decay is not None:
            d = _ema_decay(ema_decay, state["step"])
            new["ema"] = jax.tree.map(lambda e, p: d * e + (1.0 - d) * p, state["ema"], params)
        new, nonfinite = skip_if_nonfinite(loss, grad_norm, new, state)
        metrics = {"loss": loss, **aux, "grad_norm": grad_norm, "lr": lr_schedule(state["step"]),
                   "timestep_mean": jnp.mean(t.astype(jnp.float32)),
                   "id_null_frac": jnp.mean(id_null), "nonfinite": nonfinite}
        for c in controls:
            metrics[f"{c}_active_frac"] = jnp.mean(C.active_controls(cond)[c])
        return new, metrics

    return train_step
