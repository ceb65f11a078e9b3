"""Train an htr-dist model. The same script under every launcher:

  htr-train --config iam_nollm [key=value ...]                     (one process; also python launch/train.py)
  deepspeed [--num_gpus N] [--hostfile H] launch/train.py --config iam_llama3b_zero3 [key=value ...]
  torchrun --nproc_per_node N [--nnodes M ...] launch/train.py --config iam_llama3b_fsdp [key=value ...]

--config takes a YAML file or a shipped config's name; the file may also come first, without --config. Overrides are
dotted keys, e.g. train.lr=1e-3 train.use_llm=false dist.strategy=ddp run.dir=runs/x. --print-config shows the
config that would run (file + overrides, paths resolved) and exits.
"""

import argparse
import logging
import sys

from htr_dist.config import ConfigError, add_config_args, dump_yaml, groups_help, load_config
from htr_dist.dist import env as dist_env
from htr_dist.errors import InputError


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=groups_help())
    add_config_args(parser)
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config as YAML (loadable with --config) and exit, starting nothing")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed
    args = parser.parse_args(argv)
    dist_env.setup_logging()
    try:
        cfg = load_config(args.config, args.overrides)
        if args.print_config:
            print(dump_yaml(cfg), end="")
            return 0
        env = dist_env.init_distributed(cfg.dist.timeout_s, use_deepspeed=cfg.dist.strategy.startswith("deepspeed"),
                                         precision=cfg.dist.precision, llm_precision=cfg.dist.llm_precision,
                                         memory_format=cfg.dist.memory_format, device=cfg.dist.device)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    from htr_dist.train.loop import train  # torch and the models: not needed for --help or --print-config

    try:
        result = train(cfg, env)
        logging.getLogger("train").info("finished: %s", result)
    except InputError as err:  # a bad shard folder, LLM path, ...: the message names it; no traceback
        print(f"error: {err}", file=sys.stderr)
        return 1
    finally:
        dist_env.destroy()
    return 0


def run() -> None:
    """The ``htr-train`` console script: :func:`main`, then the process exit that every launcher needs."""
    dist_env.exit_process(main())


if __name__ == "__main__":
    run()
