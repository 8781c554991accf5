"""``manifest.jsonl``: one JSON line per input image, the run's source of truth for resuming.

Line format::

    {"image_id": "a/b.jpg", "status": "ok", "reason": null, "width": ..., "num_faces": ..., ...}
    {"image_id": "c.png", "status": "skipped", "reason": "no_face", "detail": "..."}

A later line for the same ``image_id`` supersedes an earlier one (``--retry-skipped`` appends new lines).
Lines are appended with flush + fsync. A torn last line (the process was killed mid-write) is dropped
when the manifest is opened, and the file is truncated back to its last complete line.

Consistency with the record shards: "ok" lines are appended only *after* the shard holding their records
has been committed (renamed into place) by the :class:`~facecrafter_jax.data.records.RecordWriter`, so a
killed run never leaves an "ok" line whose record was lost with an unfinished shard. At start,
:meth:`Manifest.reconcile` also repairs the two possible inconsistencies: "ok" lines without a record
(e.g. a shard deleted by hand) are dropped so the image is processed again, and records without an "ok"
line (a run killed between committing a shard and writing its lines) get an "ok" line marked
``"reconciled": true``.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from pathlib import Path
from typing import Iterable

log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.jsonl"

__all__ = ["Manifest", "MANIFEST_NAME"]


class Manifest:
    """The manifest file of an output folder: ``entries`` maps image_id -> its latest line (a dict)."""

    def __init__(self, path: str | os.PathLike, *, read_only: bool = False):
        self.path = Path(path)
        self.read_only = read_only
        self.entries: dict[str, dict] = {}
        if self.path.exists():
            self._load()

    def _load(self) -> None:
        data = self.path.read_bytes()
        good_end = 0
        pos = 0
        for raw in data.splitlines(keepends=True):
            end = pos + len(raw)
            if not raw.endswith(b"\n"):
                log.warning("%s: dropping a torn last line (%d bytes) from an interrupted run", self.path, len(raw))
                break
            line = raw.strip()
            if line:
                try:
                    entry = json.loads(line)
                    image_id = entry["image_id"]
                    entry["status"]
                except (ValueError, KeyError, TypeError) as e:
                    raise ValueError(f"{self.path}: malformed manifest line at byte {pos}: {e}: {line[:200]!r}") from None
                self.entries[image_id] = entry
            pos = good_end = end
        if good_end != len(data) and not self.read_only:
            with open(self.path, "r+b") as f:
                f.truncate(good_end)
                f.flush()
                os.fsync(f.fileno())

    # ----------------------------------------------------------------- queries
    def ids(self, status: str | None = None) -> set[str]:
        return {k for k, v in self.entries.items() if status is None or v.get("status") == status}

    def counts(self) -> dict:
        status = Counter(v.get("status") for v in self.entries.values())
        reasons = Counter(v.get("reason") for v in self.entries.values() if v.get("status") == "skipped")
        return {"lines": len(self.entries), "ok": status.get("ok", 0), "skipped": status.get("skipped", 0),
                "skipped_by_reason": dict(sorted(reasons.items()))}

    # ----------------------------------------------------------------- writing
    def append(self, lines: Iterable[dict]) -> None:
        """Append lines durably (flush + fsync) and update ``entries``."""
        if self.read_only:
            raise ValueError(f"{self.path} was opened read-only")
        lines = list(lines)
        if not lines:
            return
        text = "".join(json.dumps(line, ensure_ascii=False, separators=(",", ":")) + "\n" for line in lines)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        for line in lines:
            self.entries[line["image_id"]] = line

    def rewrite(self) -> None:
        """Rewrite the file atomically with one line per image (the latest)."""
        if self.read_only:
            raise ValueError(f"{self.path} was opened read-only")
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            for line in self.entries.values():
                f.write(json.dumps(line, ensure_ascii=False, separators=(",", ":")) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    def reconcile(self, record_ids: set[str]) -> dict:
        """Make "ok" lines and stored records agree (see the module docstring). Returns what was changed."""
        ok = self.ids("ok")
        stale = sorted(ok - record_ids)
        missing = sorted(record_ids - ok)
        for image_id in stale:
            log.warning("manifest says %s is ok but no committed shard holds it: it will be processed again", image_id)
            del self.entries[image_id]
        if stale:
            self.rewrite()
        if missing:
            log.warning("%d record(s) had no manifest line (interrupted run): adding them", len(missing))
            self.append({"image_id": i, "status": "ok", "reason": None, "reconciled": True} for i in missing)
        return {"dropped_ok_without_record": stale, "added_ok_for_record": missing}
