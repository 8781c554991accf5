"""grain input pipeline over record shards: shuffle, repeat, per-process slice, decode, batch, device put.

Order of operations (one grain ``MapDataset`` chain, identical on every process)::

    MapDataset.range(num_records)
      .seed(seed) -> .shuffle()           index shuffle, a different permutation each epoch (seed + epoch)
      .repeat(num_epochs)                 None = forever
      .random_map(other photo)            optional: index -> (index, index of another photo of the same identity)
      [process_index::process_count]      each process gets a disjoint, interleaved slice
      .map(read + decode)                 ArrayRecord bytes -> dict of numpy arrays (np.frombuffer)
      .batch(global_batch // process_count, drop_remainder=True)
      .to_iter_dataset(ReadOptions)       threads in the reading process
      .mp_prefetch(worker_count)          optional worker processes (each takes every worker_count-th batch)
    then, in the training process: jax.make_array_from_process_local_data(sharding, batch)

Every process must use the same ``seed`` (so all see the same global permutation) and the same
``global_batch_size``. The other-photo draw (``other_photo_identity`` > 0) happens before the per-process slice,
so it depends only on (seed, position in the global sequence), not on the process layout: with probability p a
record's ``arcface`` is replaced by that of another record of the same identity
(:func:`~facecrafter_jax.data.identities.read_identity_labels`), as at inference the identity comes from a reference
photo, not from the target image; an identity with one record keeps its own. The iterator state (a small JSON dict per process) is saved with orbax, see
:func:`save_iterator_state` / :func:`restore_iterator_state` and :func:`iterator_save_args` /
:func:`iterator_restore_args` for putting it into the training checkpoint's ``ocp.args.Composite``.
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import grain
import jax
import numpy as np

from facecrafter_jax.data import records as R
from facecrafter_jax.data.identities import read_identity_labels
from facecrafter_jax.errors import DataError

STATE_VERSION = 1


def _ensure_absl_flags_parsed() -> None:
    """grain's worker processes read absl flags; outside ``absl.app.run`` (e.g. pytest) mark them parsed."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


class OtherPhoto:
    """Picklable grain random map: record index -> (index, index whose ``arcface`` it uses).

    With probability ``p`` the second index is drawn uniformly from the other records of the same identity; an
    identity with a single record (or probability 1 - p) keeps the record's own index.
    """

    def __init__(self, labels: Sequence[str], p: float):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"other-photo identity probability must be in [0, 1], got {p}")
        self.p = float(p)
        codes: dict[str, int] = {}
        self.label = np.asarray([codes.setdefault(lab, len(codes)) for lab in labels], np.int64)
        order = np.argsort(self.label, kind="stable")
        bounds = np.searchsorted(self.label[order], np.arange(len(codes) + 1))
        self.members = [order[bounds[k]:bounds[k + 1]] for k in range(len(codes))]

    def __call__(self, index: int, rng: np.random.Generator) -> tuple[int, int]:
        index = int(index)
        group = self.members[self.label[index]]
        if len(group) < 2 or rng.random() >= self.p:
            return index, index
        k = int(rng.integers(len(group) - 1))  # uniform over the group without the record itself
        if k >= int(np.searchsorted(group, index)):
            k += 1
        return index, int(group[k])


class IteratorStateMismatch(ValueError):
    """An iterator state saved by a pipeline with other settings (the message names them)."""


class ShardLocator:
    """Global record index -> ``record k of <dir>/<shard>`` (for messages); picklable."""

    def __init__(self, data_dir: str | os.PathLike, shards: Sequence[tuple[str, int]]):
        self.data_dir = str(data_dir)
        self.shards = tuple((str(n), int(c)) for n, c in shards)
        self._starts = np.cumsum([0] + [c for _, c in self.shards])

    def __call__(self, index: int) -> str:
        i = int(np.searchsorted(self._starts, index, side="right")) - 1
        if not 0 <= i < len(self.shards):
            return f"record {index} of {self.data_dir}"
        return f"record {index - int(self._starts[i])} of {os.path.join(self.data_dir, self.shards[i][0])}"


