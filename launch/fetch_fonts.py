#!/usr/bin/env python
"""Install the handwriting-font library (htr_dist/data/fonts.tsv) that synthetic data is rendered with.

Debian fonts are installed with one `apt-get install` as root; any other user gets the packages downloaded and
unpacked into the font cache, with no sudo (`apt-get update` first only when apt does not know a package yet); npm fonts with `npm pack <package>@<exact version>`, keeping only the font file, in
~/.cache/htr_dist/fonts/<family>/<version>/ ($HTR_DIST_FONT_DIR if set). Fonts already in place are left alone, so
it is safe to re-run; `make` runs it once. Nothing else downloads fonts: synthesis and training only look them up.

Prints a JSON summary: {"list", "splits", "fonts", "already_present", "installed", "debian_installed",
"npm_installed", "font_dir", "seconds"}. With --check, installs nothing and prints {"list", "splits", "fonts",
"present", "missing": [families]}, exiting with 1 when a font is missing. Errors are one line on stderr, exit 2.
"""

import argparse
import json
import os
import sys
import time

from htr_dist.data import fonts
from htr_dist.errors import InputError


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--list", default=fonts.FONT_LIST, metavar="PATH",
                   help="the font list, TAB-separated: family split source file license (default: the repository's "
                        "htr_dist/data/fonts.tsv)")
    p.add_argument("--split", nargs="+", choices=fonts.SPLITS, default=None, metavar="SPLIT",
                   help="only the fonts of these splits: train, val, test (default: every font of the list)")
    p.add_argument("--check", action="store_true",
                   help="install nothing: report which fonts are missing and exit with 1 if any is")
    p.add_argument("--no-progress", action="store_true", help="no progress bar over the npm fonts")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    try:
        entries = fonts.select(fonts.load_font_list(args.list), args.split)
        head = {"list": os.path.abspath(args.list), "splits": args.split or list(fonts.SPLITS)}
        if args.check:
            missing = [e.family for e in fonts.missing_fonts(entries)]
            print(json.dumps({**head, "fonts": len(entries), "present": len(entries) - len(missing),
                              "missing": missing}))
            if missing:
                print(f"error: {len(missing)} fonts are missing; install them with: python launch/fetch_fonts.py"
                      + (f" --list {args.list}" if args.list != fonts.FONT_LIST else ""), file=sys.stderr)
            return 1 if missing else 0
        summary = fonts.install_fonts(entries, progress=not args.no_progress)
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps({**head, **summary, "font_dir": fonts.font_cache_dir(),
                      "seconds": round(time.perf_counter() - start, 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
