"""Decoding modes: the compiled beam search against the reference one, n-best lists, the character LM, beam+lm,
rescoring with a tiny teacher, and the settings file beside a model."""

import json
import math

import numpy as np
import pytest
import torch

from htr_dist.decode import (CharNgramLM, DecodeError, DecodeSettings, beam_paths, ctc_log_likelihoods, lm_paths,
                             log_probs_of, nbest_lists, pick, teacher_log_probs)
from htr_dist.train.metrics import greedy_decode, prefix_beam_search

from test_metrics import labelling_probs


def random_log_probs(seed, t=40, c=12, scale=1.0):
    """(T, C) log-probs; ``scale`` sets how peaked each frame is (1: nearly flat, 5: a trained model's)."""
    rng = np.random.default_rng(seed)
    return torch.from_numpy(rng.standard_normal((t, c)).astype(np.float32) * scale).log_softmax(-1).numpy()


@pytest.mark.parametrize("scale", [1.0, 2.0, 5.0])
def test_compiled_beam_is_never_worse_than_the_reference_search(scale):
    same = 0
    for seed in range(12):
        lp = random_log_probs(seed, scale=scale)
        ref = prefix_beam_search(lp, beam_width=10, prune=-math.inf)
        got = beam_paths(lp[None], beam_width=10, cut=0.0)[0]
        same += got == ref
        ll_ref, ll_got = ctc_log_likelihoods(lp, [ref, got])
        assert ll_got >= ll_ref - 1e-4, (seed, ref, got)
    assert same >= 10  # the same search: it differs from the reference only on a near tie, if ever


def test_compiled_beam_equals_greedy_where_every_frame_is_clear():
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 6, size=30)
    logits = torch.full((30, 1, 6), -9.0)
    logits[torch.arange(30), 0, torch.from_numpy(frames)] = 0.0
    assert beam_paths(log_probs_of(logits), 10) == greedy_decode(logits)


def test_the_cut_changes_nothing_on_peaked_frames():
    for seed in range(8):
        lp = random_log_probs(seed, t=60, c=30, scale=6.0)[None]
        assert beam_paths(lp, 10) == beam_paths(lp, 10, cut=0.0)


def test_beam_width_below_one_is_named():
    with pytest.raises(DecodeError, match="beam width must be >= 1, got 0"):
        beam_paths(random_log_probs(0)[None], 0)


@pytest.mark.parametrize("seed", range(4))
def test_ctc_log_likelihood_is_exact(seed):
    rng = np.random.default_rng(seed)
    probs = rng.dirichlet(np.ones(3) * 0.7, size=5).astype(np.float32)  # (T=5, C=3)
    exact = labelling_probs(probs)
    labels = sorted(exact, key=exact.get, reverse=True)[:6]
    got = ctc_log_likelihoods(np.log(probs), labels)
    assert np.allclose(got, [math.log(exact[k]) for k in labels], atol=1e-4)


def test_nbest_lists_are_distinct_ranked_and_start_at_the_beam_result():
    lp = np.stack([random_log_probs(s, scale=2.5) for s in range(3)])
    lists = nbest_lists(lp, n=5, beam_width=8)
    for line, candidates, best in zip(lp, lists, beam_paths(lp, 8)):
        labels = [c for c, _ in candidates]
        scores = [s for _, s in candidates]
        assert 1 < len(candidates) <= 5 and len(set(labels)) == len(labels)
        assert scores == sorted(scores, reverse=True)
        assert np.allclose(scores, ctc_log_likelihoods(line, labels))
        assert scores[0] >= ctc_log_likelihoods(line, [best])[0] - 1e-6


def test_char_lm_is_a_distribution_that_prefers_what_it_read():
    texts = ["the cat sat on the mat", "a cat and a hat", "that cat"]
    lm = CharNgramLM(texts, order=4)
    vocab = sorted(set("".join(texts))) + [lm.END]
    for history in ("", "the c", "zzz", "a h"):  # seen, and a context never seen
        total = sum(math.exp(lm.logprob(lm.context(history), ch)) for ch in vocab)
        assert total == pytest.approx(1.0, abs=1e-9)
    assert lm.score_text("the cat") > lm.score_text("the cot") > lm.score_text("tqe cxt")
    with pytest.raises(DecodeError, match="needs at least one transcription"):
        CharNgramLM([])
    with pytest.raises(DecodeError, match="lm_order must be >= 1"):
        CharNgramLM(texts, order=0)


def ambiguous_logits(chars, spelled, confusable, other):
    """(T, 1, C) logits that spell ``spelled`` clearly except one frame, shared 50/50 between ``confusable`` and
    ``other``, with a blank between characters."""
    frames = []
    for ch in spelled:
        frames.append({chars.index(ch) + 1: 0.0} if ch != confusable else
                      {chars.index(confusable) + 1: math.log(0.45), chars.index(other) + 1: math.log(0.55)})
        frames.append({0: 0.0})
    logits = torch.full((len(frames), 1, len(chars) + 1), -12.0)
    for t, frame in enumerate(frames):
        for c, v in frame.items():
            logits[t, 0, c] = v
    return logits


def test_beam_lm_lets_the_language_model_settle_what_the_image_leaves_open():
    chars = " acehmorst"
    logits = ambiguous_logits(chars, "the cat", "a", "o")  # the image says 'cot' slightly more than 'cat'
    plain = "".join(chars[i - 1] for i in beam_paths(log_probs_of(logits), 10)[0])
    assert plain == "the cot"
    lm = CharNgramLM(["the cat sat", "a cat", "the cat came home"] * 3, order=4)
    settings = DecodeSettings(lm_weight=0.5)
    got = "".join(chars[i - 1] for i in lm_paths(log_probs_of(logits), lm, chars, settings)[0])
    assert got == "the cat"
    # weight 0: the LM has no say, and the search finds what the plain beam search found
    off = DecodeSettings(lm_weight=0.0)
    assert "".join(chars[i - 1] for i in lm_paths(log_probs_of(logits), lm, chars, off)[0]) == "the cot"


