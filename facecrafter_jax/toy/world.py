"""The toy face world: seeded identities, sampled pose / expression / emotion, rendering and records.

``ToyWorld(WorldConfig(num_identities=256, seed=0))`` creates the identities; ``world.generate(n, seed)``
samples n faces, renders them and returns the images with every ground-truth feature in the record layout
(:mod:`facecrafter_jax.data.records`); :func:`write_records` writes them once the VAE has produced latent
moments. Identity ``i`` is the same for every ``num_identities`` (it has its own seeded generator), and the
same ``(config, n, seed)`` always gives the same faces.

Emotions drive the expression: each of the 8 classes (neutral, happy, sad, surprise, fear, disgust, anger,
contempt) has a full-intensity expression vector (:data:`EMOTION_EXPRESSIONS`) and a circumplex position
(:data:`VALENCE_AROUSAL`); a sample of class ``c`` with intensity ``k`` gets
``expression = k * EMOTION_EXPRESSIONS[c] + jitter`` (contempt's one-sided smile goes to a random side), and the
emotion record ``[p_0..p_7, valence, arousal]`` with ``p = 0.95 * (k * onehot(c) + (1 - k) * onehot(neutral))
+ 0.05 / 8`` and ``(valence, arousal) = k * VALENCE_AROUSAL[c]`` (see :func:`emotion_vectors`).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from facecrafter_jax.face.vocabulary import EMOTION_CLASSES, ID_DIM, NUM_EMOTIONS, VALENCE_AROUSAL

from . import landmarks as L
from .render import FaceParams, render_faces

__all__ = [
    "EMOTION_CLASSES", "SCENES", "VALENCE_AROUSAL", "EMOTION_EXPRESSIONS", "HAIR_STYLES", "WorldConfig", "Identities",
    "Attributes", "ToyBatch", "ToyWorld", "emotion_vectors", "write_records",
]


def _expr(**kw) -> np.ndarray:
    unknown = set(kw) - set(L.EXPRESSION_PARAMS)
    assert not unknown, unknown
    return np.array([kw.get(k, 0.0) for k in L.EXPRESSION_PARAMS], np.float64)


# Expression coefficients at full intensity (FACS-inspired: happy = AU6+12(+25), sad = AU1+4+15,
# surprise = AU1+2+5+26, fear = AU1+2+4+5+20+26, disgust = AU9+10+15, anger = AU4+5+7+23,
# contempt = unilateral AU12+14).
EMOTION_EXPRESSIONS = np.stack([
    _expr(),
    _expr(jaw_open=0.35, smile_left=1.0, smile_right=1.0, squint=0.6, eye_open=-0.1),
    _expr(smile_left=-0.8, smile_right=-0.8, brow_inner_up=0.9, brow_furrow=0.3, eye_open=-0.3, lip_press=0.3),
    _expr(jaw_open=0.85, brow_raise=1.0, brow_inner_up=0.3, eye_open=0.55),
    _expr(jaw_open=0.4, mouth_stretch=1.0, brow_raise=0.6, brow_inner_up=0.8, brow_furrow=0.3, eye_open=0.5,
          smile_left=-0.3, smile_right=-0.3),
    _expr(upper_lip_raise=1.0, brow_furrow=0.6, squint=0.6, smile_left=-0.5, smile_right=-0.5, eye_open=-0.2,
          jaw_open=0.1),
    _expr(brow_furrow=1.0, eye_open=0.2, squint=0.3, lip_press=1.0, smile_left=-0.3, smile_right=-0.3),
    _expr(smile_left=0.9, smile_right=-0.15, lip_press=0.3, eye_open=-0.15),
])
EMOTION_EXPRESSIONS.setflags(write=False)

SCENES = ("varied", "studio")
# How far the face centre moves up (image units) per unit of WorldConfig.face_zoom above 1: keeps the chin in.
FACE_ZOOM_LIFT = 0.043
# The studio scene: background gradient, light (unit vector, from above-left of the camera), ambient, brightness.
STUDIO_BG_TOP = np.array([0.62, 0.66, 0.72])
STUDIO_BG_BOTTOM = np.array([0.48, 0.52, 0.58])
STUDIO_LIGHT_AZ_EL = (-20.0, 25.0)
STUDIO_AMBIENT = 0.55
STUDIO_BRIGHTNESS = 1.0

HAIR_STYLES = ("short", "medium", "long", "fringe", "balding", "buzz")
_HAIR_STYLE_P = (0.28, 0.2, 0.22, 0.14, 0.08, 0.08)
_SKIN_TONES = np.array([[0.98, 0.85, 0.75], [0.9, 0.7, 0.56], [0.74, 0.52, 0.38], [0.52, 0.34, 0.24],
                        [0.33, 0.22, 0.16]])
_HAIR_COLOURS = np.array([[0.07, 0.06, 0.06], [0.24, 0.14, 0.08], [0.45, 0.3, 0.17], [0.86, 0.72, 0.46],
                          [0.62, 0.24, 0.1], [0.6, 0.6, 0.6], [0.9, 0.9, 0.88], [0.25, 0.35, 0.75]])
_HAIR_COLOUR_P = (0.25, 0.22, 0.16, 0.13, 0.08, 0.07, 0.05, 0.04)
_IRIS_COLOURS = np.array([[0.35, 0.2, 0.1], [0.14, 0.09, 0.06], [0.3, 0.5, 0.78], [0.3, 0.52, 0.3],
                          [0.5, 0.56, 0.62], [0.52, 0.4, 0.18]])
_GLASSES_COLOURS = np.array([[0.05, 0.05, 0.05], [0.35, 0.2, 0.1], [0.8, 0.65, 0.25], [0.7, 0.72, 0.75],
                             [0.6, 0.1, 0.12]])


def checked_config_dict(cls, d: Mapping[str, Any] | None, what: str) -> dict[str, Any]:
    """The keyword arguments of dataclass ``cls`` in ``d``: keys checked (an unknown key of the ``what`` config is
    a ConfigError naming it), values coerced to the field types; shared by the toy world, analyser and VAE configs."""
    from facecrafter_jax.config import fields_from_dict  # the one config engine: typed values, unknown keys named

    return fields_from_dict(cls, d, what=what)


@dataclass(frozen=True)
class WorldConfig:
    """Distributions of the toy world. Angles in degrees; every random draw derives from ``seed``.

    Head pose: yaw ~ N(0, yaw_std) clipped to +-yaw_max, pitch ~ N(pitch_mean, pitch_std) clipped to
    +-pitch_max around pitch_mean, roll ~ N(0, roll_std) clipped to +-roll_max. Emotions are drawn with
    ``emotion_weights`` (normalised; default uniform), intensity ~ U(intensity_min, intensity_max) (neutral:
    1), each expression coefficient gets N(0, expression_jitter) noise. ``gaze_std`` (units of
    :func:`~.landmarks.face_points`), ``center_jitter`` (image units) and ``scale_jitter`` (relative) move
    the eyes and the face in the frame.

    ``scene``: ``"varied"`` draws background colours, clothing colour, lighting and the body offset per
    sample (nuisance the conditions do not describe); ``"studio"`` fixes the background, lighting and body
    offset and gives each identity its own clothing colour, so an image is determined by identity, pose,
    expression and gaze alone - the attributes FaceCrafter conditions on. The random draws are the same in
    both, so a sample's identity, pose and emotion do not depend on ``scene``.

    ``face_zoom`` scales the face in the frame (1 = head and shoulders; 1.35 = a tighter face crop, as in
    aligned face datasets, where the hair top and shoulders leave the frame and an expression covers 1.8x
    the pixels); the face centre moves up by ``FACE_ZOOM_LIFT * (face_zoom - 1)`` so the chin stays in
    frame. It changes no random draw.
    """

    num_identities: int = 256
    seed: int = 0
    resolution: int = 64
    yaw_std: float = 18.0
    yaw_max: float = 45.0
    pitch_mean: float = 0.0
    pitch_std: float = 9.0
    pitch_max: float = 25.0
    roll_std: float = 6.0
    roll_max: float = 20.0
    emotion_weights: tuple[float, ...] = (1.0,) * NUM_EMOTIONS
    intensity_min: float = 0.7
    intensity_max: float = 1.0
    expression_jitter: float = 0.06
    gaze_std: float = 0.35
    center_jitter: float = 0.012
    scale_jitter: float = 0.03
    p_glasses: float = 0.15
    p_beard: float = 0.2
    scene: str = "varied"
    face_zoom: float = 1.0

    def __post_init__(self):
        if self.scene not in SCENES:
            raise ValueError(f"scene must be one of {SCENES}, got {self.scene!r}")
        if not isinstance(self.num_identities, int) or self.num_identities < 1:
            raise ValueError(f"num_identities must be a positive int, got {self.num_identities!r}")
        if not isinstance(self.resolution, int) or self.resolution < 16 or self.resolution % 8:
            raise ValueError(f"resolution must be an int >= 16 and a multiple of 8, got {self.resolution!r}")
        w = tuple(float(x) for x in self.emotion_weights)
        if len(w) != NUM_EMOTIONS or min(w) < 0 or sum(w) <= 0:
            raise ValueError(f"emotion_weights must be {NUM_EMOTIONS} non-negative numbers with a positive sum, "
                             f"got {self.emotion_weights!r}")
        object.__setattr__(self, "emotion_weights", w)
        if not 0.5 < self.intensity_min <= self.intensity_max <= 1.0:
            raise ValueError("need 0.5 < intensity_min <= intensity_max <= 1 (the emotion must stay the argmax), "
                             f"got {self.intensity_min}, {self.intensity_max}")
        for name in ("yaw_std", "yaw_max", "pitch_std", "pitch_max", "roll_std", "roll_max", "expression_jitter",
                     "gaze_std", "center_jitter", "scale_jitter"):
            if not float(getattr(self, name)) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        if not 0.5 <= float(self.face_zoom) <= 2.0:
            raise ValueError(f"face_zoom must be in [0.5, 2], got {self.face_zoom!r}")
        for name in ("p_glasses", "p_beard"):
            if not 0.0 <= float(getattr(self, name)) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)!r}")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> "WorldConfig":
        """Builds a config from a mapping (e.g. ``yaml.safe_load`` output); unknown keys are an error."""
        return cls(**checked_config_dict(cls, d, "toy world"))  # the engine coerces lists to the tuple fields

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["emotion_weights"] = list(self.emotion_weights)
        return d


@dataclass(frozen=True)
class Identities:
    """Per-identity attributes (arrays with leading dimension I). ``arcface`` [I, 512] is a fixed random unit
    vector per identity; ``hair_style`` indexes :data:`HAIR_STYLES`; other fields as in :class:`FaceParams`."""

    shape: np.ndarray
    iris_radius: np.ndarray
    skin: np.ndarray
    hair: np.ndarray
    iris: np.ndarray
    lips: np.ndarray
    glasses_color: np.ndarray
    hair_style: np.ndarray
    hairline_front: np.ndarray
    hairline_side: np.ndarray
    hairline_back: np.ndarray
    hair_volume: np.ndarray
    hair_length: np.ndarray
    crown: np.ndarray
    fringe: np.ndarray
    ears: np.ndarray
    glasses: np.ndarray
    beard: np.ndarray
    beard_style: np.ndarray
    arcface: np.ndarray

    def __len__(self) -> int:
        return int(self.shape.shape[0])


@dataclass(frozen=True)
class Attributes:
    """Per-sample attributes (arrays with leading dimension N): who, pose, emotion and scene.

    ``identity`` [N] int, ``head_pose`` [N, 3] (yaw, pitch, roll deg), ``emotion`` [N] int (class index),
    ``intensity`` [N], ``expression`` [N, 11], ``gaze`` [N, 2], ``center`` [N, 2], ``scale`` [N],
    ``light_dir`` [N, 3], ``ambient`` [N], ``brightness`` [N], ``bg_top`` / ``bg_bottom`` / ``clothing`` [N, 3],
    ``body_dx`` [N]. Mix attributes of different samples (``replace``) to render e.g. one identity with
    another sample's pose and a third one's emotion.
    """

    identity: np.ndarray
    head_pose: np.ndarray
    emotion: np.ndarray
    intensity: np.ndarray
    expression: np.ndarray
    gaze: np.ndarray
    center: np.ndarray
    scale: np.ndarray
    light_dir: np.ndarray
    ambient: np.ndarray
    brightness: np.ndarray
    bg_top: np.ndarray
    bg_bottom: np.ndarray
    clothing: np.ndarray
    body_dx: np.ndarray

    def __len__(self) -> int:
        return int(np.shape(self.identity)[0])

    def take(self, idx) -> "Attributes":
        """Rows ``idx`` of every field."""
        return replace(self, **{f.name: np.asarray(getattr(self, f.name))[idx] for f in fields(self)})

    @staticmethod
    def concatenate(items: "list[Attributes]") -> "Attributes":
        return Attributes(**{f.name: np.concatenate([getattr(a, f.name) for a in items]) for f in fields(Attributes)})


@dataclass(frozen=True)
class ToyBatch:
    """Rendered samples: ``images`` uint8 [N, R, R, 3], ``features`` (record fields except latents),
    ``attributes`` and ``image_ids`` (list of str)."""

    images: np.ndarray
    features: dict[str, np.ndarray]
    attributes: Attributes
    image_ids: list[str]


def emotion_vectors(emotion, intensity) -> np.ndarray:
    """Record emotion field [N, 10] (8 probabilities, valence, arousal) for classes [N] and intensities [N]."""
    e = np.asarray(emotion, np.int64)
    k = np.asarray(intensity, np.float64)
    if e.ndim != 1 or k.shape != e.shape:
        raise ValueError(f"emotion and intensity must be 1-D of equal length, got {e.shape} and {k.shape}")
    if e.size and (e.min() < 0 or e.max() >= NUM_EMOTIONS):
        raise ValueError(f"emotion class indices must be in [0, {NUM_EMOTIONS}), got range [{e.min()}, {e.max()}]")
    k = np.where(e == 0, 1.0, k)
    onehot = np.eye(NUM_EMOTIONS)[e]
    probs = 0.95 * (k[:, None] * onehot + (1.0 - k[:, None]) * np.eye(NUM_EMOTIONS)[0]) + 0.05 / NUM_EMOTIONS
    va = k[:, None] * VALENCE_AROUSAL[e].astype(np.float64)
    return np.concatenate([probs, va], 1).astype(np.float32)


def _hsv_to_rgb(h, s, v):
    i = np.floor(h * 6.0).astype(int) % 6
    f = h * 6.0 - np.floor(h * 6.0)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    table = np.stack([np.stack([v, t, p], -1), np.stack([q, v, p], -1), np.stack([p, v, t], -1),
                      np.stack([p, q, v], -1), np.stack([t, p, v], -1), np.stack([v, p, q], -1)], 0)
    return table[i, np.arange(len(h))]


def _make_identity(seed: int, i: int) -> dict[str, Any]:
    rng = np.random.default_rng([seed, 1, i])
    d: dict[str, Any] = {}
    d["shape"] = np.clip(rng.standard_normal(len(L.SHAPE_PARAMS)), -2.0, 2.0)
    d["iris_radius"] = rng.uniform(0.52, 0.6)
    t = rng.uniform(0, len(_SKIN_TONES) - 1)
    j = min(int(t), len(_SKIN_TONES) - 2)
    skin = _SKIN_TONES[j] + (t - j) * (_SKIN_TONES[j + 1] - _SKIN_TONES[j])
    d["skin"] = np.clip(skin * rng.uniform(0.95, 1.05) + rng.normal(0, 0.015, 3), 0.05, 1.0)
    hc = _HAIR_COLOURS[rng.choice(len(_HAIR_COLOURS), p=_HAIR_COLOUR_P)]
    d["hair"] = np.clip(hc * rng.uniform(0.85, 1.15) + rng.normal(0, 0.02, 3), 0.02, 1.0)
    d["iris"] = np.clip(_IRIS_COLOURS[rng.integers(len(_IRIS_COLOURS))] + rng.normal(0, 0.03, 3), 0.02, 1.0)
    lips = d["skin"] * np.array([0.88, 0.6, 0.6])
    if rng.random() < 0.15:
        lips = np.array([0.72, 0.12, 0.18]) * rng.uniform(0.7, 1.1)
    d["lips"] = np.clip(lips + rng.normal(0, 0.02, 3), 0.02, 1.0)
    d["glasses_color"] = _GLASSES_COLOURS[rng.integers(len(_GLASSES_COLOURS))]
    style = int(rng.choice(len(HAIR_STYLES), p=_HAIR_STYLE_P))
    d["hair_style"] = style
    name = HAIR_STYLES[style]
    u = rng.uniform
    front, side, back, vol, length, crown, fringe, ears = u(6.2, 7.3), u(1.5, 2.6), u(-3.5, -2.0), \
        u(1.03, 1.07), 0.0, 99.0, 0.0, 1.0
    if name == "medium":
        front, side, back, vol, length, ears = u(6.0, 7.0), u(-1.5, -0.3), -5.0, u(1.07, 1.11), u(7.0, 9.5), 0.0
    elif name == "long":
        front, side, back, vol, length, ears = u(6.0, 7.0), -2.0, -8.0, u(1.07, 1.12), u(13.0, 18.0), 0.0
    elif name == "fringe":
        front, side, back, vol, fringe = u(4.4, 5.2), u(-1.0, 0.5), -5.0, u(1.07, 1.1), u(0.15, 0.35)
        length = u(7.0, 10.0) if rng.random() < 0.5 else 0.0
        ears = 0.0 if side < 0 else 1.0
    elif name == "balding":
        crown = u(3.6, 5.0)
    elif name == "buzz":
        vol = 1.01
        d["hair"] = 0.55 * d["hair"] + 0.45 * d["skin"]
    d.update(hairline_front=front, hairline_side=side, hairline_back=back, hair_volume=vol, hair_length=length,
             crown=crown, fringe=fringe, ears=ears)
    return d


class ToyWorld:
    """Identities plus samplers and the renderer. See the module docstring."""

    def __init__(self, config: WorldConfig | Mapping[str, Any] | None = None):
        self.config = config if isinstance(config, WorldConfig) else WorldConfig.from_dict(config)
        c = self.config
        per = [_make_identity(c.seed, i) for i in range(c.num_identities)]
        arrays = {k: np.asarray([p[k] for p in per]) for k in per[0]}
        # Extras drawn from their own streams so that changing their probabilities keeps the rest unchanged.
        extras = [np.random.default_rng([c.seed, 4, i]).random(4) for i in range(c.num_identities)]
        ex = np.asarray(extras)
        arrays["glasses"] = (ex[:, 0] < c.p_glasses).astype(np.float64)
        arrays["beard"] = np.where(ex[:, 1] < c.p_beard, 0.55 + 0.4 * ex[:, 2], 0.0)
        arrays["beard_style"] = (ex[:, 3] < 0.4).astype(np.float64)
        arc = np.stack([np.random.default_rng([c.seed, 2, i]).standard_normal(ID_DIM)
                        for i in range(c.num_identities)])
        arrays["arcface"] = (arc / np.linalg.norm(arc, axis=1, keepdims=True)).astype(np.float32)
        arrays["hair_style"] = arrays["hair_style"].astype(np.int64)
        self.identities = Identities(**arrays)

    def studio_clothing(self) -> np.ndarray:
        """[I, 3] clothing colour of each identity in the studio scene (its own stream per identity)."""
        c = self.config
        hsv = np.array([np.random.default_rng([c.seed, 5, i]).random(3) for i in range(c.num_identities)])
        return _hsv_to_rgb(hsv[:, 0], 0.1 + 0.7 * hsv[:, 1], 0.15 + 0.75 * hsv[:, 2])

    # ------------------------------------------------------------------ sampling
    def sample(self, n: int, seed: int, *, identity=None, emotion=None, head_pose=None,
               intensity=None) -> Attributes:
        """Draws n samples (deterministic for ``seed``). ``identity`` / ``emotion`` ([N] ints or a scalar),
        ``head_pose`` ([N, 3] or [3]) and ``intensity`` fix those attributes instead of drawing them."""
        c = self.config
        if not isinstance(n, (int, np.integer)) or n < 0:
            raise ValueError(f"n must be a non-negative int, got {n!r}")
        rng = np.random.default_rng([c.seed, 3, int(seed)])
        ids = rng.integers(0, c.num_identities, n)
        if identity is not None:
            ids = np.broadcast_to(np.asarray(identity, np.int64), (n,)).copy()
            if n and (ids.min() < 0 or ids.max() >= c.num_identities):
                raise ValueError(f"identity indices must be in [0, {c.num_identities}), got {ids.min()}..{ids.max()}")
        yaw = np.clip(rng.normal(0.0, c.yaw_std, n), -c.yaw_max, c.yaw_max)
        pitch = c.pitch_mean + np.clip(rng.normal(0.0, c.pitch_std, n), -c.pitch_max, c.pitch_max)
        roll = np.clip(rng.normal(0.0, c.roll_std, n), -c.roll_max, c.roll_max)
        pose = np.stack([yaw, pitch, roll], 1)
        if head_pose is not None:
            pose = np.broadcast_to(np.asarray(head_pose, np.float64), (n, 3)).copy()
        w = np.asarray(c.emotion_weights) / np.sum(c.emotion_weights)
        emo = rng.choice(NUM_EMOTIONS, size=n, p=w)
        if emotion is not None:
            emo = np.broadcast_to(np.asarray(emotion, np.int64), (n,)).copy()
            if n and (emo.min() < 0 or emo.max() >= NUM_EMOTIONS):
                raise ValueError(f"emotion indices must be in [0, {NUM_EMOTIONS})")
        k = rng.uniform(c.intensity_min, c.intensity_max, n)
        if intensity is not None:
            k = np.broadcast_to(np.asarray(intensity, np.float64), (n,)).copy()
        k = np.where(emo == 0, 1.0, k)
        expr = k[:, None] * EMOTION_EXPRESSIONS[emo]
        flip = rng.random(n) < 0.5  # contempt's smirk side
        swap = flip & (emo == EMOTION_CLASSES.index("contempt"))
        il, ir = L.EXPRESSION_PARAMS.index("smile_left"), L.EXPRESSION_PARAMS.index("smile_right")
        expr[swap, il], expr[swap, ir] = expr[swap, ir].copy(), expr[swap, il].copy()
        expr = expr + rng.normal(0.0, c.expression_jitter, expr.shape)
        lo = np.array([L.EXPRESSION_RANGES[p][0] for p in L.EXPRESSION_PARAMS])
        hi = np.array([L.EXPRESSION_RANGES[p][1] for p in L.EXPRESSION_PARAMS])
        expr = np.clip(expr, lo, hi)
        gaze = np.clip(rng.normal(0.0, c.gaze_std, (n, 2)), -1.0, 1.0)
        center0 = np.asarray(L.DEFAULT_CENTER) - [0.0, FACE_ZOOM_LIFT * (c.face_zoom - 1.0)]
        center = center0 + np.clip(rng.normal(0.0, c.center_jitter, (n, 2)), -3 * c.center_jitter,
                                   3 * c.center_jitter)
        scale = L.DEFAULT_SCALE * c.face_zoom * np.exp(np.clip(rng.normal(0.0, c.scale_jitter, n),
                                                               -3 * c.scale_jitter, 3 * c.scale_jitter))
        az = np.deg2rad(rng.uniform(-60, 60, n))
        el = np.deg2rad(rng.uniform(-10, 50, n))
        light = np.stack([np.sin(az) * np.cos(el), -np.sin(el), np.cos(az) * np.cos(el)], 1)
        ambient = rng.uniform(0.45, 0.65, n)
        brightness = rng.uniform(0.85, 1.1, n)
        bg_top = _hsv_to_rgb(rng.random(n), rng.uniform(0.05, 0.5, n), rng.uniform(0.35, 0.95, n))
        bg_bottom = np.clip(bg_top * rng.uniform(0.6, 1.1, (n, 1)), 0, 1)
        clothing = _hsv_to_rgb(rng.random(n), rng.uniform(0.1, 0.8, n), rng.uniform(0.15, 0.9, n))
        body_dx = np.clip(rng.normal(0.0, 0.02, n), -0.06, 0.06)
        if c.scene == "studio":
            az, el = np.deg2rad(STUDIO_LIGHT_AZ_EL)
            light = np.broadcast_to([np.sin(az) * np.cos(el), -np.sin(el), np.cos(az) * np.cos(el)], (n, 3)).copy()
            ambient, brightness = np.full(n, STUDIO_AMBIENT), np.full(n, STUDIO_BRIGHTNESS)
            bg_top, bg_bottom = np.tile(STUDIO_BG_TOP, (n, 1)), np.tile(STUDIO_BG_BOTTOM, (n, 1))
            clothing = self.studio_clothing()[ids]
            body_dx = np.zeros(n)
        return Attributes(identity=ids, head_pose=pose, emotion=emo, intensity=k, expression=expr, gaze=gaze,
                          center=center, scale=scale, light_dir=light, ambient=ambient, brightness=brightness,
                          bg_top=bg_top, bg_bottom=bg_bottom, clothing=clothing, body_dx=body_dx)

    # ------------------------------------------------------------------ rendering / features
    def face_params(self, attrs: Attributes) -> FaceParams:
        """Merges per-sample attributes with their identities' attributes for the renderer."""
        ids = np.asarray(attrs.identity, np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= len(self.identities)):
            raise ValueError(f"identity indices must be in [0, {len(self.identities)})")
        it = self.identities
        return FaceParams(
            shape=it.shape[ids], expression=attrs.expression, gaze=attrs.gaze, iris_radius=it.iris_radius[ids],
            head_pose=attrs.head_pose, center=attrs.center, scale=attrs.scale, skin=it.skin[ids],
            hair=it.hair[ids], iris=it.iris[ids], lips=it.lips[ids], clothing=attrs.clothing,
            bg_top=attrs.bg_top, bg_bottom=attrs.bg_bottom, glasses_color=it.glasses_color[ids],
            hairline_front=it.hairline_front[ids], hairline_side=it.hairline_side[ids],
            hairline_back=it.hairline_back[ids], hair_volume=it.hair_volume[ids], hair_length=it.hair_length[ids],
            crown=it.crown[ids], fringe=it.fringe[ids], ears=it.ears[ids], glasses=it.glasses[ids],
            beard=it.beard[ids], beard_style=it.beard_style[ids], light_dir=attrs.light_dir, ambient=attrs.ambient,
            brightness=attrs.brightness, body_dx=attrs.body_dx)

    def render(self, attrs: Attributes, resolution: int | None = None, batch_size: int = 128) -> np.ndarray:
        """uint8 images [N, R, R, 3] (R = ``resolution`` or the config's)."""
        return render_faces(self.face_params(attrs), resolution or self.config.resolution, batch_size)

    def features(self, attrs: Attributes) -> dict[str, np.ndarray]:
        """Record fields (float32): ``arcface`` [N, 512], ``landmarks`` [N, 478, 3], ``head_pose`` [N, 3],
        ``emotion`` [N, 10]. Landmarks do not depend on the resolution (units of the image side)."""
        from .render import face_landmarks

        p = self.face_params(attrs)
        return {
            "arcface": self.identities.arcface[np.asarray(attrs.identity, np.int64)],
            "landmarks": face_landmarks(p),
            "head_pose": np.asarray(attrs.head_pose, np.float32),
            "emotion": emotion_vectors(attrs.emotion, attrs.intensity),
        }

    def generate(self, n: int, seed: int, *, resolution: int | None = None, prefix: str = "toy",
                 batch_size: int = 128, **fixed) -> ToyBatch:
        """Samples, renders and describes n faces. ``image_ids`` are ``{prefix}/s{seed}/{index:07d}``;
        ``fixed`` is passed to :meth:`sample` (identity, emotion, head_pose, intensity)."""
        attrs = self.sample(n, seed, **fixed)
        images = self.render(attrs, resolution, batch_size)
        ids = [f"{prefix}/s{int(seed)}/{i:07d}" for i in range(n)]
        return ToyBatch(images=images, features=self.features(attrs), attributes=attrs, image_ids=ids)


