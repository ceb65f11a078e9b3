"""CTC decoding modes, and the settings that tune them.

- ``greedy``: the best class of each frame, repeats collapsed, blanks dropped.
- ``beam``: a CTC prefix beam search, exact in its sums over alignments (the compiled one of ``fast-ctc-decode``).
- ``beam+lm``: a beam search that adds a character n-gram language model, built from the training transcriptions,
  to each extension (the compiled lexicon-free decoder of ``flashlight-text``; the LM itself is :class:`CharNgramLM`).
- ``beam+llm``: the n best hypotheses of a beam search, each rescored with the trained connector and the frozen
  teacher LLM: ``log P_ctc + llm_weight * log P_llm(text | visual tokens) + llm_bonus * characters``.

The weights of the last two are tuned on a validation split (``launch/evaluate.py --tune``) and stored beside the
exported model in ``<model>.decode.json`` (:class:`DecodeSettings`), which recognition and evaluation read.
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from htr_dist.errors import InputError
from htr_dist.io_utils import atomic_write_json
from htr_dist.train.metrics import greedy_decode

BEAM_CUT = 1e-3
"""A beam search does not extend a prefix by a class whose probability in the frame is below this. A trained model
puts nearly all of a frame's mass on one or two classes, so the cut changes no result on peaked frames (tested
against the uncut search) and makes the search several times faster; ``benchmarks/inference.py`` reports how often
it agrees with the reference search on real lines (``beam_agrees``)."""

SETTINGS_SUFFIX = ".decode.json"


class DecodeError(InputError, ValueError):
    """A decoding mode cannot run as asked (unknown mode, no language model, no connector); the message says why."""


# -- settings ----------------------------------------------------------------------------------------------------
@dataclass
class DecodeSettings:
    """How ``beam``, ``beam+lm`` and ``beam+llm`` decode; saved beside the model as ``<model>.decode.json``."""

    beam_width: int = 10
    """Prefixes kept per frame by the beam searches."""
    n_best: int = 10
    """Hypotheses that ``beam+llm`` rescores per line."""
    lm_order: int = 6
    """Characters of the n-gram language model of ``beam+lm``, the predicted one included."""
    lm_weight: float = 0.3
    """Weight of the n-gram LM's log-probability in ``beam+lm``."""
    lm_bonus: float = 0.0
    """Score added per emitted character in ``beam+lm`` (offsets the LM's cost of each character)."""
    llm_weight: float = 0.3
    """lambda: weight of the teacher's log-probability of a hypothesis in ``beam+llm``."""
    llm_bonus: float = 0.0
    """beta: score added per character of a hypothesis in ``beam+llm``."""
    lm_texts: List[str] = field(default_factory=list)
    """The transcriptions the n-gram LM is built from (the training split's)."""
    tuned: Dict[str, dict] = field(default_factory=dict)
    """Per mode, what tuning chose and measured (split, lines, CER before and after)."""

    @staticmethod
    def path_for(model_path: str) -> str:
        return os.path.splitext(model_path)[0] + SETTINGS_SUFFIX

    @classmethod
    def load(cls, model_path: str) -> "DecodeSettings":
        """The settings stored beside ``model_path``, or the defaults if there are none."""
        path = cls.path_for(model_path)
        if not os.path.isfile(path):
            return cls()
        try:
            with open(path, encoding="utf-8") as f:
                raw = json.load(f)
        except (OSError, ValueError) as err:
            raise DecodeError(f"{path}: unreadable decoding settings ({err}); delete it or tune again") from None
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known) if isinstance(raw, dict) else ["(not a JSON object)"]
        if unknown:
            raise DecodeError(f"{path}: unknown decoding setting {unknown[0]!r}")
        return cls(**raw)

    def save(self, model_path: str) -> str:
        path = self.path_for(model_path)
        atomic_write_json(path, asdict(self))
        return path


# -- log-probabilities and exact CTC scores --------------------------------------------------------------------------
def log_probs_of(logits: torch.Tensor) -> np.ndarray:
    """(T, B, C) logits -> (B, T, C) float32 log-probabilities, C-contiguous (what the compiled decoders read)."""
    return np.ascontiguousarray(logits.float().log_softmax(-1).transpose(0, 1).cpu().numpy())


def ctc_log_likelihoods(log_probs: np.ndarray, candidates: Sequence[Sequence[int]]) -> np.ndarray:
    """Exact ``log P_ctc(labels | frames)`` of each candidate label sequence, for one line's (T, C) log-probs."""
    if not candidates:
        return np.zeros(0)
    t = log_probs.shape[0]
    lp = torch.from_numpy(log_probs).unsqueeze(1).expand(t, len(candidates), log_probs.shape[1])
    flat = torch.tensor([c for cand in candidates for c in cand], dtype=torch.long)
    lengths = torch.tensor([len(c) for c in candidates], dtype=torch.long)
    nll = F.ctc_loss(lp, flat, torch.full((len(candidates),), t, dtype=torch.long), lengths, blank=0,
                     reduction="none", zero_infinity=False)
    return (-nll).double().numpy()


