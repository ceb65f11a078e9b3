"""Device, backend, dtype and autocast are decided in one place (htr_dist.dist.env)."""

import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT
from htr_dist.config import ConfigError, load_config
from htr_dist.dist import cpu
from htr_dist.dist import env as dist_env


def test_cpu_choices():
    cpu = torch.device("cpu")
    assert dist_env.pick_backend(cpu) == "gloo"
    assert dist_env.pick_dtype(cpu) == torch.float32  # auto: fp32 on CPU
    assert dist_env.pick_dtype(cpu, "fp32") == torch.float32
    assert dist_env.pick_dtype(cpu, "bf16") == torch.bfloat16
    assert dist_env.attn_implementation(cpu) == "sdpa"
    assert dist_env.attn_implementation(cpu, "eager") == "eager"
    with pytest.raises(ValueError, match="flash_attention_2 needs CUDA"):
        dist_env.attn_implementation(cpu, "flash_attention_2")
    with pytest.raises(ValueError, match="'flash'"):
        dist_env.attn_implementation(cpu, "flash")


def test_cuda_choices_without_a_gpu():
    cuda = torch.device("cuda", 0)
    assert dist_env.pick_backend(cuda) == "nccl"
    assert dist_env.pick_dtype(cuda) == torch.bfloat16  # auto: bf16 on CUDA
    assert dist_env.pick_dtype(cuda, "fp32") == torch.float32
    with pytest.raises(ValueError, match="dist.precision"):
        dist_env.pick_dtype(cuda, "fp16")
    assert dist_env.DistEnv(0, 1, 0, cuda, "nccl", torch.bfloat16).pin_memory  # batches page-locked for the GPU
    assert not dist_env.DistEnv(0, 1, 0, torch.device("cpu"), "gloo", torch.float32).pin_memory


def test_flash_attention_only_for_a_half_precision_llm(monkeypatch):
    """flash-attn computes bf16 and fp16 only: with the LLM in fp32 (dist.precision=fp32 on a GPU), auto is SDPA and
    an explicit request is an error at start-up, not a failure in the first forward."""
    import transformers.utils

    monkeypatch.setattr(transformers.utils, "is_flash_attn_2_available", lambda: True)
    cuda = torch.device("cuda", 0)
    assert dist_env.attn_implementation(cuda, "auto", torch.bfloat16) == "flash_attention_2"
    assert dist_env.attn_implementation(cuda, "auto", torch.float16) == "flash_attention_2"
    assert dist_env.attn_implementation(cuda, "auto", torch.float32) == "sdpa"
    with pytest.raises(ConfigError, match="flash_attention_2 needs the LLM in bf16 or fp16.*torch.float32"):
        dist_env.attn_implementation(cuda, "flash_attention_2", torch.float32)
    assert not dist_env.has_native_bf16(cuda)  # no GPU here: nothing native to claim


@pytest.mark.parametrize("dtype, enabled", [(torch.float32, False), (torch.bfloat16, True)])
def test_autocast_follows_the_dtype(dtype, enabled):
    env = dist_env.DistEnv(0, 1, 0, torch.device("cpu"), "gloo", dtype)
    assert env.autocast_enabled is enabled
    layer = torch.nn.Linear(4, 4)
    with env.autocast():
        out = layer(torch.randn(2, 4))
    assert out.dtype == dtype and layer.weight.dtype == torch.float32  # weights stay fp32 under autocast


