#!/usr/bin/env python
"""Pack IAM text lines (real IAM, or the IAM-format data of launch/synth_iam.py) into WebDataset shards.

  python launch/prepare_iam.py --iam DIR --out shards/NAME [--source forms|lines] [--scale 0.5] [--margin N]
                               [--shard-size N] [--workers N]
  python launch/prepare_iam.py FORMS XML SPLITS OUT          (the seed's positional form)

DIR holds formsA-D/ formsE-H/ formsI-Z/ (or forms/), xml/, splits/, and for --source lines also lines/ and
ascii/lines.txt. In the positional form, FORMS is the folder that HOLDS formsA-D/ formsE-H/ formsI-Z/ (or forms/), or
lines/ for --source lines: usually the IAM root itself, not the folder of form images; XML is the xml/ folder and
SPLITS the folder of split lists: the Aachen split's *.uttlist files of form ids (train, validation, test), or IAM's
own line recognition task lists of line ids (trainset.txt, validationset1.txt, validationset2.txt, testset.txt; both
validation sets make val). Writes OUT/{train,val,test}-%06d.tar and OUT/manifest.json. Lines that cannot be
used, lines written without a writer id and split-list forms without lines are named in the log and counted in the
summary and the manifest; a split left without lines, or a line id met twice, is an error and nothing is written.
Re-running replaces the shards atomically.
"""

import argparse
import logging
import os
import sys

from htr_dist.data.iam import DEFAULT_MARGIN
from htr_dist.data.prepare import PrepareOptions, prepare, summary


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("positional", nargs="*", metavar="FORMS XML SPLITS OUT",
                   help="the seed's positional form; FORMS is the folder holding formsA-D/ ... or forms/ (or lines/), "
                        "e.g. the IAM root, not the folder of form images")
    p.add_argument("--iam", help="IAM root folder (forms*/, xml/, splits/, lines/, ascii/)")
    p.add_argument("--out", help="output shard folder, e.g. shards/iam")
    p.add_argument("--source", choices=["forms", "lines"], default="forms",
                   help="crop lines from the forms with the XML cmp boxes (default), or read lines/ + lines.txt")
    p.add_argument("--splits", help="folder of split lists: *.uttlist files of form ids, or IAM's trainset.txt "
                                    "validationset1.txt validationset2.txt testset.txt of line ids (default: "
                                    "IAM/splits)")
    p.add_argument("--lines-txt", help="IAM's lines.txt for --source lines, and to name the lines of a malformed XML "
                                       "file (default: IAM/ascii/lines.txt, or FORMS/ascii/lines.txt)")
    p.add_argument("--scale", type=float, default=1.0, help="rescale each line crop (the reference uses 0.5)")
    p.add_argument("--margin", type=int, default=DEFAULT_MARGIN,
                   help=f"pixels of paper added around the cmp-box union, before scaling (default: {DEFAULT_MARGIN})")
    p.add_argument("--shard-size", type=int, default=2000, help="lines per shard (default: 2000)")
    p.add_argument("--workers", type=int, default=0, help="parallel processes (default: 0 = all cores)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (e.g. in batch jobs)")
    p.add_argument("--name", default="", help="data set name in the manifest (default: the output folder name)")
    p.add_argument("--verify", metavar="OUT", help="check every shard of OUT against its manifest (SHA-256 and size) "
                                                   "and exit: 0 if all match, 1 naming each one that does not")
    args = p.parse_args(argv)
    if args.verify:
        if args.positional or args.iam or args.out:
            p.error("--verify OUT takes no other folder")
        return args
    if args.positional:
        if len(args.positional) != 4 or args.iam or args.out:
            p.error("the positional form takes exactly FORMS XML SPLITS OUT (and no --iam/--out)")
    elif not (args.iam and args.out):
        p.error("give --iam DIR --out OUT, or FORMS XML SPLITS OUT")
    if not args.scale > 0:
        p.error(f"--scale must be > 0, got {args.scale}")
    if args.margin < 0 or args.shard_size < 1 or args.workers < 0:
        p.error("--margin and --workers must be >= 0 and --shard-size >= 1")
    return args


def options(args) -> PrepareOptions:
    if args.positional:
        forms, xml, splits, out = args.positional
        lines_txt = args.lines_txt or os.path.join(forms, "ascii", "lines.txt")  # FORMS is usually the IAM root
        return PrepareOptions(forms, xml, splits, out, args.source, lines_txt, args.scale, args.margin,
                              args.shard_size, args.workers, args.name)
    if not os.path.isdir(args.iam):
        raise FileNotFoundError(f"IAM folder not found: {args.iam}")
    lines_txt = args.lines_txt or os.path.join(args.iam, "ascii", "lines.txt")
    return PrepareOptions(args.iam, os.path.join(args.iam, "xml"), args.splits or os.path.join(args.iam, "splits"),
                          args.out, args.source, lines_txt, args.scale, args.margin, args.shard_size, args.workers,
                          args.name)


def verify(folder: str) -> int:
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


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.verify:
        return verify(args.verify)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    try:
        opt = options(args)
        manifest = prepare(opt, progress=not args.no_progress)
    except (OSError, ValueError) as err:  # missing or unwritable folders, malformed lines.txt or split lists
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(summary(manifest))
    print(f"manifest: {os.path.join(opt.out_dir, 'manifest.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
