"""Evaluate folders of generated faces with the FaceCrafter paper's metrics.

Reads the PNGs and samples.json that sample.py writes (one folder per identity / condition, or a folder of
such folders), runs face analysers on every image (ArcFace identity, MediaPipe landmarks and head pose,
EmoNet emotion) and compares them with the targets recorded in samples.json. Writes OUT.json (everything,
including per-image values) and OUT.md (one table row per sample set, one column per metric).

Examples:
  python -m facecrafter_jax.evaluation --samples out/arc2face --samples out/facecrafter \\
      --arcface arcface.onnx --landmarker face_landmarker.task --emonet emonet_8.pth --out results/report
  python -m facecrafter_jax.evaluation --samples out/me --landmarker face_landmarker.task --out report

Sample sets. Each --samples DIR is one set (one table row, named after the folder). DIR holds samples.json
and its images, or its immediate subfolders each do (e.g. one subfolder per identity). The fields read are
listed in facecrafter_jax/sample_set.py (the schema sample.py writes). Images without landmark / emotion
controls are "ID-only": their diversity is measured per identity.

Metrics (definitions with formulas in facecrafter_jax.metrics and docs/evaluation.md). Only metrics whose
targets and analysers are present are computed; the others are "-" in the table. Images in which the
analysers find no face are counted (no_face) and left out of the averages; they never stop the run.

Errors are one line `error: ...` on stderr with exit status 2: missing folders, samples.json, images,
model or target files, bad target shapes or values, unknown analyser backend or option are found before any
model is loaded; an identity / landmark target photo without a face stops the run the same way.
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import sys
import time

from facecrafter_jax import sample_set
from facecrafter_jax.errors import ConfigError, run_cli
from facecrafter_jax.sample_set import check_target_files, load_sample_set, need_file

from .analysers import get_backend
from .evaluate import METRIC_COLUMNS, evaluate, reference_images
from .report import write_report

__all__ = ["build_parser", "run", "main"]


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, our format
        raise ConfigError(message)


def _schema_help() -> str:
    """The samples.json fields block of :mod:`facecrafter_jax.sample_set` (its docstring's 2nd and 3rd paragraphs)."""
    intro, fields = sample_set.__doc__.split("\n\n")[1:3]
    return intro.replace("``", "").rstrip(":") + ":\n" + fields


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of ``python -m facecrafter_jax.evaluation``."""
    doc = __doc__.split("\n\n")
    p = _Parser(prog="python -m facecrafter_jax.evaluation", description=doc[0],
                epilog="\n\n".join(doc[1:] + [_schema_help()]),
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", action="append", required=True, metavar="DIR",
                   help="a sample set: a folder with samples.json + images, or a folder of such folders "
                        "(repeat for several sets; one table row each)")
    p.add_argument("--out", required=True, metavar="PATH",
                   help="report path without extension: writes PATH.json and PATH.md (folders are created)")
    a = p.add_argument_group("analysers")
    a.add_argument("--analysers", default="real", metavar="NAME",
                   help="analyser backend: 'real' (default: MediaPipe + ArcFace + EmoNet), another registered "
                        "name, or package.module:factory")
    a.add_argument("--landmarker", metavar="TASK", help="MediaPipe face_landmarker.task bundle (required by the "
                   "real backend: faces are found and aligned with it)")
    a.add_argument("--arcface", metavar="ONNX", help="ArcFace ONNX model (Arc2Face's arcface.onnx): identity metrics")
    a.add_argument("--emonet", metavar="PTH", help="official EmoNet 8-class checkpoint (emonet_8.pth): emotion "
                   "metrics and emotion diversity")
    a.add_argument("--analyser-option", action="append", default=[], metavar="KEY=VALUE",
                   help="backend option (repeatable); real backend: emonet_crop_scale (default 0.75, as data_prep)")
    a.add_argument("--batch-size", type=int, default=16, metavar="N",
                   help="images loaded and analysed at a time (default 16)")
    m = p.add_argument_group("metrics")
    m.add_argument("--id-target", choices=("auto", "embedding", "image"), default="auto",
                   help="identity target: the conditioning embedding file, or the identity photo re-embedded "
                        "with --arcface; auto (default) = the photo when samples.json names one that exists, "
                        "else the embedding")
    m.add_argument("--id-threshold", type=float, default=0.4, metavar="T",
                   help="cosine above which a generated face counts as the same identity (id_frac; default 0.4)")
    m.add_argument("--reference", metavar="DIR", help="folder of real face images: Fréchet distances of "
                   "ArcFace / EmoNet features of each set against them (fd_arcface, fd_emonet)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    return p


def _options(args) -> dict:
    extra = {}
    for kv in args.analyser_option:
        k, sep, v = kv.partition("=")
        if not sep or not k:
            raise ConfigError(f"--analyser-option {kv!r}: expected KEY=VALUE")
        extra[k] = v
    for flag in ("landmarker", "arcface", "emonet"):
        path = getattr(args, flag)
        if path is not None:
            need_file(path, f"--{flag}")
    return {"landmarker": args.landmarker, "arcface": args.arcface, "emonet": args.emonet,
            "batch_size": args.batch_size, "extra": extra}


def run(args) -> tuple[dict, tuple[str, str]]:
    """Validate everything, build the analysers, evaluate, write the report (user errors: :class:`UserError`)."""
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size {args.batch_size}: must be >= 1")
    if not math.isfinite(args.id_threshold) or not -1 <= args.id_threshold <= 1:
        raise ConfigError(f"--id-threshold {args.id_threshold}: must be in [-1, 1]")
    log = (lambda s: None) if args.quiet else (lambda s: print(s, file=sys.stderr, flush=True))
    options = _options(args)
    backend = get_backend(args.analysers)
    names: dict[str, int] = {}
    sets = []
    for d in args.samples:
        s = load_sample_set(d, args.id_target)
        if s.name in names:  # disambiguate equal folder names
            names[s.name] += 1
            s.name = f"{s.name} ({names[s.name]})"
        else:
            names[s.name] = 1
        check_target_files(s)
        sets.append(s)
    if args.reference is not None:
        reference_images(args.reference)
    out_parent = os.path.dirname(os.path.abspath(args.out))
    if os.path.exists(out_parent) and not os.path.isdir(out_parent):
        raise ConfigError(f"--out {args.out}: {out_parent} is not a directory")

    t0 = time.perf_counter()
    analysers = backend.build(options)
    try:
        if not isinstance(getattr(analysers, "capabilities", None), (set, frozenset)):
            raise ConfigError(f"--analysers {args.analysers}: the factory did not return analysers (no capabilities)")
        t_build = time.perf_counter() - t0
        report = evaluate(sets, analysers, batch_size=args.batch_size, id_threshold=args.id_threshold,
                          reference_dir=args.reference, log=log)
        report = {
            "tool": "facecrafter_jax.evaluation",
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "argv": list(getattr(args, "argv", [])),
            "analysers": analysers.describe(),
            "settings": {"id_target": args.id_target, "id_threshold": args.id_threshold,
                         "batch_size": args.batch_size},
            "columns": {k: {"description": d, "better": b or None} for k, (d, b) in METRIC_COLUMNS.items()},
            **report,
            "timing_s": {"load_analysers": round(t_build, 3), "total": round(time.perf_counter() - t0, 3)},
        }
    finally:
        getattr(analysers, "close", lambda: None)()
    return report, write_report(report, args.out)


def _main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    args.argv = argv
    report, (jp, mp) = run(args)
    for s in report["sets"]:
        print(f"{s['name']}: {s['num_images']} images, {s['no_face']} without a face")
    print(f"wrote {jp} and {mp}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit status (0 ok, 2 bad input: one line ``error: ...``)."""
    return run_cli(_main, argv)
