"""Every distributed helper in one place: ranks, backend, device and dtype.

Rank and world size come from the environment that torchrun, the deepspeed launcher or SLURM set. Every helper returns
a safe default (rank 0, world 1, no-op collectives) when torch.distributed is not initialised, so the same code runs in
one plain process. Device, dtype and backend are decided here once and passed down; model code never re-detects them.
"""

from __future__ import annotations

import datetime
import gc
import logging
import os
import socket
import sys
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as tdist

from htr_dist.config import CHOICES, ConfigError, not_one_of

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str
    """``nccl`` on CUDA, ``gloo`` on CPU."""
    dtype: torch.dtype
    """Autocast dtype of the trainable part (``dist.precision``: by default bf16 on CUDA, fp32 on CPU)."""
    llm_dtype: Optional[torch.dtype] = None
    """Dtype of the frozen LLM's weights and compute (``dist.llm_precision``); None = ``dtype``."""
    channels_last: bool = True
    """The backbone's memory format (``dist.memory_format``): NHWC if True, else NCHW."""

    def __post_init__(self):
        if self.llm_dtype is None:
            object.__setattr__(self, "llm_dtype", self.dtype)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def pin_memory(self) -> bool:
        """Whether loaders should page-lock batches: only for a copy to a GPU, which then overlaps with compute."""
        return self.device.type == "cuda"

    @property
    def autocast_enabled(self) -> bool:
        return self.dtype != torch.float32

    def autocast(self):
        """bf16 autocast of the trainable part (weights stay fp32), or a no-op context in fp32."""
        return torch.autocast(device_type=self.device.type, dtype=self.dtype, enabled=self.autocast_enabled)


def _env_int(*names: str, default: int) -> int:
    for name in names:
        if os.environ.get(name, "") != "":
            return int(os.environ[name])
    return default


def env_rank() -> int:
    return _env_int("RANK", "SLURM_PROCID", default=0)


def env_world_size() -> int:
    return _env_int("WORLD_SIZE", "SLURM_NTASKS", default=1)


def env_local_rank() -> int:
    return _env_int("LOCAL_RANK", "SLURM_LOCALID", default=0)


def pick_device(local_rank: int, wanted: str = "auto", world: int = 1) -> torch.device:
    """The rank's device for ``dist.device``: ``auto`` (``cuda`` when CUDA is available, else ``cpu``), ``cpu``,
    ``cuda`` (the GPU of the rank's local index), or ``cuda:N`` (that GPU, for a single-process run)."""
    if wanted == "auto":
        wanted = "cuda" if torch.cuda.is_available() else "cpu"
    if wanted == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError(f"dist.device={wanted}: CUDA is not available here (torch {torch.__version__}); "
                          "use dist.device=auto or cpu")
    if wanted == "cuda":
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    index = int(wanted.split(":")[1])
    if world > 1:
        raise ConfigError(f"dist.device={wanted} names one GPU, but this run has {world} ranks, each on the GPU of "
                          "its local rank: choose the GPUs with CUDA_VISIBLE_DEVICES and leave dist.device=auto")
    if index >= torch.cuda.device_count():
        raise ConfigError(f"dist.device={wanted}: this machine has {torch.cuda.device_count()} GPU(s)")
    return torch.device("cuda", index)


def cpu_settings(device: torch.device):
    """The one switch of the CPU-only settings: :mod:`htr_dist.dist.cpu` for a run on the CPU, None on an accelerator.
    It is the only importer of that module, so a GPU run never imports or patches any of it."""
    if device.type != "cpu":
        return None
    from htr_dist.dist import cpu

    return cpu


