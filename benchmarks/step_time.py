"""Seconds per full training step (forward, losses, backward, AdamW step) of several model configurations on the CPU.

All configurations are built once and stepped round robin (one step of each in turn), so machine noise hits all of
them alike. Prints one JSON object: min / median / max seconds per configuration, ``llm_overhead`` (median of
``llm_sampled`` over median of ``no_llm``) and ``llm_overhead_paired`` (min / median / max of the same ratio taken
within each round, which cancels the machine's slow drift), parameter counts and forward MACs per line (FLOPs / 2,
counted by ``torch.utils.flop_counter.FlopCounterMode``). ``--memory-format auto,channels_last,contiguous`` adds the
three models without LLM in the other layouts, with ``<case>_<format>_paired_ratio`` (their step over the first
layout's, per round); ``--precision fp32,bf16`` likewise adds them under bf16 autocast (as ``dist.precision``), with
``<case>_bf16_paired_ratio`` and ``seed_hybrid_bf16_vs_seed_code_paired`` (the seed's own step stays in fp32, as it
ships, unless ``--seed-precision bf16``).

``llm_overhead_floor`` is the overhead the LLM path could not go below on this CPU: the no-LLM step plus the path's
own arithmetic (the connector's forward and backward, the frozen LLM's forward and its input-gradient backward, from
the counted MACs) done at ``matmul_gflops``, the best rate this CPU reached in the same run on one of the LLM's
matmuls (its token rows by its MLP's first weight, in the teacher's dtype). Everything else the path costs (norms,
activations, attention, moving data) is not in it, so a real step can only be slower.

The goals compare our steps with the seed system's own, timed on one machine. ``seed_code`` and ``seed_code_llm`` run
the seed's step (restated in ``_seed_code.py``) at its configuration, without and with its LLM path, in the same
rounds, so the ratios can be judged on any machine: ``seed_hybrid_vs_seed_code_paired`` (ours at the seed's
configuration over the seed's, per round; the goal is at most 0.8) and ``seed_code_llm_overhead_paired`` (the seed's
LLM overhead, to read next to ``llm_overhead_paired``).

    .venv/bin/python benchmarks/step_time.py --steps 5 --warmup 1

Strategy mode times the real training script instead: ``perf/step_s`` of launch/train.py for each ``--strategy`` at
1 rank and at ``--nproc`` ranks (torchrun, or the deepspeed launcher for ``deepspeed``), and their ratio:

    .venv/bin/python benchmarks/step_time.py --strategy ddp fsdp deepspeed --nproc 2 --data shards/demo \\
        --config configs/demo.yaml --steps 5 --warmup 2 --repeats 2 [key=value ...]
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from htr_dist.config import ArchConfig, ConnectorConfig, LLMConfig, TrainConfig
from htr_dist.dist import env as dist_env
from htr_dist.dist.env import launcher_command
from htr_dist.models.htr import HTRModel, LossSpec, compute_losses, count_parameters, num_llm_samples
from htr_dist.train.optim import build_optimizer

from _macs import forward_macs  # benchmarks/, first on sys.path when run as a script
from _report import reserve_stdout, spread
from _seed_code import SeedCodeCase

REFERENCE_CFG = [[2, 64], "M", [3, 128], "M", [2, 256]]
SEED_CFG = [[2, 64], "M", "mobilevit1", [4, 128], "M", "mobilevit2", [4, 256]]
CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,;:'\"!?()-#&*+/"  # 79 chars, as IAM


def english_lines(count: int, line_chars: int, seed: int = 0) -> list:
    """Lines of real English prose (Python's own docs, shipped with Python) of about ``line_chars`` characters.

    Real words matter: the LLM's cost grows with the token count, and random letters take ~4x the tokens of prose.
    """
    from pydoc_data.topics import topics

    words = [w for w in " ".join(topics[k] for k in sorted(topics)).split() if all(c in CHARS for c in w)]
    start = random.Random(seed).randrange(len(words) - 100 * count)
    lines, current = [], []
    for word in words[start:]:
        if len(current) and len(" ".join(current + [word])) > line_chars:
            lines.append(" ".join(current))
            current = []
            if len(lines) == count:
                return lines
        current.append(word)
    raise ValueError("not enough text")


def make_batch(batch: int, height: int, width: int, line_chars: int, seed: int = 0) -> dict:
    """Random images with English transcriptions of about ``line_chars`` characters (an IAM line has ~43)."""
    texts = english_lines(batch, line_chars, seed)
    ids = [[CHARS.index(c) + 1 for c in t] for t in texts]
    return {
        "images": torch.rand(batch, 1, height, width, generator=torch.Generator().manual_seed(seed)),
        "targets": torch.tensor([i for row in ids for i in row], dtype=torch.long),
        "target_lengths": torch.tensor([len(row) for row in ids], dtype=torch.long),
        "texts": texts,
        "keys": [f"line-{i}" for i in range(batch)],
    }


def load_teacher(name: str, cache_dir: str, dtype: torch.dtype = torch.float32, attn: str = "sdpa"):
    """The frozen PrefixLM teacher (SmolLM2-135M by default) with its weights in ``dtype``, in the config's default
    line layout."""
    from htr_dist.config import LLMConfig
    from htr_dist.models.llm import LineFormat, PrefixLM, load_causal_lm

    lm, tokenizer = load_causal_lm(name, cache_dir, dtype=dtype, attn_implementation=attn)
    return PrefixLM(lm, tokenizer, line_format=LineFormat.from_config(LLMConfig())).eval()


class Case:
    """One configuration: its model, optimizer and (optional) teacher; ``step()`` returns the seconds taken."""

    def __init__(self, name: str, cnn_cfg, args, teacher=None, ratio: float = 0.125, channels_last: bool = True,
                 dtype: torch.dtype = torch.float32):
        self.name, self.teacher = name, teacher
        self.env = dist_env.DistEnv(0, 1, 0, torch.device("cpu"), "gloo", dtype)  # for its autocast, as training's
        torch.manual_seed(0)
        self.arch = ArchConfig(cnn_cfg=cnn_cfg)
        self.train_cfg = TrainConfig(use_llm=teacher is not None, llm_sample_ratio=ratio)
        hidden = teacher.hidden_size if teacher is not None else None
        connector = ConnectorConfig(num_queries=args.num_queries or ConnectorConfig().num_queries)
        self.model = HTRModel(self.arch, connector, len(CHARS) + 1, args.height, args.width, hidden,
                              channels_last).train()
        self.opt = build_optimizer(self.model, self.train_cfg)  # what training uses
        self.generator = torch.Generator().manual_seed(0)
        self.times: list = []
        self.loss_spec = LossSpec(use_llm=teacher is not None, llm_sample_ratio=ratio)

    def step(self, batch: dict) -> float:
        start = time.perf_counter()
        with self.env.autocast():  # fp32 weights; the recurrence and CTC run in fp32
            losses = compute_losses(self.model, self.teacher, batch, self.loss_spec, self.generator)
        self.opt.zero_grad(set_to_none=True)
        losses["total"].backward()
        self.opt.step()
        return time.perf_counter() - start

    def report(self, args, batch: dict) -> dict:
        params = count_parameters(self.model)
        one = {k: v[:1] if k != "targets" else v[: int(batch["target_lengths"][0])] for k, v in batch.items()}
        self.model.eval()
        out = {
            "params_trainable": params["trainable"],
            "macs_per_line": forward_macs(self.model, lambda: self.model(one["images"])),
        }
        if self.teacher is not None:
            k = num_llm_samples(args.batch, self.train_cfg.llm_sample_ratio)
            # connector + frozen LLM, per line sent to the LLM (the recogniser's MACs are in macs_per_line)
            ids, mask = self.teacher.tokenize(one["texts"], self.loss_spec.max_text_tokens)
            with torch.no_grad():
                feats = self.model.head(self.model.backbone(one["images"]))[2]  # the tap feature, (1, T, tap_dim)
            out["llm_lines_per_step"] = k
            out["params_frozen_llm"] = count_parameters(self.teacher)["frozen"]
            connector = self.model.connector
            out["connector_macs_per_llm_line"] = forward_macs(connector, lambda: connector(feats))
            tokens = self.model.connector(feats).detach()
            out["llm_macs_per_llm_line"] = forward_macs(self.teacher, lambda: self.teacher(tokens, ids, mask))
            out["llm_tokens_per_llm_line"] = tokens.shape[1] + ids.shape[1]  # the visual prefix, then the text
        self.model.train()
        return out


def matmul_gflops(rows: int, inner: int, cols: int, dtype: torch.dtype, seconds: float = 1.0) -> float:
    """The best rate (GFLOP/s) of ``(rows, inner) @ (inner, cols)`` on this CPU over ``seconds`` of repeats."""
    a, w = torch.randn(rows, inner, dtype=dtype), torch.randn(cols, inner, dtype=dtype)
    for _ in range(3):  # oneDNN picks and caches its kernel on the first calls
        torch.nn.functional.linear(a, w)
    best, end = float("inf"), time.perf_counter() + seconds
    while time.perf_counter() < end:
        start = time.perf_counter()
        torch.nn.functional.linear(a, w)
        best = min(best, time.perf_counter() - start)
    return 2 * rows * inner * cols / best / 1e9


def llm_floor(report: dict, teacher, rows: int, no_llm_s: float) -> dict:
    """``matmul_gflops``, the LLM path's GFLOP per step and ``llm_overhead_floor`` (see the module docstring).

    A frozen layer's backward computes only its input's gradient, as many MACs as its forward; the connector trains,
    so its backward also computes its weights' gradients: twice its forward."""
    k = report["llm_lines_per_step"]
    gflop = 2 * k * (2 * report["llm_macs_per_llm_line"] + 3 * report["connector_macs_per_llm_line"]) / 1e9
    config = teacher.lm.config
    rate = matmul_gflops(rows, config.hidden_size, config.intermediate_size, teacher.lm.dtype)
    return {"matmul_gflops": rate, "llm_path_gflop_per_step": gflop,
            "llm_overhead_floor": (no_llm_s + gflop / rate) / no_llm_s}


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``bfloat16``, as the report names dtypes."""
    return str(dtype).replace("torch.", "")


def paired_ratio(times: list, base: list) -> dict:
    """Min / median / max of ``times[i] / base[i]``: steps of one round ran back to back, so drift cancels."""
    return spread([a / b for a, b in zip(times, base)])


def _train_step_seconds(args, strategy: str, nproc: int) -> list:
    """Run launch/train.py for warm-up + steps optimizer steps; the per-step seconds it logged after the warm-up."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with tempfile.TemporaryDirectory(prefix=f"step-{strategy}-{nproc}-") as run_dir:
        train = [os.path.join(root, "launch", "train.py"), "--config", args.config, f"data.path={args.data}",
                 f"run.dir={run_dir}", f"dist.strategy={strategy}", f"train.max_steps={args.warmup + args.steps}",
                 "train.log_every=1", "train.eval_every=0", "train.save_every=0", "run.progress=false"]
        cmd = launcher_command("deepspeed" if strategy == "deepspeed" else "torchrun", nproc)
        subprocess.run(cmd + train + args.overrides, check=True, stdout=sys.stderr, stderr=sys.stderr)
        acc = EventAccumulator(os.path.join(run_dir, "tb"))
        acc.Reload()
        return [e.value for e in acc.Scalars("perf/step_s")][args.warmup:]


def strategy_mode(args) -> dict:
    """Seconds per optimizer step of the real training script, per strategy, at 1 rank and at ``nproc`` ranks."""
    if not args.data:
        raise SystemExit("--strategy needs --data SHARD_FOLDER")
    out = {"config": args.config, "nproc": args.nproc, "steps": args.steps, "repeats": args.repeats,
           "overrides": args.overrides}
    times = {(s, n): [] for s in args.strategy for n in (1, args.nproc)}
    for r in range(args.repeats):  # round robin over runs, so machine noise hits every configuration alike
        for strategy, n in times:
            print(f"repeat {r + 1}/{args.repeats}: {strategy} at {n} rank(s)", file=sys.stderr, flush=True)
            times[strategy, n] += _train_step_seconds(args, strategy, n)
    for strategy in args.strategy:
        entry = {}
        for n in (1, args.nproc):
            t = times[strategy, n]
            entry[f"{n}_ranks"] = {"min_s": min(t), "median_s": statistics.median(t), "max_s": max(t)}
        entry["ratio"] = entry[f"{args.nproc}_ranks"]["median_s"] / entry["1_ranks"]["median_s"]
        out[strategy] = entry
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=5, help="timed steps per configuration")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per configuration first")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--height", type=int, default=128)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--line-chars", type=int, default=45, help="characters per synthetic transcription")
    parser.add_argument("--llm", default=LLMConfig().name_or_path, help="teacher for the llm_* cases ('' = skip)")
    parser.add_argument("--llm-cache", default=LLMConfig().cache_dir)
    parser.add_argument("--num-queries", type=int, default=0, help="connector.num_queries (0 = the default)")
    parser.add_argument("--precision", default="fp32",
                        help="our cases' autocast, as dist.precision (default: fp32; bf16_native = bf16 where the CPU "
                             "computes it natively); a comma-separated list adds <case>_<precision> cases of the "
                             "models without LLM for the others, and their per-round ratio to the first")
    parser.add_argument("--seed-precision", choices=["fp32", "bf16"], default="fp32",
                        help="the seed's own step (seed_code*): fp32 as it ships (default), or under bf16 autocast")
    parser.add_argument("--llm-precision", default="auto",
                        help="the teacher's weights and compute, as dist.llm_precision (default: auto, which follows "
                             "--precision); a comma-separated list adds llm_sampled_llm_<precision>[_<attn>] cases "
                             "for the others, with each --llm-attn")
    parser.add_argument("--llm-attn", default="auto",
                        help="the teacher's attention, as llm.attn_implementation (default: auto, sdpa on the CPU); "
                             "a comma-separated list adds llm_sampled[_llm_<precision>]_<attn> cases for the others")
    parser.add_argument("--memory-format", default="auto",
                        help="the backbone's layout, as dist.memory_format (default: auto); a comma-separated list "
                             "adds <case>_<format> cases of the models without LLM for the others, and their "
                             "per-round ratio to the first")
    parser.add_argument("--only", default="", help="comma-separated subset of case names")
    parser.add_argument("--strategy", nargs="+", default=None, choices=["ddp", "fsdp", "deepspeed"],
                        help="strategy mode: time launch/train.py per strategy at 1 rank and at --nproc ranks")
    parser.add_argument("--nproc", type=int, default=2, help="ranks for the strategy mode (default: 2)")
    parser.add_argument("--repeats", type=int, default=1, help="strategy mode: runs per configuration, round robin")
    parser.add_argument("--data", default="", help="strategy mode: shard folder to train on")
    parser.add_argument("--config", default="configs/demo.yaml", help="strategy mode: training config")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="strategy mode: extra config overrides")
    args = parser.parse_args(argv)
    emit = reserve_stdout()
    if args.strategy:
        emit(strategy_mode(args))
        return
    torch.set_num_threads(args.threads)

    cpu = torch.device("cpu")
    precisions = args.precision.split(",")
    dtypes = {p: dist_env.pick_dtype(cpu, p) for p in precisions}  # checked as training does
    # the teacher's dtype and attention, resolved and checked as training does (an unknown name is an error naming
    # the key): llm_sampled runs the first of each list, llm_sampled[_llm_<precision>][_<attn>] every other pair
    only = set(filter(None, args.only.split(",")))
    llm_precisions = args.llm_precision.split(",")
    llm_dtypes = {p: dist_env.pick_llm_dtype(cpu, dtypes[precisions[0]], p) for p in llm_precisions}
    llm_dtype = llm_dtypes[llm_precisions[0]]
    attn_asked = args.llm_attn.split(",")
    first_attn = dist_env.attn_implementation(cpu, attn_asked[0], llm_dtype)
    teacher_specs = {}
    for i, p in enumerate(llm_precisions):
        for j, a in enumerate(attn_asked):
            attn = dist_env.attn_implementation(cpu, a, llm_dtypes[p])
            suffix = (f"_llm_{p}" if i else "") + (f"_{attn}" if j else "")
            if suffix and (not only or f"llm_sampled{suffix}" in only):
                teacher_specs[suffix] = (llm_dtypes[p], attn)
    dist_env.cpu_settings(torch.device("cpu")).tune_allocator("load")  # load, then step, as training does (htr_dist.dist.strategy.build_strategy)
    teacher = load_teacher(args.llm, args.llm_cache, llm_dtype, first_attn) if args.llm else None
    others = {suffix: load_teacher(args.llm, args.llm_cache, *spec) for suffix, spec in teacher_specs.items()
              if args.llm}
    dist_env.cpu_settings(torch.device("cpu")).tune_allocator("step")
    formats = args.memory_format.split(",")
    layouts = {f: dist_env.pick_channels_last(cpu, f) for f in formats}  # checked as training does
    first, dtype = layouts[formats[0]], dtypes[precisions[0]]
    plain = [("reference_cnn", REFERENCE_CFG), ("no_llm", ArchConfig().cnn_cfg), ("seed_hybrid", SEED_CFG)]
    specs = [
        *[(name, cfg, None, 0.125, first, dtype) for name, cfg in plain],
        ("llm_sampled", ArchConfig().cnn_cfg, teacher, 0.125, first, dtype),
        *[(f"llm_sampled{suffix}", ArchConfig().cnn_cfg, t, 0.125, first, dtype) for suffix, t in others.items()],
        ("llm_all", ArchConfig().cnn_cfg, teacher, 1.0, first, dtype),
        *[(f"{name}_{f}", cfg, None, 0.125, layouts[f], dtype) for f in formats[1:] for name, cfg in plain],
        *[(f"{name}_{p}", cfg, None, 0.125, first, dtypes[p]) for p in precisions[1:] for name, cfg in plain],
    ]
    specs = [s for s in specs if (not only or s[0] in only) and (s[2] is not None or not s[0].startswith("llm"))]
    cases = [Case(*spec[:2], args, *spec[2:]) for spec in specs]
    # the seed's own step at its configuration, without and with its LLM path: the baselines of the goals
    llm_lines = num_llm_samples(args.batch, 0.125)
    seed_specs = [("seed_code", None, 0), ("seed_code_llm", teacher, llm_lines)]
    cases += [SeedCodeCase(name, SEED_CFG, len(CHARS) + 1, t, n, args.seed_precision == "bf16")
              for name, t, n in seed_specs
              if (not only or name in only) and (n == 0 or t is not None)]
    batch = make_batch(args.batch, args.height, args.width, args.line_chars)
    reports = {case.name: case.report(args, batch) for case in cases}  # first: a failure here costs no timing run

    for i in range(args.warmup + args.steps):
        for case in cases:  # round robin: noise is shared out evenly
            seconds = case.step(batch)
            if i >= args.warmup:
                case.times.append(seconds)
        print(f"round {i + 1}/{args.warmup + args.steps}: "
              + ", ".join(f"{c.name} {c.times[-1]:.2f}s" if c.times else f"{c.name} (warm-up)" for c in cases),
              file=sys.stderr)

    result = {"batch": args.batch, "height": args.height, "width": args.width, "threads": args.threads,
              "steps": args.steps, "warmup": args.warmup, "llm": args.llm or None,
              "precision": dtype_name(dtype), "seed_precision": args.seed_precision,
              "llm_precision": dtype_name(llm_dtype), "llm_attn": first_attn,
              **{f"llm_sampled{suffix}_llm": f"{dtype_name(d)} {a}" for suffix, (d, a) in teacher_specs.items()},
              "memory_format": "channels_last" if first else "contiguous"}
    for case in cases:
        result[f"{case.name}_s"] = statistics.median(case.times)
        result[case.name] = {"min_s": min(case.times), "median_s": statistics.median(case.times),
                             "max_s": max(case.times), **reports[case.name]}
    by_name = {case.name: case.times for case in cases}
    for suffix in ["", *teacher_specs]:
        sampled = by_name.get(f"llm_sampled{suffix}")
        if sampled and "no_llm" in by_name:
            result[f"llm_overhead{suffix}"] = statistics.median(sampled) / statistics.median(by_name["no_llm"])
            # the same ratio taken within each round, where both cases ran back to back: slow drift of the machine
            # (other tenants, thermal state) cancels, which the ratio of the two medians does not do
            result[f"llm_overhead{suffix}_paired"] = paired_ratio(sampled, by_name["no_llm"])
    if "llm_sampled" in by_name and "no_llm" in by_name:  # what the teacher's arithmetic alone would cost
        sampled = reports["llm_sampled"]
        rows = sampled["llm_lines_per_step"] * sampled["llm_tokens_per_llm_line"]
        result.update(llm_floor(sampled, teacher, rows, result["no_llm_s"]))
    if "seed_hybrid" in by_name and "seed_code" in by_name:  # the goal: at most 0.8
        result["seed_hybrid_vs_seed_code_paired"] = paired_ratio(by_name["seed_hybrid"], by_name["seed_code"])
    if "seed_code_llm" in by_name and "seed_code" in by_name:  # the seed's own LLM overhead, next to ours
        result["seed_code_llm_overhead_paired"] = paired_ratio(by_name["seed_code_llm"], by_name["seed_code"])
    for variant in formats[1:] + precisions[1:]:
        for name, _ in plain:
            if f"{name}_{variant}" in by_name and name in by_name:  # this layout's or precision's step over the first
                result[f"{name}_{variant}_paired_ratio"] = paired_ratio(by_name[f"{name}_{variant}"], by_name[name])
    for p in precisions[1:]:
        if f"seed_hybrid_{p}" in by_name and "seed_code" in by_name:
            result[f"seed_hybrid_{p}_vs_seed_code_paired"] = paired_ratio(by_name[f"seed_hybrid_{p}"],
                                                                          by_name["seed_code"])
    emit(result)


if __name__ == "__main__":
    main()