class ReadRecord:
    """Picklable grain map: record index (or ``(index, arcface index)``) -> decoded fields of that record.

    A record that cannot be read (a damaged ArrayRecord chunk: riegeli checks its hashes) or decoded is a
    :class:`~facecrafter_jax.errors.DataError` naming the shard and the record's index in it (``locate``)."""

    def __init__(self, source, decode: "DecodeRecord", locate: ShardLocator | None = None):
        self.source = source
        self.decode = decode
        self.locate = locate

    def _where(self, index: int) -> str:
        return self.locate(index) if self.locate is not None else f"record {index}"

    def _read(self, index: int) -> bytes:
        try:
            return self.source[index]
        except Exception as e:  # noqa: BLE001 - the reader raises RuntimeError / OSError for damaged files
            raise DataError(f"{self._where(index)} cannot be read ({type(e).__name__}: {e}); the shard is damaged: "
                            "check the folder with python -m data_prep verify DIR --hashes") from None

    def __call__(self, item) -> dict[str, Any]:
        index, other = (int(item), int(item)) if np.ndim(item) == 0 else (int(item[0]), int(item[1]))
        try:
            rec = self.decode(self._read(index))
            if other != index and "arcface" in rec:
                index = other
                rec["arcface"] = self.decode.codec.decode(self._read(other))["arcface"]
        except R.RecordError as e:
            raise DataError(f"{self._where(index)} does not decode: {e}") from None
        return rec


class DecodeRecord:
    """Picklable grain map: record bytes -> dict of the selected fields (numpy arrays; image_id a str)."""

    def __init__(self, resolution: int, latent_dtype: str, fields: Sequence[str] | None = None,
                 latent_side: int | None = None):
        self.resolution = resolution
        self.latent_dtype = latent_dtype
        self.latent_side = latent_side
        self.fields = tuple(R.FIELDS if fields is None else fields)
        unknown = sorted(set(self.fields) - set(R.FIELDS))
        if unknown:
            raise R.RecordError(f"unknown field(s) {unknown} requested; record fields are {list(R.FIELDS)}")
        self.codec = R.RecordCodec(resolution, latent_dtype, latent_side)

    def __call__(self, data: bytes) -> dict[str, Any]:
        rec = self.codec.decode(data)
        return {k: rec[k] for k in self.fields}

    def __getstate__(self):
        return {"resolution": self.resolution, "latent_dtype": self.latent_dtype, "fields": self.fields,
                "latent_side": self.latent_side}

    def __setstate__(self, state):
        self.__init__(state["resolution"], state["latent_dtype"], state["fields"], state.get("latent_side"))


def data_sharding(mesh: jax.sharding.Mesh | None = None, axis: str | tuple[str, ...] = "data"):
    """``NamedSharding`` splitting the batch dimension over ``axis`` of ``mesh``.

    Without ``mesh``: a 1-D mesh named ``"data"`` over all devices (pure data parallelism).
    """
    if mesh is None:
        mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ("data",))
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(axis))


@dataclasses.dataclass(frozen=True)
class PipelineSpec:
    """Everything that determines the sequence of batches; stored with the iterator state and checked on restore."""

    shards: tuple[tuple[str, int], ...]
    resolution: int
    latent_dtype: str
    fields: tuple[str, ...]
    seed: int
    shuffle: bool
    num_epochs: int | None
    global_batch_size: int
    process_index: int
    process_count: int
    worker_count: int
    other_photo_identity: float = 0.0

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["shards"] = [list(s) for s in self.shards]
        d["fields"] = list(self.fields)
        return d


