"""Input-pipeline throughput at SD1.5 sizes.

Writes a synthetic record dataset (R=512: latent moments 64x64x8 plus all features) into a temporary folder
(or reuses ``--dir``), then measures records/s of

* ``decode``: ``RecordCodec.decode`` alone on in-memory bytes;
* ``pipeline``: the full grain pipeline (random-access read + decode + shuffle + batch, host numpy batches)
  for each ``--workers`` value, after a warm-up batch (worker start-up is not counted);
* ``pipeline+device_put`` (with ``--device-put``): the same, placing each batch on the default devices.

Example::

    .venv/bin/python bench/data.py --records 3000 --workers 0 2
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time

import numpy as np


def write_dataset(out_dir: str, records: int, resolution: int, latent_dtype: str, shard_size: int) -> float:
    from facecrafter_jax.data import records as R

    base = [R.synthetic_record(np.random.default_rng([0, i]), resolution, image_id="x") for i in range(16)]
    t0 = time.perf_counter()
    with R.RecordWriter(out_dir, resolution=resolution, shard_size=shard_size, latent_dtype=latent_dtype) as w:
        for i in range(records):
            w.write({**base[i % len(base)], "image_id": f"synthetic/{i:07d}.png"})
    return records / (time.perf_counter() - t0)


def bench_decode(data_dir: str, n: int = 2000) -> float:
    from facecrafter_jax.data import records as R
    from array_record.python.array_record_module import ArrayRecordReader

    shard = R.list_shards(data_dir)[0]
    reader = ArrayRecordReader(str(shard))
    blobs = reader.read(list(range(min(reader.num_records(), 256))))
    reader.close()
    codec = R.codec_for(data_dir)
    t0 = time.perf_counter()
    for i in range(n):
        codec.decode(blobs[i % len(blobs)])
    return n / (time.perf_counter() - t0)


def bench_pipeline(data_dir: str, workers: int, batch_size: int, records: int, read_threads: int,
                   device_put: bool) -> tuple[float, float]:
    from facecrafter_jax.data import pipeline as P

    pipe = P.make_pipeline(data_dir, global_batch_size=batch_size, seed=0, worker_count=workers,
                           read_threads=read_threads, sharding="default" if device_put else None)
    with pipe:
        t0 = time.perf_counter()
        first = next(pipe)  # warm-up: worker start-up, first reads
        startup = time.perf_counter() - t0
        n_batches = max(1, records // batch_size)
        t0 = time.perf_counter()
        for _ in range(n_batches):
            batch = next(pipe)
        if device_put:
            batch["latent_moments"].block_until_ready()
        dt = time.perf_counter() - t0
        del first, batch
    return n_batches * batch_size / dt, startup


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", type=int, default=3000, help="records to write (default 3000)")
    ap.add_argument("--resolution", type=int, default=512, help="image resolution; latent side = R/8 (default 512)")
    ap.add_argument("--latent-dtype", default="float16", choices=["float16", "float32"])
    ap.add_argument("--shard-size", type=int, default=1000)
    ap.add_argument("--batch-size", type=int, default=64, help="per-process batch (default 64)")
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="worker counts to measure (default 0 2)")
    ap.add_argument("--read-threads", type=int, default=4, help="grain read threads per process (default 4)")
    ap.add_argument("--measure-records", type=int, default=4096, help="records timed per configuration")
    ap.add_argument("--device-put", action="store_true", help="also time placement on the default devices")
    ap.add_argument("--dir", default=None, help="existing dataset folder to read instead of writing one")
    ap.add_argument("--keep", action="store_true", help="keep the temporary dataset")
    args = ap.parse_args(argv)

    from absl import flags

    flags.FLAGS.mark_as_parsed()
    tmp = None
    if args.dir:
        data_dir = args.dir
    else:
        tmp = data_dir = tempfile.mkdtemp(prefix="fc_bench_data_")
        rate = write_dataset(data_dir, args.records, args.resolution, args.latent_dtype, args.shard_size)
        size = sum(os.path.getsize(os.path.join(data_dir, f)) for f in os.listdir(data_dir))
        print(f"wrote {args.records} records (R={args.resolution}, latent {args.latent_dtype}) to {data_dir}: "
              f"{size / 2**20:.0f} MiB, {size / args.records / 1024:.1f} KiB/record, {rate:.0f} records/s")
    try:
        print(f"cpu cores: {os.cpu_count()}, batch {args.batch_size}, read threads {args.read_threads}")
        print(f"{'stage':<28}{'records/s':>12}{'start-up s':>12}")
        print(f"{'decode only':<28}{bench_decode(data_dir):>12.0f}{'':>12}")
        modes = [False, True] if args.device_put else [False]
        for dp in modes:
            for w in args.workers:
                rps, start = bench_pipeline(data_dir, w, args.batch_size, args.measure_records, args.read_threads, dp)
                name = f"pipeline {'+device_put ' if dp else ''}workers={w}"
                print(f"{name:<28}{rps:>12.0f}{start:>12.2f}")
    finally:
        if tmp and not args.keep:
            shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
