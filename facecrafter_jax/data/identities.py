"""Identity labels of the records (which photos show the same person): ``identities.tsv``, or the folders.

Used by the input pipeline's other-photo identity draw (``data.other_photo_identity``, docs/method.md).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from .records import TMP_SUFFIX, RecordError, read_image_ids

__all__ = ["IDENTITIES_FILE", "read_identity_labels", "write_identity_labels"]

IDENTITIES_FILE = "identities.tsv"


def read_identity_labels(data_dir: str | os.PathLike) -> list[str]:
    """The identity label of every record of the complete shards, in storage order.

    From ``identities.tsv`` in the dataset folder when it exists (``image_id<TAB>identity`` per line, written by
    ``data_prep run --identity-csv`` or the toy world; every record must be listed), otherwise the parent folder of
    the ``image_id`` (face datasets are laid out one folder per person); a record at the top level is its own
    identity.
    """
    ids = read_image_ids(data_dir)
    path = Path(data_dir) / IDENTITIES_FILE
    if not path.is_file():
        return [os.path.dirname(i) or i for i in ids]
    table: dict[str, str] = {}
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line:
            continue
        image_id, sep, label = line.partition("\t")
        if not sep or not label:
            raise RecordError(f"{path} line {n}: expected 'image_id<TAB>identity', got {line!r}")
        table[image_id] = label
    missing = [i for i in ids if i not in table]
    if missing:
        raise RecordError(f"{path} has no identity for {len(missing)} record(s), e.g. {missing[0]!r}")
    return [table[i] for i in ids]


def write_identity_labels(data_dir: str | os.PathLike, labels: Mapping[str, str]) -> Path:
    """Write ``identities.tsv`` (``image_id -> identity``) into a dataset folder (atomically)."""
    path = Path(data_dir) / IDENTITIES_FILE
    bad = [k for k, v in labels.items() if "\t" in k or "\n" in k or "\t" in str(v) or "\n" in str(v) or not str(v)]
    if bad:
        raise RecordError(f"identity labels: image_id / identity with a tab, a newline or empty, e.g. {bad[0]!r}")
    tmp = path.with_name(path.name + TMP_SUFFIX)
    tmp.write_text("".join(f"{k}\t{v}\n" for k, v in labels.items()), encoding="utf-8")
    os.replace(tmp, path)
    return path
