"""Record format: byte layout, round trip, schema errors, sharded writer (atomic shards, resume, lock)."""

import json
import os
import struct
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from facecrafter_jax.data import records as R

RES = 64  # latent 8x8x8


def _rec(i, seed=0, res=RES):
    return R.synthetic_record(np.random.default_rng([seed, i]), res, image_id=f"imgs/{i:05d}.png")


def _assert_record_equal(got, want, latent_dtype="float32"):
    assert got["image_id"] == want["image_id"]
    for k in ("arcface", "landmarks", "head_pose", "emotion"):
        assert got[k].dtype == np.float32 and got[k].shape == want[k].shape, k
        np.testing.assert_array_equal(got[k], np.asarray(want[k], np.float32), err_msg=k)
    np.testing.assert_array_equal(got["latent_moments"], np.asarray(want["latent_moments"]).astype(latent_dtype))
    assert got["latent_moments"].dtype == np.dtype(latent_dtype)


@pytest.mark.parametrize("latent_dtype", ["float32", "float16"])
def test_round_trip_exact(latent_dtype):
    rec = _rec(3)
    codec = R.RecordCodec(RES, latent_dtype)
    data = codec.encode(rec)
    _assert_record_equal(codec.decode(data), rec, latent_dtype)
    _assert_record_equal(R.decode_record(data), rec, latent_dtype)  # header-driven decode


def test_byte_layout_matches_documentation():
    """Parse the bytes by hand from the documented layout (independent of the decoder)."""
    rec = _rec(5)
    data = R.encode_record(rec, resolution=RES, latent_dtype="float16")
    magic, version, code, pad, side, id_len, pad2 = struct.unpack_from("<4sHBBHHI", data, 0)
    assert (magic, version, code, pad, side, pad2) == (b"FCR1", 1, 1, 0, 8, 0)
    ident = rec["image_id"].encode()
    assert id_len == len(ident) and data.endswith(ident)
    off = 16
    for name, n in (("arcface", 512), ("landmarks", 478 * 3), ("head_pose", 3), ("emotion", 10)):
        vals = struct.unpack_from(f"<{n}f", data, off)
        np.testing.assert_array_equal(np.array(vals, np.float32), rec[name].reshape(-1), err_msg=name)
        off += 4 * n
    n_lat = 8 * 8 * 8
    lat = np.array(struct.unpack_from(f"<{n_lat}e", data, off), np.float16)
    np.testing.assert_array_equal(lat, rec["latent_moments"].astype(np.float16).reshape(-1))
    assert len(data) == off + 2 * n_lat + id_len


def _bad(field, value):
    rec = _rec(1)
    rec[field] = value
    return rec


@pytest.mark.parametrize("rec, match", [
    ({**_rec(1), "extra": 1}, r"unknown record field\(s\) \['extra'\]"),
    ({k: v for k, v in _rec(1).items() if k != "emotion"}, r"missing record field\(s\) \['emotion'\]"),
    (_bad("landmarks", np.zeros((468, 3), np.float32)), r"'landmarks' must have shape \(478, 3\)"),
    (_bad("latent_moments", np.zeros((8, 8, 4), np.float32)), r"'latent_moments' must have shape \(8, 8, 8\)"),
    (_bad("head_pose", np.zeros(3, np.int32)), r"'head_pose' must be a floating-point array"),
    (_bad("emotion", np.full(10, np.nan, np.float32)), r"'emotion' contains NaN"),
    (_bad("arcface", np.ones(512, np.float32)), r"'arcface' must be L2-normalised"),
    (_bad("image_id", ""), r"'image_id' must be a non-empty str"),
    (_bad("image_id", b"a.png"), r"'image_id' must be a non-empty str"),
    (_bad("image_id", "a\nb"), r"'image_id' must not contain newline"),
])
def test_schema_errors_name_the_field(rec, match):
    with pytest.raises(R.RecordError, match=match):
        R.RecordCodec(RES, "float32").encode(rec)


def test_float16_overflow_is_an_error():
    lat = np.zeros((8, 8, 8), np.float32)
    lat[0, 0, 0] = 1e5
    with pytest.raises(R.RecordError, match=r"'latent_moments' overflows float16"):
        R.RecordCodec(RES, "float16").encode(_bad("latent_moments", lat))
    R.RecordCodec(RES, "float32").encode(_bad("latent_moments", lat))  # fine in float32


