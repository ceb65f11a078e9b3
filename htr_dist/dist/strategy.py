"""The one place where modules are wrapped for distribution.

The trainable part (backbone, heads, connector) and the frozen LLM teacher are wrapped separately:

- ``ddp``:       trainable under DistributedDataParallel; the LLM replicated on every rank.
- ``fsdp``:      trainable under DDP; the LLM sharded with FSDP2 ``fully_shard`` per decoder layer, then the root
                 (``reshard_after_forward``; optional CPU offload; bf16 parameters on CUDA), built on the meta device
                 and filled with each rank's own rows of the safetensors weights (``dist.fsdp_sharded_load``).
- ``deepspeed``: trainable as a DeepSpeed engine (ZeRO 0/1/2, ``dist.deepspeed_config``); the LLM built under a live
                 ``HfDeepSpeedConfig`` (so it is partitioned while loading) and wrapped as a ZeRO-3 engine without an
                 optimizer (``dist.llm_deepspeed_config``, optionally offloaded). The teacher is that engine's
                 ``.module``: DeepSpeed >= 0.18.3 refuses backward through ``llm_engine(...)`` itself, while the ZeRO-3
                 gather/release hooks live on the module, so gradients still reach the connector.

With ``fsdp`` and ``deepspeed``, CPU ranks that all run on one machine gather the LLM's parameters through shared memory
(``dist.shm_allgather``, htr_dist.dist.cpu.shm_gather) instead of gloo's loopback TCP.

Every strategy exposes the same small API to the training loop: ``model``, ``teacher``, ``backward``, ``step``,
``lr``, ``save`` / ``load`` and ``module`` (the unwrapped trainable model).
"""

from __future__ import annotations

import contextlib
import json
import math
import logging
import os
import time
from typing import Optional

import torch
import torch.nn as nn

from htr_dist import registry
from htr_dist.config import ConfigError, not_one_of
from htr_dist.dist.env import DistEnv, attn_implementation, cpu_settings, env_local_world_size, ranks_share_memory
from htr_dist.models.htr import HTRModel
from htr_dist.train.checkpoint import TRAINER_FILE, deepspeed_safe_globals, safe_load
from htr_dist.models.llm import LineFormat, PrefixLM, build_empty_causal_lm, checkpoint_slices, load_causal_lm, \
    load_tokenizer
from htr_dist.models.vocab import VocabShard, deepspeed_vocab_shard, row_segments, split_pays, take_rows
from htr_dist.train.optim import build_optimizer, build_scheduler

log = logging.getLogger(__name__)


def llm_param_bytes_on_rank(teacher: Optional[nn.Module]) -> int:
    """Bytes of LLM parameters this rank holds on its compute device between steps.

    Shards count only their local part. A ZeRO-3 parameter below the persistence thresholds stays whole on every rank
    (``ds_persist``), so it counts in full on top of its partition.
    """
    if teacher is None:
        return 0
    total = 0
    for p in teacher.parameters():
        local = p.to_local() if hasattr(p, "to_local") else p  # FSDP2 DTensor -> this rank's shard
        if hasattr(p, "ds_tensor"):  # DeepSpeed ZeRO-3: the partition this rank owns
            local = p.ds_tensor
            if getattr(p, "ds_persist", False):
                total += p.ds_numel * p.element_size()
            if local.device.type == "cpu" and p.device.type != "cpu":
                continue
        total += local.numel() * local.element_size()
    vocab = getattr(teacher, "vocab", None)
    if vocab is not None and vocab.owned:  # rows taken out of the model (FSDP): its placeholders are empty
        total += vocab.bytes_on_rank()
    return total


def llm_param_bytes_full(teacher: Optional[nn.Module]) -> int:
    """Bytes of the whole LLM's parameters, however they are sharded (a ZeRO-3 parameter counts its ``ds_numel``)."""
    if teacher is None:
        return 0
    vocab = getattr(teacher, "vocab", None)
    taken = vocab.bytes_full() if vocab is not None and vocab.owned else 0
    return taken + sum(getattr(p, "ds_numel", p.numel()) * p.element_size() for p in teacher.parameters())


