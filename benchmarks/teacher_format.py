#!/usr/bin/env python
"""What the frozen teacher makes of the transcriptions alone, per line format. Prints one JSON object.

For each format (``llm.bos_first``, ``llm.prompt``, ``llm.line_end``), every line of ``--split`` is laid out as
:class:`htr_dist.models.llm.PrefixLM` lays it out for training, without the visual tokens (the part before them, then
the text), and the LLM scores the tokens the training loss scores. Reported per format, in nats per token, mean over
the lines' tokens: ``first`` (the line's first text token), ``middle``, ``end`` (the line end) and ``all`` (what the
training loss averages), and ``end_share``, the share of the summed loss on the line ends.

Without the visual tokens, where BOS goes makes no difference here (it is first either way); it matters in training,
where BOS after the visual tokens tells the LM that a new text starts after them. The visual tokens can only lower
these figures; what a format costs here is what the connector has to pay for before the image can help. A line end
the LM finds unlikely (an end of text after a line cut from running text) adds loss, and a gradient, that says
nothing about the image.
"""

import argparse
import os
import sys

import torch

from _report import reserve_stdout

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

FORMATS = {
    "legacy": dict(bos_first=False, prompt="", line_end="eos"),
    "bos_first_newline": dict(bos_first=True, prompt="", line_end="newline"),
    "prompt_newline": dict(bos_first=True, prompt="A handwritten line reads:\n", line_end="newline"),
}


@torch.inference_mode()
def score(teacher, texts: list, max_tokens: int, batch: int = 32) -> dict:
    parts = {"first": [], "middle": [], "end": []}
    n_end, p = len(teacher.end_ids), len(teacher.head_ids)
    for start in range(0, len(texts), batch):
        ids, mask = teacher.tokenize(texts[start : start + batch], max_tokens)
        scored = teacher.label_mask(ids, mask)
        head = torch.tensor(teacher.head_ids, dtype=ids.dtype).expand(ids.shape[0], p)
        seq = torch.cat([head, ids], 1)
        full_mask = torch.cat([torch.ones_like(head), mask], 1)
        log_probs = teacher.lm(input_ids=seq, attention_mask=full_mask).logits.float().log_softmax(-1)
        for row in range(ids.shape[0]):
            positions = [p + j for j in range(ids.shape[1]) if scored[row, j]]
            for k, pos in enumerate(positions):
                nll = -log_probs[row, pos - 1, seq[row, pos]].item()
                key = "first" if k == 0 else "end" if k >= len(positions) - n_end else "middle"
                parts[key].append(nll)
    every = [v for values in parts.values() for v in values]
    out = {k: sum(v) / len(v) for k, v in parts.items() if v}
    out["all"] = sum(every) / len(every)
    out["end_share"] = sum(parts["end"]) / sum(every)
    out["tokens_per_line"] = len(every) / len(texts)
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="shard folder whose transcriptions are scored")
    p.add_argument("--split", default="val", help="split of --data (default: val)")
    p.add_argument("--lines", type=int, default=128, help="lines scored (default: 128)")
    p.add_argument("--llm", default="smollm2-135m", help="llm.name_or_path (default: smollm2-135m)")
    p.add_argument("--cache-dir", default="~/.cache/htr_dist")
    p.add_argument("--max-tokens", type=int, default=24, help="llm.max_text_tokens (default: the demo's 24)")
    args = p.parse_args(argv)
    emit = reserve_stdout()
    from htr_dist.data.shards import split_texts
    from htr_dist.models.llm import LineFormat, PrefixLM, load_causal_lm

    texts = [t.strip() for t in split_texts(args.data, args.split)[: args.lines]]  # stripped, as training reads them
    lm, tokenizer = load_causal_lm(args.llm, args.cache_dir, torch.float32)
    report = {"llm": args.llm, "split": args.split, "lines": len(texts), "formats": {}}
    for name, fmt in FORMATS.items():
        teacher = PrefixLM(lm, tokenizer, line_format=LineFormat(**fmt))
        report["formats"][name] = dict(fmt, **score(teacher, texts, args.max_tokens))
        print(f"{name}: {report['formats'][name]['all']:.2f} nats per token", file=sys.stderr, flush=True)
    emit(report)
    return report


if __name__ == "__main__":
    main()
