"""Backbone, heads, connector, LLM sampling and losses on tiny shapes; decoding and metrics."""

import math

import numpy as np
import pytest
import torch

from htr_dist.config import load_config
from htr_dist.models.backbone import HybridBackboneCRNNMobileViT, MobileViTBlock
from htr_dist.models.htr import HTRModel, HTRSystem, compute_losses, count_parameters, num_llm_samples, \
    sample_llm_index
from htr_dist.models.llm import PrefixLM, load_causal_lm
from htr_dist.train.metrics import beam_decode, cer, edit_distance, greedy_decode, prefix_beam_search, wer

REFERENCE = [[2, 64], "M", [3, 128], "M", [2, 256]]


@pytest.mark.parametrize("cnn_cfg, size, expected", [
    (REFERENCE, (64, 256), (2, 32, 256)),
    ([[1, 16], "M", "mobilevit1", [1, 32], "M", "mobilevit2", [1, 48]], (32, 256), (2, 32, 48)),
    ([[1, 16], "mobilevit1", "M", [1, 24]], (48, 200), (2, 50, 24)),  # sides not multiples of the patch
])
def test_backbone_shapes(cnn_cfg, size, expected):
    net = HybridBackboneCRNNMobileViT(cnn_cfg, 16, (4, 2), (4, 8), vit_depth=1)
    out = net(torch.rand(2, 1, *size))
    assert out.shape == expected


def test_default_backbone_gives_128_frames_of_256():
    cfg = load_config()
    net = HybridBackboneCRNNMobileViT(cfg.arch.cnn_cfg, 32, (4, 2), (4, 8))
    with torch.no_grad():
        assert net(torch.rand(1, 1, 128, 1024)).shape == (1, 128, 256)


def test_mobilevit_attention_spans_patches():
    torch.manual_seed(0)
    block = MobileViTBlock(channels=8, dim=8, depth=1, heads=2, patch=4).eval()
    x = torch.rand(1, 8, 8, 32)
    y0 = block(x)
    x2 = x.clone()
    x2[:, :, 0:4, 0:4] += 1.0  # perturb only the first 4x4 patch
    y1 = block(x2)
    far = (y1 - y0)[:, :, 4:8, 24:32].abs().max()  # a patch far away (beyond any 3x3 conv's reach)
    assert far > 1e-4


def test_reference_parameter_count():
    cfg = load_config(None, [f"arch.cnn_cfg={REFERENCE}"])
    model = HTRModel(cfg.arch, cfg.connector, 80, 128, 1024, None)
    n = count_parameters(model)["trainable"]
    assert 6.5e6 < n < 8.0e6  # Retsinas et al.'s configuration is about 7.4 M parameters


def test_head_types_and_tap():
    for head_type in ("both", "rnn", "cnn"):
        cfg = load_config(None, ["arch.cnn_cfg=[[1, 16], 'M', [1, 32]]", f"arch.head_type={head_type}",
                                 "arch.rnn_hidden_size=24", "arch.rnn_layers=3", "arch.llm_tap_layer=2"])
        model = HTRModel(cfg.arch, cfg.connector, 10, 32, 128, llm_hidden=40)
        out = model(torch.rand(3, 1, 32, 128), torch.tensor([0, 2]))
        assert out["ctc_logits"].shape == (32, 3, 10)
        assert (out["shortcut_logits"] is not None) == (head_type == "both")
        assert out["visual_tokens"].shape == (2, cfg.connector.num_queries, 40)
        if head_type != "cnn":
            assert model.head.tap_dim == 48


@pytest.mark.parametrize("ratio", [0.01, 0.0625, 0.1, 0.125, 0.25, 0.5, 0.99, 1.0])
def test_llm_sample_count_always_at_least_one(ratio):
    gen = torch.Generator().manual_seed(0)
    for batch in range(1, 18):
        k = num_llm_samples(batch, ratio)
        assert k == min(batch, max(1, math.floor(ratio * batch + 0.5)))
        idx = sample_llm_index(batch, ratio, gen)
        assert len(idx) == k >= 1 and len(set(idx.tolist())) == k and int(idx.max()) < batch
    assert num_llm_samples(16, 0.125) == 2 and num_llm_samples(16, 0.0625) == 1


