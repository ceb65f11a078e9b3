#!/usr/bin/env python
"""Lines per second of the training input pipeline (decode + preprocess + augment + batch), against a plain per-file
PNG dataset with the same transforms, for 0, 1 and 2 loader workers, augmentation on and off. Prints one JSON object.

Variants are measured round-robin in one run (each repeat times every variant once), so machine noise hits them alike.
"""

import argparse
import itertools
import os
import sys
import tarfile
import tempfile
import time

import numpy as np
import torch
from PIL import Image

from htr_dist.config import load_config
from htr_dist.data.alphabet import Alphabet
from htr_dist.data.pipeline import build_train_loader, shard_urls
from htr_dist.data.shards import load_manifest
from htr_dist.data.transforms import augment_preprocess, preprocess

from _report import reserve_stdout, spread  # benchmarks/, first on sys.path when run as a script


class PngFolder(torch.utils.data.Dataset):
    """The baseline: one PNG file per line on disk, read and transformed per item."""

    def __init__(self, files, texts, height, width, augment):
        self.files, self.texts, self.height, self.width, self.augment = files, texts, height, width, augment

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        with Image.open(self.files[i]) as im:
            img = np.asarray(im.convert("L"), dtype=np.uint8)
        if self.augment:
            x = augment_preprocess(img, self.height, self.width, np.random.default_rng(i))
        else:
            x = preprocess(img, self.height, self.width)
        return torch.from_numpy(x).unsqueeze(0), self.texts[i]


def extract(manifest, folder):
    files, texts = [], []
    for url in shard_urls(manifest, "train"):
        with tarfile.open(url) as tar:
            members = {m.name: m for m in tar.getmembers()}
            for name, m in members.items():
                if name.endswith(".png"):
                    key = name[:-4]
                    path = os.path.join(folder, key + ".png")
                    with open(path, "wb") as f:
                        f.write(tar.extractfile(m).read())
                    files.append(path)
                    texts.append(tar.extractfile(members[key + ".txt"]).read().decode())
    return files, texts


def time_batches(iterable, batches, batch_size):
    it = iter(iterable)
    next(it)  # start-up (worker processes, first shard) is not throughput
    start = time.perf_counter()
    for _ in itertools.islice(it, batches):
        pass
    return batches * batch_size / (time.perf_counter() - start)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="shard folder with manifest.json (launch/prepare_iam.py)")
    p.add_argument("--batch", type=int, default=16, help="lines per batch (default: 16)")
    p.add_argument("--batches", type=int, default=12, help="timed batches per measurement (default: 12)")
    p.add_argument("--repeats", type=int, default=3, help="round-robin repeats (default: 3)")
    p.add_argument("--height", type=int, default=128, help="input height (default: 128)")
    p.add_argument("--width", type=int, default=1024, help="input width (default: 1024)")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="worker counts (default: 0 1 2)")
    args = p.parse_args(argv)
    emit = reserve_stdout()
    torch.set_num_threads(1)
    manifest = load_manifest(args.data)
    alphabet = Alphabet(manifest["alphabet"])
    tmp = tempfile.mkdtemp(prefix="loader-bench-")
    files, texts = extract(manifest, tmp)
    results = {}
    for _ in range(args.repeats):
        for augment, workers in itertools.product((True, False), args.workers):
            cfg = load_config(None, [f"data.path={args.data}", f"data.img_height={args.height}",
                                     f"data.img_width={args.width}", f"data.num_workers={workers}",
                                     f"data.augment={str(augment).lower()}", f"train.batch_size={args.batch}"])
            stream = build_train_loader(cfg, alphabet, 0, 1)
            results.setdefault(f"wds_aug{int(augment)}_w{workers}", []).append(
                time_batches(stream, args.batches, args.batch))
            ds = PngFolder(files, texts, args.height, args.width, augment)
            dl = torch.utils.data.DataLoader(ds, batch_size=args.batch, shuffle=True, num_workers=workers,
                                             drop_last=True)
            results.setdefault(f"png_aug{int(augment)}_w{workers}", []).append(
                time_batches(itertools.cycle(dl) if len(dl) <= args.batches else dl, args.batches, args.batch))
    detail = {k: spread(v) for k, v in results.items()}
    best = max(args.workers, key=lambda w: detail[f"wds_aug1_w{w}"]["median"])
    best_base = max(args.workers, key=lambda w: detail[f"png_aug1_w{w}"]["median"])
    out = {
        "lines_per_s": detail[f"wds_aug1_w{best}"]["median"],
        "best_workers": best,
        "baseline_lines_per_s": detail[f"png_aug1_w{best_base}"]["median"],
        "ratio": detail[f"wds_aug1_w{best}"]["median"] / detail[f"png_aug1_w{best_base}"]["median"],
        "one_worker_lines_per_s": detail["wds_aug1_w1"]["median"] if 1 in args.workers else None,
        "lines": len(files),
        "settings": vars(args),
        "detail": detail,
    }
    emit(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