def test_decode_errors():
    data = R.RecordCodec(RES, "float16").encode(_rec(2))
    with pytest.raises(R.RecordError, match=r"'latent_moments' is stored as float16, expected float32"):
        R.RecordCodec(RES, "float32").decode(data)
    with pytest.raises(R.RecordError, match=r"'latent_moments' has side 8, expected 16"):
        R.RecordCodec(128, "float16").decode(data)
    with pytest.raises(R.RecordError, match="truncated"):
        R.RecordCodec(RES, "float16").decode(data[:-3])
    with pytest.raises(R.RecordError, match="magic"):
        R.RecordCodec(RES, "float16").decode(b"XXXX" + data[4:])
    with pytest.raises(R.RecordError, match="resolution must be a positive multiple of 8"):
        R.RecordCodec(100)
    with pytest.raises(R.RecordError, match="latent_dtype must be one of"):
        R.RecordCodec(RES, "bfloat16")


def test_writer_shards_info_and_readback(tmp_path):
    recs = [_rec(i) for i in range(250)]
    with R.RecordWriter(tmp_path, resolution=RES, shard_size=100, latent_dtype="float16",
                        metadata={"source": "test"}) as w:
        for r in recs:
            w.write(r)
        assert w.num_records == 250
    shards = R.list_shards(tmp_path)
    assert [p.name for p in shards] == [f"shard-0000{i}.array_record" for i in range(3)]
    info = json.loads((tmp_path / "dataset.json").read_text())
    assert info["shards"] == {"shard-00000.array_record": 100, "shard-00001.array_record": 100,
                              "shard-00002.array_record": 50}
    assert (info["resolution"], info["latent_side"], info["latent_dtype"], info["num_records"]) == (64, 8, "float16", 250)
    assert info["fields"]["latent_moments"] == {"shape": [8, 8, 8], "dtype": "float16"}
    assert info["metadata"] == {"source": "test"}
    assert R.read_dataset_info(tmp_path)["schema_version"] == R.SCHEMA_VERSION
    assert R.count_records(tmp_path) == 250
    assert R.read_image_ids(tmp_path) == [r["image_id"] for r in recs]
    got = list(R.iter_records(tmp_path))
    assert len(got) == 250
    for g, r in zip(got, recs):
        _assert_record_equal(g, r, "float16")
    # grain's random-access source accepts the shards (it checks group_size:1) and reads the same bytes.
    import grain

    src = grain.sources.ArrayRecordDataSource([str(p) for p in shards])
    assert len(src) == 250
    _assert_record_equal(R.codec_for(tmp_path).decode(src[137]), recs[137], "float16")
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_writer_rejects_duplicates_and_second_writer(tmp_path):
    w = R.RecordWriter(tmp_path, resolution=RES, shard_size=10)
    w.write(_rec(0))
    with pytest.raises(R.RecordError, match=r"'image_id': duplicate id 'imgs/00000.png'"):
        w.write(_rec(0))
    with pytest.raises(R.RecordError, match="another RecordWriter holds"):
        R.RecordWriter(tmp_path, resolution=RES)
    w.close()
    with pytest.raises(R.RecordError, match="RecordWriter is closed"):
        w.write(_rec(1))
    with pytest.raises(R.RecordError, match=r"has resolution=64; this writer was created with resolution=128"):
        R.RecordWriter(tmp_path, resolution=128)
    with pytest.raises(R.RecordError, match=r"latent_dtype='float16'; .* latent_dtype='float32'"):
        R.RecordWriter(tmp_path, resolution=RES, latent_dtype="float32")