class CountingTeacher(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner, self.calls, self.rows = inner, 0, []

    def tokenize(self, texts, max_tokens):
        return self.inner.tokenize(texts, max_tokens)

    def forward(self, prefix, ids, mask):
        self.calls += 1
        self.rows.append(prefix.shape[0])
        return self.inner(prefix, ids, mask)


def tiny_model(cfg, num_classes, hidden):
    return HTRModel(cfg.arch, cfg.connector, num_classes, 32, 128, hidden)


TINY = ["arch.cnn_cfg=[[1, 16], 'M', 'mobilevit1', [1, 24]]", "arch.stem_channels=8", "arch.rnn_hidden_size=16",
        "arch.rnn_layers=2", "arch.mobilevit_patch_sizes=[2]", "connector.num_queries=4", "connector.dim=16",
        "connector.num_layers=1", "connector.num_heads=2", "connector.proj_hidden=32"]


def batch_of(texts, chars="abcdefghijklmnopqrstuvwxyz "):
    ids = [[chars.index(c) + 1 for c in t] for t in texts]
    return {"images": torch.rand(len(texts), 1, 32, 128), "texts": texts,
            "targets": torch.tensor([i for s in ids for i in s]), "target_lengths": torch.tensor([len(s) for s in ids])}


def test_compute_losses_calls_teacher_once_and_grads(tiny_llama):
    lm, tok = load_causal_lm(tiny_llama, "/nonexistent-cache")
    teacher = CountingTeacher(PrefixLM(lm, tok))
    for batch_size in (1, 3, 17):
        cfg = load_config(None, TINY + ["train.llm_sample_ratio=0.125"])
        model = tiny_model(cfg, 28, teacher.inner.hidden_size)
        teacher.calls, teacher.rows = 0, []
        losses = compute_losses(model, teacher, batch_of(["hello world"] * batch_size), cfg.train, cfg.arch)
        assert teacher.calls == 1 and teacher.rows == [num_llm_samples(batch_size, 0.125)]
        assert set(losses) >= {"ctc", "ctc_shortcut", "llm", "total"}
        expected = losses["ctc"] + 0.1 * losses["ctc_shortcut"] + 1.0 * losses["llm"]
        assert torch.allclose(losses["total"], expected)
    # the LLM loss alone trains the connector and the backbone, never the LLM
    losses["llm"].backward()
    assert model.connector.queries.grad.abs().sum() > 0
    assert model.backbone.stem[0].weight.grad.abs().sum() > 0
    assert model.head.rnn.lower.weight_ih_l0.grad.abs().sum() > 0
    assert model.head.rnn.out[1].weight.grad is None  # after the tap point: no gradient from the LLM
    assert all(p.grad is None and not p.requires_grad for p in lm.parameters())
    assert not lm.training
    teacher.inner.train()
    assert not lm.training  # stays in eval inside train()


def test_label_masking_matches_hand_computed_loss(tiny_llama):
    lm, tok = load_causal_lm(tiny_llama, "/nonexistent-cache")
    teacher = PrefixLM(lm, tok)
    ids, mask = teacher.tokenize(["the cat sat", "a"], 48)
    assert ids[0, 0] == tok.bos_token_id and ids[1, 2] == tok.eos_token_id and mask[1].sum() == 3
    torch.manual_seed(0)
    prefix = torch.randn(2, 5, teacher.hidden_size)
    loss = teacher(prefix, ids, mask)
    with torch.no_grad():
        x = torch.cat([prefix, lm.get_input_embeddings()(ids)], 1)
        full_mask = torch.cat([torch.ones(2, 5, dtype=torch.long), mask], 1)
        logits = lm(inputs_embeds=x, attention_mask=full_mask).logits  # (2, 5 + L, V)
        terms = []
        for row in range(2):
            n = int(mask[row].sum())
            for j in range(1, n):  # token 0 is BOS: not scored; tokens 1..n-1 (text + EOS) are
                lp = logits[row, 5 + j - 1].log_softmax(-1)
                terms.append(-lp[ids[row, j]])
        hand = torch.stack(terms).mean()
    assert torch.allclose(loss, hand, atol=1e-5)
    # padding does not change a line's loss
    alone = teacher(prefix[1:], *teacher.tokenize(["a"], 48))
    padded_ids, padded_mask = teacher.tokenize(["a", "a much longer line of text"], 48)
    both = teacher(prefix[1:].repeat(2, 1, 1)[:1], padded_ids[:1], padded_mask[:1])
    assert torch.allclose(alone, both, atol=1e-5)
    ids_t, _ = teacher.tokenize(["x" * 200], 10)
    assert ids_t.shape[1] == 12 and teacher.truncated == 1


def test_greedy_and_beam_decoding():
    # frames: a a _ a b b _  -> "aab" (blank separates the repeated a)
    seq = [1, 1, 0, 1, 2, 2, 0]
    logits = torch.full((len(seq), 1, 3), -10.0)
    for t, c in enumerate(seq):
        logits[t, 0, c] = 0.0
    assert greedy_decode(logits) == [[1, 1, 2]]
    assert beam_decode(logits, 5) == [[1, 1, 2]]
    # beam search beats greedy when the best path is not the best labelling:
    # p(blank) = 0.6 per frame but "a" has total mass 1 - 0.6^2 ... over two frames
    probs = np.array([[0.6, 0.4], [0.6, 0.4]])
    assert prefix_beam_search(np.log(probs), 4) == [1]  # P("a") = 0.64 > P("") = 0.36
    assert greedy_decode(torch.log(torch.tensor(probs)).unsqueeze(1)) == [[]]


def test_edit_distance_cer_wer():
    assert edit_distance("kitten", "sitting") == 3
    assert edit_distance("", "abc") == 3
    assert cer(["abcd", "ef"], ["abxd", ""]) == pytest.approx(3 / 6)  # corpus level, not a mean of per-line rates
    assert wer(["the cat sat", "on it"], ["the bat sat", "on it"]) == pytest.approx(1 / 5)
