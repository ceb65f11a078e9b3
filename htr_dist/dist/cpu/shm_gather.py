"""All-gather through shared memory for CPU ranks on one machine.

Gloo moves an all-gather through TCP over loopback, about 0.9 GB/s here, while a memory copy runs at about 5 GB/s.
ZeRO-3 gathers the frozen LLM's layers at every forward, so on a CPU machine those gathers are most of what sharding
costs. ``ShmAllGather`` does the same collective through files in ``/dev/shm``: every rank copies its part into its own
mapped file, one gloo barrier (a few bytes) says that all parts are there, and every rank copies all parts out.

A part larger than :data:`CHUNK_BYTES` moves in rounds of at most that many bytes. Two buffers alternate, so one
barrier per round is enough: a rank writes buffer ``k % 2`` for round ``k`` only after the barrier of round ``k - 1``,
which every peer reached after it had finished reading round ``k - 2`` from that same buffer.

The files are unlinked as soon as every rank has mapped them, so nothing is left in ``/dev/shm`` even if a rank dies.
The buffers grow to the largest round seen (every rank sees the same sizes: the inputs of an all-gather are equal), so
they stay at most ``2 x CHUNK_BYTES`` per rank's file whatever the model. Each rank maps every rank's file, so that
much times the number of ranks counts in each rank's resident set: without the rounds a Llama-3.2-3B teacher's 394 MB
embedding part alone made it 1.6 GB at 2 ranks.

Two users: DeepSpeed (:func:`install_for_deepspeed` wraps its backend's ``all_gather_into_tensor``) and FSDP2
(:func:`install_for_fsdp` gives the sharded modules a custom all-gather through ``FSDPModule.set_custom_all_gather``).
Both issue their gathers in the same order on every rank, and a gather returns only when its output is complete.
"""

from __future__ import annotations

import contextlib
import logging
import os
import uuid
from typing import Dict, List, Optional

import torch
import torch.distributed as tdist

log = logging.getLogger(__name__)

FSDP_CUSTOM_ALL_GATHER = (2, 9)
"""The first torch whose FSDP2 takes a custom all-gather (``FSDPModule.set_custom_all_gather``)."""


def torch_version() -> tuple:
    return tuple(int(part) for part in torch.__version__.split("+")[0].split(".")[:2])


def fsdp_all_gather_interface():
    """FSDP2's private ``AllGather`` interface (``allocate`` and ``__call__``), the one private torch API used here, or
    None on a torch older than :data:`FSDP_CUSTOM_ALL_GATHER` (FSDP then gathers through the process group). On a
    newer torch a missing interface raises: tests/test_shm_gather.py checks its methods, so a torch that changes it
    fails there, loudly, rather than silently losing the fast path."""
    if torch_version() < FSDP_CUSTOM_ALL_GATHER:
        return None
    from torch.distributed.fsdp._fully_shard._fsdp_api import AllGather

    return AllGather


def deepspeed_backend():
    """DeepSpeed's communication backend object (``deepspeed.comm.comm.cdb``), whose ``all_gather_into_tensor``
    :func:`install_for_deepspeed` wraps; None before DeepSpeed set up its process group. The test of this module
    checks the method's parameters, so a DeepSpeed that renames them fails there."""
    from deepspeed import comm as ds_comm

    return ds_comm.comm.cdb

SHM_DIR = "/dev/shm"
CHUNK_BYTES = 16 << 20
"""The largest round of a gather, per rank: large enough that a round's barrier (tens of microseconds) is noise
beside its copies, small enough that the buffers cost little memory."""


class _Done:
    """The handle of a collective that has already completed (what an ``async_op=True`` caller waits on)."""

    def wait(self, *args, **kwargs) -> bool:
        return True

    def is_completed(self) -> bool:
        return True