def test_inference_rnn_dtype_is_bf16_only_on_a_native_bf16_cpu(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr(dist_env, "has_native_bf16", lambda device: True)
    assert dist_env.inference_rnn_dtype(cpu, torch.bfloat16) == torch.bfloat16
    assert dist_env.inference_rnn_dtype(cpu, torch.float32) == torch.float32
    assert dist_env.inference_rnn_dtype(cuda, torch.bfloat16) == torch.float32
    monkeypatch.setattr(dist_env, "has_native_bf16", lambda device: False)
    assert dist_env.inference_rnn_dtype(cpu, torch.bfloat16) == torch.float32


def test_precision_key_is_validated():
    assert load_config(None, ["dist.precision=bf16"]).dist.precision == "bf16"
    with pytest.raises(ConfigError, match="dist.precision"):
        load_config(None, ["dist.precision=fp16"])
    assert load_config(None, ["dist.llm_precision=bf16"]).dist.llm_precision == "bf16"
    with pytest.raises(ConfigError, match="dist.llm_precision"):
        load_config(None, ["dist.llm_precision=half"])


def test_llm_precision_follows_precision_unless_set(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert dist_env.pick_llm_dtype(cpu, torch.float32) == torch.float32
    assert dist_env.pick_llm_dtype(cuda, torch.bfloat16) == torch.bfloat16
    assert dist_env.pick_llm_dtype(cpu, torch.float32, "bf16") == torch.bfloat16  # the CPU demo: bf16 LLM only
    assert dist_env.pick_llm_dtype(cuda, torch.bfloat16, "fp32") == torch.float32
    with pytest.raises(ValueError, match="dist.llm_precision"):
        dist_env.pick_llm_dtype(cpu, torch.float32, "fp16")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for native, dtype in [(True, torch.bfloat16), (False, torch.float32)]:  # avx512_bf16/AMX or not, Ampere or not
        monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda n=native: n)
        assert dist_env.pick_llm_dtype(cpu, torch.float32, "bf16_native") == dtype
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True, n=native: n)
        assert dist_env.pick_llm_dtype(cuda, torch.bfloat16, "bf16_native") == dtype
        # the trainable part's autocast takes the same rule, and the LLM follows it unless told otherwise
        for device in (cpu, cuda):
            assert dist_env.pick_dtype(device, "bf16_native") == dtype
            assert dist_env.pick_llm_dtype(device, dist_env.pick_dtype(device, "bf16_native")) == dtype
    assert load_config(None, ["dist.precision=bf16_native"]).dist.precision == "bf16_native"
    env = dist_env.DistEnv(0, 1, 0, cpu, "gloo", torch.float32)
    assert env.llm_dtype == torch.float32  # not given: the trainable dtype
    env = dist_env.DistEnv(0, 1, 0, cpu, "gloo", torch.float32, torch.bfloat16)
    assert env.llm_dtype == torch.bfloat16 and not env.autocast_enabled


def test_memory_format_auto_is_nhwc_on_cuda_and_avx512_only(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert dist_env.pick_channels_last(cuda) is True
    for capability, nhwc in [("AVX512", True), ("AVX512_BF16", True), ("AVX2", False), ("DEFAULT", False)]:
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda c=capability: c)
        assert dist_env.pick_channels_last(cpu) is nhwc, capability
        assert dist_env.pick_channels_last(cpu, backward=False) is True  # no weight gradient: NHWC's forward wins
        assert dist_env.pick_channels_last(cpu, "contiguous", backward=False) is False
        assert dist_env.pick_channels_last(cpu, "channels_last") is True  # an explicit choice wins everywhere
        assert dist_env.pick_channels_last(cuda, "contiguous") is False
    with pytest.raises(ValueError, match="dist.memory_format: 'nhwc' is not one of"):
        dist_env.pick_channels_last(cpu, "nhwc")
    with pytest.raises(ConfigError, match="dist.memory_format"):
        load_config(None, ["dist.memory_format=nhwc"])
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS", "TORCHELASTIC_USE_AGENT_STORE"):
        monkeypatch.delenv(name, raising=False)
    assert dist_env.init_distributed().channels_last is False
    assert dist_env.init_distributed(memory_format="channels_last").channels_last is True


