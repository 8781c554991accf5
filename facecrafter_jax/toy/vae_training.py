"""Train the toy pipeline's VAE (a small diffusers-compatible ``AutoencoderKL``) from scratch on rendered faces.

No pretrained VAE fits 64 px toy faces, so the toy pipeline trains its own: a three-level
:class:`~facecrafter_jax.models.vae.AutoencoderKL` (64 px images -> 16 x 16 x 4 latents by default)::

    vae, info = train_vae(images_uint8, VAETrainConfig(), progress=True)
    moments = encode_dataset(vae, images_uint8)        # float32 [N, 16, 16, 8]: mean ++ logvar (for the records)
    images = decode_latents(vae, vae.encode(x))        # uint8 (latents scaled by vae.config.scaling_factor)

Loss (images scaled to [-1, 1], decoder fed a posterior sample)::

    l1_weight * mean|x - x'| + mse_weight * mean (x - x')^2 + grad_weight * mean|d(x) - d(x')|
        + kl_weight * KL(q(z|x) || N(0, I)) summed over latent elements / number of image values

(``d`` = differences of horizontally / vertically neighbouring pixels, an optional sharpness term). The KL is
normalised the way the Stable Diffusion autoencoder's loss is (both terms summed per image there), so
``kl_weight`` is on SD's scale (1e-6). The network is fully convolutional, so it trains on random
``crop_size`` crops (corners on the latent grid) and is used on whole images: on this CPU a step costs about
the same per pixel whatever the crop and batch, and at a ~150 s budget eight times as many updates on small
crops learn much more than whole-image steps (docs/toy_world.md, "Toy VAE"). Before training, every ResNet block's last conv is
zeroed and the posterior log-variance starts at ``logvar_init``. AdamW with linear warm-up and cosine decay;
minibatch order and crop positions from a NumPy generator and posterior noise from a JAX key, both seeded by
``config.seed``, so the same seed gives bit-identical weights. After training, ``scaling_factor =
1 / std(latent means)`` is measured on a seeded subset of the training images (as the SD authors did) and
the returned VAE's config carries it.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from dataclasses import dataclass
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from ..models.vae import AutoencoderKL, AutoencoderKLConfig

__all__ = ["VAETrainConfig", "build_vae", "train_vae", "encode_dataset", "decode_latents", "reconstruct", "psnr"]


@dataclass(frozen=True)
class VAETrainConfig:
    """Architecture and training settings of the toy VAE.

    Architecture (diffusers ``AutoencoderKL`` fields): ``block_out_channels`` (one level per entry, a 2x
    downsampling between levels), ``layers_per_block``, ``latent_channels``, ``norm_num_groups``,
    ``mid_block_add_attention``. Training: ``steps`` of ``batch_size`` random ``crop_size`` x ``crop_size`` crops
    (whole images when ``crop_size`` is 0 or not smaller than the images), AdamW (``lr``,
    ``weight_decay``, gradient clipping at ``grad_clip``) with linear warm-up over ``warmup`` steps then cosine
    decay to ``lr * end_lr_ratio``; loss weights ``l1_weight``, ``mse_weight``, ``grad_weight`` (image-gradient
    L1) and ``kl_weight`` (see the module docstring); ``zero_init_residual`` zeroes each ResNet block's last
    conv and ``logvar_init`` sets the initial posterior log-variance (both speed up the short training).
    ``decoder_noise`` > 0: the decoder's input gets Gaussian noise of std ``u * std(latent means)``, ``u ~ U(0,
    decoder_noise)`` per image, so it learns to decode the slightly-off latents a diffusion sampler produces to
    clean images instead of amplifying their error into texture (0 = off).
    ``stats_images``: size of the seeded subset of the training images on which ``scaling_factor`` and the
    reconstruction PSNR are measured. ``seed``: weights, minibatch order, crops, posterior noise and the
    statistics subset.
    """

    block_out_channels: tuple[int, ...] = (16, 32, 64)
    layers_per_block: int = 1
    latent_channels: int = 4
    norm_num_groups: int = 8
    mid_block_add_attention: bool = False
    steps: int = 1800
    batch_size: int = 8
    lr: float = 3e-3
    warmup: int = 50
    end_lr_ratio: float = 0.05
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    l1_weight: float = 1.0
    mse_weight: float = 1.0
    grad_weight: float = 0.0
    kl_weight: float = 1e-6
    decoder_noise: float = 0.0
    zero_init_residual: bool = True
    logvar_init: float = -6.0
    crop_size: int = 32
    stats_images: int = 256
    seed: int = 0

    def __post_init__(self):
        object.__setattr__(self, "block_out_channels", tuple(int(c) for c in self.block_out_channels))
        for name in ("layers_per_block", "latent_channels", "norm_num_groups", "steps", "batch_size", "stats_images"):
            v = getattr(self, name)
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if not isinstance(self.crop_size, (int, np.integer)) or self.crop_size < 0:
            raise ValueError(f"crop_size must be a non-negative int (0 = whole images), got {self.crop_size!r}")
        f = 2 ** (len(self.block_out_channels) - 1)
        if self.crop_size % f:
            raise ValueError(f"crop_size {self.crop_size} is not divisible by the downsample factor {f}")
        if not isinstance(self.warmup, (int, np.integer)) or self.warmup < 0:
            raise ValueError(f"warmup must be a non-negative int, got {self.warmup!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr!r}")
        for name in ("l1_weight", "mse_weight", "grad_weight", "kl_weight", "weight_decay", "end_lr_ratio", "grad_clip",
                     "decoder_noise"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        if self.l1_weight == 0 and self.mse_weight == 0:
            raise ValueError("l1_weight and mse_weight are both 0: there is no reconstruction loss")
        self.vae_config()  # architecture errors (e.g. norm_num_groups not dividing a width) surface here

    def vae_config(self, scaling_factor: float = 1.0) -> AutoencoderKLConfig:
        """The diffusers ``AutoencoderKL`` architecture (``scaling_factor`` 1 until it has been measured)."""
        n = len(self.block_out_channels)
        return AutoencoderKLConfig(
            down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
            block_out_channels=self.block_out_channels, layers_per_block=self.layers_per_block,
            latent_channels=self.latent_channels, norm_num_groups=self.norm_num_groups,
            mid_block_add_attention=self.mid_block_add_attention, scaling_factor=float(scaling_factor))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> "VAETrainConfig":
        """From a mapping (YAML / JSON); an unknown key raises ``ValueError`` naming it."""
        from .world import checked_config_dict

        return cls(**checked_config_dict(cls, d, "VAE training"))

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["block_out_channels"] = list(self.block_out_channels)
        return d


# ----------------------------------------------------------------------------- helpers
def build_vae(config: AutoencoderKLConfig, seed: int = 0) -> AutoencoderKL:
    """An ``AutoencoderKL`` with seeded random weights (built abstractly, then filled: fast on CPU)."""
    from ..train.state import random_fill_

    vae = nnx.eval_shape(lambda: AutoencoderKL(config, rngs=nnx.Rngs(0)))
    random_fill_(vae, seed)
    return vae


def _training_init_(vae: AutoencoderKL, cfg: "VAETrainConfig") -> None:
    """Start-of-training adjustments in place: with ``zero_init_residual`` the last conv of every ResNet block is
    zeroed (each block starts as its shortcut); the ``quant_conv`` logvar outputs start at ``logvar_init`` (zero
    kernel), so early posterior samples are not drowned in unit-variance noise."""
    lc = cfg.latent_channels
    updates = {}
    for path, var in nnx.to_flat_state(nnx.state(vae, nnx.Param)):
        names = [str(p) for p in path]
        value = var.get_value()
        if cfg.zero_init_residual and "resnets" in names and names[-2:] == ["conv2", "kernel"]:
            updates[tuple(path)] = jnp.zeros_like(value)
        elif names[0] == "quant_conv" and names[-1] == "kernel":
            updates[tuple(path)] = value.at[..., lc:].set(0.0)
        elif names[0] == "quant_conv" and names[-1] == "bias":
            updates[tuple(path)] = value.at[lc:].set(cfg.logvar_init)
    nnx.update(vae, nnx.from_flat_state(updates))


def _check_images(images, factor: int, what: str = "images") -> np.ndarray:
    """uint8 [N, H, W, 3] with H and W divisible by the VAE's downsample factor."""
    arr = np.asarray(images)
    if arr.dtype != np.uint8:
        raise ValueError(f"{what} must be uint8 (0..255), got dtype {arr.dtype}")
    if arr.ndim != 4 or arr.shape[-1] != 3:
        raise ValueError(f"{what} must have shape [N, H, W, 3], got {arr.shape}")
    if len(arr) == 0:
        raise ValueError(f"{what} is empty")
    h, w = arr.shape[1:3]
    if h % factor or w % factor:
        raise ValueError(f"{what} side {h}x{w} is not divisible by the VAE's downsample factor {factor}")
    return arr


