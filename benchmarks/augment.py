#!/usr/bin/env python
"""Lines per second of the training augmentation alone (htr_dist.data.transforms.augment_preprocess), per part.

Cases: ``none`` (plain preprocess), each part of AugmentParts alone, ``all`` parts, and with --baseline another
transforms module's augment_preprocess (e.g. the previous version: ``git show HEAD:htr_dist/data/transforms.py >
/tmp/old_transforms.py``). The lines are IAM-like: gray text drawn with PIL in the handwriting fonts the synthetic
data uses (PIL's own font where none is installed), dark ink on light paper, about 120 x 1200 pixels. Every case runs
once per repeat, round-robin, so machine noise hits them alike; each line gets its own seeded Generator, as in the
training pipeline. Time is this process's CPU time: the augmentation runs on one core, so lines per CPU-second is its
throughput per loader worker, little changed by other load on the machine. Prints one JSON object: lines/s (min,
median, max over the repeats) per output size and case, and the cost of ``all`` relative to ``none`` and
``baseline`` (time per line over theirs).
"""

import argparse
import importlib.util
import random
import string
import sys
import time

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from htr_dist.data.transforms import AugmentParts, augment_preprocess, preprocess

from _report import reserve_stdout, spread  # benchmarks/, first on sys.path when run as a script


def _fonts(size: int) -> list:
    try:
        from htr_dist.data.synth import find_fonts

        return [ImageFont.truetype(path, size) for path in find_fonts()]
    except Exception:  # noqa: BLE001 - no handwriting font installed: the timing does not depend on the glyphs
        return [ImageFont.load_default(size=size)]


def make_lines(n: int, seed: int = 0, height: int = 120, width: int = 1200) -> list:
    """``n`` gray uint8 lines of about ``height`` x ``width`` pixels: random words of random letters drawn in a
    font, ink 20-90 on paper 215-250 with faint grain, cropped to the ink with a small margin."""
    rnd = random.Random(seed)
    fonts = _fonts(round(height * 0.76))
    lines = []
    for i in range(n):
        font = fonts[i % len(fonts)]
        words, text = [], ""
        while font.getlength(text) < width * rnd.uniform(0.75, 1.0):
            words.append("".join(rnd.choice(string.ascii_letters) for _ in range(rnd.randint(1, 9))))
            text = " ".join(words)
        cov = Image.new("L", (int(font.getlength(text)) + 40, height * 2), 0)
        ImageDraw.Draw(cov).text((20, height // 2), text, font=font, fill=255)
        left, top, right, bottom = cov.getbbox()
        cov = np.asarray(cov.crop((max(0, left - 8), max(0, top - 8), right + 8, bottom + 8)), dtype=np.float32)
        ink, paper = rnd.randint(20, 90), rnd.randint(215, 250)
        gray = paper - cov / 255.0 * (paper - ink)
        gray += np.random.default_rng([seed, i]).normal(0.0, 3.0, gray.shape)
        lines.append(np.clip(np.rint(gray), 0, 255).astype(np.uint8))
    return lines


def load_baseline(path: str):
    """``augment_preprocess`` of the transforms module at ``path``, called without ``parts``."""
    spec = importlib.util.spec_from_file_location("baseline_transforms", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module.augment_preprocess


def size_arg(text: str) -> tuple:
    try:
        height, width = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HEIGHTxWIDTH, e.g. 128x1024, got {text!r}") from None
    if height < 1 or width < 1:
        raise argparse.ArgumentTypeError(f"expected a positive size, got {text!r}")
    return height, width


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lines", type=int, default=300, help="lines per measurement (default: 300)")
    p.add_argument("--repeats", type=int, default=3, help="round-robin repeats (default: 3)")
    p.add_argument("--sizes", type=size_arg, nargs="+", default=[(64, 512), (128, 1024)],
                   help="output sizes HEIGHTxWIDTH (default: 64x512 128x1024)")
    p.add_argument("--baseline", default="", help="a transforms.py whose augment_preprocess is timed as 'baseline'")
    p.add_argument("--seed", type=int, default=0, help="seed of the lines and of the augmentation (default: 0)")
    args = p.parse_args(argv)
    emit = reserve_stdout()
    lines = make_lines(args.lines, args.seed)
    seed = args.seed

    def augmented(parts):
        return lambda img, h, w, i: augment_preprocess(img, h, w, np.random.default_rng([seed, i]), parts)

    cases = {"none": lambda img, h, w, i: preprocess(img, h, w)}
    cases.update({name: augmented(AugmentParts.only(name)) for name in AugmentParts.names()})
    cases["all"] = augmented(AugmentParts())
    if args.baseline:
        base = load_baseline(args.baseline)
        cases["baseline"] = lambda img, h, w, i: base(img, h, w, np.random.default_rng([seed, i]))
    rates = {}
    for repeat in range(args.repeats):
        for height, width in args.sizes:
            for name, fn in cases.items():
                start = time.process_time()
                for i, img in enumerate(lines):
                    fn(img, height, width, i)
                rates.setdefault(f"{height}x{width}", {}).setdefault(name, []).append(
                    len(lines) / max(time.process_time() - start, 1e-9))
        print(f"round {repeat + 1}/{args.repeats}", file=sys.stderr)
    lines_per_s = {size: {name: spread(v) for name, v in by_case.items()} for size, by_case in rates.items()}
    # cost = 1 / rate: how many times the time per line of the reference the full augmentation takes
    cost = {size: {f"all_vs_{ref}": r[ref]["median"] / r["all"]["median"] for ref in ("none", "baseline") if ref in r}
            for size, r in lines_per_s.items()}
    emit({"lines_per_s": lines_per_s, "cost_ratio": cost, "lines": len(lines),
          "line_px": {"height": float(np.mean([g.shape[0] for g in lines])),
                      "width": float(np.mean([g.shape[1] for g in lines]))},
          "settings": {k: v for k, v in vars(args).items() if k != "sizes"} | {
              "sizes": [f"{h}x{w}" for h, w in args.sizes]}})
    return 0


if __name__ == "__main__":
    sys.exit(main())
