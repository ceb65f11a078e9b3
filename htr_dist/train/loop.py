"""The training loop. Reads top to bottom: data, model (or the weights it fine-tunes, ``train.init_from``), wrapping,
resume, steps (with logging, validation, checkpoints and a clean stop on SIGTERM), final checkpoint, export."""

from __future__ import annotations

import logging
import math
import os
import signal
import time
from dataclasses import dataclass, replace
from typing import Optional, Tuple

import numpy as np
import torch
from tqdm import tqdm

from htr_dist.config import save_config, to_dict
from htr_dist.data.alphabet import Alphabet
from htr_dist.data.pipeline import SkipStats, build_eval_loader, build_train_loader, shard_urls, steps_per_epoch
from htr_dist.data.shards import load_manifest, split_lines
from htr_dist.dist import env as dist_env
from htr_dist.dist.strategy import build_strategy, llm_param_bytes_on_rank
from htr_dist.errors import InputError, TrainingDiverged
from htr_dist.models.htr import HTRModel, LossSpec, compute_losses, count_parameters
from htr_dist.models.llm import llm_hidden_size
from htr_dist.train.checkpoint import (CheckpointManager, check_same_model, recorded_alphabet, rng_state,
                                       set_rng_state)
from htr_dist.train.export import BestModel, export_model
from htr_dist.train.init_from import InitSource, finetune_alphabet, init_weights, read_init_source
from htr_dist.train.logger import check_loggers, flat_hparams, make_logger, memory_peak_bytes, sample_figure
from htr_dist.train.metrics import edit_distance, greedy_decode

log = logging.getLogger(__name__)
LOSS_KEYS = ("total", "ctc", "ctc_shortcut", "llm")


@dataclass
class Position:
    """Where training is: optimizer steps done, epoch, and micro-batches already taken from this epoch's stream."""

    step: int = 0
    epoch: int = 0
    micro_in_epoch: int = 0


class StopFlag:
    """Set by SIGTERM (what SLURM sends before preemption); ranks agree on it at step boundaries."""

    def __init__(self):
        self.raised = False
        signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        log.warning("SIGTERM received: stopping at the next step boundary with a checkpoint")
        self.raised = True

    def any_rank(self, *more: bool) -> list:
        """[SIGTERM raised on any rank] + [each of ``more`` true on any rank], agreed in one all-reduce."""
        flags = torch.tensor([float(self.raised)] + [float(m) for m in more])
        return [bool(v) for v in dist_env.all_reduce_max(flags).tolist()]


