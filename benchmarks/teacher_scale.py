#!/usr/bin/env python
"""The teacher at its real size: the full Llama-3.2-3B shape (28 layers, seeded random weights) trained against at N
CPU ranks (gloo), per strategy. Prints one JSON object.

Each strategy is built the way training builds it (``htr_dist.dist.strategy.build_strategy``) from
``configs/tiny_cpu.yaml`` with the teacher ``configs/llm/llama-3.2-3b`` in bf16 (where the CPU computes bf16
natively; else fp32, and the report says so), a small recogniser whose connector projects to 3072, and one line per
rank through the teacher. Per strategy, with min / median / max over the timed steps:

- ``held_ratio``: teacher parameter bytes a rank holds between uses / the whole teacher's bytes;
- ``peak_gb``: the rank's largest resident-set increase (VmHWM) over the process just before the build (its libraries
  imported, as a training process has them), through the build and every step; ``peak_ratio`` = peak_gb / the whole teacher's bytes: whether sharding saves memory at the
  peak and not only at rest;
- ``planned_gb``: what ``launch/plan.py`` predicts for the same config and ranks. On a CPU the accelerator *is* the
  host, so an offloaded teacher's shards count here too (``teacher_offloaded`` of the plan);
- ``build_s``: building the strategy (teacher skeleton, this rank's weights, wrapping);
- ``teacher_s``: the teacher's forward + backward for one line per rank, on its own: a leaf prefix of visual tokens,
  the causal-LM loss, its gradient back to the prefix;
- ``step_s``: one whole training step (recogniser, connector, teacher, CTC, backward, optimizer);
- ``activation_bytes_per_line``: what the teacher's forward keeps for the backward pass for one line (the storages
  autograd saves, counted once each), with ``planned_activation_bytes_per_line`` beside it.

At the top level, ``teacher_flops`` is the matmul FLOPs of one line's forward + backward through the teacher, counted
by ``torch.utils.flop_counter`` on the run itself, ``matmul_gflops`` the best matmul rate a rank reaches in the same
run (all ranks at once, in the teacher's dtype, :func:`matmul_rates`), ``teacher_floor_s = teacher_flops /
matmul_gflops``, and per strategy ``teacher_efficiency = teacher_floor_s / median teacher_s``. The same with the
rate of the teacher's own MLP shape over weights that do not fit in the cache (``matmul_gflops_streaming``, what a
line of a few dozen tokens can reach) gives ``teacher_floor_streaming_s`` and ``teacher_efficiency_streaming``.

The run needs about 6 GB of memory per rank for the 3B shape and a few minutes per strategy on a 2-core machine;
``--llm configs/llm/llama-3.2-1b`` or fewer ``--strategies`` make it shorter.
"""

import argparse
import contextlib
import importlib
import os
import sys
import time

import torch

from _ranks import finish_rank, set_rank_env, spawn_ranks
from llm_memory import status_bytes
from _report import reserve_stdout, spread

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GB = 1e9
STRATEGIES = {  # name: (overrides, the planner's row for it)
    "deepspeed": (["dist.strategy=deepspeed"], "deepspeed"),
    "deepspeed_offload": (["dist.strategy=deepspeed",
                           f"dist.llm_deepspeed_config={ROOT}/configs/deepspeed/llm_zero3_offload.json"],
                          "deepspeed_offload"),
    "fsdp": (["dist.strategy=fsdp"], "fsdp"),
    "fsdp_offload": (["dist.strategy=fsdp", "dist.fsdp_cpu_offload=true"], "fsdp_offload"),
    "fsdp_checkpointing": (["dist.strategy=fsdp", "llm.gradient_checkpointing=true"], "fsdp"),
    "ddp": (["dist.strategy=ddp"], "ddp"),
}
DEFAULT = ["deepspeed", "deepspeed_offload", "fsdp", "fsdp_offload", "fsdp_checkpointing"]


