"""Generate a synthetic IAM-format data set from handwriting-style fonts and English prose, deterministic for a seed:

  OUT/forms/<id>.png                       grayscale forms (1800 px wide): printed header, then handwritten lines
  OUT/xml/<id>.xml                         IAM XML (ISO-8859-1): lines, words and their ink boxes
  OUT/ascii/lines.txt                      IAM's line list (id ok graylevel components x y w h tok|tok|...)
  OUT/splits/{train,validation,test,validation_seen,test_seen}.uttlist
                                           form ids: see "Writers" below; no text line is repeated across the set
  OUT/lines/s01/s01-000/s01-000-00.png     with --line-images: IAM's line images (at their lines.txt boxes),
                                           for prepare_iam.py --source lines

Writers: a writer is a font (the hand) with its own habits (size, slant, letter width, word spacing, pen width, ink
darkness, pen pressure, baseline drift, sharpness); IAM's writer-id attribute names it. By default the fonts are those
of the font list (htr_dist/data/fonts.tsv, installed by launch/fetch_fonts.py), and the set is writer-independent as
IAM's: the train forms (about 70%) are written in the list's train fonts, validation (6%) and test (12%) in its val and
test fonts, never trained on; validation_seen (4%) and test_seen (8%) hold new text in the train fonts. With --fonts,
every form's writer is drawn from the given fonts and the forms are split 70/10/20 at random.

Form ids are s01-000, s01-001, ... Handwritten lines are 100-125 px from ascender to descender, so line crops are
about 100-140 px tall. Feed OUT to launch/prepare_iam.py exactly like the real IAM. The same seed and fonts give the
same bytes.
"""

import argparse
import json
import sys

from htr_dist.config import int_at_least
from htr_dist.data.synth import FontsNotFound, synthesize


def _range(text: str):
    try:
        lo, hi = (int(v) for v in text.split("-"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a range like 6-10, got {text!r}") from None
    if not 1 <= lo <= hi:
        raise argparse.ArgumentTypeError(f"expected 1 <= a <= b, got {text!r}")
    return lo, hi


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", metavar="OUT", help="output folder (written to a temporary folder, then renamed; an "
                                              "existing OUT is replaced)")
    p.add_argument("--forms", type=int_at_least(3), default=100, help="number of forms (default: 100; the prose lasts for "
                                                          "about 850 forms of 6-10 lines)")
    p.add_argument("--seed", type=int, default=0, help="random seed of text, writers and rendering (default: 0)")
    p.add_argument("--fonts", nargs="+", default=None, metavar="PATH_OR_NAME",
                   help="font files or installed font file names, e.g. dkg.ttf Breip.ttf, every form's writer drawn "
                        "from all of them (default: the font list's fonts, writer-independent splits)")
    p.add_argument("--font-list", default="", metavar="TSV",
                   help="font list with each font's split (default: htr_dist/data/fonts.tsv)")
    p.add_argument("--lines-per-form", type=_range, default=(6, 10), metavar="A-B",
                   help="handwritten lines per form, drawn uniformly from A..B (default: 6-10)")
    p.add_argument("--workers", type=int_at_least(0), default=0, help="processes (default 0 = all cores; 1 = no subprocess)")
    p.add_argument("--line-images", action="store_true",
                   help="also write IAM's lines/ folder of line images, for prepare_iam.py --source lines")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        summary = synthesize(args.out, args.forms, args.seed, args.fonts, args.lines_per_form, args.workers,
                             progress=not args.no_progress, line_images=args.line_images, font_list=args.font_list)
    except (FontsNotFound, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
