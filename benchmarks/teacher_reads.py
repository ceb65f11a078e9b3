#!/usr/bin/env python
"""How much of a line the trained teacher reads from its image. Prints one JSON object.

A model trained with the teacher (``train.use_llm=true``) keeps its connector. For every line of ``--split``, the
frozen LLM scores the true transcription, in the layout the model was trained with, after three prefixes:

- ``own``: the line's own visual tokens (what the training loss sees);
- ``other``: the visual tokens of another line of the same batch (the batch rolled by one);
- ``mean``: the visual tokens averaged over the batch (what every line's image has in common).

Reported in nats per scored token (the training loss's unit), over every scored token of the lines. ``own`` below
``other`` is what the image tells the LM about this particular line, the only part of the teacher's signal that can
teach the recogniser something about the text: the gap between ``other`` and ``mean`` is what the connector passes
that is not about the line (a line's length, its style). ``token_accuracy`` is how often the LM's most likely next
token after the own tokens is the true one.

    python benchmarks/teacher_reads.py --model runs/demo/best_model.pt --data runs/demo/shards
"""

import argparse
import os
import sys

import torch

from _report import reserve_stdout

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

PREFIXES = ("own", "other", "mean")


@torch.inference_mode()
def score_batch(teacher, tokens: torch.Tensor, texts: list, max_tokens: int) -> dict:
    """Summed NLL per prefix kind, the scored tokens, and the own prefix's top-1 hits, for one batch."""
    ids, mask = teacher.tokenize(texts, max_tokens)
    prefixes = {
        "own": tokens,
        "other": tokens.roll(1, dims=0),
        "mean": tokens.mean(0, keepdim=True).expand_as(tokens),
    }
    out = {}
    for name, prefix in prefixes.items():
        logits, scored = teacher.scored_logits(prefix, ids, mask)
        target = ids[scored]
        out[name] = torch.nn.functional.cross_entropy(logits, target, reduction="sum").item()
        if name == "own":
            out["hits"] = (logits.argmax(-1) == target).sum().item()
            out["tokens"] = target.numel()
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="an export or checkpoint of a model trained with the teacher")
    p.add_argument("--data", required=True, help="shard folder")
    p.add_argument("--split", default="test", help="split of --data (default: test)")
    p.add_argument("--lines", type=int, default=256, help="lines scored, at most (default: 256)")
    p.add_argument("--batch-size", type=int, default=16, help="lines a batch; 'other' rolls within it (default: 16)")
    p.add_argument("--llm", default=None, help="the teacher, if not where the export says")
    args = p.parse_args(argv)
    if args.batch_size < 2:
        p.error("--batch-size: at least 2 ('other' takes another line of the batch)")
    emit = reserve_stdout()
    from htr_dist.inference import Recognizer

    rec = Recognizer.load(args.model, torch.device("cpu"))
    rec.check_mode("beam+llm")  # a clear error for a model trained without the teacher
    rec.use_teacher(args.llm)
    teacher = rec.teacher()
    max_tokens = rec.config.llm.max_text_tokens
    totals = dict.fromkeys(PREFIXES + ("hits", "tokens"), 0.0)
    lines = 0
    for batch in rec.split_batches(args.data, args.split, args.batch_size):
        texts = [t.strip() for t in batch["texts"]][: args.lines - lines]
        if len(texts) < 2:
            break
        tokens = rec.forward(batch["images"][: len(texts)], "beam+llm")["visual_tokens"]
        for k, v in score_batch(teacher, tokens, texts, max_tokens).items():
            totals[k] += v
        lines += len(texts)
        print(f"{lines} lines: own {totals['own'] / totals['tokens']:.2f} nats per token, "
              f"other {totals['other'] / totals['tokens']:.2f}", file=sys.stderr, flush=True)
        if lines >= args.lines:
            break
    if not lines:
        raise SystemExit(f"{args.data}: split {args.split!r} has no lines")
    n = totals["tokens"]
    report = {"model": args.model, "teacher": rec.teacher_name, "split": args.split, "lines": lines,
              "tokens": int(n), **{f"nll_{k}": totals[k] / n for k in PREFIXES},
              "image_gain": (totals["other"] - totals["own"]) / n, "token_accuracy": totals["hits"] / n}
    emit(report)
    return report


if __name__ == "__main__":
    main()
