"""Shared by the benchmarks that run several CPU ranks on this machine (gloo): start them, collect rank 0's report."""

import json
import os
import tempfile

import torch.multiprocessing as mp

from htr_dist.dist import env as dist_env
from htr_dist.dist.env import free_port


def spawn_ranks(worker, nproc: int, *args):
    """Run ``worker(rank, nproc, port, *args, out)`` in ``nproc`` processes; return what rank 0 wrote to ``out``."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "report.json")
        mp.spawn(worker, args=(nproc, free_port(), *args, out), nprocs=nproc, join=True)
        with open(out, encoding="utf-8") as f:
            return json.load(f)


def set_rank_env(rank: int, world: int, port: int) -> None:
    """What a launcher would export for a local rank (every rank on this machine)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))


def finish_rank(rank: int, report, out: str) -> None:
    """Rank 0 writes ``report`` to ``out``; every rank tears its group down and exits (dist_env.exit_process)."""
    if rank == 0:
        with open(out, "w", encoding="utf-8") as f:
            json.dump(report, f)
    dist_env.destroy()
    dist_env.exit_process(0)
