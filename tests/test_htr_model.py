"""The whole recogniser: LLM subset sampling, compute_losses (one teacher call, features reused), parameter counts,
and an overfit run on rendered lines with and without the LLM loss."""

import fractions
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn as nn

from htr_dist.config import ArchConfig, Config, ConnectorConfig
from htr_dist.models.htr import HTRModel, LossSpec, compute_losses, count_parameters, num_llm_samples, \
    sample_llm_index
from htr_dist.train.metrics import cer, greedy_decode

CHARS = "abcdefghijklmnopqrstuvwxyz "
REFERENCE = [[2, 64], "M", [3, 128], "M", [2, 256]]
SEED_HYBRID = [[2, 64], "M", "mobilevit1", [4, 128], "M", "mobilevit2", [4, 256]]


def tiny_arch(**kw):
    base = dict(cnn_cfg=[[1, 16], "M", "mobilevit1", [1, 32]], stem_channels=16, stem_stride=[2, 1],
                mobilevit_patch_sizes=[4], mobilevit_depth=1, rnn_hidden_size=32, rnn_layers=2, rnn_dropout=0.0)
    base.update(kw)
    return ArchConfig(**base)


TINY_CONNECTOR = ConnectorConfig(num_queries=4, dim=16, num_layers=1, num_heads=2, proj_hidden=32, dropout=0.0)


def batch_of(texts, height=32, width=160, images=None):
    ids = [[CHARS.index(c) + 1 for c in t] for t in texts]
    return {"images": images if images is not None else torch.rand(len(texts), 1, height, width), "texts": list(texts),
            "targets": torch.tensor([i for s in ids for i in s]), "target_lengths": torch.tensor([len(s) for s in ids]),
            "keys": [f"k{i}" for i in range(len(texts))]}


class CountingTeacher(nn.Module):
    """Stands in for PrefixLM: counts calls, records what it was given; loss = mean square of the prefix."""

    hidden_size = 12

    def __init__(self):
        super().__init__()
        self.frozen = nn.Linear(2, 2).requires_grad_(False)
        self.calls, self.rows, self.texts = 0, [], []

    def tokenize(self, texts, max_tokens):
        self.texts.append(list(texts))
        ids = torch.ones(len(texts), min(max_tokens, 5), dtype=torch.long)
        return ids, torch.ones_like(ids)

    def forward(self, prefix, input_ids, attention_mask):
        self.calls += 1
        self.rows.append(prefix.shape[0])
        assert input_ids.shape[0] == attention_mask.shape[0] == prefix.shape[0]
        return prefix.pow(2).mean()


@pytest.mark.parametrize("ratio", [0.01, 0.05, 0.0625, 0.1, 0.125, 0.25, 1 / 3, 0.5, 0.75, 0.99, 1.0])
def test_llm_subset_size_and_indices(ratio):
    gen = torch.Generator().manual_seed(0)
    for batch in range(1, 18):
        k = num_llm_samples(batch, ratio)
        exact = fractions.Fraction(str(ratio)) * batch  # the ratio as written, in exact arithmetic
        assert k == min(batch, max(1, math.floor(exact + fractions.Fraction(1, 2)))) and 1 <= k <= batch
        idx = sample_llm_index(batch, ratio, gen)
        assert idx.dtype == torch.long and len(idx) == k
        assert idx.tolist() == sorted(set(idx.tolist())) and 0 <= int(idx.min()) and int(idx.max()) < batch


def test_llm_subset_rounding_examples():
    assert num_llm_samples(16, 0.125) == 2 and num_llm_samples(16, 1.0) == 16
    assert num_llm_samples(12, 0.125) == 2  # 1.5 rounds half up
    assert num_llm_samples(4, 0.125) == 1  # 0.5 rounds half up
    assert num_llm_samples(3, 0.125) == 1  # 0.375 would round to 0: never 0 (a rank skipping the LLM hangs)
    assert num_llm_samples(50, 0.29) == 15  # 14.5 rounds up, although 0.29 * 50 is 14.499999999999998 in floats
    with pytest.raises(ValueError, match="llm_sample_ratio"):
        num_llm_samples(16, 0.0)
    with pytest.raises(ValueError, match="batch size"):
        num_llm_samples(0, 0.5)


