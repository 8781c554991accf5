"""``python -m data_prep run``: face photos -> training record shards + ``manifest.jsonl``.

Pipeline: worker processes (``--workers``, spawn start method, one MediaPipe landmarker each) decode,
detect, select and align every image (:mod:`data_prep.extract`); the main process batches the ok results
(``--batch-size``) through ArcFace (onnxruntime), EmoNet and the VAE (JAX) and writes records with the
:class:`~facecrafter_jax.data.records.RecordWriter`. Skipped images get a manifest line at once; ok images
get theirs when their shard is committed (see :mod:`data_prep.manifest`).

Killed at any moment (SIGKILL, OOM, preemption), a rerun of the same command finishes the job: every input
image ends with exactly one manifest line and at most one record, and every shard verifies against
``dataset.json`` (tested in tests/test_faults.py). The models are built by :func:`load_models` and the CPU
stage by :func:`make_extractor`.
"""

from __future__ import annotations

import collections
import json
import logging
import multiprocessing
import os
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from data_prep.extract import ExtractSettings, FaceExtractor, init_worker, process_in_worker
from data_prep.identities import read_identity_csv
from data_prep.manifest import MANIFEST_NAME, Manifest
from facecrafter_jax.errors import DataError, MissingDataError
from facecrafter_jax.face.images import IMAGE_EXTENSIONS

log = logging.getLogger(__name__)

__all__ = ["run", "list_images", "load_models", "make_extractor"]

TASK_TIMEOUT_S = 300.0


def list_images(root: str | os.PathLike, *, all_files: bool = False, exclude: str | os.PathLike | None = None) -> list[str]:
    """Relative paths ('/'-separated, sorted) of the candidate images under ``root``.

    Hidden files and folders (leading '.') are ignored; so is ``exclude`` (the output folder when it lies
    inside ``root``). Only files with an image extension are listed unless ``all_files``.
    """
    root = Path(root)
    if not root.is_dir():
        raise MissingDataError(f"--images: image folder not found: {root}")
    exclude_real = os.path.realpath(exclude) if exclude is not None else None
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".")
                             and os.path.realpath(os.path.join(dirpath, d)) != exclude_real)
        for name in filenames:
            if name.startswith("."):
                continue
            if not all_files and not name.lower().endswith(IMAGE_EXTENSIONS):
                continue
            full = os.path.join(dirpath, name)
            if not os.path.isfile(full):
                continue
            out.append(Path(os.path.relpath(full, root)).as_posix())
    return sorted(out)


def _file_fingerprint(path: str) -> dict:
    st = os.stat(path)
    return {"name": os.path.basename(os.path.normpath(path)), "bytes": st.st_size if os.path.isfile(path) else None}


class _Stage:
    """The batched model stage: ArcFace + EmoNet + VAE, then the writer."""

    def __init__(self, arcface, emotion, latent, writer, manifest, shard_size):
        self.arcface, self.emotion, self.latent = arcface, emotion, latent
        self.writer, self.manifest, self.shard_size = writer, manifest, shard_size
        self.pending: list[dict] = []  # ok lines whose shard is not committed yet
        self.written = 0
        self.ok = 0
        self.skipped = collections.Counter()

    def skip(self, item: dict) -> None:
        line = {"image_id": item["image_id"], "status": "skipped", "reason": item["reason"], "detail": item.get("detail", "")}
        self.manifest.append([line])
        self.skipped[item["reason"]] += 1
        if item.get("traceback"):
            log.warning("%s: %s\n%s", item["image_id"], item.get("detail"), item["traceback"])

    def _features(self, items: list[dict]):
        arc = self.arcface(np.stack([it["arcface_crop"] for it in items]))
        emo = self.emotion(np.stack([it["emonet_crop"] for it in items]))
        mom = self.latent(np.stack([it["image"] for it in items]))
        return arc, emo, mom

    def process(self, items: list[dict]) -> None:
        if not items:
            return
        try:
            feats = [self._features(items)]
            groups = [items]
        except Exception as e:  # find the culprit(s): one image at a time
            log.warning("batch of %d failed in the model stage (%s: %s); retrying one by one", len(items), type(e).__name__, e)
            feats, groups = [], []
            for it in items:
                try:
                    feats.append(self._features([it]))
                    groups.append([it])
                except Exception as e1:
                    self.skip({"image_id": it["image_id"], "reason": "model_error", "detail": f"{type(e1).__name__}: {e1}"})
        for (arc, emo, mom), group in zip(feats, groups):
            for i, it in enumerate(group):
                record = {"image_id": it["image_id"], "arcface": arc[i], "landmarks": it["landmarks"],
                          "head_pose": it["head_pose"], "emotion": emo[i], "latent_moments": mom[i]}
                try:
                    self.writer.write(record)
                except ValueError as e:  # RecordError: NaN, bad norm, duplicate id ...
                    self.skip({"image_id": it["image_id"], "reason": "invalid_record", "detail": str(e)})
                    continue
                self.pending.append({"image_id": it["image_id"], "status": "ok", "reason": None, **it["meta"]})
                self.ok += 1
                self.written += 1
                # The writer commits a shard exactly when it holds shard_size records (a resumed writer starts a
                # fresh shard), so the lines of the committed shard can be made durable now.
                if self.written % self.shard_size == 0:
                    self.commit_pending()

    def commit_pending(self) -> None:
        self.manifest.append(self.pending)
        self.pending = []