def matmul_rates(dtype: torch.dtype, tokens: int, hidden: int, intermediate: int, seconds: float = 1.0) -> dict:
    """GFLOP/s of ``dtype`` matmuls on this rank's threads while every rank runs the same ones (rounds of repetitions
    between barriers: the ranks share the machine as they do in a step), each shape the best of five rounds:

    - ``square_2048``: 2048^3, the machine's best case;
    - ``mlp_up`` and ``mlp_down``: the teacher's MLP shapes at one line's ``tokens``, the same weight every time (it
      stays in cache);
    - ``mlp_up_streaming``: the same shape over weights too many for the cache, as a step meets them: each weight
      read from memory once for ``tokens`` rows, the rate a one-line teacher can reach at best."""
    from htr_dist.dist import env as dist_env

    weights = max(2, (512 << 20) // (hidden * intermediate * torch.empty(0, dtype=dtype).element_size()))
    shapes = {"square_2048": ((2048, 2048), [(2048, 2048)]),
              "mlp_up": ((tokens, hidden), [(hidden, intermediate)]),
              "mlp_down": ((tokens, intermediate), [(intermediate, hidden)]),
              "mlp_up_streaming": ((tokens, hidden), [(hidden, intermediate)] * weights)}
    rates = {}
    for name, (a_shape, b_shapes) in shapes.items():
        a, bs = torch.randn(a_shape, dtype=dtype), [torch.randn(b, dtype=dtype) for b in b_shapes]
        flops = sum(2 * a_shape[0] * k * n for k, n in b_shapes)
        start = time.perf_counter()
        for b in bs:
            a @ b  # warm-up: kernel selection, first-touch pages
        # repetitions per round: about a fifth of ``seconds``, the same number on every rank (the slowest's estimate)
        once = dist_env.all_reduce_max(torch.tensor([time.perf_counter() - start], dtype=torch.float64)).item()
        reps = max(1, int(seconds / 5 / max(once, 1e-6)))
        best = float("inf")
        for _ in range(5):  # rounds: every rank runs its repetitions between the same two barriers
            dist_env.barrier()
            start = time.perf_counter()
            for _ in range(reps):
                for b in bs:
                    a @ b
            best = min(best, (time.perf_counter() - start) / reps)
        rates[name] = flops / best / 1e9
        del a, bs
    return rates


class SavedBytes:
    """Bytes of the distinct storages autograd saves for backward inside the ``with`` block, on the gradient's path."""

    def __init__(self):
        self.storages = {}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, t):
        # On the gradient's path only: a frozen weight (or a view of it) is a leaf that needs no gradient, and it is
        # the teacher's parameter memory, counted elsewhere, not an activation.
        if isinstance(t, torch.Tensor) and not t.is_meta and (t.requires_grad or not t.is_leaf):
            s = t.untyped_storage()
            self.storages[s.data_ptr()] = s.nbytes()
        return t

    def __enter__(self):
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)

    @property
    def total(self) -> int:
        return sum(self.storages.values())


