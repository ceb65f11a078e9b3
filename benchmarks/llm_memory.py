#!/usr/bin/env python
"""Bytes of frozen-LLM parameters each rank holds, per strategy, at N CPU ranks (gloo). Prints one JSON object.

For ddp, fsdp, deepspeed (ZeRO-3) and deepspeed with parameter offload, each rank builds the real strategy
(htr_dist.dist.strategy.build_strategy) and reports:
- held_bytes: LLM parameter bytes resident on the rank after set-up (a shard counts its local part only);
- peak_bytes: the largest number of LLM parameter bytes materialised at once during one training step, sampled in a
  forward pre-hook of every LLM submodule (gathered ZeRO-3 parameters and unsharded FSDP parameters count in full);
- the ratios of both to the full model's parameter bytes;
- load_peak_private_bytes: how far the rank's private memory (RssAnon, sampled every 2 ms) rose while the strategy
  was built: what loading the LLM cost the rank at its worst; load_peak_rss_bytes: the same for its whole resident set
  (VmHWM, reset before), which also counts the pages of memory-mapped weight files (page cache, shared by the ranks
  of a machine and dropped under pressure); load_s: how long building took. ``fsdp_whole_load`` is fsdp with
  dist.fsdp_sharded_load=false (every rank loads the whole LLM, then shards it).
On a CPU machine the "device" is the CPU itself, so offloading to CPU cannot lower these figures here; on GPU,
llm_param_bytes_on_rank counts offloaded partitions as not held on the device.
"""

import argparse
import os
import sys
import threading
import time

import torch

from _ranks import finish_rank, set_rank_env, spawn_ranks
from _report import reserve_stdout

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STRATEGIES = {
    "ddp": ["dist.strategy=ddp"],
    "fsdp": ["dist.strategy=fsdp"],
    "fsdp_whole_load": ["dist.strategy=fsdp", "dist.fsdp_sharded_load=false"],
    "deepspeed": ["dist.strategy=deepspeed"],
    "deepspeed_offload": ["dist.strategy=deepspeed",
                          f"dist.llm_deepspeed_config={ROOT}/configs/deepspeed/llm_zero3_offload.json"],
}


def materialised_bytes(teacher) -> int:
    total = 0
    for p in teacher.parameters():
        if hasattr(p, "ds_tensor"):  # ZeRO-3: gathered -> p.data is the full tensor; released -> empty
            total += p.data.numel() * p.element_size() + p.ds_tensor.numel() * p.ds_tensor.element_size()
        elif hasattr(p, "to_local"):  # FSDP2 sharded DTensor between uses
            total += p.to_local().numel() * p.element_size()
        else:
            total += p.numel() * p.element_size()
    return total


def status_bytes(field: str) -> int:
    """A ``kB`` field of /proc/self/status (VmRSS, VmHWM) in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


class PeakSampler:
    """Largest value of a /proc/self/status field seen by a thread that reads it every ``period`` seconds."""

    def __init__(self, field: str, period: float = 0.002):
        self.field, self.period, self.peak = field, period, status_bytes(field)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.wait(self.period):
            self.peak = max(self.peak, status_bytes(self.field))

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, status_bytes(self.field))


def worker(rank, world, port, overrides, out):
    os.dup2(2, 1)  # DeepSpeed prints to stdout; keep the benchmark's stdout for its one JSON object
    set_rank_env(rank, world, port)
    from htr_dist.config import load_config
    from htr_dist.dist import env as dist_env
    from htr_dist.dist.strategy import build_strategy, llm_param_bytes_full, llm_param_bytes_on_rank
    from htr_dist.models.htr import HTRModel, LossSpec, compute_losses
    from htr_dist.models.llm import llm_hidden_size

    cfg = load_config(os.path.join(ROOT, "configs", "tiny_cpu.yaml"), overrides)
    env = dist_env.init_distributed(120, use_deepspeed=cfg.dist.strategy == "deepspeed", precision=cfg.dist.precision,
                                    llm_precision=cfg.dist.llm_precision, memory_format=cfg.dist.memory_format)
    model = HTRModel(cfg.arch, cfg.connector, 30, 32, 256, llm_hidden_size(cfg))
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM, the peak resident set, to the current one
    rss_before, private_before, start = status_bytes("VmRSS"), status_bytes("RssAnon"), time.perf_counter()
    with PeakSampler("RssAnon") as private:
        strategy = build_strategy(cfg, env, model, total_steps=10)
    load_s, load_peak = time.perf_counter() - start, status_bytes("VmHWM") - rss_before
    load_private = private.peak - private_before
    teacher = strategy.teacher
    held = llm_param_bytes_on_rank(teacher)
    peak = [materialised_bytes(teacher)]
    hooks = [m.register_forward_pre_hook(lambda *_: peak.append(materialised_bytes(teacher)))
             for m in teacher.lm.modules()]
    texts = ["a line of handwritten text"] * 4
    chars = sorted(set("".join(texts)))
    ids = [[chars.index(c) + 1 for c in t] for t in texts]
    batch = {"images": torch.rand(4, 1, 32, 256), "texts": texts, "targets": torch.tensor(sum(ids, [])),
             "target_lengths": torch.tensor([len(i) for i in ids])}
    losses = compute_losses(strategy.model, teacher, batch, LossSpec.from_config(cfg))
    strategy.backward(losses["total"])
    strategy.step()
    for h in hooks:
        h.remove()
    report = dist_env.all_gather_objects({"held": held, "peak": max(peak), "full": llm_param_bytes_full(teacher),
                                          "load_peak": load_peak, "load_private": load_private, "load_s": load_s})
    finish_rank(rank, report, out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--llm", default="smollm2-135m", help="llm.name_or_path (default: smollm2-135m)")
    p.add_argument("--nproc", type=int, default=2, help="ranks (default: 2)")
    p.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=list(STRATEGIES), metavar="NAME",
                   help="subset of " + " ".join(STRATEGIES))
    p.add_argument("--set", nargs="*", default=[], metavar="key=value",
                   help="config overrides for every strategy, e.g. dist.llm_precision=bf16")
    args = p.parse_args(argv)
    emit = reserve_stdout()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    out = {"llm": args.llm, "nproc": args.nproc, "overrides": args.set}
    full = None
    for name in args.strategies:
        overrides = STRATEGIES[name] + [f"llm.name_or_path={args.llm}", "train.use_llm=true"] + args.set
        ranks = spawn_ranks(worker, args.nproc, overrides)
        full = full or ranks[0]["full"]
        out[name] = {"held_bytes": [r["held"] for r in ranks], "peak_bytes": [r["peak"] for r in ranks],
                     "load_peak_private_bytes": [r["load_private"] for r in ranks],
                     "load_peak_rss_bytes": [r["load_peak"] for r in ranks],
                     "load_s": [round(r["load_s"], 2) for r in ranks]}
    for name in args.strategies:
        if full:
            out[name]["held_ratio"] = max(out[name]["held_bytes"]) / full
            out[name]["peak_ratio"] = max(out[name]["peak_bytes"]) / full
            out[name]["load_peak_private_ratio"] = max(out[name]["load_peak_private_bytes"]) / full
            out[name]["load_peak_rss_ratio"] = max(out[name]["load_peak_rss_bytes"]) / full
    out["full_bytes"] = full
    emit(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
