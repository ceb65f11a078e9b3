"""Everything that only CPU runs need, in one place, behind one switch.

A run on the CPU (the demo, the tests, a laptop) gets settings that GPUs never need: glibc's allocator tuned for
loading and for steps, a thread count per rank, all-gathers through shared memory instead of gloo's loopback TCP
(:mod:`htr_dist.dist.cpu.shm_gather`), removal of the file DeepSpeed's CPU backend leaves in ``/dev/shm``, and an exit
that does not finalize the interpreter under live gloo threads. :func:`htr_dist.dist.env.cpu_settings` is the switch:
it returns this module for a CPU device and None otherwise, and it is the only importer, so a GPU run never imports or
patches anything here. The figures behind each setting are in docs/benchmarks.md (CPU-only settings).
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys
from typing import Optional

import torch.distributed as tdist

log = logging.getLogger(__name__)


def threads_per_rank(local_world: int) -> Optional[int]:
    """Threads for each of ``local_world`` CPU ranks on this machine: its share of the cores this process may run on
    (SLURM's cpus-per-task, taskset), or None where the user chose with OMP_NUM_THREADS.

    torchrun puts OMP_NUM_THREADS=1 into every rank's environment unless the user set it: that is its default, not a
    choice, and it would leave a 16-core machine with one thread per rank, so under torchrun 1 counts as unset.
    """
    chosen = os.environ.get("OMP_NUM_THREADS")
    if chosen is not None and not (chosen == "1" and "TORCHELASTIC_RUN_ID" in os.environ):
        return None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // max(1, local_world))


_MALLOC_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "GLIBC_TUNABLES")


STEP_HEAP_BYTES = (1 << 31) - 1
"""The ``"step"`` phase's mmap threshold: the heap serves and keeps every activation of a training step."""
GATHERING_STEP_HEAP_BYTES = 16 << 20
"""The ``"step"`` phase's threshold when the step gathers a large sharded teacher: its gathered layers (tens to
hundreds of MB each, allocated and freed many times a step) get their own mappings, returned when freed."""
LARGE_GATHERED_TEACHER_BYTES = 1 << 30
"""A sharded teacher at least this large (whole, in its dtype) is gathered with :data:`GATHERING_STEP_HEAP_BYTES`."""


def tune_allocator(phase: str = "step", gathers_large_teacher: bool = False) -> bool:
    """Set glibc's malloc for what comes next on the CPU: ``"load"`` (weights being read) or ``"step"`` (training).

    By default glibc serves allocations above an adaptive threshold (at most 32 MB) with their own mmap, unmapped when
    freed, and keeps smaller freed blocks in its heap.

    - ``"step"`` raises the mmap and trim thresholds to 2 GB, so the heap keeps every step's large activations and
      reuses them; otherwise each step gets them as fresh pages that the kernel must zero-fill on first touch. Memory
      freed by a step stays with the process (its RSS stays at the peak). With ``gathers_large_teacher`` (a sharded
      teacher of a GiB or more) the thresholds are 16 MB instead: the heap cannot reuse the holes that gathered layers
      of many sizes leave between longer-lived blocks, and a Llama-3.2-3B teacher's steps grew a rank past 11 GB, 1.8x
      the whole teacher, where its live data never exceeded 5 GB (docs/benchmarks.md, the teacher at its real size).
    - ``"load"`` maps every block above 128 KiB on its own and releases what the heap holds free, so the
      temporaries of an LLM's load (each weight whole before ZeRO-3 partitions it, gathered layers, converted copies)
      go back to the system as they are freed instead of fragmenting the heap and staying for the whole run.

    ``build_strategy`` sets ``"load"`` before it builds the strategy and ``"step"`` after
    (``benchmarks/step_time.py`` and ``benchmarks/llm_memory.py`` measure both; docs/benchmarks.md). Setting any of glibc's own
    MALLOC_* variables or GLIBC_TUNABLES leaves the allocator as configured there. Returns whether it was set.
    """
    if phase not in ("load", "step"):
        raise ValueError(f"tune_cpu_allocator: phase must be 'load' or 'step', got {phase!r}")
    if not sys.platform.startswith("linux") or any(name in os.environ for name in _MALLOC_ENV):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt, malloc_trim = libc.mallopt, libc.malloc_trim
    except (OSError, AttributeError):  # not glibc (musl, ...): nothing to tune
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    if phase == "step":
        threshold = GATHERING_STEP_HEAP_BYTES if gathers_large_teacher else STEP_HEAP_BYTES
    else:
        threshold = 128 << 10
    done = mallopt(m_mmap_threshold, threshold) == 1 and mallopt(m_trim_threshold, threshold) == 1
    if phase == "load":
        malloc_trim(0)
    if done:
        log.debug("glibc malloc set for the %s phase", phase)
    return done


def unlink_deepspeed_shm(rank: int) -> None:
    """Remove the name of the shared-memory file DeepSpeed's CPU backend made for this rank.

    When the launcher says that every rank is local, DeepSpeed maps a 69 MB file per rank in /dev/shm (for an
    all-reduce that htr-dist does not use) and never removes it: every run left 2 x 69 MB of RAM behind (9.8 GB after
    a day of tests here). Once every rank has mapped every file (DeepSpeed maps its peers' before it returns, hence
    the barrier), each rank unlinks its own; the memory is freed when the processes end. At one rank DeepSpeed makes
    its process group (and the file) itself, later: the DeepSpeed strategy calls this again once its engines exist.
    """
    if not tdist.is_initialized():
        return
    tdist.barrier()
    name = "deepspeed_allreduce_buffer_{}_{}_{}_{}".format(os.getuid(), os.environ.get("MASTER_ADDR", ""),
                                                          os.environ.get("MASTER_PORT", ""), rank)
    try:
        os.unlink(os.path.join("/dev/shm", name))
    except FileNotFoundError:  # not all ranks local, or a DeepSpeed that does not make it
        pass




def exit_without_finalizing(code: int) -> None:
    """Flush logs and streams, then leave with ``os._exit``: the end of a process that ran a gloo group.

    Gloo's worker threads outlive a group that DeepSpeed still references, and one of them may still be freeing a
    finished collective's tensors, which takes the GIL. If the interpreter is finalizing by then, that thread exits
    inside a C++ destructor and the process aborts ("terminate called without an active exception", exit code 250 or
    SIGABRT; gdb: ProcessGroupGloo::runLoop -> ~AsyncAllgatherWork -> THPVariable_dealloc -> take_gil ->
    PyThread_exit_thread -> std::terminate). Callers close their files, TensorBoard writers and progress bars first.
    """
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # closed or broken pipe: nothing more can be written anyway
            pass
    os._exit(code)


def shm_allgather_for_deepspeed() -> None:
    """Route DeepSpeed's CPU all-gathers through shared memory (:func:`.shm_gather.install_for_deepspeed`)."""
    from htr_dist.dist.cpu.shm_gather import install_for_deepspeed

    install_for_deepspeed()


def shm_allgather_for_fsdp(modules, group):
    """Give FSDP2 modules a shared-memory all-gather (:func:`.shm_gather.install_for_fsdp`); the gatherer or None."""
    from htr_dist.dist.cpu.shm_gather import install_for_fsdp

    return install_for_fsdp(modules, group)