def worker(rank, world, port, overrides, steps, out):
    os.dup2(2, 1)  # DeepSpeed prints to stdout; keep the benchmark's stdout for its one JSON object
    set_rank_env(rank, world, port)
    from torch.utils.flop_counter import FlopCounterMode

    from htr_dist.config import load_config
    from htr_dist.dist import env as dist_env
    from htr_dist.dist.strategy import build_strategy, llm_param_bytes_full, llm_param_bytes_on_rank
    from htr_dist.models.htr import HTRModel, LossSpec, compute_losses
    from htr_dist.models.llm import llm_hidden_size, load_llm_config
    cfg = load_config(os.path.join(ROOT, "configs", "tiny_cpu.yaml"), overrides)
    env = dist_env.init_distributed(300, use_deepspeed=cfg.dist.strategy == "deepspeed", precision=cfg.dist.precision,
                                    llm_precision=cfg.dist.llm_precision, memory_format=cfg.dist.memory_format)
    shape = load_llm_config(cfg.llm.name_or_path, cfg.llm.cache_dir)
    dist_env.barrier()
    rates = matmul_rates(env.llm_dtype, cfg.connector.num_queries + 24, shape.hidden_size, shape.intermediate_size)
    dist_env.barrier()

    texts = ["a line of handwritten text", "of no great length at all", "read by the model here", "and no more"]
    chars = sorted(set("".join(texts)))
    model = HTRModel(cfg.arch, cfg.connector, len(chars) + 1, cfg.data.img_height, cfg.data.img_width,
                     llm_hidden_size(cfg))
    ids = [[chars.index(c) + 1 for c in t] for t in texts]
    batch = {"images": torch.rand(len(texts), 1, cfg.data.img_height, cfg.data.img_width), "texts": texts,
             "targets": torch.tensor(sum(ids, [])), "target_lengths": torch.tensor([len(i) for i in ids])}
    spec = LossSpec.from_config(cfg)

    # the libraries a build imports are loaded first, as in a training process: their code is not the teacher's memory
    for module in ["transformers.models.llama.modeling_llama", "torch.distributed.fsdp"] + (
            ["deepspeed"] if cfg.dist.strategy == "deepspeed" else []):
        importlib.import_module(module)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM, the peak resident set, to the current one
    rss_before, start = status_bytes("VmRSS"), time.perf_counter()
    strategy = build_strategy(cfg, env, model, total_steps=steps + 1)
    build_s = time.perf_counter() - start
    build_peak = status_bytes("VmHWM") - rss_before
    teacher = strategy.teacher
    held, full = llm_param_bytes_on_rank(teacher), llm_param_bytes_full(teacher)

    generator = torch.Generator().manual_seed(rank)
    input_ids, mask = teacher.tokenize(texts[rank % len(texts):][:1], cfg.llm.max_text_tokens)
    prefix_shape = (1, cfg.connector.num_queries, teacher.hidden_size)

    def teacher_alone(count_flops: bool = False):
        """One line's forward + backward through the teacher alone; (seconds, flops, saved bytes)."""
        prefix = torch.randn(prefix_shape, generator=generator).to(env.device).requires_grad_(True)
        counter = FlopCounterMode(display=False) if count_flops else contextlib.nullcontext()
        dist_env.barrier()
        begin = time.perf_counter()
        with counter:
            with SavedBytes() as saved:
                loss = teacher(prefix, input_ids.to(env.device), mask.to(env.device))
            loss.backward()
        seconds = time.perf_counter() - begin
        if not torch.isfinite(loss) or prefix.grad is None or not torch.isfinite(prefix.grad).all():
            raise RuntimeError(f"rank {rank}: the teacher's loss {loss.item()} or its prefix gradient is not finite")
        return seconds, counter.get_total_flops() if count_flops else None, saved.total

    def train_step():
        dist_env.barrier()
        begin = time.perf_counter()
        losses = compute_losses(strategy.model, teacher, batch, spec, generator)
        strategy.backward(losses["total"])
        strategy.step()
        seconds = time.perf_counter() - begin
        if not all(torch.isfinite(v).all() for v in losses.values() if isinstance(v, torch.Tensor)):
            raise RuntimeError(f"rank {rank}: a loss is not finite: {losses}")
        return seconds, float(losses["llm"].detach())

    # warm-up: the first pass of each kind pays kernel selection and first-touch pages; it counts the FLOPs
    _, flops, _ = teacher_alone(count_flops=True)
    train_step()
    teacher_s, step_s, llm_losses, saved = [], [], [], []
    for _ in range(steps):
        seconds, _, saved_bytes = teacher_alone()
        teacher_s.append(seconds)
        saved.append(saved_bytes)
        seconds, llm_loss = train_step()
        step_s.append(seconds)
        llm_losses.append(llm_loss)
    peak = status_bytes("VmHWM") - rss_before
    report = dist_env.all_gather_objects({
        "held": held, "full": full, "build_peak": build_peak, "peak": peak, "build_s": build_s, "flops": flops,
        "teacher_s": teacher_s, "step_s": step_s, "llm_loss": llm_losses, "saved": saved, "rates": rates,
        "dtype": str(env.llm_dtype).replace("torch.", "")})
    finish_rank(rank, report, out)


def planned(overrides: list, plan_row: str, world: int, dtype: torch.dtype) -> dict:
    """The planner's per-rank total and teacher activations per line for the benchmark's config, in this process
    (not in a rank: under ZeRO-3 a rank's live DeepSpeed config would turn the planner's meta build into zero.Init)."""
    from htr_dist.config import load_config
    from htr_dist.plan import plan

    cfg = load_config(os.path.join(ROOT, "configs", "tiny_cpu.yaml"), overrides)
    row = next(r for r in plan(cfg, world, 1, 1e6, dtype)["strategies"] if r["strategy"] == plan_row)
    key = "checkpointing" if cfg.llm.gradient_checkpointing else "no_checkpointing"
    return {"total": row[key]["total"] + row["teacher_offloaded"],  # on a CPU the host is the device
            "teacher_activations_per_line": row[key]["teacher_activations_per_line"]}


