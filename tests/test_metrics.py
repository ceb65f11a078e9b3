"""CTC decoding (greedy, prefix beam search) and corpus-level CER / WER on hand-made examples."""

import itertools
import math

import numpy as np
import pytest
import torch

from htr_dist.train.metrics import beam_decode, cer, edit_distance, greedy_decode, prefix_beam_search, wer


def one_hot_logits(frames, num_classes=4):
    """(T, 1, C) logits whose best class at frame t is frames[t]."""
    logits = torch.full((len(frames), 1, num_classes), -10.0)
    for t, c in enumerate(frames):
        logits[t, 0, c] = 0.0
    return logits


def test_greedy_collapses_repeats_and_drops_blanks():
    assert greedy_decode(one_hot_logits([1, 1, 0, 1, 2, 2, 0])) == [[1, 1, 2]]
    assert greedy_decode(one_hot_logits([0, 0, 0])) == [[]]
    assert greedy_decode(one_hot_logits([3, 3, 3, 2])) == [[3, 2]]
    batch = torch.cat([one_hot_logits([1, 2, 2]), one_hot_logits([0, 3, 0])], dim=1)  # (T, B=2, C)
    assert greedy_decode(batch) == [[1, 2], [3]]


def test_beam_on_clear_paths_matches_greedy():
    for frames in ([1, 1, 0, 1, 2, 2, 0], [0, 0], [3, 0, 3, 3, 1], [2]):
        logits = one_hot_logits(frames)
        assert beam_decode(logits, 5) == greedy_decode(logits)


def test_beam_width_below_one_is_named():
    with pytest.raises(ValueError, match="beam width must be >= 1, got 0"):
        beam_decode(one_hot_logits([1, 2]), 0)


def test_beam_finds_the_best_labelling_where_greedy_does_not():
    # each frame: blank 0.6, 'a' 0.4. Best path is blank-blank (0.36); but P('a') = 1 - 0.36 = 0.64.
    probs = np.array([[0.6, 0.4], [0.6, 0.4]])
    assert prefix_beam_search(np.log(probs), 4) == [1]
    assert greedy_decode(torch.log(torch.tensor(probs)).unsqueeze(1)) == [[]]


def labelling_probs(probs):
    """Exact P(labelling) by enumerating every CTC path (tiny T and C only)."""
    out = {}
    for path in itertools.product(range(probs.shape[1]), repeat=probs.shape[0]):
        p = math.prod(probs[t, c] for t, c in enumerate(path))
        labels = tuple(c for i, c in enumerate(path) if c != 0 and (i == 0 or path[i - 1] != c))
        out[labels] = out.get(labels, 0.0) + p
    return out


@pytest.mark.parametrize("seed", range(6))
def test_beam_search_agrees_with_brute_force(seed):
    rng = np.random.default_rng(seed)
    probs = rng.dirichlet(np.ones(3) * 0.7, size=5)  # (T=5, C=3)
    exact = labelling_probs(probs)
    best = max(exact, key=exact.get)
    got = prefix_beam_search(np.log(probs), beam_width=64, prune=-math.inf)
    assert exact[tuple(got)] == pytest.approx(exact[best])


def test_beam_decode_batch_and_speed_shape():
    torch.manual_seed(0)
    logits = torch.randn(128, 3, 80)  # a full line's frames, IAM-sized alphabet
    out = beam_decode(logits, beam_width=8)
    assert len(out) == 3 and all(all(0 < c < 80 for c in line) for line in out)


def test_edit_distance():
    assert edit_distance("kitten", "sitting") == 3
    assert edit_distance("", "abc") == 3 and edit_distance("abc", "") == 3
    assert edit_distance("abc", "abc") == 0
    assert edit_distance(["the", "cat"], ["a", "cat", "sat"]) == 2  # works on word lists too


def test_cer_and_wer_are_corpus_level():
    # per-line CERs would be 1/4 and 2/2 (mean 0.625); the corpus CER is 3 errors / 6 reference characters
    assert cer(["abcd", "ef"], ["abxd", ""]) == pytest.approx(3 / 6)
    assert cer(["same"], ["same"]) == 0.0
    assert wer(["the cat sat", "on it"], ["the bat sat", "on it"]) == pytest.approx(1 / 5)
    assert wer(["a  b\tc"], ["a b c"]) == 0.0  # whitespace-split words
    assert wer(["one two"], ["one two three"]) == pytest.approx(1 / 2)
