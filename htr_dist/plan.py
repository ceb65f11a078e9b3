"""A memory plan per rank, computed from the shapes of the models a config builds (meta device), not from a table.

For each strategy and offload setting it adds up, in bytes on one rank's accelerator:
- ``teacher_held``: the frozen LLM's parameters the rank keeps between uses (all of them for ddp, 1/N sharded, none
  when offloaded to the host); ``teacher_offloaded``: the 1/N share an offloading rank keeps in host memory instead,
  not counted in the accelerator's total;
- ``teacher_working``: what a sharded teacher gathers at once: the largest decoder layer twice (the one computing and
  the one prefetched) plus the parameters of the root (final norm; and the embedding unless ``dist.shard_vocab``
  keeps it split, when the exchanged fp32 logits of every rank's scored positions count instead);
- ``teacher_activations``: what the teacher's forward keeps for the backward pass to the prefix, for the lines a step
  sends through it (``batch_size x llm_sample_ratio``), with and without activation checkpointing;
- ``trainable``: the recogniser and connector's fp32 weights, gradients and Adam moments (16 bytes a parameter; the
  gradients and moments divided by N under ZeRO-2), and their activations for the batch, measured by one real fp32
  forward pass of one line of the config's image size (an upper bound where bf16 autocast halves them);
- ``loader``: the batches the data loader workers prefetch.

The activation estimate counts, per decoder layer and token, the tensors a Llama layer saves for its backward pass:
its two norm inputs and outputs, q, k, v, the attention output and its projection (7 x hidden + 2 x kv width), and
the MLP's gate, up, activation and product (4 x intermediate); eager attention also keeps its probabilities (heads x
tokens^2). The vocabulary projection keeps fp32 logits and their gradient for the scored tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List

import torch

from htr_dist.models.vocab import exchange_bytes, split_pays

GIB = 1024 ** 3
HEADROOM_BYTES = 1 * GIB
"""Kept free on every accelerator for the CUDA context, the caching allocator's fragmentation and NCCL buffers."""
PLAN_STRATEGIES = ("ddp", "fsdp", "fsdp_offload", "deepspeed", "deepspeed_offload")


@dataclass
class TeacherShape:
    params: int
    bytes_per_param: int
    largest_layer: int
    root_params: int
    layers: int
    hidden: int
    kv_width: int
    intermediate: int
    heads: int
    vocab: int
    vocab_params: int = 0
    """The embedding's and (if untied) the output projection's parameters: what ``dist.shard_vocab`` keeps split."""


def teacher_shape(cfg, dtype: torch.dtype) -> TeacherShape:
    """The teacher's sizes from its config, built on the meta device (no memory, no weights)."""
    from transformers import AutoModelForCausalLM

    from htr_dist.models.llm import load_llm_config

    config = load_llm_config(cfg.llm.name_or_path, cfg.llm.cache_dir)
    with torch.device("meta"):
        lm = AutoModelForCausalLM.from_config(config, dtype=dtype)
    layers = list(lm.base_model.layers)
    in_layers = {id(p) for layer in layers for p in layer.parameters()}
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return TeacherShape(
        params=sum(p.numel() for p in lm.parameters()),
        bytes_per_param=torch.empty(0, dtype=dtype).element_size(),
        largest_layer=max(sum(p.numel() for p in layer.parameters()) for layer in layers),
        root_params=sum(p.numel() for p in lm.parameters() if id(p) not in in_layers),
        layers=len(layers), hidden=config.hidden_size,
        kv_width=getattr(config, "num_key_value_heads", heads) * head_dim,
        intermediate=config.intermediate_size, heads=heads, vocab=config.vocab_size,
        vocab_params=sum(p.numel() for p in {id(m.weight): m.weight for m in
                                              (lm.get_input_embeddings(), lm.get_output_embeddings())}.values()),
    )


