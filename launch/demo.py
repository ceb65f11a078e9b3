#!/usr/bin/env python
"""The one-command demo (``make demo``): writer-independent synthetic IAM-format data -> shards -> 2-rank training with
a ZeRO-3-sharded LLM teacher on CPU -> evaluation on held-out test forms, in the training fonts and in fonts never seen
in training -> a few predictions and both test CER/WER, the unseen-font one last.

Every stage is a real command of this project, run as a subprocess and shown as it runs; a stage whose output already
exists is reused, so the demo is safe to re-run (``--fresh`` starts the training over).

The reference code's single-image form, ``demo.py CONFIG resume=MODEL IMAGE...``, reads the images with MODEL (the
same as ``htr-recognize --checkpoint MODEL IMAGE...``).
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

from htr_dist.config import int_at_least, load_config
from htr_dist.data.shards import load_manifest
from htr_dist.dist.env import launcher_command

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", choices=["deepspeed", "fsdp"], default="deepspeed",
                   help="deepspeed: deepspeed launcher + LLM as a ZeRO-3 engine (default); "
                        "fsdp: torchrun + LLM sharded by FSDP2")
    p.add_argument("--config", default=os.path.join(ROOT, "configs", "demo.yaml"), help="training config")
    p.add_argument("--forms", type=int_at_least(3), default=600, help="synthetic forms to generate (default: 600)")
    p.add_argument("--nproc", type=int_at_least(1), default=2, help="training processes (default: 2)")
    p.add_argument("--workdir", default=ROOT, help="where data/, shards/ and runs/ go (default: the repository)")
    p.add_argument("--fresh", action="store_true", help="delete the previous demo run and train from scratch")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="extra training config overrides")
    return p.parse_args(argv)


def stage(title: str, cmd: list) -> float:
    """Run one stage in the foreground (its own progress bars and logs show); stop the demo if it fails."""
    print(f"\n=== {title}\n$ {' '.join(cmd)}", flush=True)
    start = time.time()
    result = subprocess.run(cmd, cwd=ROOT)
    if result.returncode != 0:
        sys.exit(f"demo: stage '{title}' failed with exit code {result.returncode}")
    took = time.time() - start
    print(f"=== {title}: done in {took:.0f} s", flush=True)
    return took


def start_background(title: str, cmd: list):
    """Start a stage that overlaps the next ones (its log lines interleave with theirs); :func:`finish` waits."""
    print(f"\n=== {title} (in the background)\n$ {' '.join(cmd)}", flush=True)
    return title, time.time(), subprocess.Popen(cmd, cwd=ROOT)


def finish(job) -> None:
    title, start, proc = job
    if proc.wait() != 0:
        sys.exit(f"demo: stage '{title}' failed with exit code {proc.returncode}")
    print(f"=== {title}: done in {time.time() - start:.0f} s", flush=True)


def reference_form(overrides: list) -> list:
    """``CONFIG resume=MODEL IMAGE...`` as htr-recognize's arguments, or [] when the overrides are not that form."""
    models = [o.split("=", 1)[1] for o in overrides if o.startswith("resume=")]
    if not models:
        return []
    images = [o for o in overrides if "=" not in o and not o.endswith((".yaml", ".yml"))]
    return ["--checkpoint", models[-1], *images]


def main(argv=None) -> int:
    args = parse_args(argv)
    recognize_args = reference_form(args.overrides)
    if recognize_args:
        from htr_dist.cli.recognize import main as recognize

        return recognize(recognize_args)
    py = sys.executable
    synth_dir = os.path.join(args.workdir, "data", "synth_iam")
    shard_dir = os.path.join(args.workdir, "shards", "synth")
    run_dir = os.path.join(args.workdir, "runs", f"demo_{args.variant}")
    t0 = time.time()
    cfg = load_config(args.config, list(args.overrides))  # a bad key stops the demo before any work
    # one core converts the LLM (once) while the other renders forms
    llm_job = start_background(f"prepare the LLM teacher ({cfg.llm.name_or_path}; a GGUF is converted once)",
                               [py, "-m", "htr_dist.models.llm", "--prepare", cfg.llm.name_or_path])
    # a set of an older layout (no test_seen list: not writer-independent) is made anew
    if not os.path.isfile(os.path.join(synth_dir, "splits", "test_seen.uttlist")):
        stage(f"generate {args.forms} synthetic IAM-format forms",
              [py, "launch/synth_iam.py", synth_dir, "--forms", str(args.forms), "--seed", "0"])
    else:
        print(f"\n=== synthetic IAM-format data: reusing {synth_dir}")
    if not _has_split(shard_dir, "test_seen"):
        stage("pack IAM-format lines into WebDataset shards",
              [py, "launch/prepare_iam.py", "--iam", synth_dir, "--out", shard_dir])
    else:
        print(f"=== shards: reusing {shard_dir}")
    finish(llm_job)
    if args.fresh and os.path.isdir(run_dir):
        shutil.rmtree(run_dir)
    train_args = ["launch/train.py", "--config", args.config, f"data.path={shard_dir}", f"run.dir={run_dir}",
                  "train.resume=auto"]
    if args.variant == "deepspeed":
        launcher = launcher_command("deepspeed", args.nproc)
        train_args.append("dist.strategy=deepspeed")
    else:
        launcher = launcher_command("torchrun", args.nproc)
        train_args.append("dist.strategy=fsdp")
    stage(f"train on {args.nproc} CPU ranks ({args.variant})", launcher + train_args + list(args.overrides))
    for split, what in (("test_seen", "the training fonts"), ("test", "fonts never seen in training")):
        stage(f"evaluate on held-out test forms in {what} ({split})",
              [py, "launch/evaluate.py", "--checkpoint", run_dir, "--data", shard_dir, "--split", split, "--show",
               "3", "--predictions", os.path.join(run_dir, f"{split}_predictions.tsv"),
               "--json", os.path.join(run_dir, f"{split}_scores.json")])
    print(f"\nTensorBoard logs:  tensorboard --logdir {os.path.join(run_dir, 'tb')}")
    print(f"Exported model:    {os.path.join(run_dir, 'model.pt')} (lowest val CER: best_model.pt)")
    print(f"Read a line image: python launch/recognize.py --checkpoint {run_dir} IMAGE.png")
    print(f"Demo time: {(time.time() - t0) / 60:.1f} min")
    for split, fonts in (("test_seen", "seen fonts"), ("test", "unseen fonts")):
        with open(os.path.join(run_dir, f"{split}_scores.json"), encoding="utf-8") as f:
            s = json.load(f)
        print(f"test CER {100 * s['cer']:.1f}% WER {100 * s['wer']:.1f}% ({s['lines']} lines, {fonts})")
    return 0


def _has_split(shard_dir: str, split: str) -> bool:
    """Whether ``shard_dir`` holds a complete shard set with ``split`` (older demo shards have no test_seen)."""
    try:
        return split in load_manifest(shard_dir)["splits"]
    except (OSError, ValueError):  # no manifest yet, or a damaged one: made anew
        return False


if __name__ == "__main__":
    sys.exit(main())
