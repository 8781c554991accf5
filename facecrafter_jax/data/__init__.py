"""Training data: the record format (ArrayRecord shards) and the grain input pipeline.

Public API::

    from facecrafter_jax.data import RecordWriter, iter_records, count_records, list_shards
    from facecrafter_jax.data import make_pipeline, save_iterator_state, restore_iterator_state

:mod:`facecrafter_jax.data.records` needs only numpy and array_record; the pipeline module (grain, jax,
orbax) is imported lazily on first use of one of its names.
"""

import importlib

_RECORDS = (
    "FIELDS", "SCHEMA_VERSION", "EMOTION_CLASSES", "RecordError", "RecordCodec", "RecordWriter",
    "encode_record", "decode_record", "field_specs", "latent_side", "list_shards", "read_dataset_info",
    "count_records", "shard_record_counts", "read_image_ids", "iter_records", "codec_for", "synthetic_record",
)
_PIPELINE = (
    "InputPipeline", "make_pipeline", "save_iterator_state", "restore_iterator_state",
    "iterator_save_args", "iterator_restore_args", "data_sharding",
)
_IDENTITIES = ("read_identity_labels", "write_identity_labels", "IDENTITIES_FILE")
_LAZY = {**{n: "facecrafter_jax.data.records" for n in _RECORDS},
         **{n: "facecrafter_jax.data.identities" for n in _IDENTITIES},
         **{n: "facecrafter_jax.data.pipeline" for n in _PIPELINE}}

__all__ = list(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'facecrafter_jax.data' has no attribute {name!r}")