def teacher_activation_bytes(shape: TeacherShape, tokens: int, scored: int, eager: bool, checkpointing: bool) -> int:
    """Bytes the teacher's forward keeps for the backward pass, for one line of ``tokens`` positions."""
    b = shape.bytes_per_param
    per_token = 7 * shape.hidden + 2 * shape.kv_width + 4 * shape.intermediate
    layer = per_token * tokens * b + (shape.heads * tokens * tokens * b if eager else 0)
    stored = (shape.layers * shape.hidden * tokens * b + layer) if checkpointing else shape.layers * layer
    logits = 2 * scored * shape.vocab * 4  # fp32 logits of the scored positions and their gradient
    return stored + logits


def recogniser_numbers(cfg, hidden: int, classes: int = 80) -> Dict[str, int]:
    """Trainable parameters (recogniser + connector) and the activation bytes of one line, from one real forward
    pass on the CPU with the config's image size, summing the tensors autograd saves for backward."""
    from htr_dist.models.htr import HTRModel

    model = HTRModel(cfg.arch, cfg.connector, classes, cfg.data.img_height, cfg.data.img_width, hidden, False)
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    seen: Dict[int, int] = {}

    def pack(t):
        if t.is_floating_point():  # distinct storages only: views of one tensor count once
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    images = torch.rand(1, 1, cfg.data.img_height, cfg.data.img_width)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(images, torch.zeros(1, dtype=torch.long))
        sum(v.float().sum() for v in out.values() if v is not None).backward()
    return {"params": params, "activation_bytes_per_line": sum(seen.values())}