def pick_backend(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def has_native_bf16(device: torch.device) -> bool:
    """A GPU that computes bf16 natively (Ampere and newer), or a CPU whose oneDNN does (avx512_bf16 or AMX);
    elsewhere bf16 is emulated, slowly."""
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    return torch.ops.mkldnn._is_mkldnn_bf16_supported()


def pick_dtype(device: torch.device, precision: str = "auto", key: str = "dist.precision") -> torch.dtype:
    """``dist.precision`` (or ``key``) -> dtype: ``auto`` is bf16 on CUDA and fp32 on CPU; ``bf16_native`` is bf16
    where the device computes bf16 natively, else fp32."""
    if precision == "fp32" or (precision == "auto" and device.type != "cuda"):
        return torch.float32
    if precision not in CHOICES[key]:
        raise ConfigError(not_one_of(key, precision))
    native = has_native_bf16(device)
    if precision == "bf16_native" and not native:
        log.info("%s=bf16_native: %s has no native bf16, fp32 it is", key, device)
        return torch.float32
    if not native:
        log.warning("%s=bf16 on %s without native bf16 (a CPU without avx512_bf16 or AMX, a GPU before Ampere): "
                    "emulated, expect it slower than fp32", key, device)
    return torch.bfloat16


def pick_llm_dtype(device: torch.device, dtype: torch.dtype, llm_precision: str = "auto") -> torch.dtype:
    """``dist.llm_precision`` -> the frozen LLM's dtype: ``auto`` follows ``dtype`` (``dist.precision``);
    ``bf16_native`` is bf16 where the device computes bf16 natively, else fp32."""
    return dtype if llm_precision == "auto" else pick_dtype(device, llm_precision, "dist.llm_precision")


def inference_rnn_dtype(device: torch.device, dtype: torch.dtype) -> torch.dtype:
    """The dtype of the recognizer's recurrent head when it only reads (recognition, evaluation) at ``dtype``: bf16
    weights and inputs on a CPU that computes bf16 natively, where oneDNN's bf16 LSTM is several times faster than its
    fp32 one; fp32 elsewhere (an emulated bf16 LSTM fails in oneDNN, and cuDNN's RNNs run fp32 under bf16 autocast).
    Training always keeps the recurrence in fp32."""
    if dtype == torch.bfloat16 and device.type == "cpu" and has_native_bf16(device):
        return torch.bfloat16
    return torch.float32


def pick_channels_last(device: torch.device, memory_format: str = "auto", backward: bool = True) -> bool:
    """``dist.memory_format`` -> whether the backbone runs in NHWC (channels_last).

    ``auto``: yes on CUDA (cuDNN's NHWC kernels), on CPUs with AVX-512, where oneDNN has NHWC kernels for every pass,
    and wherever no backward pass runs (``backward=False``: evaluation, recognition); no when training on other CPUs.
    On an AVX2-only CPU oneDNN computes a 3x3 convolution's weight gradient from an NHWC map with a kernel several
    times slower than from its blocked NCHW layout, enough to slow whole training steps; its NHWC forward is the
    faster one there too (docs/benchmarks.md, CPU-only settings).
    """
    if memory_format not in CHOICES["dist.memory_format"]:
        raise ConfigError(not_one_of("dist.memory_format", memory_format))
    if memory_format != "auto":
        return memory_format == "channels_last"
    return device.type == "cuda" or not backward or torch.backends.cpu.get_cpu_capability().startswith("AVX512")


def attn_implementation(device: torch.device, requested: str = "auto", llm_dtype: torch.dtype = torch.bfloat16) -> str:
    """``llm.attn_implementation`` -> what transformers gets. ``auto``: flash-attn 2 where it is installed, the device
    is CUDA and the LLM's weights are bf16 or fp16 (flash-attn computes nothing else), else PyTorch SDPA. An explicit
    ``flash_attention_2`` that cannot run is an error here, at start-up (transformers does not fall back)."""
    if requested not in CHOICES["llm.attn_implementation"]:
        raise ConfigError(not_one_of("llm.attn_implementation", requested))
    flash = False
    if device.type == "cuda":
        from transformers.utils import is_flash_attn_2_available

        flash = is_flash_attn_2_available()
    half = llm_dtype in (torch.bfloat16, torch.float16)
    if requested == "auto":
        return "flash_attention_2" if flash and half else "sdpa"
    if requested == "flash_attention_2" and not flash:
        raise ConfigError(f"llm.attn_implementation=flash_attention_2 needs CUDA and the flash-attn package "
                          f"(pip install .[flash]); this rank's device is {device}")
    if requested == "flash_attention_2" and not half:
        raise ConfigError(f"llm.attn_implementation=flash_attention_2 needs the LLM in bf16 or fp16, and "
                          f"dist.precision / dist.llm_precision make it {llm_dtype}")
    return requested


def env_local_world_size() -> int:
    """Ranks on this machine as the launcher says (torchrun: LOCAL_WORLD_SIZE, deepspeed: LOCAL_SIZE); 0 = unknown."""
    return _env_int("LOCAL_WORLD_SIZE", "LOCAL_SIZE", default=0)


def ranks_share_memory() -> bool:
    """Whether every rank of this job runs on this machine (so /dev/shm is common to all of them)."""
    world = env_world_size()
    return world > 1 and env_local_world_size() == world and os.path.isdir("/dev/shm")


def free_port() -> int:
    """A TCP port free on this machine right now, for a single-machine ``--master_port``."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launcher_command(launcher: str, nproc: int, port: Optional[int] = None) -> list:
    """Command prefix that starts ``nproc`` local ranks of a script: ``torchrun`` (run as this interpreter's
    ``-m torch.distributed.run``) or the ``deepspeed`` launcher installed beside this interpreter."""
    port = port or free_port()
    if launcher == "deepspeed":
        return [os.path.join(os.path.dirname(sys.executable), "deepspeed"), "--num_gpus", str(nproc),
                "--master_port", str(port)]
    if launcher == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
                str(port)]
    raise ValueError(f"launcher: expected torchrun or deepspeed, got {launcher!r}")


def _restart_store(world: int, timeout: datetime.timedelta):
    """The rendezvous store for this torchrun attempt, or None outside torchrun (then ``env://`` does the job).

    torchrun keeps one agent store across ``--max-restarts`` restarts and ``env://`` keys nothing by attempt, so the
    workers of a restart would read the dead attempt's gloo/NCCL addresses and fail to connect (pytorch#135712).
    Prefixing the keys with the restart count gives every attempt a clean namespace in the same store.
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    base = tdist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=False,
                          timeout=timeout)
    return tdist.PrefixStore(f"htr_dist/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/", base)


def init_distributed(timeout_s: int = 1800, use_deepspeed: bool = False, precision: str = "auto",
                     llm_precision: str = "auto", memory_format: str = "auto", device: str = "auto") -> DistEnv:
    """Initialise the process group when launched with several processes; return the resolved environment.

    SLURM without torchrun: MASTER_ADDR/MASTER_PORT must be exported by the batch script (launch/slurm_train.sh does).
    """
    rank, world, local_rank = env_rank(), env_world_size(), env_local_rank()
    device = pick_device(local_rank, device, world)
    backend = pick_backend(device)
    cpu = cpu_settings(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if (world > 1 or use_deepspeed) and not tdist.is_initialized():
        os.environ.setdefault("RANK", str(rank))
        os.environ.setdefault("WORLD_SIZE", str(world))
        os.environ.setdefault("LOCAL_RANK", str(local_rank))
        if world == 1:  # plain `python launch/train.py` with a DeepSpeed strategy: a 1-rank group on this machine
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")  # (DeepSpeed would otherwise look for MPI to learn
            os.environ.setdefault("MASTER_PORT", str(free_port()))  # its ranks, and fail without mpi4py)
        timeout = datetime.timedelta(seconds=timeout_s)
        store = _restart_store(world, timeout)
        if store is not None:
            tdist.init_process_group(backend=backend, store=store, rank=rank, world_size=world, timeout=timeout)
        if use_deepspeed:
            import deepspeed

            deepspeed.init_distributed(dist_backend=backend, timeout=timeout)  # adopts an existing process group
            if cpu is not None:
                cpu.unlink_deepspeed_shm(rank)
        elif store is None:
            tdist.init_process_group(backend=backend, timeout=timeout)
    threads = cpu.threads_per_rank(env_local_world_size() or world) if cpu is not None and world > 1 else None
    if threads is not None:
        torch.set_num_threads(threads)
    dtype = pick_dtype(device, precision)
    env = DistEnv(rank, world, local_rank, device, backend, dtype, pick_llm_dtype(device, dtype, llm_precision),
                  pick_channels_last(device, memory_format))
    log.info("rank %d/%d local %d device %s backend %s dtype %s (LLM %s), training backbone %s, %d CPU thread(s)",
             rank, world, local_rank, device, backend, env.dtype, env.llm_dtype,
             "channels_last" if env.channels_last else "contiguous", torch.get_num_threads())
    return env


def is_initialized() -> bool:
    return tdist.is_available() and tdist.is_initialized()


def get_rank() -> int:
    return tdist.get_rank() if is_initialized() else 0


def get_world_size() -> int:
    return tdist.get_world_size() if is_initialized() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def barrier() -> None:
    if is_initialized():
        tdist.barrier()


def collective_device() -> torch.device:
    """Where tensors must be for the default group's collectives: NCCL reduces CUDA tensors only, gloo CPU ones."""
    if tdist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _all_reduce(t: torch.Tensor, op) -> torch.Tensor:
    """A reduced copy of ``t`` on ``t``'s device, whichever device the backend reduces on."""
    if not is_initialized():
        return t
    out = t.to(collective_device(), copy=True)
    tdist.all_reduce(out, op=op)
    return out.to(t.device)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    return _all_reduce(t, tdist.ReduceOp.SUM)


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    return all_reduce_sum(t) / get_world_size()


def all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    return _all_reduce(t, tdist.ReduceOp.MAX)


def all_gather_objects(obj) -> list:
    """Gather a picklable object from every rank (a list ordered by rank); ``[obj]`` in one process."""
    if not is_initialized():
        return [obj]
    out = [None] * get_world_size()
    tdist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, src: int = 0):
    if not is_initialized():
        return obj
    box = [obj]
    tdist.broadcast_object_list(box, src=src)
    return box[0]


_ran_gloo = False  # set once a gloo process group existed in this process: exit_process() then skips finalization


def destroy() -> None:
    """Tear the process group down; call it once the modules that wrap it (DDP, engines) are out of scope.

    Collecting garbage first destroys wrappers left in reference cycles now rather than during interpreter shutdown.
    That does not stop gloo's worker threads while DeepSpeed still references the group (every ZeRO-3 parameter and
    ``deepspeed.utils.groups`` do), hence exit_process(). No barrier: after an error on one rank, the others may be
    waiting in a collective that will never complete.
    """
    global _ran_gloo
    if is_initialized():
        _ran_gloo = _ran_gloo or tdist.get_backend() == "gloo"
        gc.collect()
        tdist.destroy_process_group()


def exit_process(code: int = 0) -> None:
    """End the process with ``code``. A process that ran a gloo group ends without interpreter finalization
    (:func:`htr_dist.dist.cpu.exit_without_finalizing` says why); any other exits normally."""
    if _ran_gloo:
        from htr_dist.dist import cpu

        cpu.exit_without_finalizing(code)
    sys.exit(code)


def setup_logging(rank: Optional[int] = None, level: int = logging.INFO) -> None:
    """Log lines carry the rank; ranks other than 0 only log warnings and errors."""
    rank = env_rank() if rank is None else rank
    logging.basicConfig(
        level=level if rank == 0 else logging.WARNING,
        format=f"%(asctime)s [rank{rank}] %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        force=True,
    )
