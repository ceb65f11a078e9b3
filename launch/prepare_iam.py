#!/usr/bin/env python
"""Pack IAM text lines (real IAM, or the IAM-format data of launch/synth_iam.py) into WebDataset shards.

  python launch/prepare_iam.py --iam DIR --out shards/NAME [--source forms|lines] [--scale 0.5] [--workers N]
  python launch/prepare_iam.py FORMS XML SPLITS OUT          (the seed's positional form)

DIR holds formsA-D/ formsE-H/ formsI-Z/ (or forms/), xml/, splits/*.uttlist, and for --source lines also lines/ and
ascii/lines.txt. Writes OUT/{train,val,test}-%06d.tar and OUT/manifest.json. Lines that cannot be used are named in
the log and counted in the summary and the manifest; re-running replaces the shards atomically.
"""

import argparse
import logging
import os
import sys

from htr_dist.data.prepare import PrepareOptions, prepare, summary


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("positional", nargs="*", metavar="FORMS XML SPLITS OUT", help="the seed's positional form")
    p.add_argument("--iam", help="IAM root folder (forms*/, xml/, splits/, lines/, ascii/)")
    p.add_argument("--out", help="output shard folder, e.g. shards/iam")
    p.add_argument("--source", choices=["forms", "lines"], default="forms",
                   help="crop lines from the forms with the XML cmp boxes (default), or read lines/ + lines.txt")
    p.add_argument("--splits", help="folder of *.uttlist split files (default: IAM/splits)")
    p.add_argument("--scale", type=float, default=1.0, help="rescale each line crop (the reference uses 0.5)")
    p.add_argument("--margin", type=int, default=8, help="pixels added around the cmp-box union (default: 8)")
    p.add_argument("--shard-size", type=int, default=2000, help="lines per shard (default: 2000)")
    p.add_argument("--workers", type=int, default=0, help="parallel processes (default: all cores)")
    p.add_argument("--name", default="", help="data set name in the manifest (default: the output folder name)")
    args = p.parse_args(argv)
    if args.positional:
        if len(args.positional) != 4 or args.iam or args.out:
            p.error("the positional form takes exactly FORMS XML SPLITS OUT (and no --iam/--out)")
    elif not (args.iam and args.out):
        p.error("give --iam DIR --out OUT, or FORMS XML SPLITS OUT")
    return args


def options(args) -> PrepareOptions:
    if args.positional:
        forms, xml, splits, out = args.positional
        return PrepareOptions(forms, xml, splits, out, args.source, None, args.scale, args.margin, args.shard_size,
                              args.workers, args.name)
    if not os.path.isdir(args.iam):
        raise FileNotFoundError(f"IAM folder not found: {args.iam}")
    return PrepareOptions(args.iam, os.path.join(args.iam, "xml"), args.splits or os.path.join(args.iam, "splits"),
                          args.out, args.source, os.path.join(args.iam, "ascii", "lines.txt"), args.scale,
                          args.margin, args.shard_size, args.workers, args.name)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    try:
        manifest = prepare(options(args))
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(summary(manifest))
    print(f"manifest: {os.path.join(manifest['_folder'] if '_folder' in manifest else options(args).out_dir, 'manifest.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
