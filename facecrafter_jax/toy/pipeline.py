"""The toy pipeline: the whole FaceCrafter method, end to end, on the toy face world (``python train.py``).

Stages (``configs/toy/pipeline.yaml``; every path under ``out``, default ``runs/toy``)::

    render     toy world -> data/train.npz (images + ground truth), data/test.npz (fresh renders)
    analysers  toy ArcFace / MediaPipe / EmoNet (one CNN, three heads) -> analysers/   + accuracy on test renders
    vae        toy VAE from scratch (64 px -> 16 x 16 x 4)                -> vae/  (converted-folder format)
    records    VAE moments + features -> data/records (the data_prep record format, ArrayRecord shards)
    base       toy Arc2Face (UNet + identity encoder, stage "base" of train.py)  -> base/ -> base_model/
    landmark   stage a: landmark module on the frozen base                      -> stage_a/ -> stage_a_model/
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
    """The sampling experiment of the report (see :mod:`facecrafter_jax.toy.report`)."""

    identities: int = 16
    per_identity: int = 4
    num_steps: int = 20
    scheduler: str = "dpm++2m"
    guidance_id: float = 2.0
    guidance_control: float = 2.0
    seed: int = 7
    batch_size: int = 64

    def __post_init__(self):
        for f in ("identities", "per_identity", "num_steps", "batch_size"):
            if getattr(self, f) <= 0:
                raise ConfigError(f"config key 'evaluation.{f}' must be positive, got {getattr(self, f)}")
        if self.per_identity < 2:
            raise ConfigError("config key 'evaluation.per_identity' must be >= 2 (diversity needs pairs)")


@dataclass(frozen=True)
class ToyPipelineConfig:
    out: str = "runs/toy"
    seed: int = 0
    world: dict = field(default_factory=lambda: {"num_identities": 64, "resolution": 64})
    train_images: int = 6000
    test_images: int = 600
    analysers: dict = field(default_factory=lambda: {"steps": 1000})
    vae: dict = field(default_factory=dict)
    stages: Stages = field(default_factory=Stages)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)

    def __post_init__(self):
        if self.train_images < 64 or self.test_images < 16:
            raise ConfigError(f"train_images >= 64 and test_images >= 16 required, got {self.train_images}, "
                              f"{self.test_images}")


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

    def _mark_done(self, name: str, seconds: float, result: dict) -> None:
        f = self._done_file(name)
        f.parent.mkdir(parents=True, exist_ok=True)
        tmp = f.with_suffix(".tmp")
        tmp.write_text(json.dumps({"stage": name, "seconds": seconds, "result": result}, indent=1, default=float))
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
        """``train`` / ``test`` renders: ``images``, ``identity``, ``arcface``, ``landmarks``, ``head_pose``,
        ``emotion``, ``image_id``."""
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
                t0 = time.perf_counter()
                result = getattr(self, f"_stage_{name}")()
                seconds = time.perf_counter() - t0
                self._mark_done(name, seconds, result)
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
    def _render(self, n: int, seed: int, desc: str) -> dict[str, np.ndarray]:
        from tqdm.auto import tqdm

        w = self.world
        attrs = w.sample(n, seed)
        chunk = 512
        images = []
        for s in tqdm(range(0, n, chunk), desc=desc, unit="batch", dynamic_ncols=True):
            images.append(w.render(attrs.take(np.arange(s, min(n, s + chunk)))))
        feats = w.features(attrs)
        return {"images": np.concatenate(images), "identity": np.asarray(attrs.identity, np.int32),
                "image_id": np.asarray([f"toy/s{seed}/{i:07d}" for i in range(n)]), **feats}

    def _stage_render(self) -> dict:
        d = self.stage_dir("render")
        d.mkdir(parents=True, exist_ok=True)
        for split, n, seed in (("train", self.cfg.train_images, 1000 + self.cfg.seed),
                               ("test", self.cfg.test_images, 2000 + self.cfg.seed)):
            data = self._render(n, seed, f"render {split}")
            tmp = d / f"{split}.tmp.npz"
            np.savez(tmp, **data)
            os.replace(tmp, d / f"{split}.npz")
            self._data[split] = data
        from facecrafter_jax.image_grid import image_grid, save_png

        save_png(image_grid(self.data("train")["images"][:32], 8), d / "train_samples.png")
        return {"train_images": self.cfg.train_images, "test_images": self.cfg.test_images,
                "world": self.world.config.to_dict()}

    def _stage_analysers(self) -> dict:
        from .analysers import AnalyserConfig, evaluate_analysers, train_analysers

        tr, te = self.data("train"), self.data("test")
        acfg = AnalyserConfig.from_dict({"num_identities": self.world.config.num_identities, "seed": self.cfg.seed,
                                         **dict(self.cfg.analysers)})
        targets = {k: tr[k] for k in ("identity", "arcface", "landmarks", "head_pose", "emotion")}
        analysers, _ = train_analysers(tr["images"], targets, acfg, progress=True)
        metrics = evaluate_analysers(analysers, te["images"], {k: te[k] for k in targets})
        analysers.save(self.stage_dir("analysers"), extra={"metrics_on_test_renders": metrics})
        self.log("[toy] analysers on fresh renders: " + ", ".join(
            f"{k} {metrics[k]:.3f}" for k in ("id_top1", "pose_mae_deg", "landmark_nme", "emotion_acc")))
        return {"metrics_on_test_renders": metrics}

    def _stage_vae(self) -> dict:
        from facecrafter_jax.pretrained import save_pretrained

        from .vae_training import VAETrainConfig, train_vae

        vcfg = VAETrainConfig.from_dict({"seed": self.cfg.seed, **dict(self.cfg.vae)})
        vae, info = train_vae(self.data("train")["images"], vcfg, progress=True)
        tmp = self.out / "vae.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        save_pretrained(str(tmp), vae=vae)
        shutil.rmtree(self.stage_dir("vae"), ignore_errors=True)
        os.replace(tmp, self.stage_dir("vae"))
        return {"config": vcfg.to_dict(), "info": info}

    def _load_vae(self):
        from facecrafter_jax.pretrained import load_pretrained

        return load_pretrained(str(self.stage_dir("vae")), components=("vae",)).vae

    def _stage_records(self) -> dict:
        from .vae_training import encode_dataset
        from .world import write_records

        tr = self.data("train")
        vae = self._load_vae()
        moments = encode_dataset(vae, tr["images"], batch_size=256)
        d = self.stage_dir("records")
        tmp = d.with_name(d.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        n = write_records(tmp, [str(s) for s in tr["image_id"]], tr, moments,
                          resolution=self.world.config.resolution, shard_size=1000,
                          metadata={"source": "toy world", "world": self.world.config.to_dict()})
        shutil.rmtree(d, ignore_errors=True)
        os.replace(tmp, d)
        return {"records": n, "latent_shape": list(moments.shape[1:])}

    def train_config(self, stage: str, *, run_dir: Path | None = None, extra: tuple[str, ...] = ()):
        """The resolved :class:`~facecrafter_jax.train.config.TrainConfig` of a training stage."""
        spec: StageSpec = getattr(self.cfg.stages, stage)
        out = self.out
        overrides = [f"run_dir={run_dir or self.stage_dir(stage)}", f"data.dir={self.stage_dir('records')}",
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
