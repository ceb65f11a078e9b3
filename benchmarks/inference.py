"""Recognition throughput on the CPU: seconds per batch of the exported model's forward pass, per backbone layout,
and of CTC decoding, per decoding mode. Prints one JSON object.

The model is loaded as launch/evaluate.py and launch/recognize.py load it (``htr_dist.inference.Recognizer.load``):
``--checkpoint`` names an exported model (a run folder or its model.pt); without it, a model of ``--cnn-cfg`` with
random weights is exported to a temporary file first, which times the same forward pass. The batch is random pixels
unless ``--data`` names a shard folder, whose first ``--batch`` lines of ``--split`` are used. Beam decoding depends
on the logits: a trained model on real lines (``--checkpoint`` and ``--data``) decodes much faster than random
weights, whose flat outputs are its worst case.

Each layout in ``--memory-format`` gets its own copy of the model; their forward passes run round robin on the same
batch (noise is shared out evenly). ``forward.<layout>`` reports the layout it resolved to, min / median / max
seconds per batch, lines per second at the median, and (after the first) ``paired_ratio``: min / median / max of its
time over the first layout's, per round.

``decode.<mode>`` times decoding the batch from the first layout's outputs (``--decode``, any of greedy, beam,
beam_python, beam+lm, beam+llm): seconds per batch and lines per second, decoding alone. ``beam_python`` is the
pure-Python prefix beam search that ``beam`` replaced (``htr_dist.train.metrics.prefix_beam_search``), kept as the
reference; ``beam_over_python`` is the paired ratio of its time over ``beam``'s, and ``beam_agrees`` the share of
lines where both found the same text.

``--recognize N`` times reading N lines of ``--data`` end to end (preprocessing, forward, greedy decoding) the way
``htr-recognize`` does (``Recognizer.recognize``: batches of ``--batch`` bucketed by width, at ``--precision``) against
a plain fixed-size fp32 forward of the reference configuration (every line resized to ``--height`` x ``--width``,
128 x 1024 by default, batches of ``--batch``, greedy), round robin. ``recognize.over_reference`` (also the top-level ``recognize_over_reference``) is
the paired ratio of the reference's time over ours per round; ``recognize.agrees`` the share of lines whose text at
``--precision`` is the same as the same model's fp32 forward. ``beam+lm`` uses the LM of the model's ``.decode.json``, or one built from the
train split of ``--data``; ``beam+llm`` needs a model trained with a teacher. A mode that cannot run is listed under
``skipped`` with the reason.

    .venv/bin/python benchmarks/inference.py --checkpoint runs/demo --data shards/demo --split test --steps 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch

from htr_dist.config import ArchConfig, Config
from htr_dist.data.shards import split_texts
from htr_dist.decode import DECODE_MODES, DecodeError
from htr_dist.dist import env as dist_env
from htr_dist.inference import Recognizer
from htr_dist.models.htr import HTRModel, count_parameters
from htr_dist.train.export import export_model
from htr_dist.train.metrics import beam_decode

from _macs import forward_macs  # benchmarks/, first on sys.path when run as a script
from _report import reserve_stdout, spread
from step_time import CHARS, REFERENCE_CFG, SEED_CFG, paired_ratio

CNN_CFGS = {"default": ArchConfig().cnn_cfg, "reference": REFERENCE_CFG, "seed": SEED_CFG}


def export_random_model(cnn_cfg, height: int, width: int, folder: str) -> str:
    """An exported model of ``cnn_cfg`` with random weights, as training would write it."""
    cfg = Config()
    cfg.arch.cnn_cfg = cnn_cfg
    cfg.data.img_height, cfg.data.img_width = height, width
    torch.manual_seed(0)
    model = HTRModel(cfg.arch, cfg.connector, len(CHARS) + 1, height, width, None)
    return export_model(model, cfg, CHARS, os.path.join(folder, "model.pt"))


def real_lines(rec: Recognizer, folder: str, split: str, batch: int) -> torch.Tensor:
    """The first ``batch`` line images of ``split`` in a shard folder, preprocessed as evaluation does."""
    return next(iter(rec.split_batches(folder, split, batch)))["images"]


def usable_decoders(rec: Recognizer, decoders: list, args) -> dict:
    """Decoding modes that cannot run with this model, each with the reason; an unknown mode is an error."""
    known = set(DECODE_MODES) | {"beam_python"}
    for d in decoders:
        if d not in known:
            raise SystemExit(f"error: decode: {d!r} is not one of {', '.join(sorted(known))}")
    if "beam+lm" in decoders and not rec.settings.lm_texts and args.data:
        rec.use_lm_texts(split_texts(args.data, "train"))
    skipped = {}
    for d in decoders:
        if d in DECODE_MODES:
            try:
                rec.check_mode(d)
            except DecodeError as err:
                skipped[d] = str(err)
    return skipped


def decode(rec: Recognizer, out: dict, mode: str, beam_width: int) -> list:
    if mode == "beam_python":
        return [rec.alphabet.decode(p) for p in beam_decode(out["ctc_logits"], beam_width)]
    return rec.decode_outputs(out, mode, beam_width)


def read_lines(folder: str, split: str, n: int) -> list:
    """The first ``n`` line images of ``split`` as gray uint8 arrays, as stored (their widths vary)."""
    import glob
    import io

    import numpy as np
    from PIL import Image

    from htr_dist.data.shards import tar_samples

    urls = sorted(glob.glob(os.path.join(folder, f"{split}-*.tar")))
    lines = []
    for sample in tar_samples([{"url": u} for u in urls], handler=lambda e: False):
        lines.append(np.asarray(Image.open(io.BytesIO(sample["png"])).convert("L")))
        if len(lines) == n:
            break
    return lines


def plain_reference(rec: Recognizer, lines: list, batch: int) -> list:
    """The reference: every line on the fixed canvas, fp32, batches of ``batch``, greedy."""
    import numpy as np

    from htr_dist.data.transforms import preprocess
    from htr_dist.train.metrics import greedy_decode

    texts = []
    for start in range(0, len(lines), batch):
        arr = np.stack([preprocess(img, rec.img_height, rec.img_width) for img in lines[start : start + batch]])
        with torch.inference_mode():
            logits = rec.model(torch.from_numpy(arr).unsqueeze(1), None)["ctc_logits"]
        texts += [rec.alphabet.decode(p) for p in greedy_decode(logits)]
    return texts


def recognize_rounds(args, path: str, tmp: str) -> dict:
    """``--recognize``: ours (``Recognizer.recognize`` at ``--precision``) against the plain reference, per round."""
    lines = read_lines(args.data, args.split, args.recognize)
    os.makedirs(os.path.join(tmp, "ref"))
    reference = Recognizer.load(export_random_model(REFERENCE_CFG, args.height, args.width, os.path.join(tmp, "ref")),
                                torch.device("cpu"), "contiguous")
    ours = Recognizer.load(path, torch.device("cpu"), None, args.precision)
    ours_fp32 = Recognizer.load(path, torch.device("cpu"), None, "fp32")
    times = {"reference": [], "ours": []}
    texts = {}
    for i in range(args.warmup + args.steps):
        this_round = {}
        for name, run in (("reference", lambda: plain_reference(reference, lines, args.batch)),
                          ("ours", lambda: [r.text for r in ours.recognize(lines, batch_size=args.batch)])):
            start = time.perf_counter()
            texts[name] = run()
            this_round[name] = time.perf_counter() - start
        if i >= args.warmup:
            for name, seconds in this_round.items():
                times[name].append(seconds)
        print(f"recognize round {i + 1}: " + ", ".join(f"{k} {v:.2f} s" for k, v in this_round.items()),
              file=sys.stderr, flush=True)
    fp32 = [r.text for r in ours_fp32.recognize(lines, batch_size=args.batch)]
    return {
        "lines": len(lines), "precision": args.precision, "dtype": str(ours.dtype),
        "reference_lines_per_s": len(lines) / statistics.median(times["reference"]),
        "lines_per_s": len(lines) / statistics.median(times["ours"]),
        "seconds": {k: spread(v) for k, v in times.items()},
        "over_reference": paired_ratio(times["reference"], times["ours"]),
        "agrees": sum(a == b for a, b in zip(texts["ours"], fp32)) / len(lines),
    }


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default="", help="exported model (run folder or model.pt); default: random weights")
    p.add_argument("--data", default="", help="shard folder to take real line images from (default: random pixels)")
    p.add_argument("--split", default="test", help="split of --data (default: test)")
    p.add_argument("--cnn-cfg", default="default", choices=sorted(CNN_CFGS),
                   help="backbone of the random model (default: default)")
    p.add_argument("--batch", type=int, default=16, help="lines per batch (default: 16)")
    p.add_argument("--height", type=int, default=128, help="line image height of the random model (default: 128)")
    p.add_argument("--width", type=int, default=1024, help="line image width of the random model (default: 1024)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default: 2)")
    p.add_argument("--steps", type=int, default=8, help="timed rounds (default: 8)")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds first (default: 1)")
    p.add_argument("--memory-format", default="auto,contiguous",
                   help="comma-separated backbone layouts to compare: auto, channels_last, contiguous "
                        "(default: auto,contiguous)")
    p.add_argument("--decode", default="greedy,beam,beam_python,beam+lm,beam+llm",
                   help="comma-separated decoding modes to time (default: greedy,beam,beam_python,beam+lm,beam+llm)")
    p.add_argument("--beam-width", type=int, default=10, help="beam width of the beam decoders (default: 10)")
    p.add_argument("--recognize", type=int, default=0, metavar="N",
                   help="also time reading N lines of --data end to end against the plain reference (default: off)")
    p.add_argument("--precision", default="bf16_native",
                   help="the forward pass of --recognize: fp32, bf16 or bf16_native (default: bf16_native)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    emit = reserve_stdout()
    torch.set_num_threads(args.threads)
    formats = args.memory_format.split(",")
    decoders = args.decode.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        path = args.checkpoint or export_random_model(CNN_CFGS[args.cnn_cfg], args.height, args.width, tmp)
        # layouts checked and resolved as evaluation does (an unknown name is an error naming the key)
        recognizers = {f: Recognizer.load(path, torch.device("cpu"), f) for f in formats}
    dist_env.cpu_settings(torch.device("cpu")).tune_allocator("step")  # after the load, as evaluation does
    first = recognizers[formats[0]]
    if args.data:
        images = real_lines(first, args.data, args.split, args.batch)
    else:
        images = torch.rand(args.batch, 1, first.img_height, first.img_width)
    skipped = usable_decoders(first, decoders, args)
    decoders = [d for d in decoders if d not in skipped]
    forward = {f: [] for f in formats}
    decoding = {d: [] for d in decoders}
    texts = {}
    with torch.inference_mode():
        for i in range(args.warmup + args.steps):
            this_round = {}
            for f, rec in recognizers.items():  # round robin: noise is shared out evenly
                start = time.perf_counter()
                out = rec.forward(images, "beam+llm" if f == formats[0] and "beam+llm" in decoders else "greedy")
                this_round[f] = time.perf_counter() - start
                if f == formats[0]:
                    first_out = out
            for d in decoders:
                start = time.perf_counter()
                texts[d] = decode(first, first_out, d, args.beam_width)
                this_round[d] = time.perf_counter() - start
            if i >= args.warmup:
                for name, seconds in this_round.items():
                    (forward if name in forward else decoding)[name].append(seconds)
            print(f"round {i + 1}/{args.warmup + args.steps}" + (" (warm-up)" if i < args.warmup else "") + ": " +
                  ", ".join(f"{name} {seconds:.3f} s" for name, seconds in this_round.items()),
                  file=sys.stderr, flush=True)
    one = images[:1]
    out = {
        "checkpoint": args.checkpoint or f"random weights, cnn_cfg {args.cnn_cfg}",
        "images": f"{args.data} ({args.split})" if args.data else "random pixels",
        "batch": len(images), "threads": args.threads, "image": [first.img_height, first.img_width],
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "params": count_parameters(first.model)["trainable"],
        "macs_per_line": forward_macs(first.model, lambda: first.model(one, None)),
    }
    out["forward"] = {}
    for f in formats:
        out["forward"][f] = {
            "layout": "channels_last" if recognizers[f].model.backbone.channels_last else "contiguous",
            "seconds": spread(forward[f]),
            "lines_per_s": len(images) / statistics.median(forward[f]),
        }
        if f != formats[0]:
            out["forward"][f]["paired_ratio"] = paired_ratio(forward[f], forward[formats[0]])
    out["decode"] = {d: {"seconds": spread(decoding[d]), "lines_per_s": len(images) / statistics.median(decoding[d])}
                     for d in decoders}
    if "beam" in decoders and "beam_python" in decoders:
        out["beam_over_python"] = paired_ratio(decoding["beam_python"], decoding["beam"])
        out["beam_agrees"] = sum(a == b for a, b in zip(texts["beam"], texts["beam_python"])) / len(images)
    out["skipped"] = skipped
    if args.recognize:
        if not args.data:
            raise SystemExit("error: --recognize needs --data (lines of varied width)")
        with tempfile.TemporaryDirectory() as tmp:
            path = args.checkpoint or export_random_model(CNN_CFGS[args.cnn_cfg], args.height, args.width, tmp)
            out["recognize"] = recognize_rounds(args, path, tmp)
        out["recognize_over_reference"] = out["recognize"]["over_reference"]
    emit(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
