#!/usr/bin/env python
"""Evaluate an exported htr-dist model on a shard split: corpus CER and WER, optional per-line predictions.

Runs in one process or under torchrun with N ranks; every line of the split is counted exactly once.
"""

import argparse
import logging
import sys

from htr_dist.config import CHOICES, int_at_least
from htr_dist.decode import DECODE_MODES
from htr_dist.dist import env as dist_env
from htr_dist.errors import InputError
from htr_dist.evaluate import run_evaluation


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True,
                   help="run folder (uses its model.pt) or an exported file (model.pt, best_model.pt)")
    p.add_argument("--data", required=True, help="shard folder with manifest.json, e.g. shards/iam")
    p.add_argument("--split", default=None, help="split to evaluate: train, val, test, or a synthetic set's val_seen/test_seen (default: test; val with --tune)")
    p.add_argument("--decode", choices=DECODE_MODES, default="greedy",
                   help="greedy; beam (CTC prefix beam search); beam+lm (with a character n-gram LM of the training "
                        "text); beam+llm (n-best rescored by the trained connector and the teacher LLM) "
                        "(default: greedy)")
    p.add_argument("--teacher", default=None, metavar="NAME_OR_PATH",
                   help="the LLM for --decode beam+llm (default: the one the export names, as its run loaded it)")
    p.add_argument("--beam-width", type=int_at_least(1), default=None,
                   help="beam width (default: the model's decoding settings, 10)")
    p.add_argument("--tune", action="store_true",
                   help="tune the weights of --decode beam+lm or beam+llm on --split (default then: val) and save "
                        "them beside the model as <model>.decode.json, which later runs read")
    p.add_argument("--lm-split", default="train",
                   help="split of --data whose transcriptions the LM of --tune --decode beam+lm learns (default: train)")
    p.add_argument("--batch-size", type=int_at_least(1), default=32, help="lines per batch (default: 32)")
    p.add_argument("--memory-format", choices=CHOICES["dist.memory_format"], default=None,
                   help="backbone layout (default: the training run's dist.memory_format, resolved for this machine)")
    p.add_argument("--json", default=None, help="write the scores as JSON to this file")
    p.add_argument("--allow-partial", action="store_true",
                   help="score what can be read of a damaged split (lines_missing says how much is not) instead of "
                        "stopping with an error")
    p.add_argument("--predictions", default=None, help="write per-line id, truth, prediction, edit distance (TSV)")
    p.add_argument("--show", type=int_at_least(0), default=0, help="print this many predictions next to the ground truth")
    args = p.parse_args(argv)
    if args.split is None:
        args.split = "val" if args.tune else "test"
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    dist_env.setup_logging()
    env = dist_env.init_distributed()
    try:
        run_evaluation(args, env)
    except Exception as err:  # a clear one-line message for the user; for anything but bad input, a traceback too
        if not isinstance(err, InputError):
            logging.getLogger("evaluate").exception("evaluation failed")
        print(f"error: {err}", file=sys.stderr)
        return 1
    finally:
        dist_env.destroy()
    return 0


if __name__ == "__main__":
    dist_env.exit_process(main())