def grad_norm(module: nn.Module) -> float:
    """2-norm of all the gradients of ``module``'s trainable parameters (0 when there are none yet)."""
    norms = [torch.linalg.vector_norm(p.grad.float()) for p in module.parameters() if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0


class Strategy:
    """DDP for the trainable part; subclasses decide how the teacher is held."""

    name = "ddp"
    shm_gather = None  # the FSDP shared-memory gatherer, when installed
    llm_load = "whole"  # how each rank got the LLM's weights: "whole" or, with FSDP, "sharded" (its rows only)
    step_applied = True  # whether the last step() changed the weights

    def __init__(self, cfg, env: DistEnv, model: HTRModel, total_steps: int):
        self.cfg, self.env = cfg, env
        self.module = model.to(env.device)
        self.teacher = self.build_teacher() if cfg.train.use_llm else None
        self.model = self.wrap_trainable(self.module)
        self.optimizer = build_optimizer(self.module, cfg.train)
        self.scheduler = build_scheduler(self.optimizer, cfg.train, total_steps)
        self._micro = 0

    # -- building -----------------------------------------------------------------------------------------------
    def load_teacher_lm(self, device: Optional[str] = None):
        """The frozen LLM in ``env.llm_dtype``, on ``device`` (default: this rank's device), and its tokenizer."""
        attn = attn_implementation(self.env.device, self.cfg.llm.attn_implementation, self.env.llm_dtype)
        return load_causal_lm(self.cfg.llm.name_or_path, self.cfg.llm.cache_dir, self.env.llm_dtype, attn,
                              device=device or str(self.env.device))

    def prefix_lm(self, lm: nn.Module, tokenizer) -> PrefixLM:
        """The teacher around ``lm``, with the config's checkpointing and line format."""
        return PrefixLM(lm, tokenizer, self.cfg.llm.gradient_checkpointing, LineFormat.from_config(self.cfg.llm))

    def build_teacher(self) -> nn.Module:
        """A whole teacher on every rank: refused before loading where it cannot fit (:func:`htr_dist.plan.ddp_refusal`)."""
        from htr_dist.plan import ddp_refusal

        reason = ddp_refusal(self.cfg, device_memory_per_rank(self.env.device), self.env.llm_dtype)
        if reason:
            raise ConfigError(reason)
        lm, tokenizer = self.load_teacher_lm()
        return self.prefix_lm(lm, tokenizer)

    def _vocab_split_pays(self, teacher: PrefixLM) -> bool:
        """``dist.shard_vocab`` and a split that needs less memory than the gathered matrix
        (:func:`htr_dist.models.vocab.split_pays`, from the config's lines and the teacher's scored tokens a line)."""
        from htr_dist.models.htr import num_llm_samples

        lm = teacher.lm
        emb, head = lm.get_input_embeddings(), lm.get_output_embeddings()
        if not self.cfg.dist.shard_vocab or head is None:
            return False
        vocab, hidden = getattr(emb.weight, "ds_shape", emb.weight.shape)
        lines = num_llm_samples(self.cfg.train.batch_size, self.cfg.train.llm_sample_ratio)
        scored = teacher.scored_tokens(self.cfg.llm.max_text_tokens)
        pays = split_pays(self.env.world_size, lines, scored, vocab, hidden, emb.weight.element_size(),
                          head.weight is emb.weight)
        if not pays and self.env.world_size > 1:
            log.info("dist.shard_vocab: at %d ranks the split vocabulary's exchange would outweigh the gathered "
                     "matrix; it is gathered", self.env.world_size)
        return pays

    def wrap_trainable(self, module: nn.Module) -> nn.Module:
        if self.env.world_size == 1:
            return module
        ids = [self.env.device.index] if self.env.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(module, device_ids=ids)

    # -- stepping -----------------------------------------------------------------------------------------------
    def no_sync(self, last_micro: bool):
        """Skip the DDP all-reduce on all but the last micro-batch of an accumulated step."""
        if last_micro or not isinstance(self.model, nn.parallel.DistributedDataParallel):
            return contextlib.nullcontext()
        return self.model.no_sync()

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.cfg.train.grad_accum).backward()

    def step(self, skip: bool = False) -> float:
        """Clip, step the optimizer and the schedule, zero the gradients; return the global gradient norm. With
        ``skip`` (every rank passes the same), or a gradient norm that is not finite (the gradients are all-reduced,
        so every rank sees the same), the weights and the optimizer's moments stay as they were: the gradients are
        dropped and only the schedule moves on, as a step that was taken; ``step_applied`` says which it was."""
        params = [p for p in self.module.parameters() if p.requires_grad]
        clip = self.cfg.train.grad_clip if self.cfg.train.grad_clip > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(params, clip)
        skip = skip or not torch.isfinite(norm).item()
        if not skip:
            self.optimizer.step()
        self.step_applied = not skip
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def shm_gather_calls(self) -> int:
        """All-gathers this rank served through shared memory (``dist.shm_allgather``) so far."""
        return self.shm_gather.gather.calls if self.shm_gather is not None else 0

    # -- checkpoints: a folder per checkpoint; rank 0 writes one file ------------------------------------------
    def save(self, folder: str, client_state: dict) -> None:
        if self.env.is_main:
            os.makedirs(folder, exist_ok=True)
            state = dict(client_state, model=self.module.state_dict(), optimizer=self.optimizer.state_dict(),
                         scheduler=self.scheduler.state_dict())
            torch.save(state, os.path.join(folder, TRAINER_FILE))

    def load(self, folder: str) -> dict:
        path = os.path.join(folder, TRAINER_FILE)
        if not os.path.isfile(path):
            raise ConfigError(f"train.resume: {folder}: not a checkpoint of this strategy (no trainer.pt)")
        # on the CPU: the RNG states in it must stay CPU tensors; load_state_dict copies weights and optimizer
        # state to their parameters' device. Tensors and plain values only: nothing in the file can run.
        state = safe_load(path)
        self.module.load_state_dict(state.pop("model"))
        self.optimizer.load_state_dict(state.pop("optimizer"))
        self.scheduler.load_state_dict(state.pop("scheduler"))
        return state


