"""CTC decoding (greedy, prefix beam search) and corpus-level CER / WER as the reference system computes them."""

from __future__ import annotations

import heapq
import math
from typing import List, Sequence

import numpy as np
import torch


def greedy_decode(logits: torch.Tensor, blank: int = 0) -> List[List[int]]:
    """(T, B, C) scores -> per line: best class per frame, repeats collapsed, blanks dropped."""
    best = logits.argmax(-1).t().cpu().numpy()  # (B, T)
    out = []
    for row in best:
        keep = np.ones(len(row), dtype=bool)
        keep[1:] = row[1:] != row[:-1]
        out.append([int(c) for c in row[keep] if c != blank])
    return out


def _logsumexp(a: float, b: float) -> float:
    """log(exp(a) + exp(b)) for two Python floats, -inf allowed."""
    if a == -math.inf:
        return b
    if b == -math.inf:
        return a
    return a + math.log1p(math.exp(b - a)) if a > b else b + math.log1p(math.exp(a - b))


def prefix_beam_search(log_probs: np.ndarray, beam_width: int = 10, blank: int = 0, prune: float = -12.0) -> List[int]:
    """CTC prefix beam search over (T, C) log-probabilities; returns the best label sequence.

    Each prefix keeps two scores: ending in a blank and ending in its last label, so that 'aa' (two labels with a
    blank between) and 'a' (one label repeated) are told apart. Classes below ``prune`` (log-prob) in a frame are
    not extended, which keeps the search fast without changing the result in practice. The frame's candidates are
    turned into Python numbers once, not once per beam (half the time of reading them from numpy in the inner loop).
    """
    if beam_width < 1:
        raise ValueError(f"beam width must be >= 1, got {beam_width}")
    lse, unseen = _logsumexp, (-math.inf, -math.inf)
    beams = {(): (0.0, -math.inf)}  # prefix -> (log p ending in blank, log p ending in non-blank)
    for frame in log_probs:
        kept = np.flatnonzero(frame > prune)
        candidates = list(zip(kept.tolist(), frame[kept].tolist()))  # (class, log p), in class order
        nxt: dict = {}
        get = nxt.get
        for prefix, (pb, pnb) in beams.items():
            total = lse(pb, pnb)
            last = prefix[-1] if prefix else -1
            for c, p in candidates:
                if c == blank:
                    b, nb = get(prefix, unseen)
                    nxt[prefix] = (lse(b, total + p), nb)
                    continue
                extended = prefix + (c,)
                b, nb = get(extended, unseen)
                if c == last:
                    nxt[extended] = (b, lse(nb, pb + p))  # a repeat needs a blank in between
                    b0, nb0 = get(prefix, unseen)
                    nxt[prefix] = (b0, lse(nb0, pnb + p))  # same label continues
                else:
                    nxt[extended] = (b, lse(nb, total + p))
        beams = dict(heapq.nlargest(beam_width, nxt.items(), key=lambda kv: lse(*kv[1])))
    return list(max(beams.items(), key=lambda kv: lse(*kv[1]))[0])


def beam_decode(logits: torch.Tensor, beam_width: int = 10, blank: int = 0) -> List[List[int]]:
    """(T, B, C) scores -> per line, the best sequence of a CTC prefix beam search."""
    log_probs = logits.float().log_softmax(-1).transpose(0, 1).cpu().numpy()  # (B, T, C)
    return [prefix_beam_search(lp, beam_width, blank) for lp in log_probs]


def edit_distance(a: Sequence, b: Sequence) -> int:
    """Levenshtein distance (insertions, deletions, substitutions all cost 1)."""
    if len(a) < len(b):
        a, b = b, a
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def cer(refs: Sequence[str], hyps: Sequence[str]) -> float:
    """Corpus character error rate: sum of edit distances over the total reference length."""
    total = sum(len(r) for r in refs)
    return sum(edit_distance(r, h) for r, h in zip(refs, hyps)) / max(1, total)


def wer(refs: Sequence[str], hyps: Sequence[str]) -> float:
    """Corpus word error rate over whitespace-separated words."""
    total = sum(len(r.split()) for r in refs)
    return sum(edit_distance(r.split(), h.split()) for r, h in zip(refs, hyps)) / max(1, total)