def _to_unit(x: jax.Array) -> jax.Array:
    return x.astype(jnp.float32) / 127.5 - 1.0


def _to_uint8(x) -> np.ndarray:
    x = np.asarray(x, np.float32)
    return np.clip(np.round((x + 1.0) * 127.5), 0, 255).astype(np.uint8)


def psnr(a, b) -> float:
    """PSNR (dB) between two uint8 image arrays, over all values (one MSE for the whole set)."""
    mse = np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2)
    return float(10 * np.log10(255.0 ** 2 / max(mse, 1e-12)))


@functools.lru_cache(maxsize=None)
def _jitted(graphdef, name: str):
    """One jitted inference function per (module structure, operation); reused across calls."""
    if name == "moments":
        def fn(state, x):
            return nnx.merge(graphdef, state).encode_moments(_to_unit(x))
    elif name == "decode":
        def fn(state, z):
            return nnx.merge(graphdef, state).decode(z)
    elif name == "reconstruct":
        def fn(state, x):
            return nnx.merge(graphdef, state)(_to_unit(x))
    else:  # pragma: no cover
        raise KeyError(name)
    return jax.jit(fn)


def _batched(vae: AutoencoderKL, name: str, data: np.ndarray, batch_size: int) -> np.ndarray:
    if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    graphdef, state = nnx.split(vae)
    fn = _jitted(graphdef, name)
    n = len(data)
    bs = min(batch_size, n)
    outs = []
    for i in range(0, n, bs):
        chunk = data[i:i + bs]
        pad = bs - len(chunk)
        if pad:  # keep one compiled shape
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, 0)])
        outs.append(np.asarray(jax.device_get(fn(state, jnp.asarray(chunk))))[: bs - pad])
    return np.concatenate(outs)


