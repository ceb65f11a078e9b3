"""Training runs as experiments: train a config through the launcher its strategy needs, score its export on shard
splits, read its validation curves from TensorBoard; and the statistics of comparisons paired by seed.

Used by ``launch/compare.py`` (arms x seeds, one command) and ``benchmarks/unseen_styles.py``. A run lives in one
folder: the training run itself (``run.dir``), ``spec.json`` (what it was asked to be, written first),
``train.json`` (its training time, written when training finished), ``<split>_scores.json`` (one per evaluated
split) and ``train.log`` (everything its ranks printed).
"""

from __future__ import annotations

import json
import math
import os
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

from htr_dist.config import load_config, parse_override
from htr_dist.dist.env import launcher_command
from htr_dist.errors import InputError
from htr_dist.io_utils import atomic_write_json

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Two-sided 95% quantiles of Student's t by degrees of freedom; a df between two rows takes the lower row's
# (larger) quantile, so an interval is never narrower than it should be.
_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
         11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093,
         20: 2.086, 25: 2.060, 30: 2.042, 40: 2.021, 60: 2.000, 120: 1.980}
_ARM_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def t_quantile_975(df: int) -> float:
    """The 0.975 quantile of Student's t with ``df`` degrees of freedom (1.960 beyond the table)."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    return _T975[max(k for k in _T975 if k <= df)] if df <= 120 else 1.960


def mean_std(values: Sequence[float]) -> dict:
    """Mean and sample standard deviation (0 for a single value) of repeated measurements."""
    values = list(values)
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values)}


def paired_difference(base: Sequence[float], other: Sequence[float]) -> dict:
    """``other - base`` paired by seed: mean, 95% confidence interval (Student's t over the seeds; None for one
    seed), and the mean difference relative to the base's mean (negative = ``other`` has the lower error)."""
    if len(base) != len(other) or not base:
        raise ValueError(f"paired values: expected two equal non-empty lists, got {len(base)} and {len(other)}")
    diffs = [b - a for a, b in zip(base, other)]
    mean = statistics.fmean(diffs)
    if len(diffs) > 1:
        half = t_quantile_975(len(diffs) - 1) * statistics.stdev(diffs) / math.sqrt(len(diffs))
        low, high = mean - half, mean + half
    else:
        low = high = None
    base_mean = statistics.fmean(base)
    return {"mean": mean, "ci95": [low, high] if low is not None else None, "n": len(diffs),
            "relative": mean / base_mean if base_mean else None,
            "excludes_zero": low is not None and (low > 0 or high < 0)}


@dataclass
class Arm:
    """One setting of a comparison: a name and the config overrides that make it."""

    name: str
    overrides: List[str] = field(default_factory=list)


def parse_arm(text: str) -> Arm:
    """``NAME:key=value[,key=value ...]`` (or the overrides separated by spaces) into an :class:`Arm`. Commas inside
    brackets belong to a value, as in ``data.extra_val_splits=[val_seen,test_seen]``, and commas and spaces inside
    quotes too, as in ``llm.prompt="A line reads:"`` (the quotes stay: the value is read as YAML)."""
    name, sep, rest = text.partition(":")
    if not sep or not _ARM_NAME.match(name):
        raise InputError(f"--arm {text!r}: expected NAME:key=value[,key=value...] with a NAME of letters, digits, "
                         "'_', '.' or '-'")
    parts, depth, quote, cur = [], 0, "", ""
    for ch in rest:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "\"'":
            quote = ch
        else:
            depth += ch in "[{("
            depth -= ch in "]})"
        if depth == 0 and not quote and (ch == "," or ch.isspace()):
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    if quote:
        raise InputError(f"--arm {name}: a {quote} quote is not closed in {rest!r}")
    parts.append(cur)
    overrides = [p for p in parts if p]
    for o in overrides:
        try:
            parse_override(o)
        except ValueError as err:
            raise InputError(f"--arm {name}: {err}") from None
    return Arm(name, overrides)


def launcher_for(strategy: str, nproc: int) -> List[str]:
    """The launcher a strategy needs: DeepSpeed's for ``deepspeed``, torchrun for the others."""
    return launcher_command("deepspeed" if strategy == "deepspeed" else "torchrun", nproc)


def run_logged(cmd: List[str], log_path: Optional[str], what: str) -> float:
    """Run ``cmd`` in the repository, its output appended to ``log_path`` (or stderr); return its seconds. A failure
    raises naming the script and where its output is."""
    start = time.time()
    if log_path:
        with open(log_path, "a", encoding="utf-8") as log:
            log.write("$ " + " ".join(cmd) + "\n")
            log.flush()
            code = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT).returncode
    else:
        print("$ " + " ".join(cmd), file=sys.stderr, flush=True)
        code = subprocess.run(cmd, cwd=ROOT, stdout=sys.stderr).returncode
    if code != 0:
        where = f"; its output is in {log_path}" if log_path else ""
        raise RuntimeError(f"{what} failed with exit code {code}{where}")
    return time.time() - start


