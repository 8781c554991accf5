"""``python -m data_prep inspect DIR``: a JSON summary of a prepared dataset folder."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from data_prep.manifest import MANIFEST_NAME, Manifest

__all__ = ["inspect_dataset"]


def inspect_dataset(directory: str | os.PathLike) -> dict:
    """Record count, shards, manifest counts (skipped by reason), and the name / shape / dtype of every field
    as decoded from the first stored record (from ``dataset.json`` when the dataset holds no record)."""
    from facecrafter_jax.data.records import count_records, iter_records, list_shards, read_dataset_info, read_image_ids

    d = Path(directory)
    info = read_dataset_info(d)
    n_records = count_records(d)
    first = next(iter_records(d), None) if n_records else None
    if first is not None:
        fields = {}
        for name, value in first.items():
            if isinstance(value, str):
                fields[name] = {"shape": [], "dtype": "str"}
            else:
                arr = np.asarray(value)
                fields[name] = {"shape": list(arr.shape), "dtype": arr.dtype.name}
    else:
        fields = {k: dict(v) for k, v in info.get("fields", {}).items()}
    summary = {
        "path": str(d),
        "records": n_records,
        "shards": len(list_shards(d)),
        "resolution": info["resolution"],
        "latent_dtype": info["latent_dtype"],
        "fields": fields,
    }
    manifest_path = d / MANIFEST_NAME
    if manifest_path.exists():
        m = Manifest(manifest_path, read_only=True)
        counts = m.counts()
        ok_entries = [v for v in m.entries.values() if v.get("status") == "ok"]
        counts["multi_face_images"] = sum(1 for v in ok_entries if v.get("num_faces", 1) > 1)
        summary["manifest"] = counts
        summary["consistent"] = m.ids("ok") == set(read_image_ids(d))
    else:
        summary["manifest"] = None
        summary["consistent"] = None
    settings = info.get("metadata", {}).get("data_prep", {}).get("settings")
    if settings is not None:
        summary["settings"] = settings
    return summary