def encode_dataset(vae: AutoencoderKL, images, batch_size: int = 256) -> np.ndarray:
    """uint8 images [N, H, W, 3] -> posterior moments float32 [N, H/f, W/f, 2 * latent_channels]
    (mean ++ logvar, unscaled: what the records store), in batches of ``batch_size`` (jitted)."""
    images = _check_images(images, vae.config.downsample_factor)
    return _batched(vae, "moments", images, batch_size).astype(np.float32)


def decode_latents(vae: AutoencoderKL, latents, batch_size: int = 256) -> np.ndarray:
    """Scaled latents [N, h, w, latent_channels] (what the UNet sees: ``vae.encode`` output) -> uint8 images."""
    z = np.asarray(latents, np.float32)
    lc = vae.config.latent_channels
    if z.ndim != 4 or z.shape[-1] != lc:
        raise ValueError(f"latents must have shape [N, h, w, {lc}] (latent_channels={lc}), got {z.shape}")
    if len(z) == 0:
        raise ValueError("latents is empty")
    return _to_uint8(_batched(vae, "decode", z, batch_size))


def reconstruct(vae: AutoencoderKL, images, batch_size: int = 256) -> np.ndarray:
    """uint8 images -> uint8 reconstructions ``decode(encode(images))`` through the posterior means."""
    images = _check_images(images, vae.config.downsample_factor)
    return _to_uint8(_batched(vae, "reconstruct", images, batch_size))


