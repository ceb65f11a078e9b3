#!/usr/bin/env python
"""Compare training settings ("arms") paired by seed, in one command: every arm trains with the same config, data,
steps and seeds; each run's best export is scored on the eval splits; the report gives per arm and split the mean
+- std of CER and WER over the seeds, and each arm's difference from the first arm, paired by seed, with a 95%
confidence interval (Student's t).

  python launch/compare.py --config configs/demo.yaml --data runs/demo/shards \\
      --arm ctc:train.use_llm=false --arm llm:train.use_llm=true --seeds 0 1 2

Writes into --out: compare.json, compare.md, val_cer.png (val CER against step, each arm's mean over seeds with a
min-max band) and cer.png (CER per eval split and arm, one dot per seed). A finished run is reused and an
interrupted one resumes from its newest checkpoint, so running the same command again continues a comparison.
Each run's output is in OUT/runs/ARM/seedN/train.log.
"""

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from htr_dist.config import int_at_least, load_config  # noqa: E402
from htr_dist.errors import InputError  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="base training config (YAML)")
    p.add_argument("--arm", action="append", required=True, metavar="NAME:key=value[,key=value...]",
                   help="an arm: a name and its overrides (repeat; at least two; the first is the baseline)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds (default: 0 1 2)")
    p.add_argument("--data", default=None, help="shard folder (default: the config's data.path)")
    p.add_argument("--eval", nargs="+", default=None, metavar="SPLIT",
                   help="splits to score each run's best export on (default: test, and test_seen where the shards "
                        "have it: a synthetic set's held-out text in the training fonts)")
    p.add_argument("--nproc", type=int_at_least(1), default=2, help="training processes per run (default: 2)")
    p.add_argument("--out", default=os.path.join(ROOT, "runs", "compare"), help="output folder (default: runs/compare)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="overrides for every arm (before the arm's)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        return compare(args)
    except (InputError, RuntimeError) as err:
        print(f"compare: {err}", file=sys.stderr)
        return 1


def compare(args) -> int:
    from tqdm import tqdm

    from htr_dist import experiment as ex
    from htr_dist.compare_report import summarize, write_report
    from htr_dist.data.shards import load_manifest

    arms = [ex.parse_arm(a) for a in args.arm]
    if len(arms) < 2:
        raise InputError("--arm: give at least two arms to compare")
    names = [a.name for a in arms]
    if len(set(names)) != len(names):
        raise InputError(f"--arm: each arm needs its own name, got {names}")
    if len(set(args.seeds)) != len(args.seeds):
        raise InputError(f"--seeds: each seed once, got {args.seeds}")
    for arm in arms:  # every arm's config must load before the first run starts
        load_config(args.config, list(args.overrides) + arm.overrides)
    data = args.data or load_config(args.config, list(args.overrides)).data.path
    splits = load_manifest(data)["splits"]
    evals = args.eval or ["test"] + (["test_seen"] if "test_seen" in splits else [])
    missing = [s for s in evals if s not in splits]
    if missing:
        raise InputError(f"--eval: {data} has no split {missing[0]!r} (it has {', '.join(sorted(splits))})")
    os.makedirs(args.out, exist_ok=True)
    for arm in arms:  # converted once here, not by two ranks at once
        ex.prepare_teacher(args.config, list(args.overrides) + arm.overrides, os.path.join(args.out, "prepare.log"))

    runs = []
    bar = tqdm(total=len(arms) * len(args.seeds), desc="compare", unit="run", disable=args.no_progress)
    for seed in args.seeds:  # seed-major: an interrupted comparison has whole pairs to show
        for arm in arms:
            bar.set_postfix_str(f"{arm.name} seed {seed}")
            run_dir = os.path.join(args.out, "runs", arm.name, f"seed{seed}")
            spec = ex.RunSpec(args.config, list(args.overrides) + arm.overrides, seed, data, args.nproc)
            seconds = ex.train_run(spec, run_dir)
            scores = ex.score_run(run_dir, data, evals)
            runs.append({"arm": arm.name, "seed": seed, "minutes": round(seconds / 60, 2), "run_dir": run_dir,
                         "model": os.path.basename(ex.best_export(run_dir)),
                         "scores": {s: {k: v[k] for k in ("cer", "wer", "lines")} for s, v in scores.items()},
                         "curves": ex.val_curves(run_dir)})
            bar.update(1)
    bar.close()
    report = summarize(arms, args.seeds, evals, runs)
    report.update(config=os.path.relpath(os.path.abspath(args.config), ROOT), overrides=list(args.overrides),
                  data=data, nproc=args.nproc)
    paths = write_report(report, args.out)
    print("\n".join(paths.values()), file=sys.stderr)
    with open(paths["md"], encoding="utf-8") as f:
        print(f.read())
    return 0


if __name__ == "__main__":
    sys.exit(main())
