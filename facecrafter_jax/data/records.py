"""Training-record format: one ArrayRecord record per face image, a fixed binary layout, sharded datasets.

A dataset folder holds::

    dataset.json                  schema version, resolution, latent dtype, per-shard record counts, sizes
                                  and SHA-256 (``shard_files``; checked before training, see integrity.py)
    shard-00000.array_record      ArrayRecord file (group_size:1, random access), one encoded record each
    shard-00000.ids.txt           the image_id of every record of that shard, one per line (resume / dedup)
    ...

Record fields (``R`` = resolution, ``S`` = latent side: ``R // 8`` for the SD VAE, or the dataset's
``latent_side`` when its VAE downsamples by another factor, e.g. the toy VAE's ``R // 4``):

==================  ==================  =====================================================================
field               dtype / shape       meaning
==================  ==================  =====================================================================
``image_id``        str                 relative path of the source image (unique key)
``arcface``         float32 [512]       L2-normalised ArcFace identity embedding
``landmarks``       float32 [478, 3]    MediaPipe landmarks in the aligned crop (x, y in [0, 1]; z as given)
``head_pose``       float32 [3]         yaw, pitch, roll in degrees
``emotion``         float32 [10]        8 EmoNet class probabilities, valence, arousal
``latent_moments``  float16|32 [S,S,8]  VAE posterior mean (4 ch) then logvar (4 ch), NHWC, unscaled
==================  ==================  =====================================================================

Binary layout of one record (version 1, little endian, no pickle/protobuf)::

    header (16 bytes): magic b"FCR1" | u16 version | u8 latent dtype code (1=f16, 2=f32) | u8 0 |
                       u16 latent side S | u16 len(image_id utf-8) | u32 0
    float32[512 + 478*3 + 3 + 10]   arcface, landmarks, head_pose, emotion (contiguous)
    latent dtype[S*S*8]             latent_moments
    utf-8 bytes                     image_id

Every array starts at a 4-byte aligned offset, so decoding is two ``np.frombuffer`` calls and slicing.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import re
import struct
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from facecrafter_jax.errors import DataError, MissingDataError
from facecrafter_jax.face.vocabulary import EMOTION_CLASSES, EMOTION_DIM, ID_DIM, NUM_LANDMARKS

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
FORMAT_NAME = "facecrafter-records"
MAGIC = b"FCR1"
INFO_FILE = "dataset.json"
SHARD_SUFFIX = ".array_record"
IDS_SUFFIX = ".ids.txt"
TMP_SUFFIX = ".tmp"
LOCK_FILE = ".writer.lock"
SHARD_RE = re.compile(r"^shard-(\d{5,})\.array_record$")

FIELDS = ("image_id", "arcface", "landmarks", "head_pose", "emotion", "latent_moments")
# float32 feature fields, stored contiguously in this order.
_FEATURE_SHAPES = {
    "arcface": (ID_DIM,),
    "landmarks": (NUM_LANDMARKS, 3),
    "head_pose": (3,),
    "emotion": (EMOTION_DIM,),
}
_FEATURE_SIZES = {k: int(np.prod(v)) for k, v in _FEATURE_SHAPES.items()}
_FEATURE_COUNT = sum(_FEATURE_SIZES.values())
_HEADER = struct.Struct("<4sHBBHHI")
_LATENT_DTYPES = {"float16": 1, "float32": 2}
_LATENT_CODES = {v: k for k, v in _LATENT_DTYPES.items()}
LATENT_CHANNELS = 8
ARCFACE_NORM_TOL = 1e-3
# ArrayRecord writer options: group_size:1 is required by grain's random-access source.
DEFAULT_WRITER_OPTIONS = "group_size:1,uncompressed"


class RecordError(DataError):
    """A record or dataset does not match the schema (the message names the field / setting); a ``ValueError``."""


HASH_NAME = "sha256"
"""The content hash stored per shard in ``dataset.json`` (checked by :mod:`facecrafter_jax.data.integrity`)."""
_CHUNK = 8 << 20


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes (read in 8 MiB chunks; hashlib releases the GIL, so threads scale)."""
    h = hashlib.sha256()
    buf = bytearray(_CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while True:
            n = f.readinto(buf)
            if not n:
                break
            h.update(view[:n])
    return h.hexdigest()


def shard_file_info(path: str | os.PathLike, records: int) -> dict[str, Any]:
    """``{"records", "bytes", "sha256"}`` of a shard file (what ``dataset.json`` stores per shard)."""
    return {"records": int(records), "bytes": os.path.getsize(path), HASH_NAME: file_sha256(path)}


def latent_side(resolution: int) -> int:
    """Latent side length ``resolution // 8``; ``resolution`` must be a positive multiple of 8."""
    if not isinstance(resolution, (int, np.integer)) or isinstance(resolution, bool) or resolution <= 0 \
            or resolution % 8:
        raise RecordError(f"resolution must be a positive multiple of 8, got {resolution!r}")
    return int(resolution) // 8


def _check_latent_dtype(latent_dtype: str) -> str:
    try:
        name = np.dtype(latent_dtype).name
    except TypeError:
        name = None
    if name not in _LATENT_DTYPES:
        raise RecordError(f"latent_dtype must be one of {sorted(_LATENT_DTYPES)}, got {latent_dtype!r}")
    return name


def _side(resolution: int, side: int | None) -> int:
    """``side`` when given (checked: positive, divides ``resolution``), else :func:`latent_side` (``R // 8``)."""
    if side is None:
        return latent_side(resolution)
    if not isinstance(side, (int, np.integer)) or isinstance(side, bool) or side <= 0 \
            or not isinstance(resolution, (int, np.integer)) or resolution <= 0 or resolution % side:
        raise RecordError(f"latent_side must be a positive divisor of the resolution {resolution!r}, got {side!r}")
    return int(side)


def field_specs(resolution: int = 512, latent_dtype: str = "float16",
                latent_side: int | None = None) -> dict[str, tuple[tuple[int, ...], str]]:
    """Shape and dtype name of every field for a given resolution, latent storage dtype and latent side
    (default ``resolution // 8``)."""
    s = _side(resolution, latent_side)
    specs: dict[str, tuple[tuple[int, ...], str]] = {"image_id": ((), "str")}
    specs.update({k: (v, "float32") for k, v in _FEATURE_SHAPES.items()})
    specs["latent_moments"] = ((s, s, LATENT_CHANNELS), _check_latent_dtype(latent_dtype))
    return specs


class RecordCodec:
    """Encodes / decodes one record for a fixed ``resolution`` and latent storage dtype.

    ``latent_dtype="float16"`` (the default) halves the size of the field that dominates a record
    (R=512: 64 KiB instead of 128 KiB) and hence read time; fp16 keeps ~3 significant digits, far below
    the VAE posterior's own noise scale and the diffusion noise added in training. Values beyond the
    float16 range are rejected, never silently clipped.
    """

    def __init__(self, resolution: int = 512, latent_dtype: str = "float16", latent_side: int | None = None):
        self.resolution = int(resolution)
        self.side = _side(resolution, latent_side)
        self.latent_dtype = _check_latent_dtype(latent_dtype)
        self._np_latent = np.dtype(self.latent_dtype).newbyteorder("<")
        self._latent_shape = (self.side, self.side, LATENT_CHANNELS)
        self._latent_count = self.side * self.side * LATENT_CHANNELS
        self._feat_off = _HEADER.size
        self._lat_off = self._feat_off + 4 * _FEATURE_COUNT
        self._id_off = self._lat_off + self._latent_count * self._np_latent.itemsize

    @property
    def fixed_nbytes(self) -> int:
        """Size in bytes of a record without its image_id."""
        return self._id_off

    # ------------------------------------------------------------------ encode
    def validate(self, record: Mapping[str, Any]) -> dict[str, Any]:
        """Checks a record dict against the schema; returns it with arrays cast to the stored dtypes."""
        if not isinstance(record, Mapping):
            raise RecordError(f"record must be a mapping of field name -> value, got {type(record).__name__}")
        unknown = sorted(set(record) - set(FIELDS))
        if unknown:
            raise RecordError(f"unknown record field(s) {unknown}; expected exactly {list(FIELDS)}")
        missing = [k for k in FIELDS if k not in record]
        if missing:
            raise RecordError(f"missing record field(s) {missing}")
        image_id = record["image_id"]
        if not isinstance(image_id, str) or not image_id:
            raise RecordError(f"field 'image_id' must be a non-empty str, got {image_id!r}")
        if any(c in image_id for c in "\n\r\0"):
            raise RecordError(f"field 'image_id' must not contain newline or NUL characters: {image_id!r}")
        if len(image_id.encode("utf-8")) > 0xFFFF:
            raise RecordError("field 'image_id' is longer than 65535 utf-8 bytes")
        out: dict[str, Any] = {"image_id": image_id}
        specs = {**_FEATURE_SHAPES, "latent_moments": self._latent_shape}
        for name, shape in specs.items():
            value = np.asarray(record[name])
            if value.dtype.kind != "f":
                raise RecordError(f"field {name!r} must be a floating-point array, got dtype {value.dtype}")
            if value.shape != shape:
                raise RecordError(f"field {name!r} must have shape {shape}, got {value.shape}")
            if not np.all(np.isfinite(value)):
                raise RecordError(f"field {name!r} contains NaN or Inf")
            target = self._np_latent if name == "latent_moments" else np.dtype("<f4")
            with np.errstate(over="ignore"):
                cast = value.astype(target, copy=False)
            if not np.all(np.isfinite(cast)):
                raise RecordError(f"field {name!r} overflows {target.name} (max |value| {np.abs(value).max():g})")
            out[name] = cast
        norm = float(np.linalg.norm(out["arcface"].astype(np.float64)))
        if abs(norm - 1.0) > ARCFACE_NORM_TOL:
            raise RecordError(f"field 'arcface' must be L2-normalised, got norm {norm:.6f}")
        return out

    def encode(self, record: Mapping[str, Any]) -> bytes:
        """Validates ``record`` (a dict with exactly the schema fields) and returns its bytes."""
        r = self.validate(record)
        id_bytes = r["image_id"].encode("utf-8")
        header = _HEADER.pack(MAGIC, SCHEMA_VERSION, _LATENT_DTYPES[self.latent_dtype], 0, self.side,
                              len(id_bytes), 0)
        feats = np.concatenate([r[k].reshape(-1) for k in _FEATURE_SHAPES])
        return b"".join((header, feats.tobytes(), np.ascontiguousarray(r["latent_moments"]).tobytes(), id_bytes))

    # ------------------------------------------------------------------ decode
    def decode(self, data: bytes) -> dict[str, Any]:
        """Decodes bytes written by :meth:`encode`. Arrays are read-only views into ``data``."""
        if len(data) < _HEADER.size:
            raise RecordError(f"record is {len(data)} bytes, shorter than the {_HEADER.size}-byte header")
        magic, version, code, _, side, id_len, _ = _HEADER.unpack_from(data, 0)
        if magic != MAGIC:
            raise RecordError(f"record header has magic {magic!r}, expected {MAGIC!r} (not a facecrafter record)")
        if version != SCHEMA_VERSION:
            raise RecordError(f"record schema version {version} is not supported (this code reads {SCHEMA_VERSION})")
        if _LATENT_CODES.get(code) != self.latent_dtype:
            raise RecordError(f"field 'latent_moments' is stored as {_LATENT_CODES.get(code, f'code {code}')}, "
                              f"expected {self.latent_dtype}")
        if side != self.side:
            raise RecordError(f"field 'latent_moments' has side {side}, expected {self.side} "
                              f"(resolution {self.resolution})")
        if len(data) != self._id_off + id_len:
            raise RecordError(f"record is {len(data)} bytes, expected {self._id_off + id_len} (truncated or corrupt)")
        feats = np.frombuffer(data, dtype="<f4", count=_FEATURE_COUNT, offset=self._feat_off)
        out: dict[str, Any] = {"image_id": bytes(data[self._id_off:]).decode("utf-8")}
        o = 0
        for name, shape in _FEATURE_SHAPES.items():
            n = _FEATURE_SIZES[name]
            out[name] = feats[o:o + n].reshape(shape)
            o += n
        out["latent_moments"] = np.frombuffer(data, dtype=self._np_latent, count=self._latent_count,
                                              offset=self._lat_off).reshape(self._latent_shape)
        return out


def encode_record(record: Mapping[str, Any], *, resolution: int = 512, latent_dtype: str = "float16") -> bytes:
    """Encodes one record dict to bytes (see :class:`RecordCodec`)."""
    return RecordCodec(resolution, latent_dtype).encode(record)


def decode_record(data: bytes) -> dict[str, Any]:
    """Decodes one record, reading resolution and latent dtype from its own header."""
    if len(data) < _HEADER.size:
        raise RecordError(f"record is {len(data)} bytes, shorter than the {_HEADER.size}-byte header")
    _, _, code, _, side, _, _ = _HEADER.unpack_from(data, 0)
    if code not in _LATENT_CODES:
        raise RecordError(f"field 'latent_moments' has unknown dtype code {code}")
    return RecordCodec(side * 8, _LATENT_CODES[code]).decode(data)


# ---------------------------------------------------------------------- dataset folder helpers
def _shard_name(index: int) -> str:
    return f"shard-{index:05d}{SHARD_SUFFIX}"


def list_shards(data_dir: str | os.PathLike) -> list[Path]:
    """Complete shards of a dataset folder, sorted by index (temporary / partial files are ignored)."""
    d = Path(data_dir)
    if not d.is_dir():
        raise MissingDataError(f"dataset folder {d} does not exist: check data.dir (or the --out of data_prep)")
    shards = [(int(m.group(1)), p) for p in d.iterdir() if (m := SHARD_RE.match(p.name)) and p.is_file()]
    return [p for _, p in sorted(shards)]


def read_dataset_info(data_dir: str | os.PathLike) -> dict[str, Any]:
    """Reads and checks ``dataset.json`` (format name, schema version, resolution, latent dtype)."""
    path = Path(data_dir) / INFO_FILE
    if not path.is_file():
        if not Path(data_dir).is_dir():
            raise MissingDataError(f"dataset folder {data_dir} does not exist: check data.dir (or the --out of data_prep)")
        raise MissingDataError(f"{path} not found: {data_dir} is not a facecrafter record dataset")
    try:
        info = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise RecordError(f"{path} is not valid JSON ({e}): the dataset description is damaged") from None
    if not isinstance(info, dict):
        raise RecordError(f"{path} must hold a JSON object, got {type(info).__name__}")
    if info.get("format") != FORMAT_NAME:
        raise RecordError(f"{path}: 'format' is {info.get('format')!r}, expected {FORMAT_NAME!r}")
    if info.get("schema_version") != SCHEMA_VERSION:
        raise RecordError(f"{path}: schema_version {info.get('schema_version')!r} is not supported "
                          f"(this code reads {SCHEMA_VERSION})")
    for key in ("resolution", "latent_dtype", "shards"):
        if key not in info:
            raise RecordError(f"{path}: missing key {key!r}")
    _side(info["resolution"], info.get("latent_side"))
    _check_latent_dtype(info["latent_dtype"])
    return info


def _num_records_in_file(path: Path) -> int:
    from array_record.python.array_record_module import ArrayRecordReader

    reader = ArrayRecordReader(str(path))
    try:
        return int(reader.num_records())
    finally:
        reader.close()


def shard_record_counts(data_dir: str | os.PathLike) -> dict[str, int]:
    """``{shard file name: number of records}`` for every complete shard on disk.

    Counts come from ``dataset.json``; a complete shard missing there (a run stopped between renaming the
    shard and updating the json) is counted by opening it.
    """
    info = read_dataset_info(data_dir)
    known = dict(info["shards"])
    return {p.name: int(known[p.name]) if p.name in known else _num_records_in_file(p)
            for p in list_shards(data_dir)}


def count_records(data_dir: str | os.PathLike) -> int:
    """Total number of records in the complete shards of a dataset folder."""
    return sum(shard_record_counts(data_dir).values())


def codec_for(data_dir: str | os.PathLike) -> RecordCodec:
    """The :class:`RecordCodec` matching a dataset folder's ``dataset.json``."""
    info = read_dataset_info(data_dir)
    return RecordCodec(info["resolution"], info["latent_dtype"], info.get("latent_side"))


def read_image_ids(data_dir: str | os.PathLike) -> list[str]:
    """image_ids of all records of the complete shards, in storage order (read from the ``.ids.txt`` sidecars)."""
    ids: list[str] = []
    for shard in list_shards(data_dir):
        side = shard.with_name(shard.name[: -len(SHARD_SUFFIX)] + IDS_SUFFIX)
        if not side.is_file():
            raise RecordError(f"{side} is missing (shard {shard.name} has no image_id list)")
        text = side.read_text(encoding="utf-8")
        ids.extend(text.split("\n")[:-1] if text else [])
    return ids


def iter_records(data_dir: str | os.PathLike) -> Iterator[dict[str, Any]]:
    """Yields every decoded record of a dataset folder in storage order (sequential read)."""
    from array_record.python.array_record_module import ArrayRecordReader

    codec = codec_for(data_dir)
    for shard in list_shards(data_dir):
        reader = ArrayRecordReader(str(shard))
        try:
            n = reader.num_records()
            step = 256
            for start in range(0, n, step):
                for data in reader.read(list(range(start, min(n, start + step)))):
                    yield codec.decode(data)
        finally:
            reader.close()


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + TMP_SUFFIX)
    tmp.write_text(json.dumps(obj, indent=1))
    _fsync_path(tmp)
    os.replace(tmp, path)


