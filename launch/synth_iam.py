#!/usr/bin/env python
"""Generate a synthetic IAM-format data set (forms/, xml/, ascii/lines.txt, splits/*.uttlist) from handwriting-style
fonts and English prose, deterministic for a seed. Feed it to launch/prepare_iam.py like the real IAM.

Fonts come from Debian packages (fonts-dkg-handwriting fonts-breip fonts-femkeklaver fonts-rufscript
fonts-ecolier-court fonts-dancingscript fonts-kaushanscript fonts-comic-neue); each font plays one writer.
"""

import argparse
import json
import sys

from htr_dist.data.synth import FontsNotFound, synthesize


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", metavar="OUT", help="output folder (replaced atomically if it exists)")
    p.add_argument("--forms", type=int, default=100, help="number of forms (default: 100)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--fonts", nargs="+", default=None, metavar="FONT",
                   help="font files or installed font file names (default: every known handwriting font found)")
    p.add_argument("--lines-per-form", default="6-10", help="handwritten lines per form, a range a-b (default: 6-10)")
    p.add_argument("--workers", type=int, default=0, help="parallel processes (default: all cores)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        lo, hi = (int(v) for v in args.lines_per_form.split("-"))
    except ValueError:
        print(f"error: --lines-per-form: expected a range like 6-10, got {args.lines_per_form!r}", file=sys.stderr)
        return 2
    try:
        summary = synthesize(args.out, args.forms, args.seed, args.fonts, (lo, hi), args.workers)
    except (FontsNotFound, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
