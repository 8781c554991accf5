"""Does a trained control branch carry information? The denoising loss with the control vs with its null tokens.

Samples can hide a weak control (an under-trained base renders neither pose nor emotion legibly), so the
toy report also measures the control where it is trained: the epsilon-prediction loss on held-out renders
at fixed noise levels, for every control of a model, with

    id_only   the identity alone with the control branches switched off: exactly the base UNet (a model's
              default ID-only, every control on its null tokens, is ``null`` below for a one-control model)
    with      identity + the control's real value
    null      identity + the control's null tokens (all-zero raw input; what training uses for "dropped")

and ``gain = (null - with) / null``: the fraction of the loss the control's content removes. A branch that
ignores its input has gain 0; a zero-initialised branch (``adapter_value_init: zeros``) before training
has ``with == null == id_only`` exactly. Same images, noise and timesteps for every model (seeded).

``control_probe(model, text_encoder, vae, images, features, controls=("landmark",))`` -> dict.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

__all__ = ["PROBE_TIMESTEPS", "control_probe", "probe_table"]

PROBE_TIMESTEPS = (100, 300, 500, 700, 900)
_FIELD = {"landmark": "landmarks", "emotion": "emotion"}  # control -> record field = FaceCrafter keyword


@nnx.jit(static_argnames=("kwarg",))
def _loss(model, xt, t, ctx, noise, value, kwarg: str | None):
    # kwarg None: the identity alone with every control branch switched off, i.e. exactly the base UNet (the
    # model's default ID-only, all controls on their null tokens, equals ``null`` of a one-control model)
    eps = model.unet(xt, t, ctx) if kwarg is None else model(xt, t, ctx, **{kwarg: value})
    return jnp.mean(jnp.square(eps.astype(jnp.float32) - noise), axis=(1, 2, 3))


def control_probe(model, text_encoder, vae, images: np.ndarray, features: Mapping[str, np.ndarray], *,
                  controls: Sequence[str], timesteps: Sequence[int] = PROBE_TIMESTEPS, seed: int = 0,
                  batch_size: int = 32) -> dict:
    """Per-timestep mean losses ``id_only`` and, per control, ``with`` / ``null`` / ``gain`` (see the module doc).

    ``model``: a FaceCrafter (``model(x, t, ctx, landmarks=..., emotion=...)``); ``images`` uint8 [N, R, R, 3];
    ``features``: ``arcface`` [N, 512] and the controls' record fields (``landmarks`` [N, 478, 3], ``emotion``
    [N, 10]). Noise levels follow SD1.5's training schedule; noise for timestep t is drawn from ``(seed, t)``.
    """
    from facecrafter_jax import schedulers as S

    unknown = [c for c in controls if c not in _FIELD]
    if unknown:
        raise ValueError(f"control_probe: unknown control(s) {unknown}; known: {sorted(_FIELD)}")
    images = np.asarray(images)
    if images.ndim != 4 or images.dtype != np.uint8:
        raise ValueError(f"images must be uint8 [N, R, R, 3], got {images.dtype} {images.shape}")
    missing = [k for k in ["arcface"] + [_FIELD[c] for c in controls] if k not in features]
    if missing:
        raise ValueError(f"control_probe: features lack {missing}")
    n = len(images)
    schedule = S.NoiseSchedule.from_config(S.SD15_SCHEDULER_CONFIG)
    x0 = np.concatenate([np.asarray(vae.encode(jnp.asarray(images[i:i + batch_size], jnp.float32) / 127.5 - 1.0))
                         for i in range(0, n, batch_size)])
    ctx = np.concatenate([np.asarray(text_encoder.encode_id(jnp.asarray(features["arcface"][i:i + batch_size])))
                          for i in range(0, n, batch_size)])
    out: dict = {"timesteps": [int(t) for t in timesteps], "id_only": [],
                 **{c: {"with": [], "null": [], "gain": []} for c in controls}}
    for t in timesteps:
        noise = np.asarray(jax.random.normal(jax.random.key(seed * 100003 + int(t)), x0.shape, jnp.float32))
        tt = jnp.full((n,), int(t), jnp.int32)
        xt = np.asarray(S.add_noise(schedule, jnp.asarray(x0), jnp.asarray(noise), tt))

        def mean_loss(kwarg, value):
            losses = []
            for i in range(0, n, batch_size):
                sl = slice(i, i + batch_size)
                v = None if value is None else jnp.asarray(value[sl], jnp.float32)
                losses.append(np.asarray(_loss(model, jnp.asarray(xt[sl]), tt[sl], jnp.asarray(ctx[sl]),
                                               jnp.asarray(noise[sl]), v, kwarg)))
            return float(np.mean(np.concatenate(losses)))

        out["id_only"].append(mean_loss(None, None))
        for c in controls:
            value = np.asarray(features[_FIELD[c]], np.float32)
            w, z = mean_loss(_FIELD[c], value), mean_loss(_FIELD[c], np.zeros_like(value))
            out[c]["with"].append(w)
            out[c]["null"].append(z)
            out[c]["gain"].append((z - w) / z if z > 0 else 0.0)
    return out


def probe_table(probes: Mapping[str, dict]) -> str:
    """Markdown: one row per (model, control), the gain in % at each timestep, then id_only / with / null at the
    middle timestep."""
    if not probes:
        return ""
    ts = next(iter(probes.values()))["timesteps"]
    mid = len(ts) // 2
    head = ("| model | control | " + " | ".join(f"gain % t={t}" for t in ts)
            + f" | loss t={ts[mid]}: ID only / with / null |")
    lines = [head, "|---|---|" + "---:|" * len(ts) + "---|"]
    for name, pr in probes.items():
        for c in ("landmark", "emotion"):
            if c not in pr:
                continue
            gains = " | ".join(f"{100 * g:.1f}" for g in pr[c]["gain"])
            lines.append(f"| {name} | {c} | {gains} | {pr['id_only'][mid]:.4f} / {pr[c]['with'][mid]:.4f} / "
                         f"{pr[c]['null'][mid]:.4f} |")
    return "\n".join(lines)