def test_sampling_is_seeded():
    a = sample_llm_index(16, 0.25, torch.Generator().manual_seed(5))
    b = sample_llm_index(16, 0.25, torch.Generator().manual_seed(5))
    assert torch.equal(a, b)


def test_forward_outputs_and_connector_reads_tap_rows():
    torch.manual_seed(0)
    model = HTRModel(tiny_arch(), TINY_CONNECTOR, 10, 32, 160, llm_hidden=12).eval()
    seen = {}
    model.connector.register_forward_hook(lambda m, i, o: seen.__setitem__("feats", i[0]))
    images = torch.rand(5, 1, 32, 160)
    with torch.no_grad():
        out = model(images, torch.tensor([1, 3]))
        _, _, tap = model.head(model.backbone(images))
    assert out["ctc_logits"].shape == (80, 5, 10) and out["shortcut_logits"].shape == (80, 5, 10)
    assert out["visual_tokens"].shape == (2, 4, 12)
    assert torch.allclose(seen["feats"], tap[[1, 3]], atol=1e-6)  # (k, T, 2 * hidden): after BiLSTM layer 1
    assert seen["feats"].shape == (2, 80, 64)
    assert model(images)["visual_tokens"] is None
    # without llm_hidden there is no connector; with one, the export keeps it (for --decode beam+llm)
    assert HTRModel(tiny_arch(), TINY_CONNECTOR, 10, 32, 160).connector is None
    assert any(k.startswith("connector.") for k in model.export_state_dict())


def test_pool_connector_is_exported_and_read_back(tmp_path):
    from htr_dist.inference import Recognizer
    from htr_dist.models.connector import PoolConnector
    from htr_dist.train.export import export_model

    cfg = Config()
    cfg.arch, cfg.connector = tiny_arch(), replace(TINY_CONNECTOR, kind="pool")
    cfg.data.img_height, cfg.data.img_width = 32, 160
    torch.manual_seed(0)
    model = HTRModel(cfg.arch, cfg.connector, len(CHARS) + 1, 32, 160, llm_hidden=12).eval()
    assert isinstance(model.connector, PoolConnector)
    path = export_model(model, cfg, CHARS, str(tmp_path / "model.pt"))
    back = Recognizer.load(path).model
    assert isinstance(back.connector, PoolConnector) and back.llm_hidden == 12
    saved = model.connector.state_dict()
    assert all(torch.equal(v, saved[k]) for k, v in back.connector.state_dict().items())
    images, index = torch.rand(3, 1, 32, 160), torch.tensor([0, 2])
    with torch.no_grad():  # inference folds the batch norms (and may run the BiLSTM in bf16): close, not equal
        got, want = back(images, index)["visual_tokens"], model(images, index)["visual_tokens"]
    assert got.shape == want.shape == (2, 4, 12) and torch.allclose(got, want, atol=2e-2)


@pytest.mark.parametrize("head_type", ["both", "rnn", "cnn"])
def test_head_type_and_tap_layer_set_what_the_connector_reads(head_type):
    torch.manual_seed(0)
    arch = tiny_arch(head_type=head_type, rnn_hidden_size=24, rnn_layers=3, llm_tap_layer=2)
    model = HTRModel(arch, TINY_CONNECTOR, 10, 32, 160, llm_hidden=40).eval()
    seen = {}
    model.connector.register_forward_hook(lambda m, i, o: seen.__setitem__("feats", i[0]))
    with torch.no_grad():
        out = model(torch.rand(3, 1, 32, 160), torch.tensor([0, 2]))
    assert out["ctc_logits"].shape == (80, 3, 10)
    assert (out["shortcut_logits"] is not None) == (head_type == "both")
    assert out["visual_tokens"].shape == (2, TINY_CONNECTOR.num_queries, 40)
    # BiLSTM layer 2 of 3 (2 x 24 wide); without a recurrent head, the pooled sequence
    width = model.backbone.out_channels if head_type == "cnn" else 48
    assert model.head.tap_dim == width and seen["feats"].shape == (2, 80, width)