# ----------------------------------------------------------------------------- training
def _kl_per_value(mean: jax.Array, logvar: jax.Array, num_values: int) -> jax.Array:
    """KL(N(mean, exp(logvar)) || N(0, 1)) summed over a sample's latent elements, divided by the number of
    image values per sample, averaged over the batch."""
    kl = 0.5 * (mean ** 2 + jnp.exp(logvar) - 1.0 - logvar)
    return kl.reshape(kl.shape[0], -1).sum(-1).mean() / num_values


def _losses(vae: AutoencoderKL, cfg: VAETrainConfig, x: jax.Array, key: jax.Array):
    moments = vae.encode_moments(x)
    lc = cfg.latent_channels
    mean, logvar = moments[..., :lc], jnp.clip(moments[..., lc:], -30.0, 20.0)
    z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape, jnp.float32)
    if cfg.decoder_noise > 0:  # the decoder also learns to map slightly-off latents (a sampler's) to clean images
        k_level, k_aug = jax.random.split(jax.random.fold_in(key, 1))
        level = cfg.decoder_noise * jax.random.uniform(k_level, (z.shape[0], 1, 1, 1))
        z = z + level * jax.lax.stop_gradient(jnp.std(mean)) * jax.random.normal(k_aug, z.shape, jnp.float32)
    rec = vae.decode(z * vae.config.scaling_factor)
    d = rec - x
    l1, mse = jnp.mean(jnp.abs(d)), jnp.mean(d ** 2)
    grad = 0.5 * (jnp.mean(jnp.abs(d[:, 1:] - d[:, :-1])) + jnp.mean(jnp.abs(d[:, :, 1:] - d[:, :, :-1])))
    kl = _kl_per_value(mean, logvar, x.shape[1] * x.shape[2] * x.shape[3])
    total = cfg.l1_weight * l1 + cfg.mse_weight * mse + cfg.grad_weight * grad + cfg.kl_weight * kl
    return total, {"loss": total, "l1": l1, "mse": mse, "grad_l1": grad, "kl": kl}