def write_records(out_dir: str | os.PathLike, image_ids, features: Mapping[str, np.ndarray], latent_moments,
                  *, resolution: int = 64, shard_size: int = 1000, latent_dtype: str = "float16",
                  metadata: Mapping[str, Any] | None = None, identities=None) -> int:
    """Writes one record per sample with :class:`~facecrafter_jax.data.records.RecordWriter`.

    ``identities`` (optional, one int per sample): the world identity of each sample, stored as
    ``identities.tsv`` (label ``id0007`` for identity 7; :mod:`facecrafter_jax.data.identities`), so that
    ``data.other_photo_identity`` can draw the identity from another render of the same person. Labels of
    records already in the folder are kept.

    ``features`` holds ``arcface``, ``landmarks``, ``head_pose``, ``emotion`` (as from
    :meth:`ToyWorld.features`), ``latent_moments`` is [N, S, S, 8] (VAE mean then logvar; S = R / 8 for the SD
    VAE, R / 4 for the toy VAE; stored as the dataset's ``latent_side``). Returns the
    number of records written. Appends to an existing dataset of the same resolution / latent dtype.
    """
    from ..data.records import RecordWriter

    ids = list(image_ids)
    n = len(ids)
    lat = np.asarray(latent_moments)
    if lat.shape[0] != n:
        raise ValueError(f"latent_moments has {lat.shape[0]} rows, image_ids {n}")
    for k in ("arcface", "landmarks", "head_pose", "emotion"):
        if k not in features:
            raise ValueError(f"features lack field {k!r}")
        if np.shape(features[k])[0] != n:
            raise ValueError(f"features[{k!r}] has {np.shape(features[k])[0]} rows, image_ids {n}")
    if identities is not None and len(identities) != n:
        raise ValueError(f"identities has {len(identities)} entries, image_ids {n}")
    with RecordWriter(out_dir, resolution, shard_size, latent_dtype=latent_dtype, metadata=metadata,
                      latent_side=lat.shape[1]) as w:
        for i in range(n):
            w.write({"image_id": ids[i], "arcface": features["arcface"][i], "landmarks": features["landmarks"][i],
                     "head_pose": features["head_pose"][i], "emotion": features["emotion"][i],
                     "latent_moments": lat[i]})
    if identities is not None:
        from ..data.identities import IDENTITIES_FILE, write_identity_labels

        labels: dict[str, str] = {}
        old = Path(out_dir) / IDENTITIES_FILE
        if old.is_file():
            labels.update(line.split("\t", 1) for line in old.read_text(encoding="utf-8").splitlines() if line)
        labels.update((image_id, f"id{int(k):04d}") for image_id, k in zip(ids, identities))
        write_identity_labels(out_dir, labels)
    return n