def plan(cfg, gpus_per_node: int, nodes: int, gpu_mem_gb: float, dtype: torch.dtype = torch.bfloat16) -> dict:
    """The per-rank plan of ``cfg`` on ``nodes`` x ``gpus_per_node`` accelerators of ``gpu_mem_gb`` GiB each."""
    world = gpus_per_node * nodes
    shape = teacher_shape(cfg, dtype)
    rec = recogniser_numbers(cfg, shape.hidden)
    b = shape.bytes_per_param
    # visual tokens, BOS, text, its end, and the prompt at most one token per byte (byte-level BPE, as Llama's)
    tokens = cfg.connector.num_queries + cfg.llm.max_text_tokens + 2 + len(cfg.llm.prompt.encode("utf-8"))
    scored = cfg.llm.max_text_tokens + 1  # the text and its end (EOS or a newline: one token each in Llama's)
    eager = cfg.llm.attn_implementation == "eager"
    per_line = {ckpt: teacher_activation_bytes(shape, tokens, scored, eager, ckpt) for ckpt in (False, True)}
    lines = max(1, math.floor(cfg.train.batch_size * cfg.train.llm_sample_ratio + 0.5))
    loader = max(1, cfg.data.num_workers) * 2 * cfg.train.batch_size * cfg.data.img_height * cfg.data.img_width * 4
    capacity = gpu_mem_gb * GIB - HEADROOM_BYTES
    rows: List[dict] = []
    for strategy in PLAN_STRATEGIES:
        whole = shape.params * b
        sharded = strategy != "ddp"
        offload = strategy.endswith("_offload")
        held = 0 if offload else (math.ceil(whole / world) if sharded else whole)
        gathers = sharded and (world > 1 or offload)  # one rank's unsharded teacher has nothing to gather
        # a split vocabulary (dist.shard_vocab) stays with its rows: the root gathers only the final norm, and the
        # exchanged logits (all ranks' scored positions, fp32, forward and backward) are counted instead
        split = gathers and cfg.dist.shard_vocab and split_pays(world, lines, scored, shape.vocab, shape.hidden, b,
                                                               shape.vocab_params == shape.vocab * shape.hidden)
        root = shape.root_params - (shape.vocab_params if split else 0)
        exchange = exchange_bytes(world, lines, scored, shape.vocab) if split else 0
        working = ((2 * shape.largest_layer + root) * b + exchange) if gathers else 0
        zero2 = strategy.startswith("deepspeed") and world > 1
        states = rec["params"] * (4 + (12 / world if zero2 else 12))
        fixed = held + working + states + loader
        row = {"strategy": strategy, "teacher_held": held, "teacher_offloaded": math.ceil(whole / world) if offload else 0,
               "teacher_working": working,
               "trainable_states": int(states), "loader": loader}
        for ckpt in (False, True):
            key = "checkpointing" if ckpt else "no_checkpointing"
            per_batch_line = rec["activation_bytes_per_line"] + cfg.train.llm_sample_ratio * per_line[ckpt]
            activations = lines * per_line[ckpt] + cfg.train.batch_size * rec["activation_bytes_per_line"]
            total = fixed + activations
            room = capacity - fixed
            row[key] = {"teacher_activations_per_line": per_line[ckpt], "activations": int(activations),
                        "total": int(total), "fits": total <= capacity,
                        "max_batch_size": max(0, int(room // per_batch_line)) if room > 0 else 0}
        rows.append(row)
    return {"world": world, "gpu_mem_gb": gpu_mem_gb, "dtype": str(dtype).replace("torch.", ""),
            "teacher": {"name_or_path": cfg.llm.name_or_path, "params": shape.params, "bytes": shape.params * b,
                        "layers": shape.layers, "largest_layer_bytes": shape.largest_layer * b},
            "trainable_params": rec["params"], "recogniser_activation_bytes_per_line": rec["activation_bytes_per_line"],
            "lines_through_teacher": lines, "tokens_per_line": tokens, "capacity_bytes": int(capacity),
            "strategies": rows}


def ddp_refusal(cfg, device_mem_bytes: int, dtype: torch.dtype) -> str:
    """A one-line reason why ``dist.strategy=ddp`` cannot hold the teacher on a rank of ``device_mem_bytes``, or ''
    if it can: ddp keeps the whole teacher on every rank, and this refuses only where that alone (plus the
    accelerator's headroom) is too much."""
    shape = teacher_shape(cfg, dtype)
    need = shape.params * shape.bytes_per_param
    if need + HEADROOM_BYTES <= device_mem_bytes:
        return ""
    return (f"dist.strategy=ddp keeps the whole teacher {cfg.llm.name_or_path} ({shape.params / 1e9:.2f} B "
            f"parameters, {need / GIB:.1f} GiB in {str(dtype).replace('torch.', '')}) on every rank, more than the "
            f"{device_mem_bytes / GIB:.1f} GiB a rank has: use dist.strategy=fsdp or deepspeed "
            f"(launch/plan.py prints what each needs)")


def table(result: dict) -> str:
    """The plan as a Markdown table, GiB per rank."""
    def gib(x):
        return f"{x / GIB:.1f}"

    lines = [f"{result['teacher']['name_or_path']} ({result['teacher']['params'] / 1e9:.2f} B, "
             f"{result['dtype']}) on {result['world']} rank(s) of {result['gpu_mem_gb']:g} GiB; "
             f"{result['lines_through_teacher']} line(s) through the teacher a step, {result['tokens_per_line']} "
             "tokens each", "",
             "| strategy | teacher held | teacher working | trainable states | activations | total | fits | "
             "max batch | total, checkpointing | fits | max batch |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["strategies"]:
        a, c = r["no_checkpointing"], r["checkpointing"]
        lines.append(f"| {r['strategy']} | {gib(r['teacher_held'])} | {gib(r['teacher_working'])} | "
                     f"{gib(r['trainable_states'])} | {gib(a['activations'])} | {gib(a['total'])} | "
                     f"{'yes' if a['fits'] else 'no'} | {a['max_batch_size']} | {gib(c['total'])} | "
                     f"{'yes' if c['fits'] else 'no'} | {c['max_batch_size']} |")
    return "\n".join(lines)