def _optimizer(cfg: VAETrainConfig) -> optax.GradientTransformation:
    sched = optax.warmup_cosine_decay_schedule(0.0, cfg.lr, max(cfg.warmup, 1), max(cfg.steps, cfg.warmup + 1, 2),
                                               end_value=cfg.lr * cfg.end_lr_ratio)
    parts = [optax.clip_by_global_norm(cfg.grad_clip)] if cfg.grad_clip > 0 else []
    return optax.chain(*parts, optax.adamw(sched, weight_decay=cfg.weight_decay))


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _train_step(graphdef, cfg: VAETrainConfig, crop: int, params, opt_state, data, idx, offsets, key):
    """One AdamW step on ``data[idx]`` (uint8, on device), cropped to ``crop`` x ``crop`` at ``offsets`` [B, 2]
    when ``crop`` > 0. ``cfg`` is static with its seed zeroed, so runs that differ only in the seed share the
    compiled step."""
    x = data[idx]
    if crop:
        x = jax.vmap(lambda im, o: jax.lax.dynamic_slice(im, (o[0], o[1], 0), (crop, crop, im.shape[-1])))(x, offsets)
    x = _to_unit(x)

    def loss_fn(p):
        return _losses(nnx.merge(graphdef, p), cfg, x, key)

    (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = _optimizer(cfg).update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, metrics


def train_vae(images, config: VAETrainConfig | None = None, *, progress: bool = False
              ) -> tuple[AutoencoderKL, dict[str, Any]]:
    """Trains a VAE from scratch on uint8 images [N, H, W, 3] (H, W divisible by the downsample factor).

    Returns the VAE (its config's ``scaling_factor`` = 1 / std of the latent means on a seeded subset of at
    most ``config.stats_images`` training images, all of them if there are fewer) and an ``info`` dict:
    ``steps``, ``crop_size`` (the one used; 0 = whole images), ``seconds`` (training loop, compilation
    included), ``seconds_total`` (with the statistics), ``scaling_factor``, ``latent_mean_std``, ``psnr`` (dB,
    uint8 reconstructions through the posterior means on that subset), ``stats_images``, the final step's ``loss`` / ``l1`` / ``mse`` / ``grad_l1`` / ``kl``,
    ``history`` (total loss per step) and ``config``.
    """
    cfg = config or VAETrainConfig()
    t_start = time.time()
    vcfg = cfg.vae_config()
    images = _check_images(images, vcfg.downsample_factor)
    n = len(images)
    if n < cfg.batch_size:
        raise ValueError(f"{n} training images are fewer than batch_size {cfg.batch_size}")
    h, w = images.shape[1:3]
    f = vcfg.downsample_factor
    crop = cfg.crop_size if 0 < cfg.crop_size < min(h, w) else 0  # crops no smaller than the images: whole images

    vae = build_vae(vcfg, cfg.seed)
    _training_init_(vae, cfg)
    graphdef, params = nnx.split(vae)
    static_cfg = dataclasses.replace(cfg, seed=0)
    opt_state = _optimizer(static_cfg).init(params)
    data = jnp.asarray(images)  # uint8 on the device; minibatches are gathered inside the step
    rng = np.random.default_rng([cfg.seed, 1])
    key = jax.random.key(cfg.seed)
    perm, pos = rng.permutation(n), 0
    losses, metrics = [], None
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=cfg.steps, desc="vae", unit="step", dynamic_ncols=True)
    bs = cfg.batch_size
    for it in range(cfg.steps):
        if pos + bs > n:
            perm, pos = rng.permutation(n), 0
        idx = jnp.asarray(perm[pos:pos + bs].astype(np.int32))
        pos += bs
        if crop:  # crop corners on the latent grid
            offsets = f * np.stack([rng.integers(0, (h - crop) // f + 1, bs), rng.integers(0, (w - crop) // f + 1, bs)], 1)
        else:
            offsets = np.zeros((bs, 2), np.int64)
        params, opt_state, metrics = _train_step(graphdef, static_cfg, crop, params, opt_state, data, idx,
                                                 jnp.asarray(offsets.astype(np.int32)), jax.random.fold_in(key, it))
        losses.append(metrics["loss"])
        if bar is not None:
            bar.update(1)
            if it % 10 == 0 or it == cfg.steps - 1:
                bar.set_postfix(loss=f"{float(metrics['loss']):.4f}", l1=f"{float(metrics['l1']):.4f}")
    if bar is not None:
        bar.close()
    final = {k: float(v) for k, v in jax.device_get(metrics).items()}
    history = [float(v) for v in jax.device_get(losses)]
    t_train = time.time() - t_start
    if not all(math.isfinite(v) for v in history):
        raise FloatingPointError("the VAE loss became non-finite; try a lower lr")

    # scaling factor and reconstruction quality on a seeded subset of the training images
    trained = nnx.merge(graphdef, params)
    m = min(cfg.stats_images, n)
    sub = images if m == n else images[np.sort(np.random.default_rng([cfg.seed, 2]).choice(n, m, replace=False))]
    moments = encode_dataset(trained, sub)
    std = float(np.std(moments[..., :cfg.latent_channels].astype(np.float64)))
    if not (np.isfinite(std) and std > 0):
        raise FloatingPointError(f"latent means have std {std}; training diverged (try a lower lr)")
    scaling = 1.0 / std
    out = nnx.eval_shape(lambda: AutoencoderKL(cfg.vae_config(scaling), rngs=nnx.Rngs(0)))
    nnx.update(out, nnx.state(trained))
    rec_psnr = psnr(reconstruct(out, sub), sub)
    info = {"steps": cfg.steps, "seconds": t_train, "seconds_total": time.time() - t_start,
            "scaling_factor": scaling, "latent_mean_std": std, "psnr": rec_psnr, "stats_images": m, "crop_size": crop,
            **final, "history": history, "config": cfg.to_dict()}
    return out, info
