"""Read handwritten text line images with an exported htr-dist model.

Prints ``path<TAB>text`` per image (TSV), in the order given, or with --json one JSON object per line: the text, its
confidence (the mean of its characters') and each character's confidence (the highest probability the model gave it
in the frames the CTC alignment assigns to it). IMAGE may be a file, a folder (its PNG, JPEG and TIFF files), or a
glob pattern; --list adds the paths of a text file, one per line. Lines are batched by width, so a batch is only as
wide as its widest line needs. An image that is missing or cannot be decoded is reported by name on stderr; the others
are still read, and the exit status is 1 if any image failed.

    .venv/bin/python launch/recognize.py --checkpoint runs/demo/best_model.pt scans/ 'more/*.png' --json
"""

import argparse
import glob
import json
import os
import sys

import torch

from htr_dist.config import CHOICES, int_at_least
from htr_dist.decode import DECODE_MODES, describe_modes
from htr_dist.dist.env import cpu_settings
from htr_dist.errors import InputError
from htr_dist.inference import InferenceError, Recognizer

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True,
                   help="run folder (uses its model.pt) or an exported file (model.pt, best_model.pt)")
    p.add_argument("images", nargs="*", metavar="IMAGE", help="line images, folders of them, or glob patterns")
    p.add_argument("--list", default=None, metavar="FILE", help="a text file of image paths, one per line")
    p.add_argument("--json", action="store_true",
                   help="one JSON object per line: image, text, confidence, chars (each with its confidence)")
    p.add_argument("--device", default=None,
                   help="cpu, cuda, cuda:1, ... (default: cuda when available, else cpu)")
    p.add_argument("--decode", choices=DECODE_MODES, default="greedy",
                   help=f"{describe_modes()}; beam+lm and beam+llm use the weights that "
                        "htr-eval --tune stored beside the model (default: greedy)")
    p.add_argument("--teacher", default=None, metavar="NAME_OR_PATH",
                   help="the LLM for --decode beam+llm (default: the one the export names, as its run loaded it)")
    p.add_argument("--beam-width", type=int_at_least(1), default=None,
                   help="beam width (default: the model's decoding settings, 10)")
    p.add_argument("--memory-format", choices=CHOICES["dist.memory_format"], default=None,
                   help="backbone layout (default: the training run's dist.memory_format, resolved for this machine)")
    p.add_argument("--precision", choices=CHOICES["dist.precision"], default="fp32",
                   help="the forward pass: fp32 (default), or bf16 autocast with bf16 / bf16_native (bf16 where the "
                        "device computes it natively, else fp32): faster on such devices, text nearly always the same")
    p.add_argument("--batch-size", type=int_at_least(1), default=16, help="images per forward pass (default: 16)")
    p.add_argument("--no-bucket", action="store_true",
                   help="put every line on the training canvas instead of batching lines by width")
    args = p.parse_args(argv)
    if not args.images and not args.list:
        p.error("give at least one IMAGE or --list FILE")
    return args


def expand(items, list_file=None):
    """Image paths, in order: files as given, a folder's image files sorted, a glob's matches sorted, then the list
    file's lines. A pattern or folder that names nothing is kept as given, so it is reported as missing."""
    paths = []
    for item in items:
        if os.path.isdir(item):
            found = sorted(os.path.join(item, f) for f in os.listdir(item) if f.lower().endswith(IMAGE_SUFFIXES))
            paths += found or [item]
        elif any(ch in item for ch in "*?[") and not os.path.exists(item):
            paths += sorted(glob.glob(item, recursive=True)) or [item]
        else:
            paths.append(item)
    if list_file:
        try:
            with open(list_file, encoding="utf-8") as f:
                paths += [line.strip() for line in f if line.strip()]
        except (OSError, UnicodeDecodeError) as err:
            raise InputError(f"{list_file}: cannot read the list of images ({err})") from None
    return paths


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        paths = expand(args.images, args.list)
        rec = Recognizer.load(args.checkpoint, device=device, memory_format=args.memory_format,
                              precision=args.precision)
        rec.use_teacher(args.teacher)
        rec.check_mode(args.decode)
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    cpu = cpu_settings(device)
    if cpu is not None:
        cpu.tune_allocator("step")  # set-up is over: the batches' activations reuse heap memory from here on
    failed = 0
    for start in range(0, len(paths), args.batch_size * 8):  # a few batches at a time: output flows, memory bounded
        readable = []
        for path in paths[start : start + args.batch_size * 8]:
            if not os.path.isfile(path):
                print(f"error: {path}: no such image file", file=sys.stderr)
                failed += 1
            else:
                readable.append(path)
        while readable:
            try:
                results = rec.recognize(readable, args.decode, args.batch_size, args.beam_width, not args.no_bucket)
            except InferenceError as err:  # an undecodable image: name it, drop it, read the others
                print(f"error: {err}", file=sys.stderr)
                failed += 1
                rest = [p for p in readable if not str(err).startswith(f"{p}:")]
                if len(rest) == len(readable):  # not one image's fault: nothing more can be read
                    return 1
                readable = rest
                continue
            for r in results:
                print(json.dumps(r.as_dict(), ensure_ascii=False) if args.json else f"{r.source}\t{r.text}",
                      flush=True)
            break
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
