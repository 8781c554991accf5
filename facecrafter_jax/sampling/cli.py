"""The ``sample.py`` command line: face images from a converted Arc2Face / FaceCrafter checkpoint.

Validation of every input before any model work, identity / landmarks from photos (the face-analysis path of
data_prep), the sampling loop over :class:`~facecrafter_jax.sampling.FaceCrafterPipeline`, PNGs + grid + the
``samples.json`` of :mod:`facecrafter_jax.sample_set`. Every user error is one line ``error: ...``, exit status 2.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import math
import os
import platform
import time

import numpy as np

from facecrafter_jax.errors import ConfigError, DataError, run_cli
from facecrafter_jax.face.vocabulary import EMOTION_CLASSES, ID_DIM, NUM_LANDMARKS, emotion_vector

from facecrafter_jax.conditioning import ABSENT_CONTROLS

from .facecrafter import FaceCrafterPipeline
from .guidance import SCHEDULERS

__all__ = ["USAGE", "build_parser", "validate", "embed_id_image", "landmarks_from_image", "generate", "main"]

USAGE = """Sample face images from a converted Arc2Face / FaceCrafter checkpoint.

Identity from a photo (detect + align + ArcFace, as in data_prep) or from a saved 512-d ArcFace embedding;
writes one PNG per image, a contact-sheet grid.png and samples.json (every input and setting, versions).

Examples:
  python sample.py --checkpoint ckpt/arc2face --id-embedding me.npy --num-images 4 --out out/me
  python sample.py --checkpoint ckpt/arc2face --id-image me.jpg --arcface arcface.onnx \\
      --landmarker face_landmarker.task --scheduler ddim --steps 50 --seed 3 --out out/me
  python sample.py --checkpoint ckpt/facecrafter --id-embedding me.npy --landmarks-from pose.jpg \\
      --landmarker face_landmarker.task --emotion happy --guidance-control 2 --out out/me_happy

Controls (--landmarks / --landmarks-from, --emotion, --valence / --arousal) need a checkpoint with the
FaceCrafter `adapters` component. Guidance: eps = e(null) + g_id (e(id) - e(null)) + g_ctl (e(id+controls)
- e(id)), one model call per step. A control that is not given runs on its learned null tokens (as in
training), so a FaceCrafter checkpoint sampled with identity only still uses its control modules; with
--absent-controls switched_off, or a checkpoint without adapters, ID-only sampling is exactly Arc2Face.

