"""Plan a job's memory per rank before paying for GPUs: for each strategy and offload setting, the teacher's bytes
held and gathered, activations per step (with and without activation checkpointing), the trainable part's states
and the data loader's buffers; whether it fits, and the largest train.batch_size that does.

Computed from the models' shapes (the teacher on the meta device, one real forward of one line of the recogniser),
so a teacher given by its config alone (configs/llm/llama-3.2-3b) plans as well as a downloaded one.

    .venv/bin/python launch/plan.py --config configs/iam_llama3b_zero3.yaml --gpus 8 --gpu-mem 80
    .venv/bin/python launch/plan.py --config configs/iam_llama3b_zero3.yaml llm.name_or_path=configs/llm/llama-3.2-3b
"""

import argparse
import json
import sys

import torch

from htr_dist.config import ConfigError, load_config
from htr_dist.errors import InputError
from htr_dist.plan import plan, table


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="YAML config of the job")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    p.add_argument("--gpus", type=int, default=8, help="accelerators per node (default: 8)")
    p.add_argument("--nodes", type=int, default=1, help="nodes (default: 1)")
    p.add_argument("--gpu-mem", type=float, default=80.0, help="GiB of memory per accelerator (default: 80)")
    p.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16",
                   help="the teacher's dtype (default: bf16, as on GPUs)")
    p.add_argument("--json", action="store_true", help="print the plan as one JSON object instead of a table")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.gpus < 1 or args.nodes < 1 or args.gpu_mem <= 0:
        print("error: --gpus and --nodes must be >= 1 and --gpu-mem > 0", file=sys.stderr)
        return 2
    try:
        cfg = load_config(args.config, args.overrides)
        result = plan(cfg, args.gpus, args.nodes, args.gpu_mem,
                      torch.bfloat16 if args.dtype == "bf16" else torch.float32)
    except (ConfigError, InputError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=1) if args.json else table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
