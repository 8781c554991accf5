"""Toy face analysers: one small Flax NNX CNN trained on rendered faces to play ArcFace, MediaPipe and EmoNet.

A shared :class:`Backbone` (a stride-2 stem and stride-2 conv stages, flattened, then a dense layer) feeds three
heads:

* identity (ArcFace's role): an L2-normalised embedding, trained as a cosine classifier with an additive
  margin (CosFace) over the world's identities; compare faces by cosine similarity;
* pose and landmarks (MediaPipe's role): head pose (yaw, pitch, roll, degrees) and all 478 landmarks
  (x, y in [0, 1] of the image, and with ``landmark_depth`` the relative depth z, as MediaPipe outputs);
* emotion (EmoNet's role): 8 class logits (neutral, happy, sad, surprise, fear, disgust, anger, contempt)
  and valence / arousal in [-1, 1].

One shared trunk instead of three networks costs a third of the compute, and the landmark supervision
(which pins down the mouth, brow and lid geometry) makes the emotion head generalise from a few thousand
renders. Images (uint8 [N, R, R, 3], R a multiple of ``input_size``) are scaled to [-1, 1] and
average-pooled to ``input_size`` inside the model call. :func:`train_analysers` trains from rendered images
and their ground truth (seeded), :func:`evaluate_analysers` measures on fresh renders, and
:class:`ToyAnalysers` saves / loads ``config.json`` + ``model.safetensors``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from facecrafter_jax.face.vocabulary import NUM_EMOTIONS, NUM_LANDMARKS

__all__ = [
    "AnalyserConfig", "Backbone", "AnalyserNet", "ToyAnalysers",
    "train_analysers", "evaluate_analysers", "landmark_nme", "gaussian_blur", "POSE_SCALE_DEG",
]

POSE_SCALE_DEG = 30.0  # pose targets are divided by this
OUTER_EYE_CORNERS = (33, 263)  # NME normaliser (inter-ocular distance, as for 300-W / WFLW)


@dataclass(frozen=True)
class AnalyserConfig:
    """Architecture and training settings of the toy analysers.

    ``num_identities`` must equal the world's; ``input_size`` is the side the images are pooled to;
    ``widths`` are the channels of the stride-2 stem and of each further stride-2 stage (``len(widths)``
    halvings), each stage followed by ``extra_blocks`` stride-1 blocks.
    Training: AdamW (``lr``, ``weight_decay``) with linear warm-up over ``warmup_steps`` then cosine decay,
    ``steps`` of ``batch_size``; CosFace scale / margin; ``emotion_weight`` scales the emotion cross-entropy
    (identity's has weight 1), ``pose_weight``, ``landmark_weight`` and ``va_weight`` the (normalised) pose,
    landmark and valence / arousal squared errors, so that every task gets its share of the shared trunk. ``flip_augment`` mirrors a
    random half of every minibatch (image, landmarks via :data:`~.landmarks.MIRROR`, yaw and roll negated);
    ``shift_augment`` translates every image by up to that many pixels (edges replicated, landmarks moved along).
    ``landmark_depth``: the landmark head also predicts z (MediaPipe's relative depth), so that a face's 3-D
    landmarks can be pose-normalised (a rigid 3-D alignment removes yaw and pitch, which a 2-D one cannot).
    ``blur_augment`` > 0 blurs a random half of every minibatch with a Gaussian of sigma ~ U(0.3, blur_augment)
    pixels (separable, edges replicated): the analysers then read generated images, which are softer than the
    renders, as real ArcFace / EmoNet read imperfect photos (0 = off).
    """

    num_identities: int = 256
    input_size: int = 64
    widths: tuple[int, ...] = (16, 32, 64, 128)
    extra_blocks: int = 1
    hidden: int = 256
    embed_dim: int = 64
    cos_scale: float = 16.0
    cos_margin: float = 0.2
    steps: int = 1500
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 1e-4
    warmup_steps: int = 100
    emotion_weight: float = 5.0
    pose_weight: float = 10.0
    landmark_weight: float = 20.0
    va_weight: float = 5.0
    flip_augment: bool = True
    shift_augment: int = 3
    blur_augment: float = 0.0
    landmark_depth: bool = False
    seed: int = 0

    def __post_init__(self):
        object.__setattr__(self, "widths", tuple(int(w) for w in self.widths))
        if not isinstance(self.num_identities, int) or self.num_identities < 2:
            raise ValueError(f"num_identities must be an int >= 2, got {self.num_identities!r}")
        if len(self.widths) < 2 or min(self.widths) < 1:
            raise ValueError(f"widths needs >= 2 positive entries, got {self.widths!r}")
        if not isinstance(self.input_size, int) or self.input_size % (2 ** len(self.widths)):
            raise ValueError(f"input_size {self.input_size!r} must be divisible by 2**{len(self.widths)} "
                             f"(one halving per width)")
        if not isinstance(self.extra_blocks, int) or self.extra_blocks < 0:
            raise ValueError(f"extra_blocks must be a non-negative int, got {self.extra_blocks!r}")
        for name in ("hidden", "embed_dim", "steps", "batch_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive int, got {getattr(self, name)!r}")
        if not isinstance(self.shift_augment, int) or self.shift_augment < 0:
            raise ValueError(f"shift_augment must be a non-negative int, got {self.shift_augment!r}")
        if not float(self.blur_augment) >= 0:
            raise ValueError(f"blur_augment must be >= 0, got {self.blur_augment!r}")
        if not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be a non-negative int, got {self.warmup_steps!r}")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> "AnalyserConfig":
        """From a mapping (e.g. ``yaml.safe_load`` output or ``config.json``); unknown keys are an error."""
        from .world import checked_config_dict

        return cls(**checked_config_dict(cls, d, "analyser"))

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["widths"] = list(self.widths)
        return d


# ----------------------------------------------------------------------------- networks
class ConvBlock(nnx.Module):
    """conv3x3 (stride 1 or 2) -> GroupNorm -> SiLU."""

    def __init__(self, cin: int, cout: int, stride: int, *, rngs: nnx.Rngs):
        self.conv = nnx.Conv(cin, cout, (3, 3), strides=(stride, stride), padding=((1, 1), (1, 1)),
                             param_dtype=jnp.float32, rngs=rngs)
        self.norm = nnx.GroupNorm(cout, num_groups=min(8, cout), epsilon=1e-5, param_dtype=jnp.float32, rngs=rngs)

    def __call__(self, x):
        return jax.nn.silu(self.norm(self.conv(x)))


class Backbone(nnx.Module):
    """Pools uint8 images to ``input_size``; stride-2 stem, then per further width a stride-2 block followed by
    ``extra_blocks`` stride-1 blocks; flatten; dense to ``hidden``."""

    def __init__(self, cfg: AnalyserConfig, *, rngs: nnx.Rngs):
        self.input_size = cfg.input_size
        w = cfg.widths
        self.stem = ConvBlock(3, w[0], 2, rngs=rngs)
        self.blocks = nnx.List([])
        for a, b in zip(w[:-1], w[1:]):
            self.blocks.append(ConvBlock(a, b, 2, rngs=rngs))
            for _ in range(cfg.extra_blocks):
                self.blocks.append(ConvBlock(b, b, 1, rngs=rngs))
        side = cfg.input_size // 2 ** len(w)
        self.fc = nnx.Linear(side * side * w[-1], cfg.hidden, param_dtype=jnp.float32, rngs=rngs)

    def preprocess(self, images):
        x = jnp.asarray(images)
        if x.ndim != 4 or x.shape[-1] != 3 or x.shape[1] != x.shape[2] or x.shape[1] % self.input_size:
            raise ValueError(f"images must be [N, R, R, 3] with R a multiple of {self.input_size}, got {x.shape}")
        x = x.astype(jnp.float32) / 127.5 - 1.0
        f = x.shape[1] // self.input_size
        if f > 1:
            x = x.reshape(x.shape[0], self.input_size, f, self.input_size, f, 3).mean(axis=(2, 4))
        return x

    def __call__(self, images):
        h = self.stem(self.preprocess(images))
        for blk in self.blocks:
            h = blk(h)
        return jax.nn.silu(self.fc(h.reshape(h.shape[0], -1)))


class AnalyserNet(nnx.Module):
    """Shared backbone and the identity, pose / landmark and emotion heads."""

    def __init__(self, cfg: AnalyserConfig, *, rngs: nnx.Rngs):
        self.backbone = Backbone(cfg, rngs=rngs)
        self.embed = nnx.Linear(cfg.hidden, cfg.embed_dim, param_dtype=jnp.float32, rngs=rngs)
        self.classifier = nnx.Param(jax.random.normal(rngs.params(), (cfg.num_identities, cfg.embed_dim)))
        self.pose = nnx.Linear(cfg.hidden, 3, param_dtype=jnp.float32, rngs=rngs)
        self.landmark_dims = 3 if cfg.landmark_depth else 2
        self.landmarks = nnx.Linear(cfg.hidden, NUM_LANDMARKS * self.landmark_dims, param_dtype=jnp.float32,
                                    rngs=rngs)
        self.emotion = nnx.Linear(cfg.hidden, NUM_EMOTIONS, param_dtype=jnp.float32, rngs=rngs)
        self.va = nnx.Linear(cfg.hidden, 2, param_dtype=jnp.float32, rngs=rngs)

    def raw(self, images) -> dict[str, jax.Array]:
        """Head outputs before scaling: embedding (unit norm), cosines to the identity centres, pose / 30 deg,
        landmarks ((x - 0.5) / 0.25, (y - 0.5) / 0.25 and with depth z / 0.25), emotion logits, valence / arousal."""
        h = self.backbone(images)
        e = self.embed(h)
        e = e / jnp.maximum(jnp.linalg.norm(e, axis=-1, keepdims=True), 1e-8)
        w = self.classifier[...]
        w = w / jnp.maximum(jnp.linalg.norm(w, axis=-1, keepdims=True), 1e-8)
        return {"embedding": e, "cosines": e @ w.T, "pose": self.pose(h),
                "landmarks": self.landmarks(h).reshape(-1, NUM_LANDMARKS, self.landmark_dims),
                "emotion_logits": self.emotion(h),
                "va": jnp.tanh(self.va(h))}

    def __call__(self, images) -> dict[str, jax.Array]:
        """``embedding`` [N, E], ``cosines`` [N, I], ``head_pose`` [N, 3] deg, ``landmarks`` [N, 478, 2 or 3],
        ``emotion_probs`` [N, 8], ``va`` [N, 2]."""
        r = self.raw(images)
        return {"embedding": r["embedding"], "cosines": r["cosines"], "head_pose": r["pose"] * POSE_SCALE_DEG,
                "landmarks": r["landmarks"] * 0.25 + jnp.asarray([0.5, 0.5, 0.0][:self.landmark_dims]),
                "emotion_probs": jax.nn.softmax(r["emotion_logits"]),
                "va": r["va"]}


# ----------------------------------------------------------------------------- metrics
def landmark_nme(pred, target) -> np.ndarray:
    """Per-image NME: mean landmark error over all points divided by the outer-eye-corner distance (33-263)."""
    pred = np.asarray(pred, np.float64)[..., :2]
    target = np.asarray(target, np.float64)[..., :2]
    iod = np.linalg.norm(target[:, OUTER_EYE_CORNERS[0]] - target[:, OUTER_EYE_CORNERS[1]], axis=-1)
    return np.linalg.norm(pred - target, axis=-1).mean(-1) / np.maximum(iod, 1e-9)


def _auc(pos: np.ndarray, neg: np.ndarray) -> float:
    """Area under the ROC curve = P(score of a random positive > that of a random negative) (ties 1/2)."""
    scores = np.concatenate([pos, neg])
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores))
    ranks[order] = np.arange(1, len(scores) + 1)
    # average ranks over ties
    s_sorted = scores[order]
    i = 0
    while i < len(s_sorted):
        j = i
        while j + 1 < len(s_sorted) and s_sorted[j + 1] == s_sorted[i]:
            j += 1
        if j > i:
            ranks[order[i:j + 1]] = 0.5 * (i + 1 + j + 1)
        i = j + 1
    n_pos, n_neg = len(pos), len(neg)
    return float((ranks[:n_pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _ccc(x: np.ndarray, y: np.ndarray) -> float:
    """Concordance correlation coefficient (EmoNet's valence / arousal metric)."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    mx, my = x.mean(), y.mean()
    cov = ((x - mx) * (y - my)).mean()
    return float(2 * cov / (x.var() + y.var() + (mx - my) ** 2 + 1e-12))


# ----------------------------------------------------------------------------- the bundle users see
class ToyAnalysers:
    """The three trained analysers with numpy-in / numpy-out inference (batched, jitted)."""

    def __init__(self, config: AnalyserConfig, model: AnalyserNet | None = None):
        self.config = config
        self.model = model if model is not None else AnalyserNet(config, rngs=nnx.Rngs(config.seed))
        self._fns: dict[str, Callable] = {}

    # -------------------------------------------------------------- inference
    def _run(self, name: str, fn: Callable, images, batch_size: int):
        images = np.asarray(images)
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"images must be uint8 [N, R, R, 3], got {images.dtype} {images.shape}")
        size = self.config.input_size
        if images.shape[1] != images.shape[2] or images.shape[1] % size:
            raise ValueError(f"images must be square with a side that is a multiple of {size} "
                             f"(config.input_size), got {images.shape[1]}x{images.shape[2]}")
        if name not in self._fns:
            graphdef, state = nnx.split(self.model)

            @jax.jit
            def run(state, x):
                return fn(nnx.merge(graphdef, state), x)

            self._fns[name] = run
        state = nnx.state(self.model)
        outs = []
        n = len(images)
        for i in range(0, n, batch_size):
            chunk = images[i:i + batch_size]
            pad = batch_size - len(chunk) if n > batch_size else 0
            if pad:
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, 0)])
            out = jax.device_get(self._fns[name](state, jnp.asarray(chunk)))
            outs.append(jax.tree.map(lambda a: np.asarray(a)[: len(chunk) - pad], out))
        return jax.tree.map(lambda *a: np.concatenate(a), *outs)

    def embed(self, images, batch_size: int = 256) -> np.ndarray:
        """Unit-norm identity embeddings [N, embed_dim] (compare with cosine similarity)."""
        return self._run("embed", lambda m, x: m(x)["embedding"], images, batch_size)

    def identify(self, images, batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
        """(predicted identity [N], cosine to every identity's class centre [N, I])."""
        cos = self._run("identify", lambda m, x: m(x)["cosines"], images, batch_size)
        return cos.argmax(-1), cos

    def pose_landmarks(self, images, batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
        """(head pose [N, 3] degrees (yaw, pitch, roll), landmarks [N, 478, 2] in image units (3 with
        ``landmark_depth``: z as in the records))."""
        return self._run("pose", lambda m, x: (m(x)["head_pose"], m(x)["landmarks"]), images, batch_size)

    def emotion(self, images, batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
        """(class probabilities [N, 8], valence / arousal [N, 2])."""
        return self._run("emotion", lambda m, x: (m(x)["emotion_probs"], m(x)["va"]), images, batch_size)

    def analyse(self, images, batch_size: int = 256) -> dict[str, np.ndarray]:
        """All outputs in one pass: ``embedding``, ``identity`` (argmax of ``cosines``), ``cosines``,
        ``head_pose``, ``landmarks``, ``emotion_probs``, ``va``."""
        out = self._run("all", lambda m, x: m(x), images, batch_size)
        out["identity"] = out["cosines"].argmax(-1)
        return out

    # -------------------------------------------------------------- persistence
    def save(self, directory: str | os.PathLike, extra: Mapping[str, Any] | None = None) -> None:
        """Writes ``config.json`` (config + ``extra``, e.g. metrics) and ``model.safetensors`` (dotted paths)."""
        from safetensors.numpy import save_file

        from ..convert.weights import flax_path_str

        os.makedirs(directory, exist_ok=True)
        flat = {flax_path_str(p): np.ascontiguousarray(np.asarray(v.get_value()))
                for p, v in nnx.to_flat_state(nnx.state(self.model, nnx.Param))}
        save_file(flat, os.path.join(directory, "model.safetensors"), metadata={"format": "facecrafter-toy-analysers"})
        with open(os.path.join(directory, "config.json"), "w") as f:
            json.dump({"config": self.config.to_dict(), **(dict(extra) if extra else {})}, f, indent=2,
                      sort_keys=True)

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "ToyAnalysers":
        """Loads what :meth:`save` wrote (strict: missing / unused / mis-shaped tensors raise, naming the key)."""
        from ..convert.weights import load_flax_params

        path = os.path.join(directory, "config.json")
        if not os.path.exists(path):
            raise FileNotFoundError(f"no toy analyser config at {path}")
        with open(path) as f:
            meta = json.load(f)
        if "config" not in meta:
            raise ValueError(f"{path} has no 'config' entry")
        cfg = AnalyserConfig.from_dict(meta["config"])
        out = cls(cfg)
        load_flax_params(out.model, os.fspath(directory))
        return out


# ----------------------------------------------------------------------------- training
def _losses(model: AnalyserNet, cfg: AnalyserConfig, batch) -> tuple[jax.Array, dict[str, jax.Array]]:
    r = model.raw(batch["images"])
    # identity: CosFace
    cos = r["cosines"]
    onehot = jax.nn.one_hot(batch["identity"], cfg.num_identities)
    logits = cfg.cos_scale * (cos - cfg.cos_margin * onehot)
    id_loss = optax.softmax_cross_entropy(logits, onehot).mean()
    id_acc = (cos.argmax(-1) == batch["identity"]).mean()
    # pose + landmarks (normalised targets)
    pose_raw, lm_raw = r["pose"], r["landmarks"]
    pose_loss = jnp.mean((pose_raw - batch["head_pose"] / POSE_SCALE_DEG) ** 2)
    d = lm_raw.shape[-1]
    lm_loss = jnp.mean((lm_raw - (batch["landmarks"][..., :d] - jnp.asarray([0.5, 0.5, 0.0][:d])) / 0.25) ** 2)
    # emotion: soft cross-entropy on the record probabilities + squared error on valence / arousal
    elog, va = r["emotion_logits"], r["va"]
    emo_loss = optax.softmax_cross_entropy(elog, batch["emotion"][:, :NUM_EMOTIONS]).mean()
    va_loss = jnp.mean((va - batch["emotion"][:, NUM_EMOTIONS:]) ** 2)
    emo_acc = (elog.argmax(-1) == batch["emotion"][:, :NUM_EMOTIONS].argmax(-1)).mean()
    total = (id_loss + cfg.pose_weight * pose_loss + cfg.landmark_weight * lm_loss + cfg.emotion_weight * emo_loss
             + cfg.va_weight * va_loss)
    return total, {"loss": total, "id_loss": id_loss, "id_acc": id_acc, "pose_loss": pose_loss,
                   "landmark_loss": lm_loss, "emotion_loss": emo_loss, "va_loss": va_loss, "emotion_acc": emo_acc}


def _check_training_data(images, targets, cfg: AnalyserConfig) -> int:
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must be uint8 [N, R, R, 3], got {images.dtype} {images.shape}")
    n = len(images)
    want = {"identity": (n,), "head_pose": (n, 3), "landmarks": (n, NUM_LANDMARKS, 3), "emotion": (n, NUM_EMOTIONS + 2)}
    for k, shape in want.items():
        if k not in targets:
            raise ValueError(f"targets lack {k!r} (need {sorted(want)})")
        if np.shape(targets[k]) != shape:
            raise ValueError(f"targets[{k!r}] must have shape {shape}, got {np.shape(targets[k])}")
    ids = np.asarray(targets["identity"])
    if n and (ids.min() < 0 or ids.max() >= cfg.num_identities):
        raise ValueError(f"targets['identity'] must lie in [0, {cfg.num_identities}) (config.num_identities)")
    if n < cfg.batch_size:
        raise ValueError(f"{n} training images are fewer than batch_size {cfg.batch_size}")
    return n


def _flip_half(batch: dict[str, np.ndarray], rng: np.random.Generator) -> None:
    """Mirrors a random half of the batch in place: image columns, landmarks (index permutation and x -> 1 - x),
    yaw and roll; identity and emotion are unchanged."""
    from .landmarks import MIRROR

    f = rng.random(len(batch["images"])) < 0.5
    batch["images"][f] = batch["images"][f][:, :, ::-1]
    batch["landmarks"][f] = batch["landmarks"][f][:, MIRROR] * np.array([-1.0, 1.0, 1.0], np.float32) + \
        np.array([1.0, 0.0, 0.0], np.float32)
    batch["head_pose"][f] = batch["head_pose"][f] * np.array([-1.0, 1.0, -1.0], np.float32)


def _shift(batch: dict[str, np.ndarray], rng: np.random.Generator, max_shift: int) -> None:
    """Translates each image by an integer (dx, dy) in [-max_shift, max_shift] (edge pixels replicated) and
    moves its landmarks by the same amount; pose, identity and emotion are unchanged."""
    imgs = batch["images"]
    n, r = imgs.shape[0], imgs.shape[1]
    d = rng.integers(-max_shift, max_shift + 1, (n, 2))
    rows = np.clip(np.arange(r)[None, :] - d[:, 1:2], 0, r - 1)  # [n, r]
    cols = np.clip(np.arange(r)[None, :] - d[:, 0:1], 0, r - 1)
    batch["images"] = imgs[np.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]]
    batch["landmarks"] = batch["landmarks"] + np.concatenate([d[:, None, :] / r, np.zeros((n, 1, 1))], -1).astype(np.float32)


def gaussian_blur(images: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    """Separable Gaussian blur of ``images`` [n, H, W, C] (any dtype; float32 out) with a per-image ``sigma``
    [n] in pixels (0 = unchanged); kernel radius ceil(3 sigma), edges replicated."""
    x = np.asarray(images, np.float32)
    sigma = np.broadcast_to(np.asarray(sigma, np.float32), (x.shape[0],))
    radius = int(np.ceil(3 * float(sigma.max()))) if x.shape[0] else 0
    if radius == 0:
        return x
    taps = np.arange(-radius, radius + 1, dtype=np.float32)
    k = np.exp(-0.5 * (taps[None] / np.maximum(sigma[:, None], 1e-6)) ** 2)
    k = np.where(sigma[:, None] > 0, k, (taps[None] == 0).astype(np.float32))
    k /= k.sum(1, keepdims=True)  # [n, 2r+1]
    for axis in (1, 2):
        pad = [(0, 0)] * 4
        pad[axis] = (radius, radius)
        xp = np.pad(x, pad, mode="edge")
        length = x.shape[axis]
        out = np.zeros_like(x)
        for j in range(2 * radius + 1):
            sl = [slice(None)] * 4
            sl[axis] = slice(j, j + length)
            out += k[:, j, None, None, None] * xp[tuple(sl)]
        x = out
    return x


def _blur_half(batch: dict[str, np.ndarray], rng: np.random.Generator, max_sigma: float) -> None:
    """Blurs a random half of the batch (sigma ~ U(0.3, max_sigma)); labels unchanged."""
    n = len(batch["images"])
    sigma = np.where(rng.random(n) < 0.5, rng.uniform(min(0.3, max_sigma), max_sigma, n), 0.0)
    batch["images"] = np.clip(np.round(gaussian_blur(batch["images"], sigma)), 0, 255).astype(np.uint8)


def train_analysers(images, targets: Mapping[str, np.ndarray], config: AnalyserConfig | None = None, *,
                    log_every: int = 0, logger: Callable[[str], None] | None = None, progress: bool = False
                    ) -> tuple[ToyAnalysers, list[dict[str, float]]]:
    """Trains the analyser network (identity, pose / landmark and emotion heads) on rendered images.

    ``images`` uint8 [N, R, R, 3]; ``targets``: ``identity`` [N] (int), ``head_pose`` [N, 3] (deg),
    ``landmarks`` [N, 478, 3], ``emotion`` [N, 10] (the record fields, e.g. ``ToyBatch.features`` plus
    ``ToyBatch.attributes.identity``). Minibatches are drawn without replacement per epoch with a generator
    seeded by ``config.seed``. Returns the analysers and a list of logged metric dicts (every ``log_every``
    steps and at the end). ``progress``: a tqdm bar (desc ``analysers``) with the loss.
    """
    cfg = config or AnalyserConfig()
    n = _check_training_data(images, targets, cfg)
    data = {"images": np.asarray(images), "identity": np.asarray(targets["identity"], np.int32),
            "head_pose": np.asarray(targets["head_pose"], np.float32),
            "landmarks": np.asarray(targets["landmarks"], np.float32),
            "emotion": np.asarray(targets["emotion"], np.float32)}
    model = AnalyserNet(cfg, rngs=nnx.Rngs(cfg.seed))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    sched = optax.warmup_cosine_decay_schedule(0.0, cfg.lr, max(min(cfg.warmup_steps, cfg.steps // 2), 1),
                                               max(cfg.steps, 2),
                                               end_value=cfg.lr * 0.02)
    tx = optax.adamw(sched, weight_decay=cfg.weight_decay)
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state, batch):
        def loss_fn(p):
            return _losses(nnx.merge(graphdef, p, rest), cfg, batch)

        (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, metrics

    rng = np.random.default_rng([cfg.seed, 7])
    perm, pos = rng.permutation(n), 0
    history: list[dict[str, float]] = []
    t0 = time.time()
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.steps, desc="analysers", unit="step", dynamic_ncols=True)
    for it in range(1, cfg.steps + 1):
        if pos + cfg.batch_size > n:
            perm, pos = rng.permutation(n), 0
        idx = np.sort(perm[pos:pos + cfg.batch_size])
        pos += cfg.batch_size
        batch = {k: v[idx] for k, v in data.items()}
        if cfg.flip_augment:
            _flip_half(batch, rng)
        if cfg.shift_augment:
            _shift(batch, rng, cfg.shift_augment)
        if cfg.blur_augment > 0:
            _blur_half(batch, rng, cfg.blur_augment)
        params, opt_state, metrics = step(params, opt_state, batch)
        if bar is not None:
            bar.update(1)
            if it % 25 == 0 or it == cfg.steps:
                bar.set_postfix(loss=f"{float(metrics['loss']):.3f}")
        if (log_every and it % log_every == 0) or it == cfg.steps:
            m = {k: float(v) for k, v in jax.device_get(metrics).items()}
            m.update(step=it, seconds=time.time() - t0)
            history.append(m)
            if logger:
                logger(" ".join(f"{k}={v:.4g}" for k, v in m.items()))
    if bar is not None:
        bar.close()
    nnx.update(model, params)
    return ToyAnalysers(cfg, model), history


def evaluate_analysers(analysers: ToyAnalysers, images, targets: Mapping[str, np.ndarray], *,
                       batch_size: int = 256, num_pairs: int = 4000, seed: int = 0) -> dict[str, float]:
    """Accuracy of the analysers on rendered images with known ground truth (ideally fresh renders).

    Returns ``id_top1`` (identity classification accuracy), ``id_verification_auc`` (ROC AUC of the embedding
    cosine for ``num_pairs`` same-identity vs as many different-identity pairs, seeded), ``id_cos_same`` /
    ``id_cos_diff`` (mean cosines), ``pose_mae_deg`` (mean over yaw, pitch, roll) and per axis
    ``yaw_mae_deg`` / ``pitch_mae_deg`` / ``roll_mae_deg``, ``landmark_nme`` (mean, inter-ocular normalised),
    ``emotion_acc`` (argmax vs argmax of the target probabilities), ``valence_rmse``, ``arousal_rmse``,
    ``valence_ccc``, ``arousal_ccc``, and ``n``.
    """
    images = np.asarray(images)
    n = len(images)
    ids = np.asarray(targets["identity"])
    out = analysers.analyse(images, batch_size)
    metrics: dict[str, float] = {"n": float(n)}
    metrics["id_top1"] = float((out["identity"] == ids).mean())
    emb = out["embedding"]
    rng = np.random.default_rng([seed, 11])
    by_id: dict[int, np.ndarray] = {}
    for k in np.unique(ids):
        by_id[int(k)] = np.flatnonzero(ids == k)
    multi = [k for k, v in by_id.items() if len(v) >= 2]
    if multi and len(by_id) >= 2:
        same = []
        for k in rng.choice(multi, num_pairs):
            a, b = rng.choice(by_id[int(k)], 2, replace=False)
            same.append(float(emb[a] @ emb[b]))
        diff = []
        while len(diff) < num_pairs:
            a, b = rng.integers(0, n, 2)
            if ids[a] != ids[b]:
                diff.append(float(emb[a] @ emb[b]))
        same, diff = np.asarray(same), np.asarray(diff)
        metrics.update(id_verification_auc=_auc(same, diff), id_cos_same=float(same.mean()),
                       id_cos_diff=float(diff.mean()))
    err = np.abs(out["head_pose"] - np.asarray(targets["head_pose"]))
    metrics.update(pose_mae_deg=float(err.mean()), yaw_mae_deg=float(err[:, 0].mean()),
                   pitch_mae_deg=float(err[:, 1].mean()), roll_mae_deg=float(err[:, 2].mean()))
    metrics["landmark_nme"] = float(landmark_nme(out["landmarks"], targets["landmarks"]).mean())
    emo = np.asarray(targets["emotion"])
    metrics["emotion_acc"] = float((out["emotion_probs"].argmax(-1) == emo[:, :NUM_EMOTIONS].argmax(-1)).mean())
    for j, name in enumerate(("valence", "arousal")):
        t = emo[:, NUM_EMOTIONS + j]
        p = out["va"][:, j]
        metrics[f"{name}_rmse"] = float(np.sqrt(np.mean((p - t) ** 2)))
        metrics[f"{name}_ccc"] = _ccc(p, t)
    return metrics
