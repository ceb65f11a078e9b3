"""The shared-memory all-gather gives gloo's results, grows its buffers, and leaves nothing in /dev/shm."""

import datetime
import glob
import os

import pytest
import torch
import torch.distributed as tdist
import torch.multiprocessing as tmp

from htr_dist.dist.cpu.shm_gather import ShmAllGather
from htr_dist.dist.env import free_port, ranks_share_memory

pytestmark = pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="needs /dev/shm")


def _worker(rank, world, port, chunk_bytes, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    tdist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=30))
    gather = ShmAllGather(chunk_bytes=chunk_bytes)
    results = []
    # sizes that grow past the first buffer (1 MB) and shrink again, in several dtypes, many calls in a row so both
    # alternating buffers are reused while a peer may still be reading the other one
    cases = [(10, torch.float32), (300_000, torch.float32), (1_000_003, torch.bfloat16), (7, torch.int64),
             (0, torch.float32), (2_000_000, torch.float32)] * 3
    for i, (n, dtype) in enumerate(cases):
        x = (torch.arange(n) % 251 + 1000 * rank + i).to(dtype)
        ours, ref = torch.empty(n * world, dtype=dtype), torch.empty(n * world, dtype=dtype)
        assert gather(ours, x).wait()
        tdist.all_gather_into_tensor(ref, x)
        results.append(torch.equal(ours, ref))
    files = glob.glob(f"/dev/shm/htr-dist-{gather.tag}-*")
    if rank == 0:
        torch.save({"equal": results, "files": files, "capacity": gather.capacity, "generation": gather.generation},
                   out)
    tdist.destroy_process_group()


@pytest.mark.parametrize("world, chunk_bytes", [(2, 16 << 20), (3, 16 << 20), (2, 3_000_001)])
def test_matches_gloo_and_leaves_no_files(tmp_path, world, chunk_bytes):
    """Whole parts, and parts in rounds of an odd size (the largest part, 8 MB, takes three)."""
    out = str(tmp_path / "out.pt")
    tmp.spawn(_worker, args=(world, free_port(), chunk_bytes, out), nprocs=world, join=True)
    res = torch.load(out)
    assert res["equal"] == [True] * 18
    assert res["files"] == []  # unlinked once every rank had mapped them
    assert res["generation"] >= 2  # grew past the first buffer
    assert res["capacity"] == min(8_000_000, chunk_bytes)  # the largest round: buffers never grow past a chunk


def test_ranks_share_memory_reads_both_launchers(monkeypatch):
    for name in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert not ranks_share_memory()  # unknown: assume several machines
    monkeypatch.setenv("LOCAL_SIZE", "2")  # the deepspeed launcher
    assert ranks_share_memory()
    monkeypatch.delenv("LOCAL_SIZE")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")  # torchrun, 2 machines of 1 rank
    assert not ranks_share_memory()


def test_the_private_apis_it_wraps_have_not_changed():
    """FSDP2's AllGather interface and DeepSpeed's backend all-gather, as shm_gather calls them: a torch or DeepSpeed
    that renames them or their parameters fails here by name instead of losing the shared-memory path quietly."""
    import inspect

    from htr_dist.dist.cpu import shm_gather

    interface = shm_gather.fsdp_all_gather_interface()
    if shm_gather.torch_version() >= shm_gather.FSDP_CUSTOM_ALL_GATHER:
        assert interface is not None and issubclass(shm_gather.FSDPShmAllGather, interface)
        assert list(inspect.signature(interface.allocate).parameters) == ["self", "size", "dtype", "device"]
        assert list(inspect.signature(interface.__call__).parameters)[:5] == \
            ["self", "output_tensor", "input_tensor", "group", "async_op"]
        from torch.distributed.fsdp import FSDPModule

        assert hasattr(FSDPModule, "set_custom_all_gather")
    pytest.importorskip("deepspeed")
    import deepspeed.comm.comm as ds_comm

    # DeepSpeed decorates its backend's methods (no signature to read): check the call that the wrapper stands in for
    assert hasattr(ds_comm, "cdb")
    assert "cdb.all_gather_into_tensor(output_tensor=output_tensor, input_tensor=tensor, group=group, " \
           "async_op=async_op)" in inspect.getsource(ds_comm)


def test_a_gpu_run_never_imports_the_cpu_settings():
    """The switch returns None for an accelerator, and nothing a run imports pulls the CPU module in by itself."""
    import subprocess
    import sys

    code = ("import sys, torch\n"
            "import htr_dist.cli.train, htr_dist.cli.evaluate, htr_dist.cli.recognize, htr_dist.dist.strategy, "
            "htr_dist.train.loop, htr_dist.inference, htr_dist.evaluate, htr_dist.models.llm\n"
            "from htr_dist.dist.env import cpu_settings\n"
            "assert cpu_settings(torch.device('cuda', 0)) is None\n"
            "print(sorted(m for m in sys.modules if m.startswith('htr_dist.dist.cpu')))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