class ShmAllGather:
    """``all_gather_into_tensor`` for the ranks of ``group`` (all on this machine) through shared memory."""

    def __init__(self, group=None, shm_dir: str = SHM_DIR, chunk_bytes: int = CHUNK_BYTES):
        self.group = group
        self.chunk_bytes = chunk_bytes
        self.rank = tdist.get_rank(group)
        self.world = tdist.get_world_size(group)
        self.shm_dir = shm_dir
        tag = [uuid.uuid4().hex if self.rank == 0 else None]
        tdist.broadcast_object_list(tag, src=tdist.get_global_rank(group, 0) if group is not None else 0, group=group)
        self.tag = tag[0]
        self.capacity = 0  # bytes per part and buffer
        self.generation = 0
        self.parts: List[torch.Tensor] = []  # per rank: its file, 2 x capacity bytes (index 0 and 1 = buffers)
        self.calls = 0  # rounds so far: round k uses buffer k % 2

    def _grow(self, nbytes: int) -> None:
        """Map new files of at least ``nbytes`` per part; a collective step, run by every rank at the same call."""
        capacity = min(max(nbytes, 2 * self.capacity, 1 << 20), max(nbytes, self.chunk_bytes))
        self.generation += 1
        paths = [os.path.join(self.shm_dir, f"htr-dist-{self.tag}-g{self.generation}-r{r}") for r in range(self.world)]
        mine = paths[self.rank]
        try:
            with open(mine, "wb") as f:
                f.truncate(2 * capacity)
            tdist.barrier(group=self.group)  # every file exists at its full size
            try:
                parts = [torch.from_file(p, shared=True, size=2 * capacity, dtype=torch.uint8) for p in paths]
            finally:
                tdist.barrier(group=self.group)  # every rank has mapped every file (or failed): the names can go
        finally:  # also when a barrier fails (a peer died): a file in /dev/shm outlives the process
            with contextlib.suppress(FileNotFoundError):
                os.unlink(mine)
        self.parts, self.capacity = parts, capacity
        log.debug("shared-memory all-gather: %d ranks, %.1f MB per part", self.world, capacity / 1e6)

    def __call__(self, output: torch.Tensor, input: torch.Tensor) -> _Done:
        nbytes = input.numel() * input.element_size()
        if nbytes == 0:  # every rank has an empty part (the sizes of an all-gather are equal): nothing to move
            return _Done()
        step = min(nbytes, self.chunk_bytes)
        if step > self.capacity:
            self._grow(step)
        source = input.reshape(-1).view(torch.uint8)
        out = output.view(-1).view(torch.uint8)
        for lo in range(0, nbytes, step):
            hi = min(lo + step, nbytes)
            offset = (self.calls % 2) * self.capacity
            self.calls += 1
            self.parts[self.rank][offset:offset + hi - lo].copy_(source[lo:hi])
            tdist.barrier(group=self.group)
            for r, part in enumerate(self.parts):
                out[r * nbytes + lo:r * nbytes + hi].copy_(part[offset:offset + hi - lo])
        return _Done()

    def handles(self, output: torch.Tensor, input: torch.Tensor, group) -> bool:
        """Whether this call is one it can serve: CPU, contiguous, same dtype, the sizes of an all-gather."""
        return (group is self.group and input.device.type == "cpu" and output.device.type == "cpu"
                and input.dtype == output.dtype and input.is_contiguous() and output.is_contiguous()
                and output.numel() == input.numel() * self.world)


def install_for_deepspeed() -> None:
    """Route DeepSpeed's CPU all-gathers (what ZeRO-3 fetches parameters with) through shared memory.

    Wraps ``all_gather_into_tensor`` of DeepSpeed's communication backend; any call it cannot serve (another device,
    a non-contiguous tensor) falls through to the original. One ShmAllGather per process group, made at its first use.
    """
    backend = deepspeed_backend()
    if backend is None or getattr(backend, "_htr_shm", None) is not None:
        return
    original = backend.all_gather_into_tensor
    gathers: Dict[Optional[object], ShmAllGather] = {}

    def all_gather_into_tensor(output_tensor, input_tensor, group=None, async_op=False):
        key = group if group is not None else tdist.group.WORLD
        if input_tensor.device.type != "cpu":
            return original(output_tensor=output_tensor, input_tensor=input_tensor, group=group, async_op=async_op)
        if key not in gathers:
            gathers[key] = ShmAllGather(key)
        gather = gathers[key]
        if not gather.handles(output_tensor, input_tensor, key):
            return original(output_tensor=output_tensor, input_tensor=input_tensor, group=group, async_op=async_op)
        return gather(output_tensor, input_tensor)

    backend.all_gather_into_tensor = all_gather_into_tensor
    backend._htr_shm = gathers
    log.info("DeepSpeed all-gathers of CPU tensors go through shared memory (%s)", SHM_DIR)


class FSDPShmAllGather(fsdp_all_gather_interface() or object):
    """FSDP2's all-gather (``allocate`` the output, then gather into it) through a :class:`ShmAllGather`.

    The gather is complete when the call returns, so there is no work handle to wait on (FSDP accepts ``None``).
    A call it cannot serve goes to the process group, as FSDP's default would.
    """

    def __init__(self, group):
        self.group = group
        self.gather = ShmAllGather(group)

    def allocate(self, size, *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        return torch.empty(*size, dtype=dtype, device=device)

    def __call__(self, output_tensor: torch.Tensor, input_tensor: torch.Tensor, group, async_op: bool = False):
        if not self.gather.handles(output_tensor, input_tensor, group):
            return tdist.all_gather_into_tensor(output_tensor, input_tensor, group=group, async_op=async_op)
        self.gather(output_tensor, input_tensor)
        return None


def install_for_fsdp(modules, group) -> Optional[FSDPShmAllGather]:
    """Make the FSDP2 modules (``fully_shard`` results on one mesh) gather through shared memory; returns the
    gatherer they share, or None (with a log line) where the installed torch has no custom all-gather hook."""
    modules = list(modules)
    if fsdp_all_gather_interface() is None or not all(hasattr(m, "set_custom_all_gather") for m in modules):
        log.info("this torch has no FSDPModule.set_custom_all_gather: FSDP gathers through %s",
                 tdist.get_backend(group))
        return None
    comm = FSDPShmAllGather(group)
    for module in modules:
        module.set_custom_all_gather(comm)
    log.info("FSDP all-gathers of CPU tensors go through shared memory (%s)", SHM_DIR)
    return comm