def test_single_process_needs_no_process_group(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS", "TORCHELASTIC_USE_AGENT_STORE"):
        monkeypatch.delenv(name, raising=False)
    env = dist_env.init_distributed()
    assert (env.rank, env.world_size, env.backend) == (0, 1, "gloo") and not dist_env.is_initialized()


def test_launcher_commands_start_local_ranks_from_this_environment():
    import os
    import sys

    assert dist_env.launcher_command("torchrun", 3, 1234) == [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "3", "--master_port", "1234"]
    ds = dist_env.launcher_command("deepspeed", 2, 1234)
    assert ds == [os.path.join(os.path.dirname(sys.executable), "deepspeed"), "--num_gpus", "2", "--master_port", "1234"]
    assert os.access(ds[0], os.X_OK)  # the launcher the dev extra installs beside this interpreter
    port = int(dist_env.launcher_command("torchrun", 2)[-1])
    assert 0 < port < 65536
    with pytest.raises(ValueError, match="launcher"):
        dist_env.launcher_command("mpirun", 2)


EXIT_SCRIPT = """
import logging, sys
import torch.distributed as tdist
from htr_dist.dist import cpu
from htr_dist.dist import env as dist_env
logging.basicConfig(stream=sys.stderr, level=logging.INFO)
if sys.argv[1] == "group":
    tdist.init_process_group("gloo", init_method="tcp://127.0.0.1:{port}", rank=0, world_size=1)
    dist_env.all_gather_objects("x")
    dist_env.destroy()
print("buffered line", end="")  # stdout is a pipe: block-buffered until flushed
logging.getLogger("t").info("logged line")
dist_env.exit_process(3)
print("never printed")
"""


@pytest.mark.parametrize("mode", ["group", "plain"])
def test_exit_process_flushes_and_keeps_the_code(mode):
    """A process that ran a gloo group leaves through os._exit (see exit_process): its output must not be lost."""
    script = EXIT_SCRIPT.replace("{port}", str(dist_env.free_port()))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    proc = subprocess.run([sys.executable, "-c", script, mode], capture_output=True, text=True, cwd=ROOT, timeout=120,
                          env=env)
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert proc.stdout == "buffered line"
    assert "logged line" in proc.stderr


ALLOCATOR_SCRIPT = """
import ctypes, sys
from htr_dist.dist.cpu import tune_allocator as tune_cpu_allocator

def private_mb():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("RssAnon:")) / 1024

def kept_mb(size_mb):
    # private memory still held after filling size_mb in 1 MB blocks and freeing them all
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    before = private_mb()
    blocks = [libc.malloc(1 << 20) for _ in range(size_mb)]
    for b in blocks:
        ctypes.memset(b, 1, 1 << 20)
    for b in blocks:
        libc.free(b)
    return private_mb() - before

phases = sys.argv[1:]  # "step+gathers": the step phase of a run that gathers a large sharded teacher
print(" ".join(str(tune_cpu_allocator(p.split("+")[0], gathers_large_teacher=p.endswith("+gathers")))
               for p in phases), round(kept_mb(256)))
"""


def _allocator_run(phases, extra_env=()):
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    proc = subprocess.run([sys.executable, "-c", ALLOCATOR_SCRIPT, *phases], capture_output=True, text=True, cwd=ROOT,
                          timeout=60, env={**clean, **dict(extra_env)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    *done, kept = proc.stdout.split()
    return done, int(kept)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc")
def test_cpu_allocator_phases_keep_or_return_freed_memory():
    """The step phase keeps 256 freed blocks of 1 MB for the next step; the load phase, set after it, hands them back
    to the system at once."""
    done, kept = _allocator_run(["step"])
    assert done == ["True"] and kept >= 250, kept
    done, kept = _allocator_run(["step", "load"])
    assert done == ["True", "True"] and kept <= 8, kept
    # gathering a large teacher: the heap hands back what it holds free beyond its 16 MB trim threshold
    done, kept = _allocator_run(["step+gathers"])
    assert done == ["True"] and kept <= 24, kept
    with pytest.raises(ValueError, match="phase must be 'load' or 'step', got 'train'"):
        cpu.tune_allocator("train")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc")
def test_cpu_allocator_tuned_unless_the_user_configured_glibc():
    for extra in ({"MALLOC_MMAP_THRESHOLD_": "131072"}, {"GLIBC_TUNABLES": "glibc.malloc.perturb=0"}):
        done, _ = _allocator_run(["load", "step"], extra)
        assert done == ["False", "False"], extra


def test_build_strategy_loads_under_the_load_phase_then_sets_the_step_phase(monkeypatch):
    from htr_dist.dist import strategy as strategy_mod

    class Built:
        name, teacher = "ddp", None

    calls = []
    monkeypatch.setattr(cpu, "tune_allocator", lambda phase, **kw: calls.append((phase, kw)))
    monkeypatch.setattr(strategy_mod.registry, "resolve",
                        lambda spec: lambda *args: calls.append("build") or Built)
    cfg = load_config(os.path.join(ROOT, "configs", "tiny_cpu.yaml"), ["dist.strategy=ddp"])
    env = dist_env.init_distributed()
    assert strategy_mod.build_strategy(cfg, env, None, 10) is Built
    assert calls == [("load", {}), "build", ("step", {"gathers_large_teacher": False})]

def test_collectives_reduce_where_the_backend_can(monkeypatch):
    """NCCL reduces CUDA tensors only: the loop's small CPU tensors (stop flag, validation counts, logged means) go to
    the current CUDA device for the reduction there, and stay on the CPU for gloo."""
    import torch.distributed as tdist

    monkeypatch.setattr(tdist, "get_backend", lambda group=None: "nccl")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert dist_env.collective_device() == torch.device("cuda", 3)
    monkeypatch.setattr(tdist, "get_backend", lambda group=None: "gloo")
    assert dist_env.collective_device() == torch.device("cpu")


def test_cpu_threads_per_rank_splits_the_cores_unless_the_user_chose(monkeypatch):
    """torchrun's own OMP_NUM_THREADS=1 is not the user's choice; an OMP_NUM_THREADS the user set is."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    assert cpu.threads_per_rank(2) == 8 and cpu.threads_per_rank(32) == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert cpu.threads_per_rank(2) is None  # set by the user (no torchrun)
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "x")
    assert cpu.threads_per_rank(4) == 4  # torchrun's default
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert cpu.threads_per_rank(4) is None
