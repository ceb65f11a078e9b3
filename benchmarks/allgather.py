#!/usr/bin/env python
"""All-gather speed at N CPU ranks on this machine: gloo over loopback vs shared memory. Prints one JSON object.

For each size (bytes each rank contributes, bf16), every rank times ``--repeats`` calls of
``torch.distributed.all_gather_into_tensor`` (gloo) and of ``htr_dist.dist.cpu.shm_gather.ShmAllGather``, in alternation,
and checks that both give the same result. Reported per size: median, min and max milliseconds of rank 0, the
effective GB/s (bytes gathered into each rank's output per second) and the ratio gloo / shm.
The default sizes are those of a SmolLM2-135M decoder layer in bf16 split over 2 ranks (3.5 MB) and its neighbours.
"""

import argparse
import statistics
import sys
import time

import torch

from _ranks import finish_rank, set_rank_env, spawn_ranks
from _report import reserve_stdout


def worker(rank, world, port, sizes_mb, repeats, out):
    set_rank_env(rank, world, port)
    import torch.distributed as tdist

    from htr_dist.dist.cpu.shm_gather import ShmAllGather

    torch.set_num_threads(1)
    tdist.init_process_group("gloo")
    shm = ShmAllGather()
    report = {}
    for mb in sizes_mb:
        n = int(mb * 1e6) // 2
        x = torch.randn(n).to(torch.bfloat16) + rank
        out_gloo = torch.empty(n * world, dtype=torch.bfloat16)
        out_shm = torch.empty(n * world, dtype=torch.bfloat16)
        times = {"gloo": [], "shm": []}
        for i in range(repeats + 1):  # the first round warms up (and grows the shared buffers)
            tdist.barrier()
            t = time.perf_counter()
            tdist.all_gather_into_tensor(out_gloo, x)
            t_gloo = time.perf_counter() - t
            tdist.barrier()
            t = time.perf_counter()
            shm(out_shm, x).wait()
            t_shm = time.perf_counter() - t
            if i:
                times["gloo"].append(t_gloo)
                times["shm"].append(t_shm)
        if not torch.equal(out_gloo, out_shm):
            raise AssertionError(f"rank {rank}: shared-memory all-gather differs from gloo at {mb} MB")
        entry = {}
        for name, ts in times.items():
            med = statistics.median(ts)
            entry[name] = {"median_ms": round(med * 1e3, 2), "min_ms": round(min(ts) * 1e3, 2),
                           "max_ms": round(max(ts) * 1e3, 2),
                           "gb_per_s": round(n * 2 * world / med / 1e9, 2)}
        entry["ratio"] = round(entry["gloo"]["median_ms"] / entry["shm"]["median_ms"], 2)
        report[str(mb)] = entry
    finish_rank(rank, report, out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nproc", type=int, default=2, help="ranks (default: 2)")
    p.add_argument("--sizes-mb", type=float, nargs="+", default=[0.5, 3.5, 14.0],
                   help="MB each rank contributes (default: 0.5 3.5 14)")
    p.add_argument("--repeats", type=int, default=20, help="timed calls per size and method (default: 20)")
    args = p.parse_args(argv)
    emit = reserve_stdout()
    report = spawn_ranks(worker, args.nproc, args.sizes_mb, args.repeats)
    emit({"nproc": args.nproc, "repeats": args.repeats, "sizes_mb": report})
    return 0


if __name__ == "__main__":
    sys.exit(main())