def load_models(arcface: str, emonet: str, vae: str, resolution: int, batch_size: int):
    """``(arcface, emotion, latent)`` callables of the model stage: ArcFace ONNX, Flax EmoNet, Flax VAE."""
    from data_prep.models import LatentModel
    from facecrafter_jax.face.arcface import ArcFaceONNX
    from facecrafter_jax.face.emotion import EmotionModel

    return ArcFaceONNX(arcface), EmotionModel(emonet, batch_size), LatentModel(vae, resolution, batch_size)


def make_extractor(landmarker: str, settings: ExtractSettings) -> FaceExtractor:
    """The per-image CPU stage used in this process (``--workers 0``)."""
    return FaceExtractor(landmarker, settings)


def run(images: str, out: str, landmarker: str, arcface: str, emonet: str, vae: str, *, resolution: int = 512,
        workers: int | None = None, batch_size: int = 16, shard_size: int = 1000, latent_dtype: str = "float16",
        min_side: int | None = None, num_faces: int = 5, emonet_crop_scale: float = 0.75, all_files: bool = False,
        retry_skipped: bool = False, limit: int | None = None, progress: bool = True,
        identity_csv: str | None = None) -> dict:
    """Process every image under ``images`` into records in ``out``; resumable. Returns a summary dict.

    See ``python -m data_prep run --help`` for the arguments.
    """
    from facecrafter_jax.data.identities import write_identity_labels
    from facecrafter_jax.data.records import RecordWriter, read_dataset_info, read_image_ids

    from facecrafter_jax.face.images import MIN_SIDE

    t_start = time.time()
    settings = ExtractSettings(resolution=resolution, min_side=MIN_SIDE if min_side is None else min_side,
                               num_faces=num_faces, emonet_crop_scale=emonet_crop_scale)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if workers is None:
        workers = max(1, min(4, (os.cpu_count() or 2) - 1))
    for name, path in (("landmarker", landmarker), ("arcface", arcface), ("emonet", emonet)):
        if not os.path.isfile(path):
            raise MissingDataError(f"--{name}: file not found: {path}")
    if not os.path.isdir(vae):
        raise MissingDataError(f"--vae: diffusers VAE folder not found: {vae}")
    root = os.path.abspath(images)
    all_ids = list_images(root, all_files=all_files, exclude=out)
    identities = None if identity_csv is None else read_identity_csv(identity_csv, all_ids)

    # Models first: a wrong file fails before any work is done.
    arc_model, emo_model, lat_model = load_models(arcface, emonet, vae, resolution, batch_size)

    metadata = {"data_prep": {"settings": asdict(settings), "landmarker": _file_fingerprint(landmarker),
                              "arcface": _file_fingerprint(arcface), "emonet": _file_fingerprint(emonet),
                              "vae": os.path.basename(os.path.normpath(vae))}}
    out_path = Path(out)
    if (out_path / "dataset.json").exists():
        previous = read_dataset_info(out_path).get("metadata", {}).get("data_prep", {}).get("settings")
        if previous is not None and previous != asdict(settings):
            raise DataError(f"{out} was prepared with settings {previous}; this run uses {asdict(settings)}. "
                            "Use a new output folder (records of one dataset must share their crop settings).")

    summary: dict = {}
    with RecordWriter(out_path, resolution=resolution, shard_size=shard_size, latent_dtype=latent_dtype,
                      metadata=metadata) as writer:
        manifest = Manifest(out_path / MANIFEST_NAME)
        summary["reconciled"] = manifest.reconcile(set(writer.existing_ids))
        done = manifest.ids("ok") | set(writer.existing_ids)
        if not retry_skipped:
            done |= manifest.ids("skipped")
        todo = [i for i in all_ids if i not in done]
        if limit is not None:
            todo = todo[:limit]
        summary.update(images_found=len(all_ids), already_done=sum(1 for i in all_ids if i in done),
                       to_process=len(todo))
        stage = _Stage(arc_model, emo_model, lat_model, writer, manifest, shard_size)
        try:
            _loop(todo, root, landmarker, settings, workers, batch_size, stage, progress)
        finally:
            writer.close()  # commits the last (short) shard; on an exception the partial shard is kept
            stage.commit_pending()
            if identities is not None:
                write_identity_labels(out_path, {i: identities[i] for i in read_image_ids(out_path)})
    elapsed = time.time() - t_start
    summary.update(ok=stage.ok, skipped=dict(stage.skipped), seconds=round(elapsed, 2),
                   images_per_second=round(len(todo) / elapsed, 3) if elapsed > 0 else None)
    return summary