def total_steps(cfg, manifest: dict, world: int) -> int:
    micro_per_epoch = steps_per_epoch(manifest, world, cfg.train.batch_size)
    return cfg.train.max_steps or cfg.train.num_epochs * max(1, micro_per_epoch // cfg.train.grad_accum)


@torch.no_grad()
def validate(model: HTRModel, cfg, alphabet: Alphabet, env, logger, step: int, show: int = 3,
             split: str = "") -> dict:
    """Greedy CER/WER over a split (default ``data.val_split``), every line once across ranks; a few lines as images
    and text. The validation split logs under ``val/``, any other under its own name."""
    split = split or cfg.data.val_split
    prefix = "val/" if split == cfg.data.val_split else f"{split}/"
    was_training = model.training
    model.eval()
    dist_chars = ref_chars = dist_words = ref_words = lines = 0
    samples = []
    for batch in build_eval_loader(cfg, split, alphabet, env.rank, env.world_size, env.pin_memory):
        hyps = [alphabet.decode(p) for p in greedy_decode(model(batch["images"].to(env.device))["ctc_logits"])]
        for i, (ref, hyp) in enumerate(zip(batch["texts"], hyps)):
            dist_chars += edit_distance(ref, hyp)
            ref_chars += len(ref)
            dist_words += edit_distance(ref.split(), hyp.split())
            ref_words += len(ref.split())
            lines += 1
            if len(samples) < show:
                samples.append((batch["images"][i, 0].numpy(), ref, hyp))
    sums = dist_env.all_reduce_sum(torch.tensor([dist_chars, ref_chars, dist_words, ref_words, lines],
                                                dtype=torch.float64))
    model.train(was_training)
    result = {"step": step, "split": split, "cer": (sums[0] / max(1.0, sums[1])).item(),
              "wer": (sums[2] / max(1.0, sums[3])).item(), "lines": int(sums[4])}
    expected = split_lines(load_manifest(cfg.data.path), split)
    result.update(lines_expected=expected, lines_missing=expected - result["lines"])
    if result["lines_missing"] and result["lines"]:
        log.warning("step %d: %s: only %d of its %d lines could be read: this CER is over part of the split",
                    step, split, result["lines"], expected)
    if result["lines"] == 0:  # every rank knows the sum: all stop together, none waits in a collective
        raise InputError(f"{cfg.data.path}: no line of split {split!r} could be read for validation "
                         f"(see the warnings above); a CER over 0 lines would read as 0%")
    logger.scalars({"cer": result["cer"], "wer": result["wer"]}, step, prefix=prefix)
    for i, (img, ref, hyp) in enumerate(samples):  # the line with its truth and prediction in one picture
        logger.image(f"{prefix}line_{i}", sample_figure(img, ref, hyp), step)
        logger.text(f"{prefix}line_{i}", f"truth: {ref}  \npred: {hyp}", step)  # the same, as text to copy
    log.info("step %d: %s CER %.2f%% WER %.2f%% (%d lines)", step, split, 100 * result["cer"], 100 * result["wer"],
             result["lines"])
    return result


def log_startup(cfg, env, strategy, model: HTRModel) -> None:
    counts = count_parameters(model)
    frozen = count_parameters(strategy.teacher)["frozen"] if strategy.teacher is not None else 0
    held = llm_param_bytes_on_rank(strategy.teacher)
    log.info("world size %d, strategy %s, device %s, backend %s, dtype %s", env.world_size, cfg.dist.strategy,
             env.device, env.backend, env.dtype)
    log.info("parameters: trainable %.2f M (backbone+heads+connector), frozen LLM %.1f M (%s); "
             "LLM bytes held by this rank: %.1f MB", counts["trainable"] / 1e6, frozen / 1e6,
             cfg.llm.name_or_path if strategy.teacher is not None else "off", held / 1e6)
    if strategy.teacher is not None:
        lm_config = strategy.teacher.lm.config
        log.info("LLM dtype %s, attention %s", env.llm_dtype, getattr(lm_config, "_attn_implementation", "?"))


def run_alphabet(cfg, manifest: dict, resume_from: Optional[str]) -> Tuple[Alphabet, Optional[InitSource]]:
    """The run's alphabet, and the weights to start from when fine-tuning (``train.init_from``) a fresh run.

    Without ``init_from`` (or with it, in ``strict`` mode, on resume) the alphabet is the data's. A fine-tuning run
    resumed in ``merge`` mode keeps the union it recorded in its checkpoint, without reading ``init_from`` again."""
    data = manifest["alphabet"]
    if not cfg.train.init_from:
        return Alphabet(data), None
    if resume_from:
        log.info("train.init_from=%s is ignored: resuming from %s", cfg.train.init_from, resume_from)
        recorded = recorded_alphabet(resume_from) if cfg.train.init_alphabet == "merge" else None
        if recorded is None:
            return Alphabet(data), None
        lacking = "".join(c for c in data if c not in recorded)
        if lacking:
            raise InputError(f"train.resume: {resume_from} was trained with an alphabet that lacks {lacking!r} of "
                             f"{cfg.data.path}: the data changed since; start a new run.dir")
        return Alphabet(recorded), None
    source = read_init_source(cfg.train.init_from)
    return finetune_alphabet(source.alphabet, data, cfg.train.init_alphabet, source.path), source


def _rescale_position(pos: Position, saved_world: int, world: int, micro_per_epoch: int) -> Position:
    """The data position of a checkpoint written by ``saved_world`` ranks, for ``world`` ranks: the same share of the
    epoch consumed (each micro-step takes ``world`` batches, one per rank), the next epoch if that share is all of it."""
    micro = pos.micro_in_epoch * saved_world // world
    if micro >= micro_per_epoch:
        return replace(pos, epoch=pos.epoch + 1, micro_in_epoch=0)
    return replace(pos, micro_in_epoch=micro)


def train(cfg, env) -> dict:
    """Run (or resume) training as configured; return the final metrics. Every rank calls this.

    SIGTERM stops the run at the next step boundary with a checkpoint (:class:`StopFlag`) while it trains; the
    process's own SIGTERM handler comes back when it returns, so that a program which trains and then forks (a data
    pool, a test run) does not leave its children unable to be terminated."""
    previous = signal.getsignal(signal.SIGTERM)
    try:
        return _train(cfg, env)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _train(cfg, env) -> dict:
    torch.manual_seed(cfg.train.seed)
    np.random.seed(cfg.train.seed)
    manifest = load_manifest(cfg.data.path)
    for split in [cfg.data.val_split] + cfg.data.extra_val_splits:
        shard_urls(manifest, split)  # a misnamed split is an error now, not after the run has trained
    check_loggers(cfg.run.loggers)  # a logger's missing package too
    steps = total_steps(cfg, manifest, env.world_size)
    micro_per_epoch = steps_per_epoch(manifest, env.world_size, cfg.train.batch_size)
    ckpts = CheckpointManager(cfg.run.dir, cfg.train.keep_last)
    # a fine-tuning run that already wrote checkpoints goes on from them: init_from is only where it began
    resume_from = ckpts.resolve(cfg.train.resume or ("auto" if cfg.train.init_from else ""))
    alphabet, source = run_alphabet(cfg, manifest, resume_from)
    if env.is_main:
        save_config(cfg, os.path.join(cfg.run.dir, "config.yaml"))
    model = HTRModel(cfg.arch, cfg.connector, alphabet.num_classes, cfg.data.img_height, cfg.data.img_width,
                     llm_hidden_size(cfg), env.channels_last)
    if source is not None:  # into the plain model: the strategy wraps (and DeepSpeed broadcasts) loaded weights
        init_weights(model, source, alphabet, cfg)
    strategy = build_strategy(cfg, env, model, steps)
    log_startup(cfg, env, strategy, model)
    sampler = torch.Generator().manual_seed(cfg.train.seed * 1000 + env.rank)  # LLM subset, per rank
    loss_spec = LossSpec.from_config(cfg)
    pos = Position()
    if resume_from:
        check_same_model(resume_from, model_meta(cfg, alphabet))
        state = strategy.load(resume_from)
        pos = Position(**state["position"])
        saved_world = len(state["rng"])
        if saved_world != env.world_size:
            pos = _rescale_position(pos, saved_world, env.world_size, micro_per_epoch)
            log.warning("%s was written by %d rank(s) and this run has %d: training goes on from step %d, but not as "
                        "the uninterrupted run would (this epoch's data order and the ranks' random streams differ)",
                        resume_from, saved_world, env.world_size, pos.step)
        if env.rank < saved_world:  # a rank the checkpoint did not have keeps the fresh seed it got above
            set_rng_state(state["rng"][env.rank], sampler)
        log.info("resumed from %s at step %d (epoch %d, batch %d)", resume_from, pos.step, pos.epoch,
                 pos.micro_in_epoch)
        skipped = state.get("data_skipped")
        skip_stats = SkipStats(skipped[env.rank] if isinstance(skipped, list) and env.rank < len(skipped) else 0)
    else:
        skip_stats = SkipStats()
    best = BestModel(cfg.run.dir, cfg.train.keep_best, env.is_main, bool(resume_from), cfg.data.val_split)
    start_step = pos.step
    logger = make_logger(cfg, env.is_main, resumed=pos.step > 0)
    stop = StopFlag()
    bar = tqdm(total=steps, initial=pos.step, desc="train", unit="step", disable=not (env.is_main and cfg.run.progress),
               dynamic_ncols=True)
    accum = cfg.train.grad_accum
    window = {k: 0.0 for k in LOSS_KEYS + ("llm_s", "data_s", "lines", "llm_steps", "llm_weight")}
    planned_steps = steps  # the LLM weight's schedule spans the planned run, as the learning rate's
    window_steps, window_start = 0, time.time()
    stream = None

    def open_stream(skip: int):
        skip_stats.new_loader()
        return iter(build_train_loader(cfg, alphabet, env.rank, env.world_size, pos.epoch, skip, env.pin_memory))

    model.train()
    val = None
    started = time.time()
    bad_run = skipped_steps = 0
    while pos.step < steps:
        if stream is None:
            stream = open_stream(pos.micro_in_epoch)
        llm_step = loss_spec.llm_step(pos.step)  # the same on every rank
        llm_weight = loss_spec.llm_weight_at(pos.step, planned_steps)
        window["llm_steps"] += float(llm_step)
        window["llm_weight"] += llm_weight if strategy.teacher is not None and loss_spec.use_llm else 0.0
        finite = True
        # a step skipped for a non-finite loss must not keep what its forward passes did to the normalisation
        # layers' running statistics either: they are put back from this copy
        buffers = [(b, b.detach().clone()) for b in strategy.module.buffers() if b.is_floating_point()]
        for micro in range(accum):
            t0 = time.time()
            batch = next(stream)
            window["data_s"] += time.time() - t0
            skip_stats.update(batch)
            batch["images"] = batch["images"].to(env.device, non_blocking=True)
            with strategy.no_sync(micro == accum - 1), env.autocast():
                losses = compute_losses(strategy.model, strategy.teacher, batch, loss_spec, sampler, llm_step=llm_step,
                                        llm_weight=llm_weight)
            strategy.backward(losses["total"])
            for k in LOSS_KEYS:
                window[k] += losses[k].item() / accum
            finite = finite and math.isfinite(losses["total"].item())
            window["llm_s"] += losses["llm_s"]
            window["lines"] += batch["images"].shape[0]
            pos.micro_in_epoch += 1
            if pos.micro_in_epoch >= micro_per_epoch:  # every rank rolls over at the same step
                pos.epoch, pos.micro_in_epoch, stream = pos.epoch + 1, 0, None
                if micro < accum - 1:
                    stream = open_stream(0)
        # one all-reduce a step agrees on SIGTERM, the time budget and a non-finite loss on any rank; a non-finite
        # gradient norm (the same on every rank once the gradients are all-reduced) is the strategy's to skip
        late = bool(cfg.train.max_minutes) and time.time() - started >= 60.0 * cfg.train.max_minutes
        sigterm, late, bad = stop.any_rank(late, not finite)
        lr = strategy.lr()  # the rate this step uses; the schedule moves on inside strategy.step()
        grad_norm = strategy.step(skip=bad)
        pos.step += 1
        window_steps += 1
        bar.update(1)
        if strategy.step_applied:
            bad_run = 0
        else:
            with torch.no_grad():
                for b, saved in buffers:
                    b.copy_(saved)
            bad_run += 1
            skipped_steps += 1
            log.warning("step %d skipped: the loss or the gradient norm is not finite (%d in a row, %d in all)",
                        pos.step, bad_run, skipped_steps)
            if bad_run >= cfg.train.max_bad_steps:
                logger.scalar("train/skipped_steps", skipped_steps, pos.step)
                bar.close()
                logger.close()
                raise TrainingDiverged(
                    f"training diverged: {bad_run} steps in a row up to step {pos.step} had a non-finite loss or "
                    f"gradient norm (train.max_bad_steps={cfg.train.max_bad_steps}); the checkpoints and exports in "
                    f"{cfg.run.dir} are from the last good steps. Lower train.lr or check the data, then resume "
                    "with train.resume=auto")
        if pos.step % cfg.train.log_every == 0 or pos.step == steps:
            _write_window(logger, window, window_steps, time.time() - window_start, grad_norm, lr, env,
                          skip_stats, pos.step, bar)
            logger.scalar("train/skipped_steps", skipped_steps, pos.step)
            window = {k: 0.0 for k in window}
            window_steps, window_start = 0, time.time()
        if cfg.train.eval_every and pos.step % cfg.train.eval_every == 0 and pos.step < steps:
            val = _validate_and_keep_best(strategy.module, cfg, alphabet, env, logger, best, pos.step)
        # stop_after counts this run's steps: a job script that always passes it goes on by that many each time
        stopping = sigterm or (0 < cfg.train.stop_after <= pos.step - start_step and pos.step < steps)
        if late and not stopping and pos.step < steps:
            log.info("train.max_minutes=%g reached at step %d of %d: finishing here", cfg.train.max_minutes,
                     pos.step, steps)
            steps = pos.step  # the run ends now: last checkpoint, validation and export as at the last step
        if stopping or (cfg.train.save_every and pos.step % cfg.train.save_every == 0) or pos.step == steps:
            _save(ckpts, strategy, cfg, alphabet, pos, sampler, skip_stats)
        if stopping:
            log.warning("stopped by %s at step %d; resume with train.resume=auto",
                        "SIGTERM" if stop.raised else "train.stop_after", pos.step)
            bar.close()
            logger.close()
            return {"step": pos.step, "stopped": True}
    bar.close()
    val = _validate_and_keep_best(strategy.module, cfg, alphabet, env, logger, best, pos.step)
    logger.hparams(flat_hparams(to_dict(cfg)), {"hparam/val_cer": val["cer"], "hparam/val_wer": val["wer"]})
    if env.is_main:
        export_model(strategy.module, cfg, alphabet.chars, os.path.join(cfg.run.dir, "model.pt"), val)
        log.info("exported %s", os.path.join(cfg.run.dir, "model.pt"))
    logger.close()
    dist_env.barrier()
    return {"step": pos.step, "stopped": False, "val_cer": val["cer"], "val_wer": val["wer"]}


def _validate_and_keep_best(model, cfg, alphabet, env, logger, best: BestModel, step: int) -> dict:
    for split in cfg.data.extra_val_splits:
        validate(model, cfg, alphabet, env, logger, step, split=split)
    val = validate(model, cfg, alphabet, env, logger, step)
    check_finite_weights(model, step, "export")
    best.offer(model, cfg, alphabet.chars, val)
    if best.validation is not None:
        logger.scalar("val/best_cer", best.validation["cer"], step)
    return val


def model_meta(cfg, alphabet: Alphabet) -> dict:
    """What the trainable weights' shapes depend on: alphabet, input size, architecture, and the connector if any."""
    d = to_dict(cfg)
    arch = {k: v for k, v in d["arch"].items() if k not in ("rnn_dropout", "shortcut_weight")}  # no weight depends on
    meta = {"alphabet": alphabet.chars, "img_height": cfg.data.img_height, "img_width": cfg.data.img_width,
            "arch": arch, "use_llm": cfg.train.use_llm}
    if cfg.train.use_llm:
        meta["connector"] = d["connector"]
    return meta


def check_finite_weights(module, step: int, what: str) -> None:
    """Refuse to write ``what`` from weights that are not all finite (every rank holds the same trainable weights,
    so all refuse together)."""
    bad = [name for name, t in module.state_dict().items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise TrainingDiverged(f"step {step}: {len(bad)} weight tensor(s) are not finite (e.g. {bad[0]}): no {what} "
                               "written; the existing checkpoints and exports are from the last good steps")


def _save(ckpts, strategy, cfg, alphabet, pos: Position, sampler, skip_stats) -> None:
    check_finite_weights(strategy.module, pos.step, "checkpoint")
    client_state = {
        "position": vars(pos).copy(),
        "rng": dist_env.all_gather_objects(rng_state(sampler)),
        "config": to_dict(cfg),
        "alphabet": alphabet.chars,
        "llm": cfg.llm.name_or_path if cfg.train.use_llm else None,
        "data_skipped": dist_env.all_gather_objects(skip_stats.skipped),  # per rank, as "rng"
    }
    ckpts.save(strategy, pos.step, client_state, model_meta(cfg, alphabet))


def _write_window(logger, window, n_steps, seconds, grad_norm, lr, env, skip_stats, step, bar) -> None:
    # the LLM's loss is the mean over the steps that ran it (train.llm_every); the total's over every step
    per_step = {k: window[k] / (max(1.0, window["llm_steps"]) if k == "llm" else n_steps) for k in LOSS_KEYS}
    values = torch.tensor([per_step[k] for k in LOSS_KEYS] + [window["llm_s"] / n_steps,
                          window["data_s"] / n_steps, window["lines"], float(skip_stats.skipped),
                          float(skip_stats.unknown_chars)])
    values = dist_env.all_reduce_mean(values)
    for i, k in enumerate(LOSS_KEYS):
        logger.scalar(f"train/loss_{k}", values[i].item(), step)
    lines_per_s = values[6].item() * env.world_size / max(seconds, 1e-9)
    logger.scalar("train/lr", lr, step)
    if window["llm_weight"]:  # alpha, with a teacher (train.llm_weight_schedule)
        logger.scalar("train/llm_weight", window["llm_weight"] / n_steps, step)
    logger.scalar("train/grad_norm", grad_norm, step)
    logger.scalar("perf/lines_per_s", lines_per_s, step)
    logger.scalar("perf/step_s", seconds / n_steps, step)
    logger.scalar("perf/llm_s", values[4].item(), step)
    logger.scalar("perf/data_wait_s", values[5].item(), step)
    logger.scalar("perf/mem_peak", float(memory_peak_bytes(env.device) or 0), step)
    logger.scalar("data/skipped", values[7].item() * env.world_size, step)
    logger.scalar("data/unknown_chars", values[8].item() * env.world_size, step)
    if not math.isfinite(values[0].item()):
        log.warning("step %d: the loss is not finite (%s)", step, values[0].item())
    bar.set_postfix(loss=f"{values[0].item():.3f}", lines_s=f"{lines_per_s:.1f}")