def test_interrupted_run_leaves_no_readable_partial_shard_and_resume_continues(tmp_path):
    """A writer killed mid-shard (os._exit: no close, no cleanup) leaves only a .tmp file."""
    script = textwrap.dedent(f"""
        import os, numpy as np
        from facecrafter_jax.data import records as R
        w = R.RecordWriter({str(tmp_path)!r}, resolution={RES}, shard_size=100)
        for i in range(150):
            w.write(R.synthetic_record(np.random.default_rng([0, i]), {RES}, image_id=f"imgs/{{i:05d}}.png"))
        os._exit(3)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3, proc.stderr
    names = sorted(p.name for p in tmp_path.iterdir())
    assert "shard-00000.array_record" in names and "shard-00001.array_record.tmp" in names
    assert "shard-00001.array_record" not in names
    # Readers see only the complete shard.
    assert [p.name for p in R.list_shards(tmp_path)] == ["shard-00000.array_record"]
    assert R.count_records(tmp_path) == 100
    assert len(list(R.iter_records(tmp_path))) == 100
    # Resume: the partial file is removed, numbering continues, completed ids are known.
    with R.RecordWriter(tmp_path, resolution=RES, shard_size=100) as w:
        assert not (tmp_path / "shard-00001.array_record.tmp").exists()
        assert w.existing_ids == {f"imgs/{i:05d}.png" for i in range(100)}
        for i in range(100, 230):
            if f"imgs/{i:05d}.png" not in w.existing_ids:
                w.write(_rec(i))
    assert [p.name for p in R.list_shards(tmp_path)] == [f"shard-0000{i}.array_record" for i in range(3)]
    assert R.count_records(tmp_path) == 230
    got = list(R.iter_records(tmp_path))
    assert [g["image_id"] for g in got] == [f"imgs/{i:05d}.png" for i in range(230)]
    for i in (0, 99, 100, 229):
        _assert_record_equal(got[i], _rec(i), "float16")


def test_shard_renamed_but_info_not_updated_is_counted(tmp_path):
    """A crash between the shard rename and the dataset.json rewrite: the shard still counts."""
    with R.RecordWriter(tmp_path, resolution=RES, shard_size=20) as w:
        for i in range(40):
            w.write(_rec(i))
    info = json.loads((tmp_path / "dataset.json").read_text())
    del info["shards"]["shard-00001.array_record"]
    (tmp_path / "dataset.json").write_text(json.dumps(info))
    assert R.shard_record_counts(tmp_path) == {"shard-00000.array_record": 20, "shard-00001.array_record": 20}
    with R.RecordWriter(tmp_path, resolution=RES, shard_size=20) as w:
        w.write(_rec(40))
    assert R.read_dataset_info(tmp_path)["shards"]["shard-00001.array_record"] == 20
    assert R.count_records(tmp_path) == 41


def test_missing_info_or_shard_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="dataset.json"):
        R.read_dataset_info(tmp_path)
    with R.RecordWriter(tmp_path, resolution=RES, shard_size=5) as w:
        for i in range(10):
            w.write(_rec(i))
    os.remove(tmp_path / "shard-00000.array_record")
    with pytest.raises(R.RecordError, match=r"missing on disk: \['shard-00000.array_record'\]"):
        R.RecordWriter(tmp_path, resolution=RES)


def test_other_vae_factor_latent_side(tmp_path):
    """A VAE that downsamples by 4 (the toy VAE): 64 px records with 16 x 16 latents, stored as the dataset's
    latent_side; the grain pipeline decodes them; resuming with another side or a side that does not divide
    the resolution is an error naming it."""
    from facecrafter_jax.data import iter_records, make_pipeline

    rng = np.random.default_rng(0)
    recs = []
    for i in range(6):
        r = _rec(i)
        r["latent_moments"] = rng.standard_normal((16, 16, 8)).astype(np.float32)
        recs.append(r)
    with R.RecordWriter(tmp_path / "d", RES, shard_size=4, latent_dtype="float32", latent_side=16) as w:
        for r in recs:
            w.write(r)
    info = R.read_dataset_info(tmp_path / "d")
    assert info["latent_side"] == 16 and info["fields"]["latent_moments"]["shape"] == [16, 16, 8]
    for got, want in zip(iter_records(tmp_path / "d"), recs):
        _assert_record_equal(got, want)
    p = make_pipeline(tmp_path / "d", global_batch_size=3, seed=0, shuffle=False, sharding=None)
    batch = next(p)
    p.close()
    assert np.shape(batch["latent_moments"]) == (3, 16, 16, 8)
    np.testing.assert_array_equal(np.asarray(batch["latent_moments"]), np.stack([r["latent_moments"] for r in recs[:3]]))
    with pytest.raises(R.RecordError, match="latent_side"):
        R.RecordWriter(tmp_path / "d", RES, shard_size=4, latent_dtype="float32")  # default side 8
    with pytest.raises(R.RecordError, match="latent_side"):
        R.RecordCodec(RES, "float32", latent_side=5)
    with pytest.raises(R.RecordError, match="latent_moments"):
        R.RecordCodec(RES, "float32").encode(recs[0])  # a 16 x 16 latent in an SD-factor dataset
