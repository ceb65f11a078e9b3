"""Evaluation of an exported model on a shard split, on one rank or many (each line counted once)."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import Counter

from htr_dist.data.shards import load_manifest, split_lines
from htr_dist.dist import env as dist_env
from htr_dist.errors import InputError
from htr_dist.inference import LineResult, Recognizer, corpus_scores, evaluate_batches
from htr_dist.io_utils import atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)


def gather_results(results: list) -> list:
    """All ranks' line results on every rank, in key order; a key seen twice is an error (it would bias the CER)."""
    merged = [r for part in dist_env.all_gather_objects([dataclasses.astuple(r) for r in results]) for r in part]
    out = sorted((LineResult(*r) for r in merged), key=lambda r: r.key)
    dup = [k for k, n in Counter(r.key for r in out).items() if n > 1]
    if dup:
        raise RuntimeError(f"evaluation saw {len(dup)} line(s) more than once, e.g. {dup[:3]}")
    return out


def predictions_tsv(results: list) -> str:
    lines = ["id\tground_truth\tprediction\tedit_distance"]
    lines += [f"{r.key}\t{r.reference}\t{r.prediction}\t{r.distance}" for r in results]
    return "\n".join(lines) + "\n"


def run_evaluation(args, env) -> dict:
    """Evaluate ``args.checkpoint`` on ``args.data``/``args.split``; rank 0 prints and writes the results."""
    from htr_dist.data.pipeline import build_eval_loader

    rec = Recognizer.load(args.checkpoint, env.device, args.memory_format)
    if env.device.type == "cpu":
        dist_env.tune_cpu_allocator("step")  # set-up is over: the batches' activations reuse heap memory from here on
    cfg = rec.config
    cfg.data.path = args.data
    cfg.data.img_height, cfg.data.img_width = rec.img_height, rec.img_width
    cfg.train.batch_size = args.batch_size
    start = time.time()
    loader = build_eval_loader(cfg, args.split, rec.alphabet, env.rank, env.world_size, env.pin_memory)
    results = gather_results(evaluate_batches(rec, loader, args.decode, args.beam_width))
    if not results:  # every rank holds all results: all stop together
        raise InputError(f"{args.data}: no line of split {args.split!r} could be read (see the warnings above)")
    scores = corpus_scores(results)
    expected = split_lines(load_manifest(args.data), args.split)
    scores.update(split=args.split, data=args.data, decode=args.decode, seconds=round(time.time() - start, 2),
                  lines_expected=expected, lines_missing=expected - scores["lines"])
    if scores["lines_missing"] and not getattr(args, "allow_partial", False):  # the same on every rank
        raise InputError(f"{args.data}: only {scores['lines']} of the {expected} lines of split {args.split!r} could be "
                         f"read (see the warnings above): a CER over part of a split is not its CER; repair the "
                         f"shards (prepare_iam.py --verify) or pass --allow-partial")
    if env.is_main:
        for r in results[: args.show]:
            print(f"{r.key}\n  truth: {r.reference}\n  pred:  {r.prediction}")
        if args.predictions:
            atomic_write_text(args.predictions, predictions_tsv(results))
            log.info("per-line predictions written to %s", args.predictions)
        if args.json:
            atomic_write_json(args.json, scores)
        missing = f", {scores['lines_missing']} of {expected} MISSING" if scores["lines_missing"] else ""
        print(f"{args.split} CER {100 * scores['cer']:.1f}% WER {100 * scores['wer']:.1f}% ({scores['lines']} lines"
              f"{missing})")
    return scores