def summarise(ranks: list, planned: dict) -> dict:
    full = ranks[0]["full"]
    peak = max(r["peak"] for r in ranks)
    teacher_s = [max(values) for values in zip(*(r["teacher_s"] for r in ranks))]  # a step waits for its slowest rank
    step_s = [max(values) for values in zip(*(r["step_s"] for r in ranks))]
    return {
        "held_bytes": [r["held"] for r in ranks], "held_ratio": round(max(r["held"] for r in ranks) / full, 4),
        "build_peak_gb": [round(r["build_peak"] / GB, 3) for r in ranks],
        "peak_gb_per_rank": [round(r["peak"] / GB, 3) for r in ranks],
        "peak_gb": round(peak / GB, 3), "peak_ratio": round(peak / full, 4),
        "planned_gb": round(planned["total"] / GB, 3),
        "planned_over_peak": round(planned["total"] / peak, 3),
        "build_s": spread([round(r["build_s"], 1) for r in ranks]),
        "teacher_s": spread([round(s, 3) for s in teacher_s]),
        "step_s": spread([round(s, 3) for s in step_s]),
        "llm_loss": ranks[0]["llm_loss"],
        "activation_bytes_per_line": max(max(r["saved"]) for r in ranks),
        "planned_activation_bytes_per_line": planned["teacher_activations_per_line"],
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--llm", default=os.path.join(ROOT, "configs", "llm", "llama-3.2-3b"),
                   help="llm.name_or_path: a shape (config.json folder) or a checkpoint (default: the 3B shape)")
    p.add_argument("--nproc", type=int, default=2, help="ranks (default: 2)")
    p.add_argument("--steps", type=int, default=3, help="timed steps per strategy after one warm-up (default: 3)")
    p.add_argument("--strategies", nargs="+", default=DEFAULT, choices=list(STRATEGIES), metavar="NAME",
                   help=f"any of {' '.join(STRATEGIES)} (default: {' '.join(DEFAULT)})")
    p.add_argument("--set", nargs="*", default=[], metavar="key=value",
                   help="config overrides for every strategy, e.g. llm.attn_implementation=sdpa")
    args = p.parse_args(argv)
    if args.steps < 1:
        p.error(f"--steps must be at least 1, got {args.steps}")
    emit = reserve_stdout()
    from htr_dist.dist.env import has_native_bf16

    precision = "bf16" if has_native_bf16(torch.device("cpu")) else "fp32"
    base = [f"llm.name_or_path={args.llm}", "train.use_llm=true", f"dist.llm_precision={precision}",
            "train.batch_size=4", "train.llm_sample_ratio=0.25", "train.log_every=1000"]
    out = {"llm": args.llm, "nproc": args.nproc, "steps": args.steps, "llm_precision": precision,
           "overrides": args.set, "strategies": {}}
    rates, flops = None, None
    for name in args.strategies:
        print(f"teacher_scale: {name} ...", file=sys.stderr, flush=True)
        overrides, plan_row = STRATEGIES[name]
        overrides = overrides + base + args.set
        ranks = spawn_ranks(worker, args.nproc, overrides, args.steps)
        dtype = getattr(torch, ranks[0]["dtype"])
        out["strategies"][name] = summarise(ranks, planned(overrides, plan_row, args.nproc, dtype))
        out["teacher_bytes"] = ranks[0]["full"]
        flops = flops or ranks[0]["flops"]
        rates = (rates or []) + [{"best": max(r["rates"].values()), "streaming": r["rates"]["mlp_up_streaming"]}
                                 for r in ranks]
        out.setdefault("matmul_gflops_by_shape", {k: round(v, 1) for k, v in ranks[0]["rates"].items()})
        print(f"teacher_scale: {name}: {out['strategies'][name]}", file=sys.stderr, flush=True)
    best, streaming = max(r["best"] for r in rates), max(r["streaming"] for r in rates)
    out["teacher_flops"] = flops
    out["matmul_gflops"] = round(best, 1)
    out["matmul_gflops_streaming"] = round(streaming, 1)
    out["matmul_gflops_per_rank_and_run"] = spread([round(r["best"], 1) for r in rates])
    out["teacher_floor_s"] = round(flops / (best * 1e9), 4)
    out["teacher_floor_streaming_s"] = round(flops / (streaming * 1e9), 4)
    for row in out["strategies"].values():
        row["teacher_efficiency"] = round(out["teacher_floor_s"] / row["teacher_s"]["median"], 3)
        row["teacher_efficiency_streaming"] = round(out["teacher_floor_streaming_s"] / row["teacher_s"]["median"], 3)
    sharded = {k: v for k, v in out["strategies"].items() if k != "ddp"}
    out["goals"] = {
        "held_ratio_le_0.55": all(v["held_ratio"] <= 0.55 for v in sharded.values()),
        "peak_ratio_le_0.75": all(v["peak_ratio"] <= 0.75 for v in sharded.values()),
        "planner_within_25pct": all(0.75 <= v["planned_over_peak"] <= 1.25 for v in out["strategies"].values()),
        "best_teacher_efficiency_ge_0.5": max(v["teacher_efficiency"] for v in out["strategies"].values()) >= 0.5,
    }
    emit(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
