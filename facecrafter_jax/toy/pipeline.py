"""The toy pipeline: the whole FaceCrafter method, end to end, on the toy face world (``python train.py``).

Stages (``configs/toy/pipeline.yaml``; every path under ``out``, default ``runs/toy``)::

    render     toy world -> data/{base,adapter,test,test_base}.npz (images + ground truth): the base model's
               "celebrity" split (narrow per-identity pose / expression, facecrafter_jax/toy/splits.py), the
               adapters' full-range split, fresh full-range and celebrity test renders
    analysers  toy ArcFace / MediaPipe / EmoNet (one CNN, three heads) on the adapter split -> analysers/
    vae        toy VAE from scratch (64 px -> 16 x 16 x 4) on both splits  -> vae/  (converted-folder format)
    records    VAE moments + features + the toy ArcFace of each image (the identity analyser's embedding,
               which leaks pose and expression: facecrafter_jax/toy/identity.py) -> data/records/{base,adapter},
               each with identities.tsv (so data.other_photo_identity works on the toy records)
    base       toy Arc2Face (UNet + identity encoder, stage "base" of train.py) on the celebrity split -> base_model/
    landmark   stage a: landmark module on the frozen base, adapter split       -> stage_a/ -> stage_a_model/
    emotion    stage b: emotion module                                          -> stage_b/ -> stage_b_model/
    joint      stage c: both, mixed conditioning + AD loss, init from a and b   -> stage_c/ -> facecrafter/
    evaluate   samples of every model / setup, toy-analyser metrics -> report.md, report.json, images/

The training stages run the real trainer (``facecrafter_jax.train``: records -> grain -> sharded step ->
orbax checkpoints) with the configs in ``configs/toy/``; the exported folders are what ``sample.py``
reads. A finished stage writes ``<stage dir>/done.json`` and is skipped next time; an interrupted
training stage resumes from its last checkpoint, so re-running the same command continues where it
stopped. The resolved pipeline config is kept in ``<out>/pipeline.yaml``: running again with a
different config in the same ``out`` is an error naming the first differing key (use a new ``out``).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from facecrafter_jax.train.config import ConfigError, load_config, to_dict, to_yaml

from .stages import EXPORTS, STAGE_NAMES, TRAIN_STAGES

__all__ = ["StageSpec", "Stages", "EvaluationConfig", "ToyPipelineConfig", "STAGE_NAMES", "load_pipeline_config",
           "ToyPipeline", "main"]

DEFAULT_CONFIG = "configs/toy/pipeline.yaml"


@dataclass(frozen=True)
class StageSpec:
    """A training stage: its train.py config and its number of steps (overrides the config's)."""

    config: str
    steps: int

    def __post_init__(self):
        if self.steps <= 0:
            raise ConfigError(f"stage steps must be positive, got {self.steps}")


@dataclass(frozen=True)
class Stages:
    base: StageSpec = StageSpec("configs/toy/base.yaml", 1600)
    landmark: StageSpec = StageSpec("configs/toy/stage_a_landmark.yaml", 400)
    emotion: StageSpec = StageSpec("configs/toy/stage_b_emotion.yaml", 400)
    joint: StageSpec = StageSpec("configs/toy/stage_c_joint.yaml", 500)


@dataclass(frozen=True)
class EvaluationConfig:
    """The sampling experiment of the report (see :mod:`facecrafter_jax.toy.report`): ``identities`` x
    ``per_identity`` conditions (one reference render per identity), the sampler, guidance, ``bootstrap``
    resamples for the standard errors of ratios and FD, ``probe_images`` held-out renders for the control probe."""

    identities: int = 32
    per_identity: int = 8
    num_steps: int = 20
    scheduler: str = "dpm++2m"
    guidance_id: float = 2.0
    guidance_control: float = 2.0
    seed: int = 7
    batch_size: int = 64
    bootstrap: int = 100
    probe_images: int = 64

    def __post_init__(self):
        for f in ("identities", "per_identity", "num_steps", "batch_size", "bootstrap", "probe_images"):
            if getattr(self, f) <= 0:
                raise ConfigError(f"config key 'evaluation.{f}' must be positive, got {getattr(self, f)}")
        if self.per_identity < 2:
            raise ConfigError("config key 'evaluation.per_identity' must be >= 2 (diversity needs pairs)")


@dataclass(frozen=True)
class ToyPipelineConfig:
    """``python train.py``'s toy pipeline (``configs/toy/pipeline.yaml``).

    ``base_images`` renders of the ``base_split`` (``celebrity``: narrow per-identity pose / expression habits,
    :class:`~.splits.CelebritySplit` with the ``celebrity`` overrides; ``full``: the whole range, for
    comparison) train the base model; ``adapter_images`` full-range renders train the analysers and the adapter
    stages; ``test_images`` fresh renders of each split are the references of the evaluation.
    """

    out: str = "runs/toy"
    seed: int = 0
    world: dict = field(default_factory=lambda: {"num_identities": 64, "resolution": 64})
    base_split: str = "celebrity"
    celebrity: dict = field(default_factory=dict)
    base_images: int = 6000
    adapter_images: int = 6000
    test_images: int = 600
    analysers: dict = field(default_factory=lambda: {"steps": 1000})
    vae: dict = field(default_factory=dict)
    stages: Stages = field(default_factory=Stages)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)

    def __post_init__(self):
        if self.base_images < 64 or self.adapter_images < 64 or self.test_images < 16:
            raise ConfigError(f"base_images >= 64, adapter_images >= 64 and test_images >= 16 required, got "
                              f"{self.base_images}, {self.adapter_images}, {self.test_images}")
        from .splits import SPLITS, CelebritySplit

        if self.base_split not in SPLITS:
            raise ConfigError(f"config key 'base_split' must be one of {list(SPLITS)}, got {self.base_split!r}")
        try:
            CelebritySplit.from_dict(self.celebrity)
        except ValueError as e:
            raise ConfigError(f"config key 'celebrity': {e}") from None


