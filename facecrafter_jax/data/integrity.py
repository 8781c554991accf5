"""Integrity of a record folder: per-shard record count, size and content hash, checked before training.

When a shard is committed, :class:`~facecrafter_jax.data.records.RecordWriter` stores in ``dataset.json``::

    "shard_files": {"shard-00000.array_record": {"records": 1000, "bytes": 73521152, "sha256": "9f2c..."}, ...}

(``"shards"`` keeps the plain ``{name: records}`` table). :func:`verify_dataset` compares the folder with it:

* a listed shard that is **missing**, **truncated** or of another size, or whose record count (read from the
  ArrayRecord footer) differs, is a problem, always checked (``stat`` + a footer read per shard: milliseconds);
* with ``hashes=True`` the SHA-256 of every shard is recomputed (reads every byte: ~0.7-0.9 GB/s per core here,
  run on several threads; docs/reliability.md has the measurement) and a shard whose bytes **changed** is named;
* a complete shard on disk that ``dataset.json`` does not list (a writer killed between committing the shard
  and rewriting the json) is named too: run the writer (``python -m data_prep run``) on the folder again to
  adopt it.

The report's :attr:`VerifyReport.fingerprint` (SHA-256 of the verified shard table) identifies the records a run
trains on; the trainer stores it in every checkpoint, so a resume on different records is detected and named.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any, Mapping

from facecrafter_jax.data import records as R
from facecrafter_jax.data.records import HASH_NAME, file_sha256, shard_file_info
from facecrafter_jax.errors import DataError

__all__ = ["HASH_NAME", "file_sha256", "shard_file_info", "ShardProblem", "VerifyReport", "verify_dataset",
           "fingerprint_of", "describe_changes"]

def _footer_count(path: Path) -> int:
    from array_record.python.array_record_module import ArrayRecordReader

    reader = ArrayRecordReader(str(path), "readahead_buffer_size:0")
    try:
        return int(reader.num_records())
    finally:
        reader.close()


@dataclasses.dataclass(frozen=True)
class ShardProblem:
    """One shard that does not match ``dataset.json``: ``kind`` is ``missing``, ``truncated``, ``size``,
    ``count``, ``unreadable``, ``changed`` or ``unlisted``."""

    shard: str
    kind: str
    detail: str

    def __str__(self) -> str:
        return f"{self.shard} {self.detail}"


@dataclasses.dataclass
class VerifyReport:
    """Result of :func:`verify_dataset`.

    Attributes:
      data_dir: the folder.
      shards: the shards that verified, ``{name: {"records", "bytes"[, "sha256"]}}`` (sorted by name).
      problems: every shard that did not, with what is wrong.
      hashed: whether content hashes were recomputed; ``legacy``: ``dataset.json`` has no sizes / hashes
        (written by an older version): only presence and record counts were checked.
      seconds, bytes_hashed: cost of the check.
    """

    data_dir: Path
    shards: dict[str, dict[str, Any]]
    problems: list[ShardProblem]
    hashed: bool
    legacy: bool
    seconds: float
    bytes_hashed: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def num_records(self) -> int:
        return sum(int(v["records"]) for v in self.shards.values())

    @property
    def counts(self) -> dict[str, int]:
        """``{shard: records}`` of the verified shards (the input pipeline's shard list)."""
        return {k: int(v["records"]) for k, v in self.shards.items()}

    @property
    def fingerprint(self) -> str:
        return fingerprint_of(self.shards)

    def summary(self) -> dict[str, Any]:
        """What a checkpoint stores about its records: folder, fingerprint and the shard table."""
        return {"dir": str(self.data_dir), "fingerprint": self.fingerprint, "records": self.num_records,
                "shards": {k: dict(v) for k, v in self.shards.items()}}

    def problem_text(self, limit: int = 4) -> str:
        shown = "; ".join(str(p) for p in self.problems[:limit])
        more = f"; and {len(self.problems) - limit} more" if len(self.problems) > limit else ""
        return shown + more

    def raise_if_problems(self, *, training: bool = False) -> None:
        """:class:`DataError` naming the damaged shards and what to do, if there are any (``training``: the
        message says that nothing was trained and how to train on the shards that verify)."""
        if self.ok:
            return
        kinds = {p.kind for p in self.problems}
        if kinds == {"unlisted"}:
            hint = "run the writer again on the folder (python -m data_prep run ... --out DIR) to adopt them"
        else:
            hint = "restore the named shard(s) from your copy of the data, or rewrite the folder with data_prep"
            if training:
                hint += "; data.on_change=restart trains on the shards that verify"
        raise DataError(f"records in {self.data_dir} do not match their dataset.json: {self.problem_text()}. "
                        + (f"Nothing was trained: {hint}" if training else hint[0].upper() + hint[1:]))


def _table(info: Mapping[str, Any]) -> tuple[dict[str, dict[str, Any]], bool]:
    files = info.get("shard_files")
    if isinstance(files, Mapping) and set(files) == set(info["shards"]):
        return {k: dict(v) for k, v in files.items()}, False
    return {k: {"records": int(n)} for k, n in info["shards"].items()}, True


def verify_dataset(data_dir: str | os.PathLike, *, hashes: bool = False, threads: int | None = None) -> VerifyReport:
    """Check every shard of ``data_dir`` against ``dataset.json`` (see the module docstring); never raises for a
    damaged shard (the report lists it), only for a folder that is not a dataset at all."""
    t0 = time.perf_counter()
    data_dir = Path(data_dir)
    info = R.read_dataset_info(data_dir)
    listed, legacy = _table(info)
    on_disk = {p.name: p for p in R.list_shards(data_dir)}
    problems: list[ShardProblem] = []
    good: dict[str, dict[str, Any]] = {}
    for name in sorted(set(listed) | set(on_disk)):
        want = listed.get(name)
        path = on_disk.get(name)
        if want is None:
            problems.append(ShardProblem(name, "unlisted", "is on disk but not listed in dataset.json"))
            continue
        if path is None:
            problems.append(ShardProblem(name, "missing", f"is missing ({want['records']} records)"))
            continue
        size = path.stat().st_size
        if "bytes" in want and size != int(want["bytes"]):
            kind = "truncated" if size < int(want["bytes"]) else "size"
            what = "is truncated" if kind == "truncated" else "has changed size"
            problems.append(ShardProblem(name, kind, f"{what} ({size} bytes, dataset.json says {want['bytes']})"))
            continue
        try:
            count = _footer_count(path)
        except Exception as e:  # noqa: BLE001 - any reader failure means the file cannot be used
            problems.append(ShardProblem(name, "unreadable", f"cannot be opened ({type(e).__name__}: {e})"))
            continue
        if count != int(want["records"]):
            problems.append(ShardProblem(name, "count", f"holds {count} records, dataset.json says {want['records']}"))
            continue
        good[name] = want
    hashed_bytes = 0
    check = [n for n in good if HASH_NAME in good[n]] if hashes else []
    if check:
        workers = max(1, min(len(check), threads or min(8, os.cpu_count() or 1)))
        with concurrent.futures.ThreadPoolExecutor(workers) as pool:
            digests = dict(zip(check, pool.map(lambda n: file_sha256(on_disk[n]), check)))
        for name in check:
            hashed_bytes += int(good[name]["bytes"])
            if digests[name] != good[name][HASH_NAME]:
                problems.append(ShardProblem(name, "changed", "has changed (its SHA-256 differs from dataset.json)"))
                del good[name]
    problems.sort(key=lambda p: p.shard)
    return VerifyReport(data_dir=data_dir, shards=dict(sorted(good.items())), problems=problems,
                        hashed=bool(check), legacy=legacy, seconds=time.perf_counter() - t0, bytes_hashed=hashed_bytes)


def fingerprint_of(shards: Mapping[str, Mapping[str, Any]]) -> str:
    """SHA-256 (hex, 16 digits) of a shard table ``{name: {"records", "bytes", "sha256"}}``."""
    canon = json.dumps({k: {f: shards[k][f] for f in ("records", "bytes", HASH_NAME) if f in shards[k]}
                        for k in sorted(shards)}, sort_keys=True)
    return hashlib.sha256(canon.encode()).hexdigest()[:16]


def describe_changes(before: Mapping[str, Mapping[str, Any]], now: Mapping[str, Mapping[str, Any]],
                     limit: int = 4) -> str:
    """Human-readable difference of two shard tables: missing, new and changed shards."""
    parts = []
    for name in sorted(set(before) - set(now)):
        parts.append(f"{name} ({before[name].get('records')} records) is gone")
    for name in sorted(set(now) - set(before)):
        parts.append(f"{name} ({now[name].get('records')} records) is new")
    for name in sorted(set(before) & set(now)):
        a, b = before[name], now[name]
        diff = [f for f in ("records", "bytes", HASH_NAME) if f in a and f in b and a[f] != b[f]]
        if diff:
            parts.append(f"{name} changed ({', '.join(diff)})")
    shown = "; ".join(parts[:limit])
    return shown + (f"; and {len(parts) - limit} more" if len(parts) > limit else "")