Every bad input (missing checkpoint or file, unreadable or face-less --id-image, wrong embedding shape,
unknown emotion, valence / arousal outside [-1, 1], ...) is reported as one line `error: ...` on stderr
with exit status 2, before any diffusion-model work starts.
"""


# -------------------------------------------------------------------------------------------------------
# FaceCrafter controls: which checkpoint component provides which control. Both live in the `adapters`
# component (facecrafter_jax.pretrained); its config.json lists the controls it was trained with
# (`controls`: a subset of landmark, emotion).
# -------------------------------------------------------------------------------------------------------
CONTROL_COMPONENTS = {"landmark": "adapters", "emotion": "adapters"}


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, our format, instead of usage + message
        raise ConfigError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="sample.py", description=USAGE.split("\n\n")[0],
                epilog="\n\n".join(USAGE.split("\n\n")[1:]), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, metavar="DIR",
                   help="converted checkpoint folder (facecrafter-convert from-diffusers ... --out DIR) with unet, "
                        "text_encoder and vae")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (created): NNNN.png, grid.png, "
                   "samples.json, identity.npy")
    p.add_argument("--overwrite", action="store_true", help="allow writing into a folder that already holds samples.json")

    ident = p.add_argument_group("identity (exactly one of --id-image / --id-embedding)")
    src = ident.add_mutually_exclusive_group(required=True)
    src.add_argument("--id-image", metavar="IMG", help="photo of the person: the largest face is detected (MediaPipe), "
                     "aligned to 112x112 and embedded with ArcFace; needs --arcface and --landmarker")
    src.add_argument("--id-embedding", metavar="NPY", help=f".npy with a {ID_DIM}-d ArcFace embedding (shape "
                     f"[{ID_DIM}] or [1, {ID_DIM}]); it is L2-normalised")
    ident.add_argument("--arcface", metavar="ONNX", help="ArcFace ONNX model (Arc2Face's arcface.onnx), for --id-image")
    ident.add_argument("--landmarker", metavar="TASK", help="MediaPipe face_landmarker.task bundle, for --id-image "
                       "and --landmarks-from")

    s = p.add_argument_group("sampling")
    s.add_argument("--num-images", type=int, default=4, metavar="N", help="images to generate (default 4)")
    s.add_argument("--batch-size", type=int, default=None, metavar="B",
                   help="images per model call (default min(N, 4)); results do not depend on it")
    s.add_argument("--steps", type=int, default=25, help="sampler steps (default 25, Arc2Face's)")
    s.add_argument("--scheduler", choices=tuple(SCHEDULERS), default="dpm++2m",
                   help="sampler: DPM-Solver++ 2M (default, Arc2Face's), DDIM (eta 0) or Euler")
    s.add_argument("--scheduler-config", metavar="JSON", help="diffusers scheduler_config.json (default: SD1.5's)")
    s.add_argument("--guidance-id", type=float, default=3.0, metavar="G",
                   help="classifier-free guidance scale of the identity against the empty prompt (default 3.0; "
                        "1.0 disables guidance)")
    s.add_argument("--seed", type=int, default=0, help="image i starts from noise fold_in(key(seed), i) (default 0)")
    s.add_argument("--height", type=int, help="image height in pixels (default: UNet sample_size x VAE factor, 512 for SD1.5)")
    s.add_argument("--width", type=int, help="image width in pixels (default as --height)")
    s.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="compute dtype (parameters stay float32; bfloat16 for accelerators)")

    c = p.add_argument_group("controls (FaceCrafter checkpoints with the adapters component only)")
    lm = c.add_mutually_exclusive_group()
    lm.add_argument("--landmarks-from", metavar="IMG", help="take pose / expression landmarks from this photo: the "
                    "largest face is detected (MediaPipe, needs --landmarker) and its 478 landmarks are mapped "
                    "into the aligned crop exactly as data_prep stores them")
    lm.add_argument("--landmarks", metavar="NPY", help=f".npy of MediaPipe landmarks [{NUM_LANDMARKS}, 3] (all "
                    f"images) or [N, {NUM_LANDMARKS}, 3] (one per image, N = --num-images); x, y in [0, 1] of the "
                    "aligned crop, z relative depth, as data_prep stores them")
    c.add_argument("--emotion", metavar="NAME", help="target emotion class: neutral, happy, sad, surprise, fear, "
                   "disgust, anger, contempt (one-hot probabilities + the class's valence / arousal from "
                   "facecrafter_jax.face.vocabulary.emotion_table)")
    c.add_argument("--valence", type=float, metavar="V", help="target valence in [-1, 1] (with --arousal; overrides "
                   "the class's; alone: the class is the nearest one on the circumplex)")
    c.add_argument("--arousal", type=float, metavar="A", help="target arousal in [-1, 1] (with --valence)")
    c.add_argument("--guidance-control", type=float, metavar="G",
                   help="guidance scale of the controls on top of the identity (eps = e0 + g_id (e_id - e0) + "
                        "g_ctl (e_id+ctl - e_id)); default: --guidance-id; 0 gives the ID-only result; needs a "
                        "control flag")
    c.add_argument("--landmark-scale", type=float, metavar="L", help="lambda of the landmark attention branch "
                   "(default 1.0)")
    c.add_argument("--emotion-scale", type=float, metavar="L", help="lambda of the emotion attention branch "
                   "(default 1.0)")
    c.add_argument("--absent-controls", choices=ABSENT_CONTROLS, default="null_tokens",
                   help="what the checkpoint's controls that are not given do: 'null_tokens' (default) = their learned null "
                        "tokens, as in training (so ID-only sampling uses the control modules too); 'off' = switched "
                        "off (an ablation: ID-only sampling is then the Arc2Face base exactly)")
    return p


# -------------------------------------------------------------------------------------------------------
# Validation (no model work)
# -------------------------------------------------------------------------------------------------------
def _need_file(path: str | None, flag: str) -> str:
    if path is None:
        raise ConfigError(f"{flag} is required")
    if not os.path.isfile(path):
        raise DataError(f"{flag} {path}: no such file")
    if not os.access(path, os.R_OK):
        raise DataError(f"{flag} {path}: not readable")
    return os.path.abspath(path)


def _load_npy(path: str, flag: str) -> np.ndarray:
    _need_file(path, flag)
    try:
        a = np.load(path, allow_pickle=False)
    except Exception as e:  # ValueError (pickled object arrays), OSError, format errors
        raise DataError(f"{flag} {path}: cannot read as .npy ({type(e).__name__}: {e})") from None
    if not isinstance(a, np.ndarray) or not np.issubdtype(a.dtype, np.number):
        raise DataError(f"{flag} {path}: expected a numeric array, got {getattr(a, 'dtype', type(a))}")
    return a


def load_id_embedding(path: str) -> np.ndarray:
    """A 512-d ArcFace embedding from .npy ([512] or [1, 512]) -> L2-normalised float32 [512]."""
    a = _load_npy(path, "--id-embedding")
    if a.shape not in ((ID_DIM,), (1, ID_DIM)):
        raise DataError(f"--id-embedding {path}: shape {list(a.shape)}, expected [{ID_DIM}] or [1, {ID_DIM}]")
    a = a.reshape(ID_DIM).astype(np.float32)
    if not np.all(np.isfinite(a)):
        raise DataError(f"--id-embedding {path}: contains NaN or Inf")
    n = float(np.linalg.norm(a))
    if n < 1e-6:
        raise DataError(f"--id-embedding {path}: zero vector")
    return a / n


def _check_image(path: str, flag: str) -> np.ndarray:
    from facecrafter_jax.face.images import SkipImage, load_image

    _need_file(path, flag)
    try:
        return load_image(path)
    except SkipImage as s:
        raise DataError(f"{flag} {path}: {s.reason.replace('_', ' ')}" + (f" ({s.detail})" if s.detail else "")) from None


def _read_json(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: {e}") from None


def read_checkpoint(directory: str) -> dict:
    """Manifest and component configs of a converted checkpoint (JSON only, no weights)."""
    if not os.path.isdir(directory):
        raise DataError(f"--checkpoint {directory}: no such directory")
    from facecrafter_jax.pretrained import read_manifest

    try:
        manifest = read_manifest(directory)
    except (FileNotFoundError, ValueError) as e:
        raise DataError(str(e)) from None
    missing = [c for c in ("unet", "text_encoder", "vae") if c not in manifest["components"]]
    if missing:
        raise DataError(f"checkpoint {directory} lacks component(s) {missing} (it has {manifest['components']})")
    configs = {c: _read_json(os.path.join(directory, c, "config.json")) for c in ("unet", "text_encoder", "vae")}
    return {"manifest": manifest, "configs": configs, "components": list(manifest["components"]), "dir": directory}


def available_controls(ckpt: dict) -> set[str]:
    """Controls the checkpoint can apply: those listed by its adapters component (see CONTROL_COMPONENTS)."""
    have = set()
    for name, comp in CONTROL_COMPONENTS.items():
        if comp not in ckpt["components"]:
            continue
        if comp == "adapters":
            if "adapters" not in ckpt["configs"]:
                from facecrafter_jax.models.facecrafter import FaceCrafterConfig

                path = os.path.join(ckpt["dir"], "adapters", "config.json")
                try:
                    ckpt["configs"]["adapters"] = FaceCrafterConfig.from_dict(_read_json(path)).to_dict()
                except (ValueError, TypeError) as e:
                    raise DataError(f"{path}: {e}") from None
            if name in ckpt["configs"]["adapters"]["controls"]:
                have.add(name)
        else:
            have.add(name)
    return have


def image_size(ckpt: dict, height: int | None, width: int | None) -> tuple[int, int]:
    """Default / validated (height, width) from the UNet and VAE configs."""
    u, v = ckpt["configs"]["unet"], ckpt["configs"]["vae"]
    f = 2 ** (len(v.get("block_out_channels", (64,))) - 1)
    m = f * 2 ** (len(u.get("block_out_channels", (320, 640, 1280, 1280))) - 1)
    s = u.get("sample_size")
    if (height is None or width is None) and s is None:
        raise ConfigError("the UNet config has no sample_size: pass --height and --width")
    sh, sw = (s, s) if isinstance(s, int) else tuple(s or (0, 0))
    height = sh * f if height is None else height
    width = sw * f if width is None else width
    for name, val in (("--height", height), ("--width", width)):
        if val <= 0 or val % m:
            raise ConfigError(f"{name} {val}: must be a positive multiple of {m} for this checkpoint")
    return height, width


def parse_controls(args) -> dict:
    """Validate the control flags; returns the parsed control inputs (empty dict when none given).

    ``landmarks``: ``{"source", "path", "array"}`` (array [478, 3] or [N, 478, 3]; for ``--landmarks-from``
    the array is filled in by :func:`landmarks_from_image`); ``emotion``: ``{"name", "index", "valence",
    "arousal", "class_from", "vector"}`` (vector [10]).
    """
    controls: dict = {}
    if args.landmarks is not None:
        a = _load_npy(args.landmarks, "--landmarks")
        if a.shape != (NUM_LANDMARKS, 3) and a.shape != (args.num_images, NUM_LANDMARKS, 3):
            raise DataError(f"--landmarks {args.landmarks}: shape {list(a.shape)}, expected [{NUM_LANDMARKS}, 3] or "
                           f"[{args.num_images}, {NUM_LANDMARKS}, 3] (one per image, --num-images {args.num_images})")
        if not np.all(np.isfinite(a)):
            raise DataError(f"--landmarks {args.landmarks}: contains NaN or Inf")
        controls["landmarks"] = {"source": "npy", "path": os.path.abspath(args.landmarks), "array": a.astype(np.float32)}
    if args.landmarks_from is not None:
        _check_image(args.landmarks_from, "--landmarks-from")
        if args.landmarker is None:
            raise ConfigError("--landmarks-from needs --landmarker")
        _need_file(args.landmarker, "--landmarker")
        controls["landmarks"] = {"source": "image", "path": os.path.abspath(args.landmarks_from)}
    if args.emotion is not None:
        names = EMOTION_CLASSES
        if args.emotion.lower() not in names:
            raise ConfigError(f"--emotion {args.emotion!r}: unknown; choose one of {', '.join(names)}")
        controls["emotion"] = {"name": args.emotion.lower(), "index": names.index(args.emotion.lower())}
    if (args.valence is None) != (args.arousal is None):
        raise ConfigError("--valence and --arousal go together: give both")
    if args.valence is not None:
        for flag, v in (("--valence", args.valence), ("--arousal", args.arousal)):
            if not math.isfinite(v) or not -1.0 <= v <= 1.0:
                raise ConfigError(f"{flag} {v}: must be in [-1, 1]")
        controls.setdefault("emotion", {}).update(valence=args.valence, arousal=args.arousal)
    if "emotion" in controls:
        e = controls["emotion"]
        try:
            vec, desc = emotion_vector(e.get("name"), e.get("valence"), e.get("arousal"))
        except ValueError as err:  # pragma: no cover - the checks above catch every bad input first
            raise ConfigError(f"--emotion: {err}") from None
        controls["emotion"] = {**desc, "vector": [round(float(x), 6) for x in vec], "array": vec}
    if args.guidance_control is not None:
        if not controls:
            raise ConfigError("--guidance-control needs a control (--landmarks, --landmarks-from, --emotion or "
                           "--valence/--arousal)")
        if not math.isfinite(args.guidance_control):
            raise ConfigError(f"--guidance-control {args.guidance_control}: must be a finite number")
    for flag, value, name, what in (("--landmark-scale", args.landmark_scale, "landmarks", "--landmarks or --landmarks-from"),
                                    ("--emotion-scale", args.emotion_scale, "emotion", "--emotion or --valence/--arousal")):
        if value is None:
            continue
        if name not in controls:
            raise ConfigError(f"{flag} needs {what}")
        if not math.isfinite(value):
            raise ConfigError(f"{flag} {value}: must be a finite number")
    return controls


def validate(args) -> dict:
    """Check every input before any model work. Returns what the run needs."""
    if args.num_images < 1:
        raise ConfigError(f"--num-images {args.num_images}: must be >= 1")
    batch = min(args.num_images, 4) if args.batch_size is None else args.batch_size
    if batch < 1:
        raise ConfigError(f"--batch-size {args.batch_size}: must be >= 1")
    if not 1 <= args.steps <= 1000:
        raise ConfigError(f"--steps {args.steps}: must be in [1, 1000]")
    if not math.isfinite(args.guidance_id):
        raise ConfigError(f"--guidance-id {args.guidance_id}: must be a finite number")
    if not 0 <= args.seed < 2**32:
        raise ConfigError(f"--seed {args.seed}: must be in [0, 2^32)")
    ckpt = read_checkpoint(args.checkpoint)
    hidden = ckpt["configs"]["text_encoder"].get("hidden_size", 0)
    if hidden < ID_DIM:
        raise ConfigError(f"checkpoint text encoder width {hidden} < {ID_DIM}: cannot take an ArcFace embedding")
    height, width = image_size(ckpt, args.height, args.width)
    scheduler_config = None
    if args.scheduler_config is not None:
        _need_file(args.scheduler_config, "--scheduler-config")
        from facecrafter_jax.schedulers import read_config_file

        try:
            scheduler_config = read_config_file(args.scheduler_config)
        except (FileNotFoundError, ValueError, json.JSONDecodeError) as e:
            raise ConfigError(f"--scheduler-config {args.scheduler_config}: {e}") from None
    from facecrafter_jax.schedulers import SD15_SCHEDULER_CONFIG

    try:
        plan = SCHEDULERS[args.scheduler].from_config(scheduler_config or SD15_SCHEDULER_CONFIG).set_timesteps(args.steps)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"scheduler {args.scheduler}: {e}") from None
    if plan.stochastic:
        raise ConfigError(f"scheduler {args.scheduler}: stochastic sampler configurations are not supported")

    identity: dict = {}
    if args.id_embedding is not None:
        if args.arcface is not None:
            raise ConfigError("--arcface is only used with --id-image")
        identity = {"source": "embedding", "path": os.path.abspath(args.id_embedding),
                    "embedding": load_id_embedding(args.id_embedding)}
    else:
        arcface = _need_file(args.arcface, "--arcface (needed by --id-image)")
        landmarker = _need_file(args.landmarker, "--landmarker (needed by --id-image)")
        _check_image(args.id_image, "--id-image")
        identity = {"source": "image", "path": os.path.abspath(args.id_image), "arcface": arcface,
                    "landmarker": landmarker}

    controls = parse_controls(args)
    have = available_controls(ckpt)
    if controls:
        for name in ("landmarks", "emotion"):
            module = "landmark" if name == "landmarks" else "emotion"
            if name in controls and module not in have:
                raise ConfigError(f"checkpoint {args.checkpoint} has no {module} module: "
                               f"--{'landmarks' if name == 'landmarks' else 'emotion/--valence/--arousal'} cannot be used")

    out = os.path.abspath(args.out)
    if os.path.exists(out) and not os.path.isdir(out):
        raise ConfigError(f"--out {args.out}: exists and is not a directory")
    if os.path.isfile(os.path.join(out, "samples.json")) and not args.overwrite:
        raise ConfigError(f"--out {args.out} already holds samples.json (pass --overwrite to replace)")
    return {"ckpt": ckpt, "batch": batch, "height": height, "width": width, "identity": identity,
            "controls": controls, "available_controls": sorted(have), "scheduler_config": scheduler_config, "out": out}


# -------------------------------------------------------------------------------------------------------
# Identity and landmarks from a photo (the face-analysis path of data_prep)
# -------------------------------------------------------------------------------------------------------
def embed_id_image(image_path: str, landmarker_path: str, arcface_path: str) -> tuple[np.ndarray, dict]:
    """Largest face of a photo -> (L2-normalised ArcFace embedding [512], face info)."""
    from facecrafter_jax.face.analysis import identity_from_photo

    return identity_from_photo(_check_image(image_path, "--id-image"), landmarker_path, arcface_path,
                               what=f"--id-image {image_path}")


def landmarks_from_image(image_path: str, landmarker_path: str) -> tuple[np.ndarray, dict]:
    """Largest face of a photo -> its 478 landmarks [478, 3] in the FFHQ-style aligned crop's frame, exactly as
    data_prep stores them in records, and face info."""
    from facecrafter_jax.face.analysis import landmarks_from_photo

    return landmarks_from_photo(_check_image(image_path, "--landmarks-from"), landmarker_path,
                                what=f"--landmarks-from {image_path}")


def versions() -> dict:
    import flax
    import jax
    import jaxlib

    import facecrafter_jax

    return {"facecrafter_jax": facecrafter_jax.__version__, "jax": jax.__version__, "jaxlib": jaxlib.__version__,
            "flax": flax.__version__, "numpy": np.__version__, "python": platform.python_version(),
            "platform": platform.platform(), "devices": [str(d) for d in jax.devices()]}


def generate(v: dict, args) -> dict:
    """Load the models, sample, write the outputs. Returns the samples.json dict."""
    import jax.numpy as jnp
    from PIL import Image

    from facecrafter_jax.image_grid import image_grid, save_png
    from facecrafter_jax.pretrained import load_pretrained
    from facecrafter_jax.sample_set import write_samples_json

    ctl = v["controls"]
    # the adapters are used whenever the checkpoint has them, except for ID-only sampling with --absent-controls switched_off
    # (plain Arc2Face); a checkpoint without adapters is Arc2Face
    use_adapters = bool(v["available_controls"]) and (bool(ctl) or args.absent_controls == "null_tokens")
    components = ("unet", "text_encoder", "vae") + (("adapters",) if use_adapters else ())
    t0 = time.perf_counter()
    models = load_pretrained(args.checkpoint, dtype=jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32,
                             components=components)
    t_load = time.perf_counter() - t0
    pipe = FaceCrafterPipeline(models.adapters if use_adapters else models.unet, models.text_encoder, models.vae,
                               scheduler=args.scheduler, scheduler_config=v["scheduler_config"])
    n, batch = args.num_images, min(v["batch"], args.num_images)
    emb = v["identity"]["embedding"]
    os.makedirs(v["out"], exist_ok=True)
    np.save(os.path.join(v["out"], "identity.npy"), emb)
    lmk = ctl["landmarks"]["array"] if "landmarks" in ctl else None
    emo = ctl["emotion"]["array"] if "emotion" in ctl else None
    per_image_lmk = lmk is not None and lmk.ndim == 3
    if per_image_lmk:
        os.makedirs(os.path.join(v["out"], "landmarks"), exist_ok=True)
    elif lmk is not None:
        np.save(os.path.join(v["out"], "landmarks.npy"), lmk)
    settings = dict(num_steps=args.steps, guidance_id=args.guidance_id, guidance_control=args.guidance_control,
                    absent_controls=args.absent_controls, height=v["height"], width=v["width"])
    scales = dict(landmark_scale=1.0 if args.landmark_scale is None else args.landmark_scale,
                  emotion_scale=1.0 if args.emotion_scale is None else args.emotion_scale)

    t0 = time.perf_counter()
    compile_s = pipe.compile(batch, controls=tuple(c for c, a in (("landmark", lmk), ("emotion", emo)) if a is not None),
                             id_dim=ID_DIM, **settings)
    t_sample = 0.0
    images, records = [], []
    for start in range(0, n, batch):
        count = min(batch, n - start)  # the last batch is padded to `batch` (one compilation) and trimmed
        batch_lmk = lmk
        if per_image_lmk:
            idx = np.minimum(np.arange(start, start + batch), n - 1)  # padding repeats the last image's
            batch_lmk = lmk[idx]
        t1 = time.perf_counter()
        out = pipe(np.broadcast_to(emb, (batch, ID_DIM)), landmarks=batch_lmk, emotion=emo, seed=args.seed,
                   first_index=start, output_type="uint8", **settings, **scales)
        t_sample += time.perf_counter() - t1
        for j in range(count):
            name = f"{start + j:04d}.png"
            Image.fromarray(out.images[j]).save(os.path.join(v["out"], name))
            images.append(out.images[j])
            rec = {"file": name, "index": start + j, "seed": args.seed, "noise_index": start + j}
            if per_image_lmk:
                lname = os.path.join("landmarks", f"{start + j:04d}.npy")
                np.save(os.path.join(v["out"], lname), lmk[start + j])
                rec["controls"] = {"landmarks": {"file": lname, "source": ctl["landmarks"]["source"],
                                                 "path": ctl["landmarks"]["path"], "row": start + j}}
            records.append(rec)
    save_png(image_grid(np.stack(images), pad=4), os.path.join(v["out"], "grid.png"))

    ident = {k: val for k, val in v["identity"].items() if k != "embedding"}
    ident["embedding_file"] = "identity.npy"
    ident["embedding_sha256"] = hashlib.sha256(emb.astype("<f4").tobytes()).hexdigest()
    controls = {k: {kk: vv for kk, vv in c.items() if kk != "array"} for k, c in ctl.items()}
    if "landmarks" in controls:
        c = controls["landmarks"]
        c["shape"] = list(lmk.shape)
        c["sha256"] = hashlib.sha256(lmk.astype("<f4").tobytes()).hexdigest()
        if not per_image_lmk:
            c["file"] = "landmarks.npy"
        else:
            c["per_image"] = "images[i].controls.landmarks.file"
    if "landmarks" in controls or "emotion" in controls:
        controls["scales"] = {"landmark": scales["landmark_scale"] if lmk is not None else None,
                              "emotion": scales["emotion_scale"] if emo is not None else None}
    meta = {
        "tool": "sample.py",
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "argv": list(args.argv),
        "checkpoint": os.path.abspath(args.checkpoint),
        "checkpoint_components": v["ckpt"]["components"],
        "checkpoint_controls": v["available_controls"],
        "model": "FaceCrafter (Arc2Face + adapters)" if use_adapters else "Arc2Face",
        "identity": ident,
        "controls": controls,
        "settings": {
            "num_images": n, "batch_size": batch, "steps": args.steps, "scheduler": args.scheduler,
            "scheduler_config": os.path.abspath(args.scheduler_config) if args.scheduler_config else "SD1.5 (built in)",
            "guidance_id": args.guidance_id, "guidance_control": args.guidance_control,
            "guidance_control_used": (args.guidance_control if args.guidance_control is not None else args.guidance_id)
            if ctl else None,
            "guidance": "eps = e(null) + g_id (e(id) - e(null)) + g_ctl (e(id+controls) - e(id))",
            "absent_controls": args.absent_controls,
            "null_branch": pipe.null_branch(bool(ctl) and (args.guidance_id if args.guidance_control is None
                                                            else args.guidance_control) != 0.0, args.absent_controls),
            "seed": args.seed,
            "height": v["height"], "width": v["width"], "dtype": args.dtype,
            "noise": "image i: jax.random.normal(jax.random.fold_in(jax.random.key(seed), i), [h, w, 4], float32)",
        },
        "images": records,
        "grid": "grid.png",
        "timing_s": {"load": round(t_load, 3), "compile": round(compile_s, 3), "sample": round(t_sample, 3),
                     "total_generate": round(time.perf_counter() - t0, 3)},
        "versions": versions(),
    }
    write_samples_json(v["out"], meta)
    return meta


def _main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    args.argv = argv
    from facecrafter_jax.runtime import configure_cpu, enable_compilation_cache

    configure_cpu()  # XLA:CPU flag defaults (docs/performance.md); no effect on GPU / TPU, user XLA_FLAGS win
    enable_compilation_cache()  # a second run loads the sampler program from disk (docs/performance.md)
    v = validate(args)
    if v["identity"]["source"] == "image":
        emb, info = embed_id_image(args.id_image, v["identity"]["landmarker"], v["identity"]["arcface"])
        v["identity"].update(embedding=emb, face=info)
    lm = v["controls"].get("landmarks")
    if lm is not None and lm["source"] == "image":
        arr, info = landmarks_from_image(args.landmarks_from, os.path.abspath(args.landmarker))
        lm.update(array=arr, landmarker=os.path.abspath(args.landmarker), face=info)
    meta = generate(v, args)
    print(f"wrote {len(meta['images'])} images, grid.png and samples.json to {v['out']} "
          f"(compile {meta['timing_s']['compile']:.1f}s, sampling {meta['timing_s']['sample']:.1f}s)")
    return 0


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit status (0 ok, 2 bad input: one line ``error: ...``)."""
    return run_cli(_main, argv)