@pytest.mark.parametrize("batch_size", [1, 3, 8, 17])
def test_compute_losses_calls_teacher_once_on_the_sampled_lines(batch_size):
    torch.manual_seed(0)
    arch, spec = tiny_arch(), LossSpec(llm_sample_ratio=0.125, llm_weight=0.5)
    model = HTRModel(arch, TINY_CONNECTOR, len(CHARS) + 1, 32, 160, llm_hidden=CountingTeacher.hidden_size)
    backbone_calls = []
    model.backbone.register_forward_hook(lambda m, i, o: backbone_calls.append(i[0].shape[0]))
    teacher = CountingTeacher()
    texts = [f"line {chr(97 + i % 26)}" for i in range(batch_size)]
    losses = compute_losses(model, teacher, batch_of(texts), spec, torch.Generator().manual_seed(3))
    k = num_llm_samples(batch_size, 0.125)
    assert teacher.calls == 1 and teacher.rows == [k]
    assert backbone_calls == [batch_size]  # one backbone pass: the LLM subset reuses its features
    index = sample_llm_index(batch_size, 0.125, torch.Generator().manual_seed(3))
    assert teacher.texts == [[texts[i] for i in index.tolist()]]
    for name in ("ctc", "ctc_shortcut", "llm", "total"):
        assert losses[name].dim() == 0 and torch.isfinite(losses[name])
    expected = losses["ctc"] + spec.shortcut_weight * losses["ctc_shortcut"] + 0.5 * losses["llm"]
    assert torch.allclose(losses["total"], expected) and losses["llm"] > 0
    # the LLM term trains the connector and everything below the tap, nothing above it
    model.zero_grad()
    losses["llm"].backward()
    assert model.connector.queries.grad.abs().sum() > 0
    assert model.backbone.stem[0].weight.grad.abs().sum() > 0
    assert model.head.rnn.lower.weight_ih_l0.grad.abs().sum() > 0
    assert model.head.rnn.out[-1].weight.grad is None and model.head.shortcut.conv.weight.grad is None


def test_compute_losses_without_llm():
    arch = tiny_arch()
    model = HTRModel(arch, TINY_CONNECTOR, len(CHARS) + 1, 32, 160, llm_hidden=12)
    teacher = CountingTeacher()
    batch = batch_of(["abc", "de"])
    for t, use in ((None, True), (teacher, False)):
        losses = compute_losses(model, t, batch, LossSpec(use_llm=use))
        assert losses["llm"].item() == 0.0
        assert torch.allclose(losses["total"], losses["ctc"] + 0.1 * losses["ctc_shortcut"])
    assert teacher.calls == 0
    # head 'rnn' has no shortcut: its loss is 0
    arch_rnn = tiny_arch(head_type="rnn")
    losses = compute_losses(HTRModel(arch_rnn, TINY_CONNECTOR, len(CHARS) + 1, 32, 160), None, batch, LossSpec())
    assert losses["ctc_shortcut"].item() == 0.0 and losses["ctc"] > 0


def test_a_step_without_the_llm_keeps_the_connector_in_the_graph():
    """train.llm_every: on a step that skips the LLM the teacher is not called, the loss is the CTC loss alone, and
    every connector parameter still gets a (zero) gradient, so DDP finds no unused parameter."""
    arch = tiny_arch()
    model = HTRModel(arch, TINY_CONNECTOR, len(CHARS) + 1, 32, 160, llm_hidden=CountingTeacher.hidden_size)
    teacher = CountingTeacher()
    losses = compute_losses(model, teacher, batch_of(["abc", "de"]), LossSpec(), llm_step=False)
    assert teacher.calls == 0 and losses["llm"].item() == 0.0
    assert torch.allclose(losses["total"], losses["ctc"] + 0.1 * losses["ctc_shortcut"])
    losses["total"].backward()
    grads = [p.grad for p in model.connector.parameters()]
    assert grads and all(g is not None and not g.any() for g in grads)
    assert model.backbone.stem[0].weight.grad.abs().sum() > 0