def _bad_name(image_id: str) -> str | None:
    if any(c in image_id for c in "\n\r\0"):
        return "file name contains a newline or NUL character"
    return None


def _loop(todo, root, landmarker, settings, workers, batch_size, stage, progress):
    from tqdm import tqdm

    bar = tqdm(total=len(todo), unit="img", disable=not progress, smoothing=0.1, dynamic_ncols=True)
    batch: list[dict] = []

    def handle(item: dict):
        if item["status"] == "ok":
            batch.append(item)
            if len(batch) >= batch_size:
                stage.process(batch)
                batch.clear()
        else:
            stage.skip(item)
        bar.update(1)
        bar.set_postfix(ok=stage.ok + len(batch), skipped=sum(stage.skipped.values()), refresh=False)

    valid = []
    for image_id in todo:
        why = _bad_name(image_id)
        if why:
            handle({"image_id": image_id.replace("\n", "\\n").replace("\r", "\\r").replace("\0", "\\0"),
                    "status": "skipped", "reason": "bad_name", "detail": why})
        else:
            valid.append(image_id)

    try:
        if workers == 0:
            extractor = make_extractor(landmarker, settings)
            try:
                for image_id in valid:
                    handle(extractor(root, image_id))
            finally:
                extractor.close()
        else:
            ctx = multiprocessing.get_context("spawn")
            max_inflight = 4 * workers + batch_size
            with ctx.Pool(workers, initializer=init_worker, initargs=(landmarker, asdict(settings), root)) as pool:
                inflight: collections.deque = collections.deque()
                it = iter(valid)
                for image_id in it:
                    inflight.append((image_id, pool.apply_async(process_in_worker, (image_id,))))
                    if len(inflight) >= max_inflight:
                        break
                while inflight:
                    image_id, res = inflight.popleft()
                    try:
                        item = res.get(timeout=TASK_TIMEOUT_S)
                    except multiprocessing.TimeoutError:
                        item = {"image_id": image_id, "status": "skipped", "reason": "timeout",
                                "detail": f"no result after {TASK_TIMEOUT_S:.0f} s (worker stuck or crashed)"}
                    except Exception as e:
                        item = {"image_id": image_id, "status": "skipped", "reason": "error", "detail": f"{type(e).__name__}: {e}"}
                    nxt = next(it, None)
                    if nxt is not None:
                        inflight.append((nxt, pool.apply_async(process_in_worker, (nxt,))))
                    handle(item)
        stage.process(batch)
        batch.clear()
    finally:
        bar.close()


def summary_json(summary: dict) -> str:
    return json.dumps(summary, indent=1, sort_keys=True)
