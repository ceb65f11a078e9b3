"""Turn line images and their transcriptions, in any supported format, into WebDataset shards for training.

  htr-prepare FORMAT SOURCE --out SHARDS [--splits DIR | --val-fraction F --test-fraction F --seed N]
              [--scale S] [--margin N] [--shard-size N] [--workers N] [--name NAME]
  htr-prepare --verify SHARDS

Writes SHARDS/{train,val,test}-%06d.tar and SHARDS/manifest.json (the alphabet is the train split's characters).
Splits: the source's own (IAM's split lists in SOURCE/splits, the reference's split folders), else the lists given
with --splits (files train, val or validation, test of line, page or group ids, one a line), else by group (writer,
page or folder: a group is never in two splits) with the given fractions of the lines, deterministically by --seed.
Every line not written is named in the log with its reason, counted in the summary and in the manifest's problems.
Re-running replaces the shards atomically.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import List, Optional

from htr_dist.data.formats import FORMATS
from htr_dist.data.formats.base import ImportOptions


def _formats_epilog() -> str:
    width = max(len(name) for name in FORMATS)
    rows = [f"  {name:<{width}}  {fmt.summary}" for name, fmt in FORMATS.items()]
    return "formats:\n" + "\n".join(rows) + "\n\nexamples:\n" + "\n".join([
        "  htr-prepare lines my_lines/ --out shards/mine",
        "  htr-prepare page transkribus_export/ --out shards/archive --val-fraction 0.05 --test-fraction 0.05",
        "  htr-prepare iam IAM/ --out shards/iam --scale 0.5",
        "  htr-prepare reference data/IAM_lines/ --out shards/iam_ref",
    ])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="htr-prepare", description=__doc__, epilog=_formats_epilog(),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("format", nargs="?", metavar="FORMAT", help=f"input format: {', '.join(FORMATS)}")
    p.add_argument("source", nargs="?", metavar="SOURCE", help="the folder (or PAGE-XML file) to read")
    p.add_argument("--out", metavar="SHARDS", help="output shard folder, e.g. shards/mine")
    p.add_argument("--splits", metavar="DIR", help="folder of split lists (train, val or validation, test files: one "
                                                   "id a line); IAM reads its *.uttlist or task lists here (default "
                                                   "for iam: SOURCE/splits when present)")
    p.add_argument("--val-fraction", type=float, default=0.1, metavar="F",
                   help="share of the lines for val when splitting by group (default: 0.1)")
    p.add_argument("--test-fraction", type=float, default=0.1, metavar="F",
                   help="share of the lines for test when splitting by group (default: 0.1)")
    p.add_argument("--seed", type=int, metavar="N", default=0, help="seed of the split by group (default: 0)")
    p.add_argument("--scale", type=float, metavar="S", default=1.0, help="rescale each line image (default: 1.0)")
    p.add_argument("--margin", type=int, metavar="N", default=None,
                   help="pixels of paper added around a line cut from a page, before scaling (default: 8 for iam, "
                        "0 otherwise)")
    p.add_argument("--shard-size", type=int, metavar="N", default=2000, help="lines per shard (default: 2000)")
    p.add_argument("--workers", type=int, metavar="N", default=0, help="parallel processes (default: 0 = all cores)")
    p.add_argument("--name", default="", help="data set name in the manifest (default: the output folder name)")
    p.add_argument("--xml", metavar="DIR", help="iam, iam-lines: the folder of form XML files (default: SOURCE/xml)")
    p.add_argument("--lines-txt", metavar="FILE", help="iam, iam-lines: IAM's lines.txt (default: "
                                                       "SOURCE/ascii/lines.txt)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (e.g. in batch jobs)")
    p.add_argument("--verify", metavar="SHARDS", help="check every shard of SHARDS against its manifest (SHA-256 and "
                                                      "size) and exit: 0 if all match, 1 naming each one that does "
                                                      "not")
    return p


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = build_parser()
    args = p.parse_args(argv)
    if args.verify:
        if args.format or args.out:
            p.error("--verify SHARDS takes no FORMAT, SOURCE or --out")
        return args
    if not (args.format and args.source and args.out):
        p.error("give FORMAT SOURCE --out SHARDS (or --verify SHARDS)")
    if args.format not in FORMATS:
        p.error(f"unknown format {args.format!r}; choose one of: {', '.join(FORMATS)}")
    if not args.scale > 0:
        p.error(f"--scale must be > 0, got {args.scale}")
    if (args.margin is not None and args.margin < 0) or args.shard_size < 1 or args.workers < 0:
        p.error("--margin and --workers must be >= 0 and --shard-size >= 1")
    fractions = (args.val_fraction, args.test_fraction)
    if not all(0 <= f < 1 for f in fractions) or sum(fractions) >= 1:
        p.error(f"--val-fraction and --test-fraction must be in [0, 1) with a sum below 1, got {fractions}")
    return args


def options(args: argparse.Namespace) -> ImportOptions:
    return ImportOptions(args.source, args.out, splits_dir=args.splits, val_fraction=args.val_fraction,
                         test_fraction=args.test_fraction, seed=args.seed, scale=args.scale, margin=args.margin,
                         shard_size=args.shard_size, workers=args.workers, name=args.name, xml_dir=args.xml,
                         lines_txt=args.lines_txt)


def verify(folder: str) -> int:
    """Check every shard of ``folder`` against its manifest; print one line per mismatch; 0 if all match."""
    from htr_dist.data.shards import ManifestError, load_manifest, verify_shards

    try:
        problems = verify_shards(folder)
        manifest = load_manifest(folder, check_sizes=False)
    except ManifestError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    for line in problems:
        print(f"error: {line}", file=sys.stderr)
    shards = sum(len(i["shards"]) for i in manifest["splits"].values())
    print(f"{folder}: {shards - len(problems)} of {shards} shards match the manifest")
    return 1 if problems else 0


def run(write, out_dir: str) -> int:
    """Call ``write()`` (which returns the manifest) and print its summary; bad input is one ``error:`` line."""
    from htr_dist.data.prepare import summary

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    try:
        manifest = write()
    except (OSError, ValueError) as err:  # missing or unwritable folders, malformed files or split lists
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(summary(manifest))
    print(f"manifest: {os.path.join(out_dir, 'manifest.json')}")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    if args.verify:
        return verify(args.verify)
    from htr_dist.data.prepare import prepare_format

    return run(lambda: prepare_format(FORMATS[args.format], options(args), progress=not args.no_progress), args.out)