class FSDPStrategy(Strategy):
    """The frozen LLM sharded by FSDP2: each rank keeps 1/N of every decoder layer between uses."""

    name = "fsdp"

    def build_teacher(self) -> nn.Module:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

        if self.env.world_size == 1:
            lm, tokenizer = self.load_teacher_lm()
            return self.prefix_lm(lm, tokenizer)
        slices = None
        if self.cfg.dist.fsdp_sharded_load:
            slices = checkpoint_slices(self.cfg.llm.name_or_path, self.cfg.llm.cache_dir)
            if slices is None:
                log.warning("llm.name_or_path=%s has no safetensors weights: every rank loads the whole LLM, then "
                            "shards it", self.cfg.llm.name_or_path)
        lm = None
        if slices is not None:  # a skeleton: parameters on the meta device, filled after sharding
            attn = attn_implementation(self.env.device, self.cfg.llm.attn_implementation, self.env.llm_dtype)
            lm = build_empty_causal_lm(self.cfg.llm.name_or_path, self.cfg.llm.cache_dir, self.env.llm_dtype, attn)
            slices.base_prefix = lm.base_model_prefix
            unreadable = slices.mismatches(lm)
            if unreadable:
                log.warning("llm.name_or_path=%s: %d weight(s) cannot be read as they are stored (e.g. %s): every "
                            "rank loads the whole LLM through transformers, then shards it", self.cfg.llm.name_or_path,
                            len(unreadable), "; ".join(unreadable[:3]))
                lm = slices = None
        if lm is not None:
            tokenizer = load_tokenizer(self.cfg.llm.name_or_path, self.cfg.llm.cache_dir)
        else:
            lm, tokenizer = self.load_teacher_lm(device="cpu")
        teacher = self.prefix_lm(lm, tokenizer)
        mesh = init_device_mesh(self.env.device.type, (self.env.world_size,))
        kwargs = {"mesh": mesh, "reshard_after_forward": True}
        if self.cfg.dist.fsdp_cpu_offload:
            # pinned host memory speeds the copies to an accelerator; with none, pinning is an error
            kwargs["offload_policy"] = CPUOffloadPolicy(pin_memory=self.env.device.type != "cpu")
        if self.env.device.type == "cuda":
            kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=self.env.llm_dtype, reduce_dtype=torch.float32)
        vocab = self._take_vocab(lm, mesh.get_group()) if self._vocab_split_pays(teacher) else None
        for layer in lm.base_model.layers:
            fully_shard(layer, **kwargs)
        root_kwargs = dict(kwargs, ignored_params={lm.get_input_embeddings().weight,
                                                   lm.get_output_embeddings().weight}) if vocab else kwargs
        fully_shard(teacher, **root_kwargs)
        # A loaded LLM: fully_shard moved each parameter's local shard to the mesh device and freed the full copies.
        # A meta skeleton: its shards are still meta, allocated and read by _fill_shards.
        if slices is not None:
            self._fill_shards(teacher, slices)
            self.llm_load = "sharded"
        if vocab is not None:
            teacher.vocab = self._fill_vocab(*vocab, slices)
        cpu = cpu_settings(self.env.device)
        if self.cfg.dist.shm_allgather and cpu is not None and ranks_share_memory():
            self.shm_gather = cpu.shm_allgather_for_fsdp([*lm.base_model.layers, teacher], mesh.get_group())
        return teacher

    @property
    def _shard_storage(self):
        """Where the teacher's shards live between uses: the CPU with ``dist.fsdp_cpu_offload`` (FSDP2 moves them to
        the device per use), else the rank's device."""
        return "cpu" if self.cfg.dist.fsdp_cpu_offload else self.env.device

    def _take_vocab(self, lm: nn.Module, group):
        """Take the embedding and output projection out of FSDP's hands for a :class:`VocabShard`: note this rank's
        rows (and, for a loaded LLM, copy them), and leave the model empty placeholders in their place, which FSDP
        then ignores. None where that cannot be done: a torch whose ``fully_shard`` has no ``ignored_params``, or an
        output projection with a bias."""
        import inspect

        from torch.distributed.fsdp import fully_shard

        emb, head = lm.get_input_embeddings(), lm.get_output_embeddings()
        if "ignored_params" not in inspect.signature(fully_shard).parameters or head is None \
                or getattr(head, "bias", None) is not None:
            log.info("dist.shard_vocab: this torch or LLM cannot split its vocabulary; FSDP gathers it whole")
            return None
        names = {id(p): name for name, p in lm.named_parameters()}  # a tied weight by its first name, as stored
        tied = head.weight is emb.weight
        rank, world = self.env.rank, self.env.world_size
        taken = []
        for module in (emb,) if tied else (emb, head):
            w = module.weight
            lo, hi = take_rows(w, rank, world)
            rows = None if w.is_meta else w.detach()[lo:hi].clone()
            taken.append((names[id(w)], tuple(w.shape), lo, hi, rows))
        placeholder = nn.Parameter(torch.empty(0, emb.weight.shape[1], dtype=emb.weight.dtype,
                                               device=self._shard_storage),
                                   requires_grad=False)
        emb.weight = placeholder
        head.weight = placeholder if tied else nn.Parameter(placeholder.detach().clone(), requires_grad=False)
        return taken, tied, group

    def _fill_vocab(self, taken, tied: bool, group, slices) -> VocabShard:
        """The :class:`VocabShard` of the rows noted by :meth:`_take_vocab`, read from ``slices`` where the model was
        a meta skeleton."""
        segments = []
        for name, shape, lo, hi, rows in taken:
            if rows is None:
                rows = slices.rows(name, lo, hi, self.env.llm_dtype)
            segments.append(row_segments(rows.to(self._shard_storage), lo, shape[1]))
        vocab, hidden = taken[0][1]
        return VocabShard(segments[0], segments[0] if tied else segments[1], vocab, hidden, self.env.llm_dtype,
                          owned=True, group=group)

    def _fill_shards(self, teacher: PrefixLM, slices) -> None:
        """Give every sharded parameter of the meta-built ``teacher`` this rank's rows, read from the checkpoint.

        FSDP2 shards dim 0 as ``torch.chunk`` does: rank r holds rows [r*c, (r+1)*c) with c = ceil(rows / N). Buffers
        keep the values computed at construction (``to_empty`` would leave them uninitialised), on the compute device
        as ``fully_shard`` puts them, also when CPU offload keeps the shards on the CPU.
        """
        buffers = {(prefix, key): b.detach().clone() for prefix, module in teacher.named_modules()
                   for key, b in module._buffers.items() if b is not None}
        teacher.to_empty(device=self._shard_storage)
        for prefix, module in teacher.named_modules():
            for key in module._buffers:
                if (prefix, key) in buffers:
                    module._buffers[key] = buffers[(prefix, key)].to(self.env.device)
        start = time.time()
        with torch.no_grad():
            for name, p in teacher.lm.named_parameters():  # a tied weight is listed (and read) once
                if not hasattr(p, "to_local"):  # a placeholder of the split vocabulary (_take_vocab)
                    continue
                local = p.to_local()
                lo, hi = take_rows(p, p.device_mesh.get_local_rank(), p.device_mesh.size())
                if local.shape[0] != hi - lo:
                    raise RuntimeError(f"FSDP shard of {name}: {tuple(local.shape)} rows, expected {hi - lo} "
                                       f"(rows {lo}:{hi} of {p.shape[0]})")
                local.copy_(slices.rows(name, lo, hi, local.dtype))
        log.info("LLM shards read from %s in %.1f s (this rank's rows only)", slices.folder, time.time() - start)