def prepare_teacher(config: str, overrides: List[str], log_path: Optional[str] = None) -> None:
    """Convert the config's LLM once, before any ranks start (two ranks converting it at once would race)."""
    cfg = load_config(config, list(overrides))
    if cfg.train.use_llm:
        run_logged([sys.executable, "-m", "htr_dist.models.llm", "--prepare", cfg.llm.name_or_path], log_path,
                   "preparing the LLM")


@dataclass
class RunSpec:
    """What one training run is: config, overrides (common first, then the arm's), seed, data, ranks."""

    config: str
    overrides: List[str]
    seed: int
    data: str
    nproc: int

    def as_dict(self) -> dict:
        return {"config": os.path.relpath(os.path.abspath(self.config), ROOT), "overrides": list(self.overrides),
                "seed": self.seed, "data": os.path.abspath(self.data), "nproc": self.nproc}


def train_run(spec: RunSpec, run_dir: str, log: bool = True, extra: Sequence[str] = ()) -> float:
    """Train ``spec`` into ``run_dir`` unless it finished there before; return its training seconds.

    A folder made for another spec is an error (nothing is deleted); an interrupted run resumes from its newest
    checkpoint (``train.resume=auto``), its seconds adding up over the attempts."""
    os.makedirs(run_dir, exist_ok=True)
    spec_path, done_path = os.path.join(run_dir, "spec.json"), os.path.join(run_dir, "train.json")
    if os.path.isfile(spec_path):
        with open(spec_path, encoding="utf-8") as f:
            before = json.load(f)
        if before != spec.as_dict():
            changed = sorted(k for k in spec.as_dict() if before.get(k) != spec.as_dict()[k])
            raise InputError(f"{run_dir} holds a run made with other settings ({', '.join(changed)} differ): "
                             "give another output folder, or delete that one")
    else:
        atomic_write_json(spec_path, spec.as_dict())
    if os.path.isfile(done_path):
        with open(done_path, encoding="utf-8") as f:
            return json.load(f)["seconds"]
    partial_path = os.path.join(run_dir, "train_partial.json")
    seconds = 0.0
    if os.path.isfile(partial_path):
        with open(partial_path, encoding="utf-8") as f:
            seconds = json.load(f)["seconds"]
    cfg = load_config(spec.config, list(spec.overrides))
    overrides = list(spec.overrides) + [f"data.path={spec.data}", f"run.dir={run_dir}", f"train.seed={spec.seed}",
                                        "run.progress=false", "train.resume=auto"] + list(extra)
    start = time.time()
    try:
        run_logged(launcher_for(cfg.dist.strategy, spec.nproc) + ["launch/train.py", "--config", spec.config]
                   + overrides, os.path.join(run_dir, "train.log") if log else None, f"training {run_dir}")
    finally:
        atomic_write_json(partial_path, {"seconds": seconds + time.time() - start})
    seconds += time.time() - start
    atomic_write_json(done_path, {"seconds": seconds})
    os.unlink(partial_path)
    return seconds


def best_export(run_dir: str) -> str:
    """The run's export of its lowest validation CER (``best_model.pt``), else its final ``model.pt``."""
    best = os.path.join(run_dir, "best_model.pt")
    return best if os.path.isfile(best) else os.path.join(run_dir, "model.pt")


def score_run(run_dir: str, data: str, splits: Sequence[str], log: bool = True, model: Optional[str] = None,
              decode: str = "greedy") -> Dict[str, dict]:
    """Corpus CER/WER of the run's export (default :func:`best_export`) on each split, evaluated once and kept in
    ``<split>_scores.json``."""
    model = model or best_export(run_dir)
    out = {}
    for split in splits:
        path = os.path.join(run_dir, f"{split}_scores.json")
        if not os.path.isfile(path):
            run_logged([sys.executable, "launch/evaluate.py", "--checkpoint", model, "--data", data, "--split",
                        split, "--decode", decode, "--json", path],
                       os.path.join(run_dir, "train.log") if log else None, f"evaluating {model} on {split}")
        with open(path, encoding="utf-8") as f:
            out[split] = json.load(f)
    return out


def val_curves(run_dir: str) -> Dict[str, list]:
    """``{split: [(minutes since the first logged step, step, CER)]}`` for every split the run validated on, from
    its TensorBoard events."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(os.path.join(run_dir, "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    tags = acc.Tags()["scalars"]
    t0 = min(e.wall_time for e in acc.Scalars("train/lr")) if "train/lr" in tags else None
    out = {}
    for tag in tags:
        split, _, metric = tag.partition("/")
        if metric != "cer" or split == "train":
            continue
        events = acc.Scalars(tag)
        start = t0 if t0 is not None else events[0].wall_time
        out[split] = [(round((e.wall_time - start) / 60, 2), e.step, round(e.value, 4)) for e in events]
    return out