def test_pick_takes_the_highest_combined_score():
    texts = ["form", "from", "fron"]
    ctc = [-1.0, -1.5, -0.9]
    llm = [-20.0, -12.0, -30.0]
    assert pick(texts, ctc, llm, 0.0, 0.0) == 2  # CTC alone
    assert pick(texts, ctc, llm, 0.1, 0.0) == 1  # -2.7 beats -3.0 and -3.9
    assert pick(["a", "ab"], [-1.0, -1.5], [0.0, 0.0], 0.0, 1.0) == 1  # with 1 per character: 0.5 beats 0.0
    assert pick(["x", "y"], [-1.0, -1.0], [-2.0, -2.0], 1.0, 0.0) == 0  # a tie goes to the first


@pytest.mark.parametrize("bos_first, line_end", [(False, "eos"), (True, "newline")])
def test_teacher_scores_texts_as_it_was_trained_to_predict_them(tiny_llama, bos_first, line_end):
    from htr_dist.models.llm import LineFormat, PrefixLM, load_causal_lm

    lm, tok = load_causal_lm(tiny_llama, "/nonexistent-cache")
    teacher = PrefixLM(lm, tok, line_format=LineFormat(bos_first, "", line_end))
    torch.manual_seed(0)
    visual = torch.randn(4, lm.config.hidden_size)
    texts = ["The quick brown fox", "The quick brown fax", "jumps over"]
    got = teacher_log_probs(teacher, visual, texts)
    for text, value in zip(texts, got):  # one line alone: the summed log-prob is -(mean CE) * scored tokens
        ids, mask = teacher.tokenize([text], 256)
        with torch.no_grad():
            mean_ce = teacher(visual[None], ids, mask).item()
        assert value == pytest.approx(-mean_ce * teacher.label_mask(ids, mask).sum().item(), rel=1e-4)
    # rescoring with this teacher picks the hypothesis of the highest combined score
    ctc = [-1.0, -1.0, -1.2]
    totals = [c + 0.5 * l for c, l in zip(ctc, got)]
    assert pick(texts, ctc, got, 0.5, 0.0) == int(np.argmax(totals))


def test_settings_round_trip_and_name_the_bad_key(tmp_path):
    model = str(tmp_path / "best_model.pt")
    assert DecodeSettings.load(model) == DecodeSettings()  # none saved: the defaults
    s = DecodeSettings(lm_weight=0.7, lm_texts=["a b", "c"], tuned={"beam+lm": {"cer": 0.1}})
    path = s.save(model)
    assert path == str(tmp_path / "best_model.decode.json")
    assert DecodeSettings.load(model) == s
    json.dump({"lm_wieght": 1.0}, open(path, "w"))
    with pytest.raises(DecodeError, match=r"best_model.decode.json: unknown decoding setting 'lm_wieght'"):
        DecodeSettings.load(model)
    open(path, "w").write("{not json")
    with pytest.raises(DecodeError, match="best_model.decode.json: unreadable decoding settings"):
        DecodeSettings.load(model)


def export_tiny(tmp_path, llm_hidden, name):
    from htr_dist.config import Config
    from htr_dist.models.htr import HTRModel
    from htr_dist.train.export import export_model
    from test_htr_model import CHARS, TINY_CONNECTOR, tiny_arch

    cfg = Config()
    cfg.arch, cfg.connector = tiny_arch(), TINY_CONNECTOR
    cfg.data.img_height, cfg.data.img_width = 32, 160
    cfg.llm.name_or_path = "/models/teacher-it-was-trained-with"
    torch.manual_seed(0)
    model = HTRModel(cfg.arch, cfg.connector, len(CHARS) + 1, 32, 160, llm_hidden)
    return export_model(model, cfg, CHARS, str(tmp_path / name)), model


def test_an_export_keeps_the_connector_and_names_its_teacher(tmp_path):
    from htr_dist.inference import Recognizer

    path, model = export_tiny(tmp_path, 24, "with_teacher.pt")
    rec = Recognizer.load(path)
    assert rec.teacher_name == "/models/teacher-it-was-trained-with" and rec.model.llm_hidden == 24
    for key, value in model.connector.state_dict().items():
        assert torch.equal(rec.model.connector.state_dict()[key], value)
    images = torch.rand(2, 1, 32, 160)
    assert len(rec.predict(images, "beam")) == 2 and rec._teacher is None  # modes without the LLM never load it
    rec.use_teacher("/elsewhere/same-teacher")
    assert rec.teacher_name == "/elsewhere/same-teacher"


def test_modes_that_cannot_run_say_why_before_any_work(tmp_path):
    from htr_dist.inference import Recognizer

    path, _ = export_tiny(tmp_path, None, "plain.pt")
    rec = Recognizer.load(path)
    assert rec.teacher_name is None
    with pytest.raises(DecodeError, match=r"plain.pt: --decode beam\+llm needs a model trained with a teacher"):
        rec.check_mode("beam+llm")
    with pytest.raises(DecodeError, match=r"plain.decode.json holds none: build it with launch/evaluate.py --tune"):
        rec.predict(torch.rand(1, 1, 32, 160), "beam+lm")
    with pytest.raises(DecodeError, match=r"decode: 'viterbi' is not one of greedy, beam, beam\+lm, beam\+llm"):
        rec.check_mode("viterbi")
    rec.use_teacher("/some/llm")  # no connector: nothing to give a teacher to
    assert rec.teacher_name is None