class DeepSpeedStrategy(Strategy):
    """Trainable part as a ZeRO 0/1/2 engine; the frozen LLM as a ZeRO-3 engine built partitioned."""

    name = "deepspeed"

    def __init__(self, cfg, env: DistEnv, model: HTRModel, total_steps: int):
        import deepspeed

        self.cfg, self.env = cfg, env
        # DeepSpeed broadcasts parameters as byte views, which needs them contiguous (not channels_last).
        self.module = model.to(env.device, memory_format=torch.contiguous_format)
        cpu = cpu_settings(env.device)
        if cfg.dist.shm_allgather and cpu is not None and ranks_share_memory():
            cpu.shm_allgather_for_deepspeed()
        self.teacher = self.build_teacher() if cfg.train.use_llm else None
        optimizer = build_optimizer(self.module, cfg.train)
        scheduler = build_scheduler(optimizer, cfg.train, total_steps)
        ds_cfg = self.trainable_config()
        self.model, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=self.module, optimizer=optimizer, lr_scheduler=scheduler, config=ds_cfg,
            model_parameters=[p for p in self.module.parameters() if p.requires_grad])
        if cpu is not None:
            cpu.unlink_deepspeed_shm(env.rank)  # at one rank, DeepSpeed has only now made its /dev/shm file

    def _read(self, path: str) -> dict:
        try:
            with open(path, encoding="utf-8") as f:
                return json.load(f)
        except (OSError, json.JSONDecodeError) as err:
            raise ConfigError(f"DeepSpeed config {path}: {err}") from None

    def _batch_keys(self, ds: dict, micro: int, accum: int, bf16: bool) -> dict:
        # The YAML config is the one source of batch sizes: the JSON's values are replaced, never trusted.
        ds = dict(ds)
        ds["train_micro_batch_size_per_gpu"] = micro
        ds["gradient_accumulation_steps"] = accum
        ds["train_batch_size"] = micro * accum * self.env.world_size
        ds.setdefault("steps_per_print", 1 << 30)
        ds.setdefault("wall_clock_breakdown", False)
        ds.setdefault("bf16", {"enabled": bf16})
        return ds

    def trainable_config(self) -> dict:
        # fp32 weights on every device, the step under autocast (dist.precision), as with ddp and fsdp. A bf16 engine
        # would cast the module's own weights to bf16: validation and export, which use the module without the
        # engine, would then get bf16 weights (a dtype error in validation, rounded weights in model.pt), for no
        # memory worth having (the trainable part is ~10-20 M parameters).
        path = self.cfg.dist.deepspeed_config
        ds = self._batch_keys(self._read(path), self.cfg.train.batch_size, self.cfg.train.grad_accum, False)
        for key in ("bf16", "fp16"):
            if ds.get(key, {}).get("enabled"):
                raise ConfigError(f"{path}: {key}.enabled: the trainable part keeps fp32 weights and trains under "
                                  f"autocast; set its precision with dist.precision (now {self.cfg.dist.precision})")
        ds["gradient_clipping"] = self.cfg.train.grad_clip
        ds.pop("optimizer", None)  # the optimizer and schedule come from train.* (build_optimizer)
        ds.pop("scheduler", None)
        if ds.get("zero_optimization", {}).get("stage", 0) >= 3:
            raise ConfigError(f"{self.cfg.dist.deepspeed_config}: the trainable part takes ZeRO stage 0, 1 or 2")
        return ds

    def build_teacher(self) -> nn.Module:
        import deepspeed
        from transformers.integrations import HfDeepSpeedConfig

        ds = self._batch_keys(self._read(self.cfg.dist.llm_deepspeed_config), 1, 1,
                              self.env.llm_dtype == torch.bfloat16)
        if ds.get("zero_optimization", {}).get("stage") != 3:
            raise ConfigError(f"{self.cfg.dist.llm_deepspeed_config}: the LLM config must use ZeRO stage 3")
        # A live HfDeepSpeedConfig makes from_pretrained build the model under zero.Init: parameters are
        # partitioned as they load, so no rank ever holds the whole LLM.
        self._hf_ds = HfDeepSpeedConfig(ds)
        lm, tokenizer = self.load_teacher_lm()
        teacher = self.prefix_lm(lm, tokenizer)
        engine, *_ = deepspeed.initialize(model=teacher, config=ds)
        self.llm_engine = engine
        if self._vocab_split_pays(teacher):
            teacher.vocab = deepspeed_vocab_shard(lm)
        return engine.module

    def no_sync(self, last_micro: bool):
        return contextlib.nullcontext()  # the engine accumulates itself (gradient_accumulation_steps)

    def backward(self, loss: torch.Tensor) -> None:
        # The engine scales by 1/grad_accum itself and wants step() after EVERY micro-batch (it only updates the
        # weights at accumulation boundaries); the boundary step is left to step() so the loop reads the same.
        boundary = self.model.is_gradient_accumulation_boundary()
        self.model.backward(loss)
        if not boundary:
            self.model.step()

    def step(self, skip: bool = False) -> float:
        # ZeRO 1/2 report the norm they clip with; at stage 0 the engine clips without keeping it, so measure it here
        # (the gradients are already averaged over the ranks) rather than log a made-up value.
        stage0 = self.model.zero_optimization_stage() == 0
        own = grad_norm(self.module) if stage0 else None
        skip = skip or (own is not None and not math.isfinite(own))
        if skip and stage0:
            # the engine's step without the optimizer's: it still drops the gradients and moves the schedule on
            opt = self.model.optimizer
            own_attr = vars(opt).get("step")  # torch's LR scheduler wraps an optimizer's step on the instance
            opt.step = lambda *a, **k: None
            try:
                self.model.step()
            finally:
                if own_attr is not None:
                    opt.step = own_attr
                else:
                    del opt.step
        else:
            # ZeRO 1/2 skip a step with a non-finite gradient norm themselves (fp32 weights): the engine says so
            self.model.step()
        self.step_applied = not skip and getattr(self.model, "_step_applied", True)
        norm = self.model.get_global_grad_norm()
        if norm is None:
            norm = own if own is not None else float("nan")
        return float(norm)

    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def shm_gather_calls(self) -> int:
        from deepspeed import comm as ds_comm

        return sum(g.calls for g in (getattr(ds_comm.comm.cdb, "_htr_shm", None) or {}).values())

    def save(self, folder: str, client_state: dict) -> None:
        parent, tag = os.path.split(folder)
        self.model.save_checkpoint(parent, tag=tag, client_state=client_state, save_latest=False,
                                   exclude_frozen_parameters=True)

    def load(self, folder: str) -> dict:
        parent, tag = os.path.split(folder)
        # DeepSpeed reads every file of a checkpoint through its checkpoint engine, with weights_only=False: read
        # them with weights_only=True instead, so that nothing in them can run
        allowed = deepspeed_safe_globals()  # plain records in ZeRO's optimizer states
        engine = self.model.checkpoint_engine
        engine.load = lambda path, map_location=None: safe_load(path, map_location or "cpu", allowed)
        try:
            _, client_state = self.model.load_checkpoint(parent, tag=tag, load_module_strict=False,
                                                         load_optimizer_states=True, load_lr_scheduler_states=True)
        finally:
            del engine.load
        if client_state is None:
            raise ConfigError(f"train.resume: {folder}: not a DeepSpeed checkpoint")
        return client_state


def build_strategy(cfg, env: DistEnv, model: HTRModel, total_steps: int) -> Strategy:
    """The strategy ``dist.strategy`` names in :data:`htr_dist.registry.STRATEGIES`, built between the CPU
    allocator's load and step phases."""
    try:
        cls = registry.resolve(registry.STRATEGIES[cfg.dist.strategy])
    except KeyError:
        raise ConfigError(not_one_of("dist.strategy", cfg.dist.strategy)) from None
    cpu = cpu_settings(env.device)
    if cpu is not None:
        cpu.tune_allocator("load")
    strategy = cls(cfg, env, model, total_steps)
    if cpu is not None:
        sharded = strategy.teacher is not None and strategy.name != "ddp"
        cpu.tune_allocator("step", gathers_large_teacher=sharded and llm_param_bytes_full(strategy.teacher)
                           >= cpu.LARGE_GATHERED_TEACHER_BYTES)
    return strategy


def device_memory_per_rank(device: torch.device) -> int:
    """Bytes one rank may use: the accelerator's memory, or on the CPU the machine's RAM shared by its local ranks."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return ram // max(1, env_local_world_size())


