"""Evaluation of an exported model on a shard split, on one rank or many (each line counted once)."""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections import Counter

from htr_dist.data.shards import load_manifest, split_lines, split_texts
from htr_dist.decode import DecodeError, log_probs_of, lm_paths, pick
from htr_dist.dist import env as dist_env
from htr_dist.errors import InputError
from htr_dist.inference import LineResult, Recognizer, corpus_scores, evaluate_batches
from htr_dist.io_utils import atomic_write_json, atomic_write_text
from htr_dist.report import check_report_dir, write_report
from htr_dist.train.metrics import edit_distance

LM_GRID = {"lm_weight": (0.2, 0.4, 0.7, 1.0), "lm_bonus": (0.0, 1.0, 2.0, 3.0)}
"""The grid ``--tune --decode beam+lm`` searches: each point is one beam search of the tuning split."""
LLM_GRID = {"llm_weight": (0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0),
            "llm_bonus": (-1.0, -0.5, 0.0, 0.5, 1.0, 1.5, 2.0, 3.0)}
"""The grid ``--tune --decode beam+llm`` searches: the n-best lists are scored once, each point only re-ranks them."""

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


def _loader(rec: Recognizer, args, env):
    return rec.split_batches(args.data, args.split, args.batch_size, env.rank, env.world_size, env.pin_memory)


def _grid(grid: dict) -> list:
    (a, values_a), (b, values_b) = grid.items()
    return [{a: x, b: y} for x in values_a for y in values_b]


def tune(rec: Recognizer, args, env) -> dict:
    """Choose the weights of ``args.decode`` (beam+lm or beam+llm) by the lowest CER on ``args.split`` of
    ``args.data``, and store them beside the model (:class:`~htr_dist.decode.DecodeSettings`). Every rank decodes its
    share of the lines; edit distances are summed over ranks, so all choose the same point."""
    mode = args.decode
    settings = rec.settings
    if mode == "beam+lm":
        rec.use_lm_texts(split_texts(args.data, args.lm_split))
    rec.check_mode(mode)
    grid = _grid(LM_GRID if mode == "beam+lm" else LLM_GRID)
    errors = [0] * len(grid)
    greedy_errors, chars, lines = 0, 0, 0
    with _progress(env, f"tuning {mode} on {args.split}") as progress:  # closed (its line ended) before any error
        for batch in _loader(rec, args, env):
            out = rec.forward(batch["images"], mode)
            refs = batch["texts"]
            chars += sum(len(r) for r in refs)
            lines += len(refs)
            greedy_errors += sum(edit_distance(r, h) for r, h in zip(refs, rec.decode_outputs(out, "greedy")))
            if mode == "beam+lm":
                log_probs = log_probs_of(out["ctc_logits"])
                for i, point in enumerate(grid):
                    trial = dataclasses.replace(settings, **point)
                    paths = lm_paths(log_probs, rec.char_lm(), rec.alphabet.chars, trial)
                    errors[i] += sum(edit_distance(r, rec.alphabet.decode(p)) for r, p in zip(refs, paths))
            else:
                for ref, cands in zip(refs, rec.llm_candidates(out, args.beam_width)):
                    texts, ctc, llm = zip(*cands)
                    for i, point in enumerate(grid):
                        errors[i] += edit_distance(ref, texts[pick(texts, ctc, llm, **point)])
            progress.update(len(refs))
    totals = [sum(parts) for parts in zip(*dist_env.all_gather_objects([greedy_errors, chars, lines] + errors))]
    greedy_errors, chars, lines, errors = totals[0], totals[1], totals[2], totals[3:]
    if not lines:
        raise InputError(f"{args.data}: no line of split {args.split!r} could be read to tune on")
    best = min(range(len(grid)), key=errors.__getitem__)  # ties: the first point, i.e. the smaller weight
    for key, value in grid[best].items():
        setattr(settings, key, value)
    record = {"data": args.data, "split": args.split, "lines": lines, "cer_greedy": greedy_errors / max(1, chars),
              "cer": errors[best] / max(1, chars), **grid[best],
              "grid": [{**p, "cer": e / max(1, chars)} for p, e in zip(grid, errors)]}
    settings.tuned[mode] = record
    if env.is_main:
        path = settings.save(rec.path)
        print(f"tuned {mode} on {args.split}: " + ", ".join(f"{k}={v}" for k, v in grid[best].items()) +
              f": CER {100 * record['cer']:.2f}% (greedy {100 * record['cer_greedy']:.2f}%, {lines} lines); "
              f"saved to {path}")
    return record


def _progress(env, what: str):
    from tqdm import tqdm

    return tqdm(desc=what, unit="line", disable=not env.is_main, dynamic_ncols=True)


def run_evaluation(args, env) -> dict:
    """Evaluate ``args.checkpoint`` on ``args.data``/``args.split``; rank 0 prints and writes the results. With
    ``args.tune``, first tune the weights of ``args.decode`` on that split and store them beside the model."""
    rec = Recognizer.load(args.checkpoint, env.device, args.memory_format, getattr(args, "precision", "fp32"))
    rec.use_teacher(getattr(args, "teacher", None))
    cpu = dist_env.cpu_settings(env.device)
    if cpu is not None:
        cpu.tune_allocator("step")  # set-up is over: the batches' activations reuse heap memory from here on
    if getattr(args, "tune", False):
        if args.decode not in ("beam+lm", "beam+llm"):
            raise DecodeError(f"--tune tunes --decode beam+lm or beam+llm, not {args.decode!r}")
        record = tune(rec, args, env)
        if env.is_main and args.json:
            atomic_write_json(args.json, record)
        return record
    rec.check_mode(args.decode)
    report_dir = getattr(args, "report", None)
    if report_dir:
        check_report_dir(report_dir)  # before the long part, on every rank: all stop together
    start = time.time()
    results = []
    with _progress(env, f"{args.split} ({args.decode})") as progress:  # closed (its line ended) before any error
        for batch in _loader(rec, args, env):
            results += evaluate_batches(rec, [batch], args.decode, args.beam_width)
            progress.update(len(batch["keys"]))
    results = gather_results(results)
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
        if report_dir:
            write_report(report_dir, results, scores, rec.path)
            print(f"report written to {os.path.join(report_dir, 'report.html')}")
        missing = f", {scores['lines_missing']} of {expected} MISSING" if scores["lines_missing"] else ""
        print(f"{args.split} CER {100 * scores['cer']:.1f}% WER {100 * scores['wer']:.1f}% ({scores['lines']} lines"
              f"{missing})")
    return scores