class RecordWriter:
    """Writes records to ``shard-XXXXX.array_record`` files of ``shard_size`` records each.

    Each shard is written under a temporary name (``*.tmp``) and renamed only once it is complete and
    flushed, together with its ``.ids.txt`` sidecar, then ``dataset.json`` is rewritten atomically. A run
    that is killed therefore leaves at most a ``*.tmp`` file that readers ignore; a new writer on the same
    folder removes such files and continues numbering after the last complete shard. Use
    :attr:`existing_ids` (or :func:`read_image_ids`) to skip images that are already stored.

    Args:
        out_dir: dataset folder (created if needed).
        resolution: image resolution; latents are ``latent_side`` square (default ``resolution // 8``).
        shard_size: records per shard (the last shard of a run may be smaller).
        latent_dtype: ``"float16"`` (default) or ``"float32"`` storage for ``latent_moments``.
        writer_options: ArrayRecord writer options; must contain ``group_size:1`` (random access).
        metadata: optional JSON-serialisable dict stored under ``"metadata"`` in ``dataset.json``.

    A resumed writer must use the same resolution and latent dtype as the existing dataset.
    Only one writer may hold a folder at a time (an advisory lock file enforces this).
    """

    def __init__(self, out_dir: str | os.PathLike, resolution: int = 512, shard_size: int = 1000, *,
                 latent_dtype: str = "float16", writer_options: str = DEFAULT_WRITER_OPTIONS,
                 metadata: Mapping[str, Any] | None = None, latent_side: int | None = None):
        if not isinstance(shard_size, int) or shard_size <= 0:
            raise RecordError(f"shard_size must be a positive int, got {shard_size!r}")
        if "group_size:1" not in writer_options.split(","):
            raise RecordError(f"writer_options must contain 'group_size:1' for random access, got {writer_options!r}")
        self.codec = RecordCodec(resolution, latent_dtype, latent_side)
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.shard_size = shard_size
        self.writer_options = writer_options
        self._lock_fd = os.open(self.out_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            raise RecordError(f"another RecordWriter holds {self.out_dir} (lock {LOCK_FILE})") from None
        self._closed = False
        try:
            self._open_dataset(metadata)
        except BaseException:
            self._release_lock()
            raise
        self._writer = None
        self._current_ids: list[str] = []

    # ---------------------------------------------------------------- setup / resume
    def _open_dataset(self, metadata: Mapping[str, Any] | None) -> None:
        for p in self.out_dir.iterdir():  # leftovers of an interrupted run
            if p.name.endswith(TMP_SUFFIX) and p.name.startswith("shard-"):
                log.warning("removing incomplete shard file %s from an interrupted run", p)
                p.unlink()
        info_path = self.out_dir / INFO_FILE
        shards = list_shards(self.out_dir)
        if info_path.exists():
            info = read_dataset_info(self.out_dir)
            for key, want in (("resolution", self.codec.resolution), ("latent_dtype", self.codec.latent_dtype),
                              ("latent_side", self.codec.side)):
                if info.get(key, latent_side(info["resolution"]) if key == "latent_side" else None) != want:
                    raise RecordError(f"dataset {self.out_dir} has {key}={info.get(key)!r}; this writer was "
                                      f"created with {key}={want!r}")
            on_disk = {p.name for p in shards}
            lost = sorted(set(info["shards"]) - on_disk)
            if lost:
                raise RecordError(f"dataset.json lists shard(s) missing on disk: {lost}")
            counts = shard_record_counts(self.out_dir)
            files = dict(info.get("shard_files") or {})
            for name in sorted(counts):
                size = (self.out_dir / name).stat().st_size
                if name in files and files[name].get("bytes") not in (None, size):
                    raise RecordError(f"{self.out_dir / name} has {size} bytes, dataset.json says "
                                      f"{files[name]['bytes']} (truncated or replaced): restore it before adding records")
            if metadata is None:
                metadata = info.get("metadata")
        else:
            if shards:
                raise RecordError(f"{self.out_dir} holds shards but no {INFO_FILE}")
            counts, files = {}, {}
        for p in self.out_dir.iterdir():  # sidecars of shards that never completed
            if p.name.endswith(IDS_SUFFIX) and p.name[: -len(IDS_SUFFIX)] + SHARD_SUFFIX not in counts:
                p.unlink()
        self._counts: dict[str, int] = dict(counts)

        # Size + hash of every shard; computed here for shards committed by a writer that was killed before it
        # rewrote dataset.json, and for folders written before dataset.json had them.
        self._files: dict[str, dict] = {name: (dict(files[name]) if name in files and "sha256" in files[name]
                                                else shard_file_info(self.out_dir / name, n))
                                        for name, n in counts.items()}
        self._metadata = dict(metadata) if metadata is not None else {}
        self._next_index = int(SHARD_RE.match(shards[-1].name).group(1)) + 1 if shards else 0
        self.existing_ids: set[str] = set(read_image_ids(self.out_dir)) if shards else set()
        self._write_info()

    def _write_info(self) -> None:
        specs = field_specs(self.codec.resolution, self.codec.latent_dtype, self.codec.side)
        info = {
            "format": FORMAT_NAME,
            "schema_version": SCHEMA_VERSION,
            "resolution": self.codec.resolution,
            "latent_side": self.codec.side,
            "latent_dtype": self.codec.latent_dtype,
            "fields": {k: {"shape": list(s), "dtype": d} for k, (s, d) in specs.items()},
            "emotion_layout": list(EMOTION_CLASSES) + ["valence", "arousal"],
            "latent_layout": "NHWC; channels 0-3 posterior mean, 4-7 posterior logvar; unscaled",
            "writer_options": self.writer_options,
            "shard_size": self.shard_size,
            "shards": dict(sorted(self._counts.items())),
            "shard_files": dict(sorted(self._files.items())),
            "num_records": sum(self._counts.values()),
            "metadata": self._metadata,
        }
        _write_json_atomic(self.out_dir / INFO_FILE, info)

    # ---------------------------------------------------------------- writing
    @property
    def num_records(self) -> int:
        """Records in complete shards plus those in the shard being written."""
        return sum(self._counts.values()) + len(self._current_ids)

    def write(self, record: Mapping[str, Any]) -> None:
        """Validates, encodes and appends one record; completes the shard when it holds ``shard_size``."""
        if self._closed:
            raise RecordError("RecordWriter is closed")
        data = self.codec.encode(record)
        image_id = record["image_id"]
        if image_id in self.existing_ids:
            raise RecordError(f"field 'image_id': duplicate id {image_id!r} (already in the dataset)")
        if self._writer is None:
            from array_record.python.array_record_module import ArrayRecordWriter

            self._tmp_path = self.out_dir / (_shard_name(self._next_index) + TMP_SUFFIX)
            self._writer = ArrayRecordWriter(str(self._tmp_path), self.writer_options)
        self._writer.write(data)
        self._current_ids.append(image_id)
        self.existing_ids.add(image_id)
        if len(self._current_ids) >= self.shard_size:
            self._finish_shard()

    def _finish_shard(self) -> None:
        writer, self._writer = self._writer, None
        if writer is None:
            return
        if not writer.ok():
            raise RecordError(f"ArrayRecord writer failed for {self._tmp_path}")
        writer.close()
        name = _shard_name(self._next_index)
        final = self.out_dir / name
        ids_final = self.out_dir / (name[: -len(SHARD_SUFFIX)] + IDS_SUFFIX)
        ids_tmp = ids_final.with_name(ids_final.name + TMP_SUFFIX)
        ids_tmp.write_text("".join(i + "\n" for i in self._current_ids), encoding="utf-8")
        _fsync_path(ids_tmp)
        _fsync_path(self._tmp_path)

        file_info = shard_file_info(self._tmp_path, len(self._current_ids))  # re-read from the page cache
        os.replace(ids_tmp, ids_final)
        os.replace(self._tmp_path, final)  # the shard becomes visible only here
        _fsync_path(self.out_dir)
        self._counts[name] = len(self._current_ids)
        self._files[name] = file_info
        self._current_ids = []
        self._next_index += 1
        self._write_info()

    def close(self) -> None:
        """Completes the current (possibly short) shard, rewrites ``dataset.json`` and releases the folder."""
        if self._closed:
            return
        try:
            self._finish_shard()
        finally:
            self._closed = True
            self._release_lock()

    def _release_lock(self) -> None:
        if self._lock_fd is not None:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None

    def __enter__(self) -> "RecordWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        # Records already written passed validation, so the partial shard is kept even on an exception.
        self.close()


def synthetic_record(rng: np.random.Generator, resolution: int = 512, image_id: str = "synthetic/0.png",
                     ) -> dict[str, Any]:
    """A schema-valid record of random values (for tests and benchmarks); ``rng`` makes it reproducible."""
    s = latent_side(resolution)
    arc = rng.standard_normal(512)
    probs = rng.random(len(EMOTION_CLASSES))
    mean = rng.standard_normal((s, s, 4)) * 5.0
    logvar = rng.uniform(-20.0, 0.0, (s, s, 4))
    return {
        "image_id": image_id,
        "arcface": (arc / np.linalg.norm(arc)).astype(np.float32),
        "landmarks": np.concatenate([rng.random((NUM_LANDMARKS, 2)), rng.normal(0, 0.05, (NUM_LANDMARKS, 1))],
                                    axis=1).astype(np.float32),
        "head_pose": rng.uniform(-60, 60, 3).astype(np.float32),
        "emotion": np.concatenate([probs / probs.sum(), rng.uniform(-1, 1, 2)]).astype(np.float32),
        "latent_moments": np.concatenate([mean, logvar], axis=-1).astype(np.float32),
    }
