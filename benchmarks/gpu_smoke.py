#!/usr/bin/env python
"""The first run on a CUDA machine: every strategy for a few steps with the SmolLM2 teacher, then with the 3B shape
(configs/llm/llama-3.2-3b, random weights, nothing to download), through the launcher each strategy uses, with NCCL,
bf16 autocast and flash-attn where installed. Prints one line per run (strategy, teacher, steps/s, peak GPU memory,
final loss) and then one JSON object with the same figures. Without CUDA it says so and exits 0.

Data: --data SHARDS, or a small synthetic set written to --work first (launch/synth_iam.py + prepare_iam.py, about a
minute on the CPU). On one 80 GB GPU the six runs take a few minutes.

    .venv/bin/python benchmarks/gpu_smoke.py --gpus 1 --steps 20
"""

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNS = {  # strategy -> (launcher, config)
    "ddp": ("torchrun", "configs/iam_llama3b_fsdp.yaml", ["dist.strategy=ddp"]),
    "fsdp": ("torchrun", "configs/iam_llama3b_fsdp.yaml", []),
    "deepspeed": ("deepspeed", "configs/iam_llama3b_zero3.yaml", []),
}
TEACHERS = {"smollm2": "smollm2-135m", "llama3b_shape": os.path.join(ROOT, "configs", "llm", "llama-3.2-3b")}


def synthetic_shards(work: str) -> str:
    forms, shards = os.path.join(work, "forms"), os.path.join(work, "shards")
    if not os.path.isfile(os.path.join(shards, "manifest.json")):
        subprocess.run([sys.executable, "launch/synth_iam.py", forms, "--forms", "40", "--seed", "0"], cwd=ROOT,
                       check=True)
        subprocess.run([sys.executable, "launch/prepare_iam.py", "--iam", forms, "--out", shards], cwd=ROOT,
                       check=True)
    return shards


def last_scalars(tb_dir: str) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(tb_dir)
    acc.Reload()
    return {tag: [e.value for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def run(strategy: str, teacher: str, args, data: str) -> dict:
    from htr_dist.dist.env import launcher_command

    launcher, config, extra = RUNS[strategy]
    run_dir = os.path.join(args.work, f"{strategy}_{teacher}")
    cmd = launcher_command(launcher, args.gpus) + ["launch/train.py", "--config", config, f"data.path={data}",
                                                    f"llm.name_or_path={TEACHERS[teacher]}", f"run.dir={run_dir}",
                                                    f"train.max_steps={args.steps}", "train.eval_every=0",
                                                    "train.save_every=0", "train.log_every=1", "run.progress=false",
                                                    "data.num_workers=2"] + extra
    start = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    seconds = time.time() - start
    if proc.returncode != 0:
        return {"strategy": strategy, "teacher": teacher, "ok": False, "error": proc.stderr.strip()[-400:]}
    scalars = last_scalars(os.path.join(run_dir, "tb"))
    step_s = scalars.get("perf/step_s", [])[1:] or [seconds / args.steps]  # the first step compiles and warms up
    return {"strategy": strategy, "teacher": teacher, "ok": True, "steps_per_s": len(step_s) / sum(step_s),
            "peak_gpu_gb": max(scalars.get("perf/mem_peak", [0])) / 1024 ** 3,
            "final_loss": scalars["train/loss_total"][-1], "wall_s": round(seconds, 1)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpus", type=int, default=1, help="GPUs on this machine to use (default: 1)")
    p.add_argument("--steps", type=int, default=20, help="optimizer steps per run (default: 20)")
    p.add_argument("--data", default="", help="shard folder (default: a small synthetic set in --work)")
    p.add_argument("--work", default=os.path.join(ROOT, "runs", "gpu_smoke"), help="runs and data go here")
    p.add_argument("--strategies", nargs="+", default=list(RUNS), choices=list(RUNS))
    args = p.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("gpu_smoke: no CUDA device here; nothing to run")
        return 0
    os.makedirs(args.work, exist_ok=True)
    data = args.data or synthetic_shards(args.work)
    results = []
    for teacher in TEACHERS:
        for strategy in args.strategies:
            r = run(strategy, teacher, args, data)
            results.append(r)
            if r["ok"]:
                print(f"{strategy:10s} {teacher:14s} {r['steps_per_s']:.2f} steps/s  peak {r['peak_gpu_gb']:.1f} GB  "
                      f"final loss {r['final_loss']:.3f}", flush=True)
            else:
                print(f"{strategy:10s} {teacher:14s} FAILED: {r['error']}", flush=True)
    print(json.dumps({"gpus": args.gpus, "steps": args.steps, "device": torch.cuda.get_device_name(0),
                      "runs": results}))
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