def _collapse(tokens) -> Tuple[int, ...]:
    """A frame-level path -> its labels: repeats merged, blanks (0) and the decoder's boundary marks (-1) dropped."""
    out, prev = [], None
    for k in tokens:
        k = int(k)
        if k != prev and k > 0:
            out.append(k)
        prev = k
    return tuple(out)


# -- beam: compiled exact prefix beam search -------------------------------------------------------------------------
def beam_paths(log_probs: np.ndarray, beam_width: int = 10, cut: float = BEAM_CUT) -> List[List[int]]:
    """(B, T, C) log-probs -> per line, the best label sequence of a CTC prefix beam search."""
    from fast_ctc_decode import beam_search

    if beam_width < 1:
        raise DecodeError(f"beam width must be >= 1, got {beam_width}")
    # the library maps classes to characters of an alphabet string; distinct private-use code points stand for them
    codes = "".join(chr(0xF0000 + i) for i in range(log_probs.shape[2]))
    out = []
    for line in log_probs:
        text, _ = beam_search(np.exp(line), codes, beam_size=beam_width, beam_cut_threshold=cut)
        out.append([ord(ch) - 0xF0000 for ch in text])
    return out


# -- beam+lm and n-best: flashlight's lexicon-free decoder -----------------------------------------------------------
class CharNgramLM:
    """An interpolated Witten-Bell character n-gram model over the transcriptions it is built from.

    ``P(c | h) = (n(h, c) + u(h) P(c | h')) / (n(h) + u(h))``, where ``u(h)`` is the number of distinct characters
    seen after ``h`` and ``h'`` drops the oldest character of ``h``; the base case is uniform over the characters
    plus the end of line. Lines are padded with a start mark, so the first characters of a line are predicted from
    it, and the end of line is predicted as a character of its own.
    """

    START, END = "\x02", "\x03"

    def __init__(self, texts: Sequence[str], order: int = 6):
        if order < 1:
            raise DecodeError(f"lm_order must be >= 1, got {order}")
        if not texts:
            raise DecodeError("the character LM needs at least one transcription to learn from")
        self.order = order
        self.counts: List[Dict[str, Counter]] = [defaultdict(Counter) for _ in range(order)]
        vocab = {self.END}
        for text in texts:
            padded = self.START * (order - 1) + text + self.END
            vocab.update(text)
            for i in range(order - 1, len(padded)):
                for k in range(order):  # contexts of length 0 .. order-1
                    self.counts[k][padded[i - k:i]][padded[i]] += 1
        self.uniform = -math.log(len(vocab))
        self._cache: Dict[Tuple[str, str], float] = {}

    def context(self, history: str) -> str:
        """The last ``order - 1`` characters of ``history``, start marks before the beginning of the line."""
        k = self.order - 1
        return (self.START * k + history)[-k:] if k else ""

    def logprob(self, context: str, char: str) -> float:
        """``log P(char | context)``; ``context`` is at most ``order - 1`` characters (see :meth:`context`)."""
        key = (context, char)
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        p = math.exp(self.uniform)
        for k in range(len(context) + 1):
            seen = self.counts[k].get(context[len(context) - k:]) if k else self.counts[0].get("")
            if not seen:
                break
            total, distinct = sum(seen.values()), len(seen)
            p = (seen.get(char, 0) + distinct * p) / (total + distinct)
        value = math.log(p)
        self._cache[key] = value
        return value

    def score_text(self, text: str) -> float:
        """``log P(text, end of line)``: for tests and for comparing hypotheses outside a search."""
        total, history = 0.0, ""
        for ch in text:
            total += self.logprob(self.context(history), ch)
            history += ch
        return total + self.logprob(self.context(history), self.END)


def _flashlight_decoder(beam_width: int, num_classes: int, lm=None):
    from flashlight.lib.text.decoder import (CriterionType, LexiconFreeDecoder, LexiconFreeDecoderOptions,
                                             ZeroLM)

    options = LexiconFreeDecoderOptions(
        beam_size=beam_width,
        beam_size_token=min(num_classes, beam_width),  # classes tried per frame: the most likely ones
        beam_threshold=1e9,  # no score-based pruning beyond the beam itself
        lm_weight=1.0,  # the LM wrapper below applies its own weight and bonus
        sil_score=0.0,
        log_add=True,  # merged hypotheses sum their probabilities, as a CTC prefix search does
        criterion_type=CriterionType.CTC,
    )
    return LexiconFreeDecoder(options, lm if lm is not None else ZeroLM(), -1, 0, [])


def _weighted_lm(lm: CharNgramLM, chars: str, weight: float, bonus: float):
    """``lm`` as flashlight's LM interface: each emitted class scores ``weight * log P + bonus``."""
    from flashlight.lib.text.decoder import LM, LMState

    class _Wrapped(LM):
        def __init__(self):
            LM.__init__(self)
            self.history: Dict[object, str] = {}

        def start(self, start_with_nothing):
            root = LMState()
            self.history = {root: ""}  # one line at a time: the states of the previous line are dropped
            return root

        def score(self, state, token):
            child = state.child(token)
            history = self.history.get(child)
            if history is None:
                history = self.history[child] = self.history[state] + chars[token - 1]
            return child, weight * lm.logprob(lm.context(self.history[state]), chars[token - 1]) + bonus

        def finish(self, state):
            return state, weight * lm.logprob(lm.context(self.history[state]), lm.END)

    return _Wrapped()