def test_a_training_step_under_bf16_autocast():
    """dist.precision=bf16: fp32 weights, the step under autocast; every trainable weight gets a finite fp32 grad."""
    torch.manual_seed(0)
    arch = tiny_arch()
    model = HTRModel(arch, TINY_CONNECTOR, len(CHARS) + 1, 32, 160, llm_hidden=12)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = compute_losses(model, CountingTeacher(), batch_of(["abc", "de"]), LossSpec(use_llm=True))
    losses["total"].backward()
    assert torch.isfinite(losses["total"]) and losses["llm"] > 0
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all(), name


def test_losses_of_the_default_spec_are_named_and_weighted():
    arch = tiny_arch()
    teacher = CountingTeacher()
    model = HTRModel(arch, TINY_CONNECTOR, len(CHARS) + 1, 32, 160, 12)
    losses = compute_losses(model, teacher, batch_of(["abc", "de", "f"]), LossSpec.from_config(Config()))
    assert {"ctc", "ctc_shortcut", "llm", "total"} <= set(losses) and teacher.calls == 1
    # the default weights: shortcut 0.1, LLM 1.0
    assert torch.allclose(losses["total"], losses["ctc"] + 0.1 * losses["ctc_shortcut"] + 1.0 * losses["llm"])
    assert losses["llm"] > 0
    losses["total"].backward()
    counts = count_parameters(torch.nn.ModuleList([model, teacher]))
    assert counts["frozen"] == 6 and counts["trainable"] == count_parameters(model)["trainable"]
    assert count_parameters(None) == {"trainable": 0, "frozen": 0}


@pytest.mark.parametrize("cnn_cfg, low, high", [(REFERENCE, 7.3e6, 7.8e6), (SEED_HYBRID, 10.3e6, 11.5e6)])
def test_parameter_counts(cnn_cfg, low, high):
    model = HTRModel(ArchConfig(cnn_cfg=cnn_cfg), ConnectorConfig(), 80, 128, 1024)
    n = count_parameters(model)
    assert n["frozen"] == 0 and low < n["trainable"] < high
    # the recurrent head: 3 BiLSTM layers of 256, LayerNorm + Linear + GELU + Linear; shortcut 1x3 conv
    lstm = 2 * 4 * (256 * (256 + 256) + 2 * 256) + 2 * 2 * 4 * (256 * (512 + 256) + 2 * 256)
    head = lstm + 2 * 512 + 512 * 512 + 512 + 512 * 80 + 80 + 256 * 80 * 3 + 80
    assert count_parameters(model.head)["trainable"] == head


def render(texts, height=32, width=160):
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default(size=20)
    out = []
    for text in texts:
        im = Image.new("L", (width, height), 255)
        ImageDraw.Draw(im).text((3, 5), text, font=font, fill=0)
        out.append(1.0 - np.asarray(im, dtype=np.float32) / 255.0)  # ink = 1, as the pipeline's batches
    return torch.from_numpy(np.stack(out)).unsqueeze(1)


