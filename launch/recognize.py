#!/usr/bin/env python
"""Read handwritten text line images with an exported htr-dist model; prints ``path<TAB>text`` per image.

No LLM is loaded. An image that is missing or cannot be decoded is reported by name on stderr; the others are still
read, and the exit status is 1 if any image failed.
"""

import argparse
import sys

from htr_dist.config import CHOICES, int_at_least
from htr_dist.decode import DECODE_MODES
from htr_dist.errors import InputError
from htr_dist.dist.env import tune_cpu_allocator
from htr_dist.inference import InferenceError, Recognizer, read_gray


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True,
                   help="run folder (uses its model.pt) or an exported file (model.pt, best_model.pt)")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="line images (PNG, JPEG, TIFF)")
    p.add_argument("--decode", choices=DECODE_MODES, default="greedy",
                   help="greedy; beam; beam+lm and beam+llm with the weights launch/evaluate.py --tune stored "
                        "beside the model (default: greedy)")
    p.add_argument("--teacher", default=None, metavar="NAME_OR_PATH",
                   help="the LLM for --decode beam+llm (default: the one the export names, as its run loaded it)")
    p.add_argument("--beam-width", type=int_at_least(1), default=None,
                   help="beam width (default: the model's decoding settings, 10)")
    p.add_argument("--memory-format", choices=CHOICES["dist.memory_format"], default=None,
                   help="backbone layout (default: the training run's dist.memory_format, resolved for this machine)")
    p.add_argument("--batch-size", type=int_at_least(1), default=16, help="images per forward pass (default: 16)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        rec = Recognizer.load(args.checkpoint, memory_format=args.memory_format)
        rec.use_teacher(args.teacher)
        rec.check_mode(args.decode)
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    tune_cpu_allocator("step")  # set-up is over: the batches' activations reuse heap memory from here on
    failed = 0
    for start in range(0, len(args.images), args.batch_size):
        paths, arrays = [], []
        for path in args.images[start : start + args.batch_size]:
            try:
                arrays.append(read_gray(path))
                paths.append(path)
            except InferenceError as err:
                print(f"error: {err}", file=sys.stderr)
                failed += 1
        if arrays:
            for path, text in zip(paths, rec.predict(rec.batch_from_arrays(arrays), args.decode, args.beam_width)):
                print(f"{path}\t{text}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