class InputPipeline:
    """Iterator over training batches with a checkpointable position.

    ``next(pipeline)`` returns a dict of per-process batches: numeric fields as global ``jax.Array`` placed
    with ``sharding`` (or numpy arrays when ``sharding`` is ``None``); ``image_id`` (if requested) stays a
    numpy array of str on the host. ``get_state()`` / ``set_state()`` describe the position after the last
    batch returned, even though up to ``device_prefetch`` batches are already fetched ahead.

    Build it with :func:`make_pipeline`.
    """

    def __init__(self, dataset: grain.IterDataset, spec: PipelineSpec, sharding=None, device_prefetch: int = 2):
        self.dataset = dataset
        self.spec = spec
        self.sharding = sharding
        self.device_prefetch = max(1, int(device_prefetch))
        self._iterator = None
        self._buffer: collections.deque = collections.deque()
        self._state = None

    @property
    def process_index(self) -> int:
        return self.spec.process_index

    @property
    def process_count(self) -> int:
        return self.spec.process_count

    @property
    def local_batch_size(self) -> int:
        return self.spec.global_batch_size // self.spec.process_count

    @property
    def iterator(self) -> grain.DatasetIterator:
        """The underlying grain iterator (host numpy batches); created on first use."""
        if self._iterator is None:
            if self.spec.worker_count > 0:
                _ensure_absl_flags_parsed()
            self._iterator = iter(self.dataset)
            self._state = None
        return self._iterator

    def __iter__(self) -> "InputPipeline":
        return self

    def _put(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        if self.sharding is None:
            return batch
        numeric = {k: v for k, v in batch.items() if v.dtype.kind in "fiub"}
        out = dict(batch)
        out.update(jax.make_array_from_process_local_data(
            {k: self.sharding for k in numeric}, numeric))
        return out

    def __next__(self) -> dict[str, Any]:
        it = self.iterator
        if self._state is None and not self._buffer:
            self._state = copy.deepcopy(it.get_state())
        while len(self._buffer) < self.device_prefetch:
            try:
                batch = next(it)
            except StopIteration:
                break
            self._buffer.append((self._put(batch), copy.deepcopy(it.get_state())))
        if not self._buffer:
            raise StopIteration
        batch, self._state = self._buffer.popleft()
        return batch

    def get_state(self) -> dict[str, Any]:
        """Position after the last batch returned by ``next`` (a JSON-serialisable dict)."""
        if self._state is None and not self._buffer:
            self._state = copy.deepcopy(self.iterator.get_state())
        return {"version": STATE_VERSION, "spec": self.spec.to_json(), "grain": copy.deepcopy(self._state)}

    def set_state(self, state: Mapping[str, Any]) -> None:
        """Restores a position from :meth:`get_state`; the pipeline spec must match (clear error otherwise)."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"iterator state version {state.get('version')!r} is not supported ({STATE_VERSION})")
        saved, mine = {"other_photo_identity": 0.0, **state["spec"]}, self.spec.to_json()  # key added later
        diff = sorted(k for k in set(saved) | set(mine) if saved.get(k) != mine.get(k))
        if diff:
            detail = "; ".join(f"{k}: saved {saved.get(k)!r}, now {mine.get(k)!r}" for k in diff)
            raise IteratorStateMismatch(f"iterator state was saved by a different pipeline ({detail})")
        self._buffer.clear()
        self.iterator.set_state(copy.deepcopy(state["grain"]))
        self._state = copy.deepcopy(state["grain"])

    def close(self) -> None:
        """Stops worker processes (if any)."""
        self._buffer.clear()
        if self._iterator is not None and hasattr(self._iterator, "close"):
            self._iterator.close()
        self._iterator = None

    def __enter__(self) -> "InputPipeline":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def make_pipeline(
    data_dir: str | os.PathLike,
    *,
    global_batch_size: int,
    seed: int,
    shuffle: bool = True,
    num_epochs: int | None = None,
    fields: Sequence[str] | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
    worker_count: int = 0,
    worker_buffer_size: int = 2,
    read_threads: int = 4,
    read_buffer_size: int = 4,
    sharding: Any = "default",
    device_prefetch: int = 2,
    other_photo_identity: float = 0.0,
    shards: Mapping[str, int] | None = None,
) -> InputPipeline:
    """Builds the training input pipeline over the complete shards of ``data_dir``.

    Args:
        data_dir: dataset folder written by :class:`~facecrafter_jax.data.records.RecordWriter`.
        global_batch_size: batch size summed over processes; each process yields
            ``global_batch_size // process_count`` records per batch (must divide evenly).
        seed: shuffle seed, the same on every process (epoch ``e`` uses permutation seed ``seed + e``).
        shuffle: ``False`` keeps storage order (evaluation).
        num_epochs: passes over the data; ``None`` repeats forever. Epochs are concatenated before
            batching, so a batch may straddle an epoch boundary; only the final partial batch is dropped.
        fields: record fields to decode (default: all).
        process_index, process_count: this process's slice; default ``jax.process_index()`` /
            ``jax.process_count()`` (pass them explicitly to simulate several hosts).
        worker_count: grain worker processes (``mp_prefetch``); 0 decodes in this process with threads.
        worker_buffer_size: batches buffered per worker process.
        read_threads, read_buffer_size: grain ``ReadOptions`` (threads and batches buffered per process).
        sharding: ``jax.sharding.Sharding`` for the numeric fields of each global batch; ``"default"`` is
            :func:`data_sharding` over all devices; ``None`` yields host numpy batches.
        device_prefetch: batches placed on device ahead of the consumer.
        other_photo_identity: probability that a record's ``arcface`` comes from another record of the same
            identity (module docstring); 0 keeps every record's own.
        shards: ``{shard name: records}`` to read (e.g. the shards that passed
            :func:`~facecrafter_jax.data.integrity.verify_dataset`); default: every complete shard.
    """
    data_dir = Path(data_dir)
    info = R.read_dataset_info(data_dir)
    counts = dict(shards) if shards is not None else R.shard_record_counts(data_dir)
    if not counts:
        raise DataError(f"{data_dir} has no complete shards")
    if process_index is None:
        process_index = jax.process_index()
    if process_count is None:
        process_count = jax.process_count()
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    if global_batch_size <= 0 or global_batch_size % process_count:
        raise ValueError(f"global_batch_size {global_batch_size} must be a positive multiple of "
                         f"process_count {process_count}")
    if not 0 <= seed < 2**32:
        raise ValueError(f"seed must be in [0, 2**32), got {seed}")
    if num_epochs is not None and num_epochs <= 0:
        raise ValueError(f"num_epochs must be positive or None, got {num_epochs}")
    if worker_count < 0:
        raise ValueError(f"worker_count must be >= 0, got {worker_count}")
    decode = DecodeRecord(info["resolution"], info["latent_dtype"], fields, info.get("latent_side"))
    spec = PipelineSpec(
        shards=tuple(sorted(counts.items())), resolution=info["resolution"], latent_dtype=info["latent_dtype"],
        fields=decode.fields, seed=int(seed), shuffle=bool(shuffle), num_epochs=num_epochs,
        global_batch_size=int(global_batch_size), process_index=int(process_index),
        process_count=int(process_count), worker_count=int(worker_count),
        other_photo_identity=float(other_photo_identity))
    local_batch = global_batch_size // process_count

    # Shard files named with their record counts ("path[0:n]") so grain does not reopen each one to count.
    source = grain.sources.ArrayRecordDataSource([f"{data_dir / name}[0:{n}]" for name, n in spec.shards])
    ds = grain.MapDataset.range(sum(n for _, n in spec.shards)).seed(seed)
    if shuffle:
        ds = ds.shuffle()
    ds = ds.repeat(num_epochs)
    if other_photo_identity > 0:
        ds = ds.random_map(OtherPhoto(_identity_labels(data_dir, spec.shards), other_photo_identity))
    ds = ds[process_index::process_count]
    ds = ds.map(ReadRecord(source, decode, ShardLocator(data_dir, spec.shards)))
    ds = ds.batch(local_batch, drop_remainder=True)
    it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=read_buffer_size))
    if worker_count > 0:
        it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count,
                                                               per_worker_buffer_size=worker_buffer_size))
    if isinstance(sharding, str):
        if sharding != "default":
            raise ValueError(f"sharding must be a jax Sharding, None or 'default', got {sharding!r}")
        sharding = data_sharding()
    return InputPipeline(it_ds, spec, sharding=sharding, device_prefetch=device_prefetch)


def _identity_labels(data_dir: Path, shards: Sequence[tuple[str, int]]) -> list[str]:
    """Identity labels of the records of ``shards`` (all or some of the folder's shards, in that order)."""
    labels = read_identity_labels(data_dir)  # every complete shard, in storage order (from the .ids.txt sidecars)
    offsets, start = {}, 0
    for p in R.list_shards(data_dir):
        offsets[p.name] = start
        start += p.with_name(p.name[: -len(R.SHARD_SUFFIX)] + R.IDS_SUFFIX).read_text(encoding="utf-8").count("\n")
    return [labels[offsets[name] + i] for name, n in shards for i in range(n)]


# ---------------------------------------------------------------------------- orbax integration
def _state_filename(pipeline: InputPipeline) -> str:
    return f"process_{pipeline.process_index}-of-{pipeline.process_count}.json"


class PipelineCheckpointHandler(grain.checkpoint.CheckpointHandler):
    """Orbax handler storing one JSON file per (simulated) process, named by the pipeline's own
    ``process_index`` / ``process_count`` (grain's handler uses ``jax.process_index()``)."""

    def save(self, directory, item=None, args=None):
        pipeline = item if item is not None else args.item
        (Path(directory) / _state_filename(pipeline)).write_text(json.dumps(pipeline.get_state(), indent=1))

    def restore(self, directory, item=None, args=None):
        pipeline = item if item is not None else args.item
        path = Path(directory) / _state_filename(pipeline)
        if not path.is_file():
            have = sorted(p.name for p in Path(directory).iterdir())
            raise FileNotFoundError(f"no iterator state {path.name} in {directory} (found {have})")
        pipeline.set_state(json.loads(path.read_text()))
        return pipeline


def _register_args():
    import orbax.checkpoint as ocp

    @ocp.args.register_with_handler(PipelineCheckpointHandler, for_save=True)
    @dataclasses.dataclass
    class PipelineSave(ocp.args.CheckpointArgs):
        item: Any

    @ocp.args.register_with_handler(PipelineCheckpointHandler, for_restore=True)
    @dataclasses.dataclass
    class PipelineRestore(ocp.args.CheckpointArgs):
        item: Any

    return PipelineSave, PipelineRestore


PipelineSave, PipelineRestore = _register_args()


def iterator_save_args(pipeline: InputPipeline):
    """Orbax args saving the pipeline position; put it into the train checkpoint's ``ocp.args.Composite``::

        manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                   data_iter=iterator_save_args(pipeline)))
    """
    return PipelineSave(pipeline)


def iterator_restore_args(pipeline: InputPipeline):
    """Orbax args restoring the pipeline position in place (counterpart of :func:`iterator_save_args`)."""
    return PipelineRestore(pipeline)


def save_iterator_state(manager, step: int, pipeline: InputPipeline, item_name: str = "data_iter",
                        wait: bool = True) -> bool:
    """Saves only the pipeline position as item ``item_name`` of step ``step`` of an orbax ``CheckpointManager``."""
    import orbax.checkpoint as ocp

    saved = manager.save(step, args=ocp.args.Composite(**{item_name: iterator_save_args(pipeline)}))
    if wait:
        manager.wait_until_finished()
    return saved


def restore_iterator_state(manager, step: int | None, pipeline: InputPipeline,
                           item_name: str = "data_iter") -> InputPipeline:
    """Restores the pipeline position saved at ``step`` (default: latest step) into ``pipeline``."""
    import orbax.checkpoint as ocp

    if step is None:
        step = manager.latest_step()
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {manager.directory}")
    manager.restore(step, args=ocp.args.Composite(**{item_name: iterator_restore_args(pipeline)}))
    return pipeline
