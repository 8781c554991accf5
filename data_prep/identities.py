"""Identity labels of the records: ``--identity-csv`` (a CSV ``image,identity``) or the images' parent folders.

Face datasets are usually laid out one folder per person (``person/photo.jpg``); the training pipeline then takes
the identity from the folder of each record's ``image_id`` and needs nothing more. A CSV maps other layouts: its
header names an image column (``image``, ``image_id``, ``path`` or ``file``: the path relative to ``--images``) and
an ``identity`` column. It is read before any image is processed, and every image to be processed must be listed;
the labels of the records written are stored as ``identities.tsv`` in the dataset folder
(:func:`facecrafter_jax.data.records.write_identity_labels`).
"""

from __future__ import annotations

import csv
import os

__all__ = ["read_identity_csv", "IMAGE_COLUMNS"]

IMAGE_COLUMNS = ("image", "image_id", "path", "file")


def read_identity_csv(path: str | os.PathLike, image_ids) -> dict[str, str]:
    """``{image_id: identity}`` from a CSV; raises ``ValueError`` naming the file, column or missing image."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--identity-csv: file not found: {path}")
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        fields = [c.strip() for c in (reader.fieldnames or [])]
        image_col = next((c for c in IMAGE_COLUMNS if c in fields), None)
        if image_col is None or "identity" not in fields:
            raise ValueError(f"--identity-csv {path}: the header needs an image column ({', '.join(IMAGE_COLUMNS)}) "
                             f"and an 'identity' column, has {fields}")
        table: dict[str, str] = {}
        for n, row in enumerate(reader, 2):
            row = {(k or "").strip(): (v or "").strip() for k, v in row.items()}
            image, label = os.path.normpath(row[image_col]).replace(os.sep, "/"), row["identity"]
            if not row[image_col] or not label:
                raise ValueError(f"--identity-csv {path} line {n}: empty image or identity")
            if table.get(image, label) != label:
                raise ValueError(f"--identity-csv {path} line {n}: {image} has two identities ({table[image]}, {label})")
            table[image] = label
    missing = [i for i in image_ids if i not in table]
    if missing:
        raise ValueError(f"--identity-csv {path}: no identity for {len(missing)} image(s), e.g. {missing[0]}")
    return table