def load_pipeline_config(path: str | None = DEFAULT_CONFIG, overrides=()) -> ToyPipelineConfig:
    """``configs/toy/pipeline.yaml`` (safe YAML) plus dotted ``key=value`` overrides; unknown keys are errors."""
    return load_config(path, list(overrides), cls=ToyPipelineConfig)


def _first_difference(a: Any, b: Any, prefix: str = "") -> str | None:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            d = _first_difference(a.get(k), b.get(k), f"{prefix}.{k}" if prefix else str(k))
            if d is not None:
                return d
        return None
    return None if a == b else f"{prefix}: {a!r} (stored) vs {b!r} (now)"


class ToyPipeline:
    """Runs the stages of :data:`STAGE_NAMES` in order (see the module docstring).

    ``log``: where progress lines go (default stderr; tqdm bars write to stderr too).
    """

    def __init__(self, cfg: ToyPipelineConfig, *, log: Callable[[str], None] | None = None):
        self.cfg = cfg
        self.out = Path(cfg.out)
        self.log = log or (lambda s: print(s, file=sys.stderr, flush=True))
        self._world = None
        self._data: dict[str, dict[str, np.ndarray]] = {}

    # ------------------------------------------------------------------------------------ bookkeeping
    def stage_dir(self, name: str) -> Path:
        return self.out / {"render": "data", "records": "data/records", **TRAIN_STAGES}.get(name, name)

    def _done_file(self, name: str) -> Path:
        return self.out / "stages" / f"{name}.json"

    def done(self, name: str) -> dict | None:
        f = self._done_file(name)
        return json.loads(f.read_text()) if f.is_file() else None

    def _mark_done(self, name: str, seconds: float, result: dict, cpu_seconds: float | None = None) -> None:
        f = self._done_file(name)
        f.parent.mkdir(parents=True, exist_ok=True)
        tmp = f.with_suffix(".tmp")
        rec = {"stage": name, "seconds": seconds, "cpu_seconds": cpu_seconds, "load_average": os.getloadavg()[0],
               "result": result}
        tmp.write_text(json.dumps(rec, indent=1, default=float))
        os.replace(tmp, f)

    def _check_config(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        stored = self.out / "pipeline.yaml"
        now = to_dict(self.cfg)
        if stored.is_file():
            import yaml

            old = yaml.safe_load(stored.read_text())
            diff = _first_difference(old, now)
            if diff is not None:
                raise ConfigError(f"{self.out} holds a toy run with a different config ({diff}); "
                                  "use a new out= or delete the folder")
        else:
            stored.write_text(to_yaml(self.cfg))

    @property
    def world(self):
        if self._world is None:
            from .world import ToyWorld, WorldConfig

            self._world = ToyWorld(WorldConfig.from_dict({**dict(self.cfg.world), "seed": self.cfg.seed}))
        return self._world

    def data(self, split: str) -> dict[str, np.ndarray]:
        """Rendered set ``base`` / ``adapter`` / ``test`` / ``test_base`` (:data:`SPLIT_FILES`): ``images``,
        ``identity``, ``emotion_class``, ``expression``, ``landmarks``, ``head_pose``, ``emotion`` (the record
        field), ``image_id``."""
        if split not in self._data:
            with np.load(self.stage_dir("render") / f"{split}.npz") as z:
                self._data[split] = {k: z[k] for k in z.files}
        return self._data[split]

    # ------------------------------------------------------------------------------------ run
    def run(self, until: str | None = None) -> dict:
        """Run (or skip, when done) every stage up to ``until`` (default all); returns ``{stage: done record}``."""
        from facecrafter_jax.runtime import configure_cpu

        configure_cpu()
        if until is not None and until not in STAGE_NAMES:
            raise ValueError(f"unknown stage {until!r}; stages: {list(STAGE_NAMES)}")
        self._check_config()
        results = {}
        t_all = time.perf_counter()
        for i, name in enumerate(STAGE_NAMES, 1):
            rec = self.done(name)
            if rec is not None:
                self.log(f"[toy {i}/{len(STAGE_NAMES)}] {name}: done earlier ({rec['seconds']:.0f} s), skipped")
            else:
                self.log(f"[toy {i}/{len(STAGE_NAMES)}] {name} ...")
                t0, c0 = time.perf_counter(), time.process_time()
                result = getattr(self, f"_stage_{name}")()
                seconds = time.perf_counter() - t0
                self._mark_done(name, seconds, result, cpu_seconds=time.process_time() - c0)
                rec = self.done(name)
                self.log(f"[toy {i}/{len(STAGE_NAMES)}] {name}: finished in {seconds:.0f} s")
            results[name] = rec
            if name == until:
                self.log(f"[toy] stopped after stage {name} ({time.perf_counter() - t_all:.0f} s this run); "
                         "run again without --until to continue")
                return results
        self.log(f"[toy] all stages done ({time.perf_counter() - t_all:.0f} s this run); report: "
                 f"{self.out / 'report.md'}")
        return results

    # ------------------------------------------------------------------------------------ stages
    @property
    def celebrity(self):
        from .splits import CelebritySplit

        return CelebritySplit.from_dict(self.cfg.celebrity)

    SPLIT_FILES = {"base": "base_split", "adapter": "full", "test": "full", "test_base": "base_split"}
    """Rendered set -> the split it is drawn from (``base_split``: the configured base split)."""

    def split_of(self, name: str) -> str:
        s = self.SPLIT_FILES[name]
        return self.cfg.base_split if s == "base_split" else s

    def _render(self, name: str, n: int, seed: int) -> dict[str, np.ndarray]:
        from tqdm.auto import tqdm

        from .splits import sample_split

        w = self.world
        attrs = sample_split(w, self.split_of(name), n, seed, self.celebrity)
        chunk = 512
        images = []
        for s in tqdm(range(0, n, chunk), desc=f"render {name}", unit="batch", dynamic_ncols=True):
            images.append(w.render(attrs.take(np.arange(s, min(n, s + chunk)))))
        feats = w.features(attrs)
        del feats["arcface"]  # the toy ArcFace is computed from the image by the records stage
        ids = np.asarray(attrs.identity, np.int32)
        return {"images": np.concatenate(images), "identity": ids, "emotion_class": np.asarray(attrs.emotion, np.int32),
                "expression": np.asarray(attrs.expression, np.float32),
                "image_id": np.asarray([f"toy/{name}/id{k:04d}/s{seed}/{i:07d}" for i, k in enumerate(ids)]), **feats}

    RENDER_SEEDS = {"base": 1000, "adapter": 1100, "test": 2000, "test_base": 2100}

    def _stage_render(self) -> dict:
        d = self.stage_dir("render")
        d.mkdir(parents=True, exist_ok=True)
        sizes = {"base": self.cfg.base_images, "adapter": self.cfg.adapter_images, "test": self.cfg.test_images,
                 "test_base": self.cfg.test_images}
        stats = {}
        for name, n in sizes.items():
            data = self._render(name, n, self.RENDER_SEEDS[name] + self.cfg.seed)
            tmp = d / f"{name}.tmp.npz"
            np.savez(tmp, **data)
            os.replace(tmp, d / f"{name}.npz")
            self._data[name] = data
            stats[name] = _split_stats(data)
        from facecrafter_jax.image_grid import image_grid, save_png

        for name in ("base", "adapter"):
            save_png(image_grid(self.data(name)["images"][:32], 8), d / f"{name}_samples.png")
        return {"images": sizes, "world": self.world.config.to_dict(), "base_split": self.cfg.base_split,
                "celebrity": self.celebrity.to_dict(), "split_statistics": stats}

    def _stage_analysers(self) -> dict:
        from .analysers import AnalyserConfig, evaluate_analysers, train_analysers

        tr, te = self.data("adapter"), self.data("test")
        acfg = AnalyserConfig.from_dict({"num_identities": self.world.config.num_identities, "seed": self.cfg.seed,
                                         **dict(self.cfg.analysers)})
        keys = ("identity", "landmarks", "head_pose", "emotion")
        analysers, _ = train_analysers(tr["images"], {k: tr[k] for k in keys}, acfg, progress=True)
        metrics = evaluate_analysers(analysers, te["images"], {k: te[k] for k in keys})
        analysers.save(self.stage_dir("analysers"), extra={"metrics_on_test_renders": metrics})
        self.log("[toy] analysers on fresh renders: " + ", ".join(
            f"{k} {metrics[k]:.3f}" for k in ("id_top1", "pose_mae_deg", "landmark_nme", "emotion_acc")))
        return {"metrics_on_test_renders": metrics}

    def _stage_vae(self) -> dict:
        from facecrafter_jax.pretrained import save_pretrained

        from .vae_training import VAETrainConfig, train_vae

        vcfg = VAETrainConfig.from_dict({"seed": self.cfg.seed, **dict(self.cfg.vae)})
        images = np.concatenate([self.data("base")["images"], self.data("adapter")["images"]])
        vae, info = train_vae(images, vcfg, progress=True)
        tmp = self.out / "vae.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        save_pretrained(str(tmp), vae=vae)
        shutil.rmtree(self.stage_dir("vae"), ignore_errors=True)
        os.replace(tmp, self.stage_dir("vae"))
        return {"config": vcfg.to_dict(), "info": info}

    def _load_vae(self):
        from facecrafter_jax.pretrained import load_pretrained

        return load_pretrained(str(self.stage_dir("vae")), components=("vae",)).vae

    def analysers(self):
        """The toy analysers of the ``analysers`` stage (loaded once)."""
        if getattr(self, "_analysers", None) is None:
            from .analysers import ToyAnalysers

            self._analysers = ToyAnalysers.load(self.stage_dir("analysers"))
        return self._analysers

    def arcface(self, images: np.ndarray) -> np.ndarray:
        """The toy ArcFace of images (:func:`~.identity.toy_arcface` with this pipeline's analysers and seed)."""
        from .identity import toy_arcface

        return toy_arcface(self.analysers(), images, seed=self.cfg.seed)

    def records_dir(self, split: str) -> Path:
        """``data/records/base`` (the base model's) or ``data/records/adapter`` (stages a / b / c)."""
        return self.stage_dir("records") / split

    def _stage_records(self) -> dict:
        from facecrafter_jax.data.records import EMOTION_CLASSES

        from .identity import leakage
        from .landmarks import EXPRESSION_PARAMS
        from .vae_training import encode_dataset
        from .world import write_records

        vae = self._load_vae()
        d = self.stage_dir("records")
        tmp = d.with_name(d.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        counts = {}
        for split in ("base", "adapter"):
            data = self.data(split)
            moments = encode_dataset(vae, data["images"], batch_size=256)
            feats = {k: data[k] for k in ("landmarks", "head_pose", "emotion")}
            feats["arcface"] = self.arcface(data["images"])
            counts[split] = write_records(tmp / split, [str(s) for s in data["image_id"]], feats, moments,
                                          resolution=self.world.config.resolution, shard_size=1000,
                                          identities=data["identity"],
                                          metadata={"source": "toy world", "split": self.split_of(split),
                                                    "world": self.world.config.to_dict()})
        shutil.rmtree(d, ignore_errors=True)
        os.replace(tmp, d)
        te = self.data("test")
        leak = leakage(self.arcface(te["images"]), head_pose=te["head_pose"], expression=te["expression"],
                       emotion=te["emotion_class"], identity=te["identity"], expression_names=EXPRESSION_PARAMS,
                       num_classes=len(EMOTION_CLASSES), seed=self.cfg.seed)
        self.log("[toy] toy ArcFace leakage on fresh full-range renders: " + ", ".join(
            f"{k} {leak[k]:.3f}" for k in ("r2_yaw", "r2_pitch", "r2_expression", "emotion_acc")))
        return {"records": counts, "latent_shape": list(moments.shape[1:]), "arcface_leakage": leak}

    def train_config(self, stage: str, *, run_dir: Path | None = None, extra: tuple[str, ...] = ()):
        """The resolved :class:`~facecrafter_jax.train.config.TrainConfig` of a training stage."""
        spec: StageSpec = getattr(self.cfg.stages, stage)
        out = self.out
        records = self.records_dir("base" if stage == "base" else "adapter")
        overrides = [f"run_dir={run_dir or self.stage_dir(stage)}", f"data.dir={records}",
                     f"steps={spec.steps}"]
        if stage == "base":
            overrides.append(f"model.vae={json.dumps(self._load_vae().config.to_dict())}")
        else:
            overrides.append(f"model.pretrained={out / EXPORTS['base']}")
        if stage == "joint":
            overrides += [f"model.init_from.landmark={self.stage_dir('landmark')}",
                          f"model.init_from.emotion={self.stage_dir('emotion')}"]
        return load_config(spec.config, overrides + list(extra))

    def train_stage(self, stage: str, *, run_dir: Path | None = None, export_to: Path | None = None,
                    extra: tuple[str, ...] = ()) -> dict:
        """Train one stage (resuming its checkpoints) and export it to a converted folder."""
        from facecrafter_jax.train.export import export_run
        from facecrafter_jax.train.loop import Trainer

        cfg = self.train_config(stage, run_dir=run_dir, extra=extra)
        result = Trainer(cfg).run()
        if result["status"] != "finished":
            raise RuntimeError(f"stage {stage} stopped ({result['status']}) at step {result['step']}; run again to resume")
        export = export_to or (self.out / EXPORTS[stage])
        tmp = export.with_name(export.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        export_run(cfg.run_dir, tmp, vae=self.stage_dir("vae") if stage == "base" else None)
        shutil.rmtree(export, ignore_errors=True)
        os.replace(tmp, export)
        losses = [json.loads(line) for line in (Path(cfg.run_dir) / "metrics.jsonl").read_text().splitlines() if line]
        last = losses[-1] if losses else {}
        return {"steps": result["step"], "compile_seconds": result.get("compile_seconds"),
                "final_loss": last.get("loss"), "final_diffusion_loss": last.get("diffusion_loss"),
                "final_ad_loss": last.get("ad_loss"), "export": str(export)}

    def _stage_base(self) -> dict:
        return self.train_stage("base")

    def _stage_landmark(self) -> dict:
        return self.train_stage("landmark")

    def _stage_emotion(self) -> dict:
        return self.train_stage("emotion")

    def _stage_joint(self) -> dict:
        return self.train_stage("joint")

    def _stage_evaluate(self) -> dict:
        from .report import evaluate_pipeline

        return evaluate_pipeline(self)


def _split_stats(data: dict[str, np.ndarray]) -> dict[str, float]:
    from .splits import split_statistics

    return split_statistics(data["identity"], data["head_pose"], data["emotion_class"])


# ---------------------------------------------------------------------------------------------- CLI
USAGE = """usage: python train.py [--toy-config configs/toy/pipeline.yaml] [--until STAGE] [key=value ...]

With no arguments, runs the toy pipeline (render -> analysers -> vae -> records -> base -> landmark ->
emotion -> joint -> evaluate) into runs/toy and writes runs/toy/report.md; run it again to resume.
Overrides are dotted keys of configs/toy/pipeline.yaml, e.g. out=runs/toy2 stages.base.steps=600.
"""


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python train.py", usage=USAGE, description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--toy-config", default=DEFAULT_CONFIG, help="pipeline config (default %(default)s)")
    p.add_argument("--until", choices=STAGE_NAMES, help="stop after this stage")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides of the pipeline config")
    args = p.parse_args(argv)
    try:
        cfg = load_pipeline_config(args.toy_config, args.overrides)
    except (ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        ToyPipeline(cfg).run(until=args.until)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
