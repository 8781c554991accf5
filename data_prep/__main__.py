"""Command line: ``python -m data_prep {run,inspect,verify} ...`` (``--help`` on each).

Expected failures (a missing input or model file, a damaged output folder, an unreadable model file) print one
line ``error: ...`` and exit with status 2 (``--debug`` shows the traceback).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys


def _positive(v: str) -> int:
    n = int(v)
    if n <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {v}")
    return n


def _non_negative(v: str) -> int:
    n = int(v)
    if n < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {v}")
    return n


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m data_prep", description=(
        "Prepare FaceCrafter training records from face photos (ArcFace, MediaPipe landmarks, head pose, "
        "EmoNet emotion, VAE latent moments)."))
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="process a folder of images into record shards + manifest.jsonl (resumable)",
                       description="Process every image under --images into record shards and manifest.jsonl in --out. "
                                   "Re-running with the same --out resumes: images already in the manifest are skipped.")
    r.add_argument("--images", required=True, help="folder of input images (searched recursively)")
    r.add_argument("--out", required=True, help="output dataset folder")
    r.add_argument("--landmarker", required=True, help="MediaPipe face_landmarker.task bundle")
    r.add_argument("--arcface", required=True, help="ArcFace ONNX model (input [N,3,112,112], output [N,512])")
    r.add_argument("--emonet", required=True, help="official EmoNet checkpoint (emonet_8.pth)")
    r.add_argument("--vae", required=True, help="diffusers AutoencoderKL folder (e.g. SD1.5 vae/)")
    r.add_argument("--resolution", type=_positive, default=512, help="side of the aligned crop (multiple of 8; default 512)")
    r.add_argument("--workers", type=_non_negative, default=None,
                   help="decode + landmark worker processes (0: in the main process; default min(4, cores-1))")
    r.add_argument("--batch-size", type=_positive, default=16, help="batch size of the ArcFace / EmoNet / VAE calls")
    r.add_argument("--shard-size", type=_positive, default=1000, help="records per shard")
    r.add_argument("--latent-dtype", choices=("float16", "float32"), default="float16", help="storage dtype of latent_moments")
    r.add_argument("--min-side", type=_positive, default=None, help="skip images (and faces) smaller than this many px (default 64)")
    r.add_argument("--num-faces", type=int, default=5, help="faces the landmarker may report (>= 2; the largest is used)")
    r.add_argument("--emonet-crop-scale", type=float, default=0.75,
                   help="EmoNet crop side relative to the FFHQ-style crop (default 0.75)")
    r.add_argument("--all-files", action="store_true", help="consider every file, not only image extensions")
    r.add_argument("--retry-skipped", action="store_true", help="process again the images the manifest marks skipped")
    r.add_argument("--limit", type=_positive, default=None, help="process at most this many new images")
    r.add_argument("--identity-csv", metavar="CSV", help="identity of each image (header: image,identity; image paths "
                   "relative to --images), stored as identities.tsv; default: the image's parent folder is its identity")
    r.add_argument("--no-progress", action="store_true", help="no progress bar")

    i = sub.add_parser("inspect", help="print a JSON summary of a prepared folder")
    i.add_argument("directory", help="dataset folder written by 'run'")

    v = sub.add_parser("verify", help="check every shard against dataset.json (count, size; --hashes: SHA-256)",
                       description="Check that every shard listed in dataset.json is present, of its recorded size "
                                   "and record count (and, with --hashes, of its recorded SHA-256). Prints a JSON "
                                   "report; exits with status 2 naming the damaged shards if there are any.")
    v.add_argument("directory", help="dataset folder")
    v.add_argument("--hashes", action="store_true", help="also recompute every shard's SHA-256 (reads every byte)")
    return p


def main(argv=None) -> int:
    from facecrafter_jax.errors import run_cli

    return run_cli(_main, argv)


def _main(argv) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.command == "verify":
        from facecrafter_jax.data.integrity import verify_dataset

        report = verify_dataset(args.directory, hashes=args.hashes)
        gbs = report.bytes_hashed / 1e9 / report.seconds if report.hashed and report.seconds > 0 else None
        print(json.dumps({"path": str(report.data_dir), "ok": report.ok, "records": report.num_records,
                          "shards": len(report.shards), "hashed": report.hashed, "legacy": report.legacy,
                          "problems": [str(p) for p in report.problems], "seconds": round(report.seconds, 3),
                          "hash_gb_per_s": round(gbs, 3) if gbs else None}, indent=1))
        report.raise_if_problems()
        return 0
    if args.command == "inspect":
        from data_prep.inspect_cmd import inspect_dataset

        print(json.dumps(inspect_dataset(args.directory), indent=1))
        return 0
    from data_prep.run import run, summary_json

    summary = run(args.images, args.out, args.landmarker, args.arcface, args.emonet, args.vae,
                  resolution=args.resolution, workers=args.workers, batch_size=args.batch_size,
                  shard_size=args.shard_size, latent_dtype=args.latent_dtype, min_side=args.min_side,
                  num_faces=args.num_faces, emonet_crop_scale=args.emonet_crop_scale, all_files=args.all_files,
                  retry_skipped=args.retry_skipped, limit=args.limit, progress=not args.no_progress,
                  identity_csv=args.identity_csv)
    print(summary_json(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
