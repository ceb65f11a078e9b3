"""Evaluate an exported htr-dist model on a shard split: corpus CER and WER, optional per-line predictions.

Runs in one process or under torchrun with N ranks; every line of the split is counted exactly once.

  htr-eval --checkpoint runs/iam/model.pt --data shards/iam [--split test] [--decode beam+lm]
  htr-eval --checkpoint runs/iam/model.pt --data shards/iam --report reports/iam-test    (then open report.html)
  htr-eval CONFIG resume=MODEL        (the reference code's form: --data is the config's data.path)
"""

import argparse
import logging
import sys

from htr_dist.config import CHOICES, ConfigError, int_at_least, load_config
from htr_dist.decode import DECODE_MODES, describe_modes
from htr_dist.dist import env as dist_env
from htr_dist.errors import InputError
from htr_dist.evaluate import run_evaluation


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("reference_form", nargs="*", metavar="CONFIG resume=MODEL",
                   help="the reference code's form, the same as --checkpoint MODEL --data <the config's data.path>")
    p.add_argument("--checkpoint", help="run folder (uses its model.pt) or an exported file (model.pt, best_model.pt)")
    p.add_argument("--data", help="shard folder with manifest.json, e.g. shards/iam")
    p.add_argument("--split", default=None, help="split to evaluate: train, val, test, or a synthetic set's val_seen/test_seen (default: test; val with --tune)")
    p.add_argument("--decode", choices=DECODE_MODES, default="greedy",
                   help=f"{describe_modes()} (default: greedy)")
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
    p.add_argument("--precision", choices=CHOICES["dist.precision"], default="fp32",
                   help="the forward pass: fp32 (default), or bf16 autocast with bf16 / bf16_native (bf16 where the "
                        "device computes it natively, else fp32): faster on such devices, text nearly always the same")
    p.add_argument("--json", default=None, help="write the scores as JSON to this file")
    p.add_argument("--allow-partial", action="store_true",
                   help="score what can be read of a damaged split (lines_missing says how much is not) instead of "
                        "stopping with an error")
    p.add_argument("--predictions", default=None, help="write per-line id, truth, prediction, edit distance (TSV)")
    p.add_argument("--report", default=None, metavar="DIR",
                   help="write an evaluation report into DIR: report.json and a static report.html (error types, "
                        "confusions, CER per writer, CER histogram, the worst lines with their images)")
    p.add_argument("--show", type=int_at_least(0), default=0, help="print this many predictions next to the ground truth")
    args = p.parse_args(argv)
    if args.reference_form:
        _from_reference_form(p, args)
    for name in ("checkpoint", "data"):
        if getattr(args, name) is None:
            p.error(f"--{name} is required")
    if args.report and args.tune:
        p.error("--report reports an evaluation; --tune only tunes (run --report without --tune afterwards)")
    if args.split is None:
        args.split = "val" if args.tune else "test"
    return args


def _from_reference_form(parser, args) -> None:
    """``CONFIG resume=MODEL``: the model to --checkpoint, the config's data.path to --data (unless given)."""
    new_form = "htr-eval --checkpoint MODEL --data SHARDS"
    config = [a for a in args.reference_form if "=" not in a]
    resume = [a.split("=", 1)[1] for a in args.reference_form if a.startswith("resume=")]
    other = [a for a in args.reference_form if "=" in a and not a.startswith("resume=")]
    if len(config) != 1 or len(resume) != 1 or other:
        parser.error(f"{' '.join(args.reference_form)}: expected CONFIG resume=MODEL; the new form: {new_form}")
    try:
        cfg = load_config(config[0])
    except ConfigError as err:
        parser.error(f"{err}; the new form: {new_form}")
    args.checkpoint = args.checkpoint or resume[0]
    args.data = args.data or cfg.data.path


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


def run() -> None:
    """The ``htr-eval`` console script: :func:`main`, then the process exit that torchrun's ranks need."""
    dist_env.exit_process(main())


if __name__ == "__main__":
    run()