def lm_paths(log_probs: np.ndarray, lm: CharNgramLM, chars: str, settings: DecodeSettings) -> List[List[int]]:
    """(B, T, C) log-probs -> per line, the best labels of a beam search with the character LM (``beam+lm``)."""
    wrapped = _weighted_lm(lm, chars, settings.lm_weight, settings.lm_bonus)
    decoder = _flashlight_decoder(settings.beam_width, log_probs.shape[2], wrapped)
    b, t, c = log_probs.shape
    return [list(_collapse(decoder.decode(line.ctypes.data, t, c)[0].tokens)) for line in log_probs]


def nbest_lists(log_probs: np.ndarray, n: int, beam_width: int) -> List[List[Tuple[Tuple[int, ...], float]]]:
    """(B, T, C) log-probs -> per line, up to ``n`` distinct label sequences with their exact CTC log-likelihood,
    best first. The candidates come from a beam search of ``max(n, beam_width)``; the best path of the exact search
    (:func:`beam_paths`) is always among them, so rescoring never starts from a worse first choice than ``beam``."""
    b, t, c = log_probs.shape
    decoder = _flashlight_decoder(max(n, beam_width), c)
    exact = beam_paths(log_probs, beam_width)
    out = []
    for line, best in zip(log_probs, exact):
        seen = {tuple(best): None}
        for result in decoder.decode(line.ctypes.data, t, c):
            seen.setdefault(_collapse(result.tokens), None)
        candidates = list(seen)
        scores = ctc_log_likelihoods(line, candidates)
        ranked = sorted(zip(candidates, scores.tolist()), key=lambda kv: -kv[1])
        out.append(ranked[:n])
    return out


# -- beam+llm: rescoring with the trained connector and the frozen teacher ------------------------------------------
def pick(candidates: Sequence[str], ctc: Sequence[float], llm: Sequence[float], llm_weight: float,
         llm_bonus: float) -> int:
    """Index of the hypothesis of highest ``ctc + llm_weight * llm + llm_bonus * len(text)``; ties go to the first."""
    totals = [c + llm_weight * l + llm_bonus * len(t) for t, c, l in zip(candidates, ctc, llm)]
    return max(range(len(totals)), key=totals.__getitem__)


@torch.inference_mode()
def teacher_log_probs(teacher, visual_tokens: torch.Tensor, texts: Sequence[str], max_tokens: int = 256) -> List[float]:
    """``log P_llm(text | visual tokens)`` of each text after the same line's visual tokens (Q, H), summed over its
    tokens and the end of text, in the layout the teacher was trained with (:class:`~htr_dist.models.llm.PrefixLM`)."""
    input_ids, mask = teacher.tokenize(list(texts), max_tokens)
    prefix = visual_tokens.unsqueeze(0).expand(len(texts), *visual_tokens.shape)
    return teacher.sequence_log_probs(prefix, input_ids.to(prefix.device), mask.to(prefix.device)).tolist()


# --------------------------------------------------------------------------------------------------------------------
# The decoding modes
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DecodeMode:
    """A ``--decode`` choice: what it does, and the function that turns a batch's CTC logits into label paths,
    ``paths(recognizer, logits (T, B, C), beam_width) -> [[class, ...], ...]``. A mode that needs more than the
    logits (``beam+llm``: the visual tokens) has none and is read by ``Recognizer.decode_outputs``."""

    help: str
    paths: Optional[Callable] = None


def _greedy(rec, logits: torch.Tensor, beam_width: int) -> List[List[int]]:
    return greedy_decode(logits)


def _beam(rec, logits: torch.Tensor, beam_width: int) -> List[List[int]]:
    return beam_paths(log_probs_of(logits), beam_width)


def _beam_lm(rec, logits: torch.Tensor, beam_width: int) -> List[List[int]]:
    rec.check_mode("beam+lm")
    settings = replace(rec.settings, beam_width=beam_width)
    return lm_paths(log_probs_of(logits), rec.char_lm(), rec.alphabet.chars, settings)


DECODE_MODES: Dict[str, DecodeMode] = {
    "greedy": DecodeMode("the best class of each frame", _greedy),
    "beam": DecodeMode("CTC prefix beam search (compiled), exact sums over alignments", _beam),
    "beam+lm": DecodeMode("beam search with a character n-gram LM of the training text", _beam_lm),
    "beam+llm": DecodeMode("the beam's n best hypotheses rescored by the trained connector and the teacher LLM"),
}
"""Every decoding mode, the one list that command-line choices, help texts and checks read: a new mode is a
function above and its entry here."""


def describe_modes() -> str:
    """``name: what it does; ...`` for a command's --help."""
    return "; ".join(f"{name}: {mode.help}" for name, mode in DECODE_MODES.items())