@pytest.mark.parametrize("use_llm", [False, True])
def test_overfit_four_rendered_lines(use_llm, request):
    """A tiny model learns 4 lines to CER ~0 (about 200 steps, 5-10 s), with the LLM loss off and on.

    Gradients are clipped at 1.0 as train.grad_clip does: without it, batch-4 training spikes and a seed can end on
    "heo" for "hello" after 450 steps; with it, every seed tried (0-3, lr 2e-3 and 3e-3) reaches CER 0 by step 250.
    """
    texts = ["abc def", "hello", "ink on paper", "zebra"]
    batch = batch_of(texts, images=render(texts))
    teacher = None
    if use_llm:
        from htr_dist.models.llm import PrefixLM, load_causal_lm

        lm, tokenizer = load_causal_lm(request.getfixturevalue("tiny_llama"), "/nonexistent-cache")
        teacher = PrefixLM(lm, tokenizer)
    torch.manual_seed(0)
    arch = tiny_arch()
    model = HTRModel(arch, TINY_CONNECTOR, len(CHARS) + 1, 32, 160, teacher.hidden_size if use_llm else None)
    # ctc_reduction="char": the step-25 check below reads the CTC loss per character
    spec = LossSpec(use_llm=use_llm, llm_sample_ratio=0.5, ctc_reduction="char")
    generator = torch.Generator().manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    error, hyps = 1.0, []
    for step in range(1, 451):
        losses = compute_losses(model, teacher if use_llm else None, batch, spec, generator)
        opt.zero_grad()
        losses["total"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 25 == 0 and losses["ctc"] < 0.2:
            model.eval()
            with torch.no_grad():
                logits = model(batch["images"])["ctc_logits"]
            model.train()
            hyps = ["".join(CHARS[i - 1] for i in line) for line in greedy_decode(logits)]
            error = cer(texts, hyps)
            if error == 0:
                break
    assert error < 0.05, hyps
    assert (losses["llm"].item() > 0) == use_llm
    if use_llm:
        assert all(p.grad is None for p in teacher.parameters()) and not teacher.lm.training


@pytest.mark.parametrize("trained, override", [("contiguous", None), ("channels_last", None),
                                               ("channels_last", "contiguous"), ("auto", None)])
def test_exported_model_loads_in_the_runs_memory_format(trained, override, tmp_path):
    """Recognizer.load builds the backbone in the run's dist.memory_format (or the one asked for; ``auto`` is NHWC on
    every machine, since no weight gradient runs); the layout changes how the maps sit in memory, never what the model
    reads."""
    from htr_dist.config import Config
    from htr_dist.inference import Recognizer
    from htr_dist.train.export import export_model

    cfg = Config()
    cfg.arch, cfg.connector = tiny_arch(), TINY_CONNECTOR
    cfg.data.img_height, cfg.data.img_width = 32, 160
    cfg.dist.memory_format = trained
    torch.manual_seed(0)
    model = HTRModel(cfg.arch, cfg.connector, len(CHARS) + 1, 32, 160, channels_last=trained == "channels_last").eval()
    path = export_model(model, cfg, CHARS, str(tmp_path / "model.pt"))
    rec = Recognizer.load(path, memory_format=override)
    expected = (override or trained) in ("channels_last", "auto")
    assert rec.model.backbone.channels_last is expected
    conv = next(m for m in rec.model.backbone.modules() if isinstance(m, nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last if expected else torch.contiguous_format)
    images = torch.rand(3, 1, 32, 160, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(images, None)["ctc_logits"]
        got = rec.model(images, None)["ctc_logits"]
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


def test_exported_model_is_readable_as_the_umask_says_and_a_damaged_one_is_named(tmp_path):
    """model.pt is renamed into place from a temporary file (mode 0600): it ends with the mode plain open() gives.
    A file that is an export but does not rebuild is an InferenceError naming the file, not a traceback."""
    import os

    from htr_dist.config import Config
    from htr_dist.inference import InferenceError, Recognizer
    from htr_dist.train.export import export_model

    cfg = Config()
    cfg.arch, cfg.connector = tiny_arch(), TINY_CONNECTOR
    cfg.data.img_height, cfg.data.img_width = 32, 160
    model = HTRModel(cfg.arch, cfg.connector, len(CHARS) + 1, 32, 160).eval()
    old = os.umask(0o022)
    try:
        path = export_model(model, cfg, CHARS, str(tmp_path / "model.pt"))
    finally:
        os.umask(old)
    assert os.stat(path).st_mode & 0o777 == 0o644
    blob = torch.load(path, weights_only=True)
    blob["state_dict"].pop(next(iter(blob["state_dict"])))
    torch.save(blob, tmp_path / "missing_weight.pt")
    with pytest.raises(InferenceError, match=r"(?s)missing_weight.pt: cannot rebuild the model from it .*Missing key"):
        Recognizer.load(str(tmp_path / "missing_weight.pt"))
    del blob["num_classes"]
    torch.save(blob, tmp_path / "no_classes.pt")
    with pytest.raises(InferenceError, match=r"no_classes.pt: exported model lacks its 'num_classes' entry"):
        Recognizer.load(str(tmp_path / "no_classes.pt"))


def test_best_model_keeps_the_lowest_val_cer_across_a_resume(tmp_path, caplog):
    """best_model.pt is rewritten only by a strictly lower CER (a tie keeps the earlier step), holds the weights and
    the validation record of that step, and a resumed run keeps comparing against it; a fresh run, a damaged file and
    ``keep_best=false`` are handled as the config says."""
    import logging
    import os

    from htr_dist.config import Config
    from htr_dist.inference import Recognizer
    from htr_dist.train.export import BEST_FILE, BestModel

    cfg = Config()
    cfg.arch, cfg.connector = tiny_arch(), TINY_CONNECTOR
    cfg.data.img_height, cfg.data.img_width = 32, 160
    run = str(tmp_path)
    path = os.path.join(run, BEST_FILE)
    models = []
    for seed in range(5):
        torch.manual_seed(seed)
        models.append(HTRModel(cfg.arch, cfg.connector, len(CHARS) + 1, 32, 160).eval())

    def val(step, cer):
        return {"step": step, "split": "val", "cer": cer, "wer": 2 * cer, "lines": 7}

    def weights():
        return torch.load(path, weights_only=True)["state_dict"]

    best = BestModel(run, enabled=True, is_main=True, resumed=False, split="val")
    assert [best.offer(models[i], cfg, CHARS, val(10 * (i + 1), c)) for i, c in enumerate([0.5, 0.4, 0.4])] == \
        [True, True, False]  # the tie at step 30 keeps step 20
    assert torch.load(path, weights_only=True)["validation"] == val(20, 0.4)
    torch.testing.assert_close(weights(), models[1].export_state_dict())
    # a resumed run (another process) starts from the record in the file: 0.45 is no better, 0.1 is
    resumed = BestModel(run, enabled=True, is_main=True, resumed=True, split="val")
    assert resumed.validation == val(20, 0.4)
    assert not resumed.offer(models[3], cfg, CHARS, val(40, 0.45))
    assert resumed.offer(models[4], cfg, CHARS, val(50, 0.1))
    torch.testing.assert_close(weights(), models[4].export_state_dict())
    with caplog.at_level(logging.INFO, logger="htr_dist.inference"):
        assert Recognizer.load(path).alphabet.chars == CHARS  # an ordinary export for evaluate.py and recognize.py
    assert "step 50, val CER 10.00%" in caplog.text  # the loader says which weights these are
    # a rank other than the main one agrees on the best and writes nothing
    other = BestModel(run, enabled=True, is_main=False, resumed=True, split="val")
    assert other.offer(models[0], cfg, CHARS, val(60, 0.05)) and other.validation["cer"] == 0.05
    assert torch.load(path, weights_only=True)["validation"]["step"] == 50
    # a resumed run that validates on another split does not compare against it
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        other_split = BestModel(run, enabled=True, is_main=True, resumed=True, split="test")
    assert other_split.validation is None and "was validated on split 'val' and this run validates on 'test'" in \
        caplog.text
    # a fresh run in the same folder ignores the old file and replaces it at its first validation, however it scores
    with caplog.at_level(logging.WARNING):
        fresh = BestModel(run, enabled=True, is_main=True, resumed=False, split="val")
    assert fresh.validation is None and f"{path} is from an earlier run in this folder" in caplog.text
    assert fresh.offer(models[2], cfg, CHARS, val(5, 0.9))
    assert torch.load(path, weights_only=True)["validation"]["step"] == 5
    # keep_best=false writes nothing
    off = BestModel(str(tmp_path / "off"), enabled=False, is_main=True, resumed=False, split="val")
    assert not off.offer(models[0], cfg, CHARS, val(1, 0.0)) and not os.path.exists(off.path)
    # a damaged file: the resumed run says so and replaces it at its next validation
    with open(path, "wb") as f:
        f.write(b"not a model")
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        damaged = BestModel(run, enabled=True, is_main=True, resumed=True, split="val")
    assert damaged.validation is None and "holds no readable validation record" in caplog.text
    assert damaged.offer(models[3], cfg, CHARS, val(70, 0.7))
    assert torch.load(path, weights_only=True)["validation"]["step"] == 70


def test_folding_batch_norms_keeps_the_output_of_the_default_model():
    """Recognizer.load folds each batch norm into the convolution before it: the default backbone (ResNet blocks,
    their projections, the stem, the MobileViT blocks) keeps no BatchNorm2d and gives the same logits; a model in
    training mode is left alone (its batch norms use batch statistics)."""
    from htr_dist.models.backbone import fold_batch_norms

    torch.manual_seed(0)
    model = HTRModel(Config().arch, TINY_CONNECTOR, 30, 64, 256, None)
    for m in model.modules():  # running statistics that differ from the identity, as after training
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    assert fold_batch_norms(model) == 0  # training mode: nothing folded
    model.eval()
    images = torch.rand(2, 1, 64, 256)
    with torch.no_grad():
        before = model(images)["ctc_logits"]
        norms = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
        assert fold_batch_norms(model) == norms > 0
        after = model(images)["ctc_logits"]
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert torch.allclose(before, after, rtol=1e-4, atol=1e-4), (before - after).abs().max()


def test_the_llm_weight_schedule_starts_late_and_decays():
    """train.llm_start_step, llm_every and llm_weight_schedule: the teacher's steps and alpha are functions of the
    step alone; alpha decays from llm_loss_weight at the start to 0 at the last step, and is what the total uses."""
    spec = LossSpec(llm_weight=4.0, llm_every=3, llm_start_step=10)
    assert [s for s in range(20) if spec.llm_step(s)] == [10, 13, 16, 19]
    assert spec.llm_weight_at(9, 110) == 0.0 and spec.llm_weight_at(10, 110) == spec.llm_weight_at(109, 110) == 4.0
    for schedule, middle in (("linear", 2.0), ("cosine", 2.0)):
        s = replace(spec, llm_weight_schedule=schedule)
        assert s.llm_weight_at(10, 111) == 4.0 and s.llm_weight_at(110, 111) == 0.0
        assert s.llm_weight_at(60, 111) == pytest.approx(middle)
        assert s.llm_weight_at(35, 111) > s.llm_weight_at(36, 111)
    assert replace(spec, llm_weight_schedule="cosine").llm_weight_at(35, 111) > \
        replace(spec, llm_weight_schedule="linear").llm_weight_at(35, 111)
    with pytest.raises(ValueError, match="llm_weight_schedule"):
        replace(spec, llm_weight_schedule="step").llm_weight_at(10, 20)
    model = HTRModel(tiny_arch(), TINY_CONNECTOR, len(CHARS) + 1, 32, 160, llm_hidden=CountingTeacher.hidden_size)
    batch = batch_of(["abc", "de"])
    losses = compute_losses(model, CountingTeacher(), batch, spec, llm_weight=0.25)
    assert losses["llm"] > 0
    assert torch.allclose(losses["total"], losses["ctc"] + 0.1 * losses["ctc_shortcut"] + 0.25 * losses["llm"])
