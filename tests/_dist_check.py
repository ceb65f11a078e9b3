"""Run by tests/test_train_dist.py under torchrun or the deepspeed launcher (2 CPU ranks, gloo).

Builds the real strategy, feeds the ranks DIFFERENT batch sizes (3 and 5 lines), runs a few optimizer steps and
checks: finite losses, one LLM call per micro-step on every rank (no hang with a 60 s timeout), identical gradients
(ddp/fsdp) and weights across ranks, and an unchanged frozen LLM. Rank 0 writes the findings as JSON.
"""

import json
import sys

import torch

from htr_dist.config import load_config
from htr_dist.dist import env as dist_env
from htr_dist.dist.strategy import build_strategy, llm_param_bytes_full, llm_param_bytes_on_rank
from htr_dist.models.llm import llm_hidden_size
from htr_dist.models.htr import HTRModel, LossSpec, compute_losses


def flat(tensors):
    return torch.cat([t.detach().float().reshape(-1) for t in tensors])


def llm_checksum(teacher) -> float:
    total = torch.zeros(1, dtype=torch.float64)
    for p in teacher.parameters():
        local = p.ds_tensor if hasattr(p, "ds_tensor") else (p.to_local() if hasattr(p, "to_local") else p)
        total += local.detach().double().abs().sum()
    vocab = getattr(teacher, "vocab", None)
    if vocab is not None and vocab.owned:  # FSDP: the split vocabulary's rows, taken out of the model
        for seg in vocab.embed_segments + ([] if vocab.tied else vocab.head):
            total += seg.rows.detach().double().abs().sum()
    if any(hasattr(p, "ds_tensor") or hasattr(p, "to_local") for p in teacher.parameters()):
        total = dist_env.all_reduce_sum(total)  # sharded: add up the ranks' parts
    return float(total)


def main():
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]  # the deepspeed launcher adds it
    try:
        check(args[0], args[1:])
    finally:
        dist_env.destroy()  # after check() returned: the wrapped modules that hold the process group are gone


def check(out_path, overrides):
    cfg = load_config(None, overrides)
    env = dist_env.init_distributed(cfg.dist.timeout_s, use_deepspeed=cfg.dist.strategy == "deepspeed",
                                    precision=cfg.dist.precision, llm_precision=cfg.dist.llm_precision,
                                    memory_format=cfg.dist.memory_format)
    torch.manual_seed(0)
    chars = "abcdefghijklmnopqrstuvwxyz "
    model = HTRModel(cfg.arch, cfg.connector, len(chars) + 1, 32, 256, llm_hidden_size(cfg), env.channels_last)
    strategy = build_strategy(cfg, env, model, total_steps=10)
    before = llm_checksum(strategy.teacher)
    held = llm_param_bytes_on_rank(strategy.teacher)
    full = llm_param_bytes_full(strategy.teacher)
    gen = torch.Generator().manual_seed(env.rank)
    batch_size = 3 + 2 * env.rank  # ranks differ: 3 and 5 lines
    losses_seen, grads_equal, llm_calls = [], [], 0
    for step in range(3):
        texts = ["the cat sat", "on a mat", "ink", "paper line", "zebra"][:batch_size]
        ids = [[chars.index(c) + 1 for c in t] for t in texts]
        batch = {"images": torch.rand(batch_size, 1, 32, 256, generator=gen), "texts": texts,
                 "targets": torch.tensor([i for s in ids for i in s]),
                 "target_lengths": torch.tensor([len(s) for s in ids])}
        losses = compute_losses(strategy.model, strategy.teacher, batch, LossSpec.from_config(cfg), gen)
        llm_calls += 1
        strategy.backward(losses["total"])
        if cfg.dist.strategy != "deepspeed":  # ZeRO-2 keeps reduced gradients partitioned; weights are checked below
            g = flat([p.grad for p in strategy.module.parameters() if p.grad is not None])
            grads_equal.append(all(torch.allclose(g, other) for other in dist_env.all_gather_objects(g)))
        strategy.step()
        losses_seen.append({k: float(losses[k]) for k in ("total", "ctc", "llm")})
    weights = flat(strategy.module.parameters())
    weights_equal = all(torch.equal(weights, w) for w in dist_env.all_gather_objects(weights))
    after = llm_checksum(strategy.teacher)
    calls = dist_env.all_gather_objects(llm_calls)
    shm_calls = strategy.shm_gather_calls()  # all-gathers served through shared memory (dist.shm_allgather)
    if env.is_main:
        with open(out_path, "w") as f:
            json.dump({"losses": losses_seen, "grads_equal": grads_equal, "weights_equal": weights_equal,
                       "llm_before": before, "llm_after": after, "llm_calls": calls, "held": held, "full": full,
                       "shm_calls": shm_calls, "channels_last": model.backbone.channels_last,
                       "teacher_training": strategy.teacher.lm.training, "llm_load": strategy.llm_load,
                       "llm_requires_grad": any(p.requires_grad for p in strategy.teacher.parameters()),
                       "llm_grads": any(p.grad is not None for p in strategy.teacher.parameters()),
                       "llm_dtypes": sorted({str(p.dtype) for p in strategy.teacher.parameters()}),
                       "llm_offload": fsdp_offload_policy(strategy.teacher),
                       "vocab_split": getattr(strategy.teacher, "vocab", None) is not None}, f)


def fsdp_offload_policy(teacher):
    """Name of the offload policy FSDP2 applied to the teacher's root (None when it is not an FSDP module)."""
    get_state = getattr(teacher, "_get_fsdp_state", None)  # FSDPModule; no public accessor for the policy
    group = get_state()._fsdp_param_group if get_state else None
    return type(group.offload_policy).__name__ if group else None


if __name__ == "__main__":
    main()
    dist_env.exit_process(0)
