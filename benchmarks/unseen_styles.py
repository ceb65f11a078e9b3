#!/usr/bin/env python
"""How well a training config reads handwriting styles it never saw: train on the training fonts of a
writer-independent synthetic IAM-format set, then score held-out text in those fonts (``seen``) and in fonts no
training line used (``unseen``, the figure that IAM's writer-independent test set corresponds to).

For each seed: train the config (through the launcher its ``dist.strategy`` needs) for ``--steps`` optimizer steps
or ``--minutes`` of training, validating on ``val`` (unseen val fonts) and ``val_seen`` along the way, then evaluate
the exported model on ``test_seen`` and ``test``. Prints one JSON object:

  cer_seen, cer_unseen, wer_seen, wer_unseen, minutes, steps   medians over the seeds
  spread                                                         min / median / max of each over the seeds
  runs                                                           per seed: the same figures and the val curves

and writes a PNG of val CER against minutes of training, both sets, every seed (``--plot``).

  python benchmarks/unseen_styles.py --config configs/demo.yaml --seeds 0 1 2
  python benchmarks/unseen_styles.py --config configs/synth_long.yaml --forms 800 --minutes 60
"""

import argparse
import os
import shutil
import statistics
import sys

from _report import reserve_stdout, spread

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from htr_dist import experiment as ex  # noqa: E402
from htr_dist.compare_report import pyplot, save_figure  # noqa: E402
from htr_dist.config import int_at_least, load_config  # noqa: E402
from htr_dist.errors import InputError  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=os.path.join(ROOT, "configs", "demo.yaml"), help="training config")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--steps", type=int_at_least(1), default=None,
                        help="optimizer steps per run (default: the config's train.max_steps)")
    budget.add_argument("--minutes", type=float, default=None,
                        help="minutes of training per run (train.max_minutes; set train.max_steps=N among the "
                             "overrides for the schedule's length, else the config's)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="training seeds (default: 0)")
    p.add_argument("--forms", type=int_at_least(20), default=600, help="synthetic forms (default: 600)")
    p.add_argument("--data-seed", type=int, default=0, help="seed of the synthetic set (default: 0)")
    p.add_argument("--nproc", type=int_at_least(1), default=2, help="training processes (default: 2)")
    p.add_argument("--workdir", default=os.path.join(ROOT, "runs", "unseen_styles"),
                   help="where the data, shards and runs go (default: runs/unseen_styles)")
    p.add_argument("--plot", default=None, help="PNG of the val curves (default: WORKDIR/val_cer.png)")
    p.add_argument("--reuse", action="store_true", help="reuse a finished run of the same seed in WORKDIR")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="training config overrides")
    return p.parse_args(argv)


def make_data(args) -> str:
    """The writer-independent synthetic set and its shards (made once per WORKDIR, forms and data seed)."""
    tag = f"forms{args.forms}_seed{args.data_seed}"
    synth, shards = os.path.join(args.workdir, "data", tag), os.path.join(args.workdir, "shards", tag)
    py = sys.executable
    if not os.path.isfile(os.path.join(synth, "splits", "test_seen.uttlist")):
        ex.run_logged([py, "launch/synth_iam.py", synth, "--forms", str(args.forms), "--seed", str(args.data_seed),
                       "--no-progress"], None, "synth_iam.py")
    if not os.path.isfile(os.path.join(shards, "manifest.json")):
        ex.run_logged([py, "launch/prepare_iam.py", "--iam", synth, "--out", shards], None, "prepare_iam.py")
    return shards


def train_and_score(args, shards: str, seed: int) -> dict:
    run_dir = os.path.join(args.workdir, "runs", f"{os.path.splitext(os.path.basename(args.config))[0]}_seed{seed}")
    budget = [f"train.max_steps={args.steps}"] if args.steps else []
    budget += [f"train.max_minutes={args.minutes}"] if args.minutes else []
    spec = ex.RunSpec(args.config, ["data.extra_val_splits=[val_seen]"] + budget + list(args.overrides), seed, shards,
                      args.nproc)
    if not args.reuse and os.path.isdir(run_dir):
        shutil.rmtree(run_dir)
    seconds = ex.train_run(spec, run_dir, log=False)
    # the final export, as make demo reports it
    scores = ex.score_run(run_dir, shards, ("test_seen", "test"), log=False, model=os.path.join(run_dir, "model.pt"))
    curves = ex.val_curves(run_dir)
    curves = {name: curves[split] for name, split in (("unseen", "val"), ("seen", "val_seen")) if split in curves}
    steps = max((p[1] for c in curves.values() for p in c), default=0)
    return {"seed": seed, "cer_seen": scores["test_seen"]["cer"], "cer_unseen": scores["test"]["cer"],
            "wer_seen": scores["test_seen"]["wer"], "wer_unseen": scores["test"]["wer"],
            "lines_seen": scores["test_seen"]["lines"], "lines_unseen": scores["test"]["lines"],
            "minutes": round(seconds / 60, 2), "steps": steps, "curves": curves, "run_dir": run_dir}


def plot(runs: list, path: str, title: str) -> None:
    fig, ax = pyplot().subplots(figsize=(7, 4.2), dpi=110)
    for i, r in enumerate(runs):  # one colour per seed: solid unseen fonts, dashed seen fonts
        for split, style in (("unseen", "-"), ("seen", "--")):
            pts = r["curves"].get(split, [])
            if pts:
                ax.plot([p[0] for p in pts], [100 * p[2] for p in pts], style, color=f"C{i % 10}", marker="o",
                        markersize=3, label=f"{split} fonts, seed {r['seed']}")
    ax.set_xlabel("minutes of training")
    ax.set_ylabel("val CER (%)")
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7)
    save_figure(fig, path)


def main(argv=None) -> int:
    args = parse_args(argv)
    emit = reserve_stdout()
    load_config(args.config, list(args.overrides))  # a bad key fails here, before any data is made
    os.makedirs(args.workdir, exist_ok=True)
    shards = make_data(args)
    ex.prepare_teacher(args.config, list(args.overrides))  # once here, not by every rank at once
    runs = [train_and_score(args, shards, seed) for seed in args.seeds]
    keys = ("cer_seen", "cer_unseen", "wer_seen", "wer_unseen", "minutes", "steps")
    report = {k: statistics.median(r[k] for r in runs) for k in keys}
    report["spread"] = {k: spread([r[k] for r in runs]) for k in keys}
    report.update(config=os.path.relpath(args.config, ROOT), overrides=list(args.overrides), seeds=args.seeds,
                  forms=args.forms, nproc=args.nproc, runs=runs)
    plot_path = args.plot or os.path.join(args.workdir, "val_cer.png")
    plot(runs, plot_path, f"{report['config']} {' '.join(args.overrides)}".strip())
    report["plot"] = plot_path
    emit(report)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (InputError, RuntimeError) as err:  # a stage failed (its output is above) or a setting is wrong
        sys.exit(f"unseen_styles: {err}")
