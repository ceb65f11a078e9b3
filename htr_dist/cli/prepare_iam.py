"""Pack IAM text lines (real IAM, or the IAM-format data of launch/synth_iam.py) into WebDataset shards.

  python launch/prepare_iam.py --iam DIR --out shards/NAME [--source forms|lines] [--scale 0.5] [--margin N]
                               [--shard-size N] [--workers N]
  python launch/prepare_iam.py FORMS XML SPLITS OUT          (the seed's positional form)

DIR holds formsA-D/ formsE-H/ formsI-Z/ (or forms/), xml/, splits/, and for --source lines also lines/ and
ascii/lines.txt. In the positional form,
FORMS is the folder that HOLDS formsA-D/ formsE-H/ formsI-Z/ (or forms/), usually the IAM root, or the folder of
form images itself (IAM/forms/ holding the PNGs, as the reference's prepare_iam.py takes it); for --source lines it
is the folder holding lines/, not the folder of form images. XML is the xml/ folder and SPLITS the folder of split
lists: the Aachen split's *.uttlist files of form ids (train, validation, test), or IAM's own line recognition task
lists of line ids (trainset.txt, validationset1.txt, validationset2.txt, testset.txt; both validation sets make
val). Writes OUT/{train,val,test}-%06d.tar and OUT/manifest.json. Lines that cannot be used, lines written without a
writer id and split-list forms without lines are named in the log and counted in the summary and the manifest; a
split left without lines, or a line id met twice, is an error and nothing is written. Re-running replaces the shards
atomically. The same as ``htr-prepare iam|iam-lines`` (htr_dist/cli/prepare.py), which also reads other formats.
"""

import argparse
import os

from htr_dist.cli.prepare import run, verify
from htr_dist.data.iam import DEFAULT_MARGIN


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("positional", nargs="*", metavar="FORMS XML SPLITS OUT",
                   help="the seed's positional form; FORMS is the folder holding formsA-D/ ... or forms/ (e.g. the "
                        "IAM root), or the folder of form images itself; with --source lines the folder holding "
                        "lines/, not the folder of form images")
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


def _default_lines_txt(forms: str) -> str:
    """FORMS/ascii/lines.txt (FORMS is usually the IAM root), or beside FORMS when FORMS is IAM/forms/ itself."""
    own = os.path.join(forms, "ascii", "lines.txt")
    beside = os.path.join(os.path.dirname(os.path.normpath(forms)), "ascii", "lines.txt")
    return own if os.path.isfile(own) or not os.path.isfile(beside) else beside


def options(args):
    from htr_dist.data.prepare import PrepareOptions

    if args.positional:
        forms, xml, splits, out = args.positional
        lines_txt = args.lines_txt or _default_lines_txt(forms)
        return PrepareOptions(forms, xml, splits, out, args.source, lines_txt, args.scale, args.margin,
                              args.shard_size, args.workers, args.name)
    if not os.path.isdir(args.iam):
        raise FileNotFoundError(f"IAM folder not found: {args.iam}")
    lines_txt = args.lines_txt or os.path.join(args.iam, "ascii", "lines.txt")
    return PrepareOptions(args.iam, os.path.join(args.iam, "xml"), args.splits or os.path.join(args.iam, "splits"),
                          args.out, args.source, lines_txt, args.scale, args.margin, args.shard_size, args.workers,
                          args.name)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.verify:
        return verify(args.verify)

    def write():
        from htr_dist.data.prepare import prepare

        return prepare(options(args), progress=not args.no_progress)

    out = args.positional[3] if args.positional else args.out
    return run(write, out)
