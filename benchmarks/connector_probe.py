#!/usr/bin/env python
"""Can a connector learn to pass the image to the frozen teacher? Prints one JSON object.

Trains only a fresh connector (config ``connector.*`` of ``--model``, with ``--set`` overrides) against the frozen
teacher, on the tap features of a trained recogniser that stays frozen: its features already hold the text (CTC
reads them), so what the connector makes of them depends on the connector alone. Every ``--probe-every`` steps, the
teacher scores test lines after their own visual tokens and after another line's (as ``teacher_reads.py`` does):
``image_gain``, the difference in nats per token, is what the visual tokens say about their own line.

    python benchmarks/connector_probe.py --model runs/demo/best_model.pt --data runs/demo/shards \\
        --set connector.locality=0
"""

import argparse
import copy
import os
import sys
import time

import torch

from _report import reserve_stdout
from teacher_reads import PREFIXES, score_batch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a trained export (its recogniser is frozen, its connector unused)")
    p.add_argument("--data", required=True, help="shard folder: train split for training, --split for the probes")
    p.add_argument("--split", default="test", help="split the probes score (default: test)")
    p.add_argument("--steps", type=int, default=300, help="connector training steps (default: 300)")
    p.add_argument("--probe-every", type=int, default=150, help="probe every N steps and at the end (default: 150)")
    p.add_argument("--probe-lines", type=int, default=128, help="lines a probe scores (default: 128)")
    p.add_argument("--batch-size", type=int, default=8, help="lines a training step (default: 8)")
    p.add_argument("--lr", type=float, default=3e-3, help="AdamW learning rate (default: 3e-3, the demo's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", nargs="*", default=[], metavar="connector.KEY=VALUE",
                   help="connector settings to change, e.g. connector.locality=0")
    p.add_argument("--llm", default=None, help="the teacher, if not where the export says")
    args = p.parse_args(argv)
    emit = reserve_stdout()
    from htr_dist.config import ConfigError, get_key, parse_override
    from htr_dist.data.pipeline import build_train_loader
    from htr_dist.dist.env import pick_dtype
    from htr_dist.inference import Recognizer
    from htr_dist.models.connector import build_connector
    from htr_dist.models.llm import LineFormat, PrefixLM, load_causal_lm

    torch.manual_seed(args.seed)
    device = torch.device("cpu")
    rec = Recognizer.load(args.model, device)
    rec.check_mode("beam+llm")
    cfg = copy.deepcopy(rec.config)
    for text in args.set:
        try:
            key, value = parse_override(text)
            if not key.startswith("connector."):
                raise ConfigError(f"only connector.* settings, not {key!r}")
            get_key(cfg, key)  # an unknown key is an error, as everywhere
        except (ConfigError, AttributeError) as err:
            p.error(f"--set {text!r}: {err}")
        setattr(cfg.connector, key.split(".", 1)[1], value)
    cfg.data.path, cfg.train.seed, cfg.train.batch_size = args.data, args.seed, args.batch_size
    cfg.data.img_height, cfg.data.img_width = rec.img_height, rec.img_width

    # the teacher as the demo trains it: bf16 where the CPU computes it natively, else fp32
    lm, tokenizer = load_causal_lm(args.llm or rec.teacher_name, cfg.llm.cache_dir,
                                   pick_dtype(device, "bf16_native", "dist.llm_precision"), "eager", "cpu")
    teacher = PrefixLM(lm, tokenizer, line_format=LineFormat.from_config(cfg.llm)).eval()
    recogniser = rec.model.eval()
    connector = build_connector(recogniser.head.tap_dim, lm.config.hidden_size, cfg.connector)
    optimizer = torch.optim.AdamW(connector.parameters(), lr=args.lr)

    @torch.no_grad()
    def tap(images):
        return recogniser.head(recogniser.backbone(images))[2]

    def probe(step: int) -> dict:
        connector.eval()
        totals = dict.fromkeys(PREFIXES + ("hits", "tokens"), 0.0)
        lines, spread = 0, []
        for batch in rec.split_batches(args.data, args.split, 16):
            if lines >= args.probe_lines or len(batch["texts"]) < 2:
                break
            with torch.no_grad():
                tokens = connector(tap(batch["images"]))
            spread.append(float(tokens.std(0).norm(dim=-1).mean() / tokens.norm(dim=-1).mean()))
            for k, v in score_batch(teacher, tokens, [t.strip() for t in batch["texts"]],
                                    cfg.llm.max_text_tokens).items():
                totals[k] += v
            lines += len(batch["texts"])
        connector.train()
        n = totals["tokens"]
        out = {"step": step, **{f"nll_{k}": totals[k] / n for k in PREFIXES},
               "image_gain": (totals["other"] - totals["own"]) / n, "token_accuracy": totals["hits"] / n,
               "spread_over_lines": sum(spread) / len(spread)}
        print(f"step {step}: own {out['nll_own']:.3f}, other {out['nll_other']:.3f} nats per token",
              file=sys.stderr, flush=True)
        return out

    probes, losses = [], []
    started = time.time()
    connector.train()
    for step, batch in enumerate(build_train_loader(cfg, rec.alphabet, 0, 1), start=1):
        ids, mask = teacher.tokenize([t.strip() for t in batch["texts"]], cfg.llm.max_text_tokens)
        loss = teacher(connector(tap(batch["images"])), ids, mask)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if step % args.probe_every == 0 or step == args.steps:
            probes.append(probe(step))
        if step >= args.steps:
            break
    last = probes[-1]
    report = {"model": args.model, "teacher": args.llm or rec.teacher_name, "connector": vars(cfg.connector),
              "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed,
              "train_loss_last_50": sum(losses[-50:]) / len(losses[-50:]), "probes": probes,
              "image_gain": last["image_gain"], "seconds": time.time() - started}
    emit(report)
    return report


if __name__ == "__main__":
    main()
