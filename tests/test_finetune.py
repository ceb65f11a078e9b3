"""Fine-tuning (train.init_from): a tiny model trained on rendered lines of 7 characters goes on with data that adds 2
(``k`` and ``m``, which sort between old ones: every old character after them changes index)."""

import logging
import os
import signal

import pytest
import torch

from conftest import ROOT, TINY_ARCH
from htr_dist.config import load_config
from htr_dist.data.alphabet import Alphabet
from htr_dist.dist.env import init_distributed
from htr_dist.errors import InputError
from htr_dist.inference import Recognizer
from htr_dist.models.backbone import fold_batch_norms
from htr_dist.models.htr import HTRModel
from htr_dist.testing import render_line, write_text_shards
from htr_dist.train.checkpoint import CheckpointManager, recorded_alphabet
from htr_dist.train.init_from import InitFromError, init_weights, read_init_source
from htr_dist.train.loop import train
from test_train_dist import deepspeed_launch

OLD = "abcdeno"
NEW = "abcdekmno"
OLD_LINES = ["bad", "cab", "node", "code", "dance", "one", "bead", "done"]
NEW_LINES = ["km", "mk", "kam", "mbk", "kkm", "dmm", "kek", "nmo"]
# every run here: no teacher, no augmentation, 128-pixel lines, 8 lines a step
BASE = TINY_ARCH + ["train.use_llm=false", "data.augment=false", "train.keep_best=false", "train.log_every=1000",
                    "data.img_width=128", "train.lr=0.01", "train.schedule=cosine", "train.batch_size=8"]


def run_train(*overrides):
    cfg = load_config(None, BASE + list(overrides))
    before = signal.getsignal(signal.SIGTERM)
    result = train(cfg, init_distributed(60))
    assert signal.getsignal(signal.SIGTERM) is before  # training's SIGTERM handler is gone once it returns
    return result, cfg


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    """The old set (alphabet OLD), the new one (NEW: the old lines and 8 with k and m), one lacking 'c'."""
    root = tmp_path_factory.mktemp("finetune")
    old = write_text_shards(str(root / "old"), {"train": OLD_LINES, "val": OLD_LINES, "test": OLD_LINES[:2]})
    lines = OLD_LINES + NEW_LINES
    new = write_text_shards(str(root / "new"), {"train": lines, "val": NEW_LINES, "test": NEW_LINES[:2]}, NEW)
    no_c = [t for t in lines if "c" not in t]
    lacking = write_text_shards(str(root / "no_c"), {"train": no_c, "val": no_c, "test": no_c[:2]})
    return {"old": old, "new": new, "no_c": lacking, "root": root}


@pytest.fixture(scope="module")
def old_run(sets):
    """150 steps on the old lines: enough for the tiny model to read most of them."""
    run = str(sets["root"] / "old_run")
    run_train(f"data.path={sets['old']}", f"run.dir={run}", "train.max_steps=150")
    return run


def greedy(model, alphabet, texts):
    from htr_dist.train.metrics import greedy_decode

    rec = Recognizer(model.eval(), alphabet, 32, 128, torch.device("cpu"), load_config(None, BASE))
    with torch.no_grad():
        out = model(rec.batch_from_arrays([render_line(t) for t in texts]))
    return [alphabet.decode(p) for p in greedy_decode(out["ctc_logits"])], out


def grown(source_path, alphabet=NEW, overrides=()):
    cfg = load_config(None, BASE + list(overrides))
    model = HTRModel(cfg.arch, cfg.connector, len(alphabet) + 1, 32, 128, None, False)
    return model, init_weights(model, read_init_source(source_path), Alphabet(alphabet), cfg)


@pytest.mark.parametrize("source", ["model.pt", "checkpoint", "run"])
def test_grown_model_reads_the_old_lines_as_before(source, old_run):
    """(a) After init_from and no step: on every old line, each old character's logits (both heads) equal the
    original's at its new index, the greedy text is the same (so is the CER: margin 0), and the new characters'
    logits are a constant below every frame's best."""
    path = {"model.pt": os.path.join(old_run, "model.pt"), "checkpoint": CheckpointManager(old_run, 1).latest(),
            "run": old_run}[source]
    original = Recognizer.load(os.path.join(old_run, "model.pt"), memory_format="contiguous")  # as grown()
    before, out_before = greedy(original.model, original.alphabet, OLD_LINES)
    assert sum(map(bool, before)) >= 6  # the original reads the lines: the comparison means something
    model, done = grown(path)
    assert done["new_chars"] == "km"
    fold_batch_norms(model.eval())  # as Recognizer.load did for the original: the same arithmetic on both sides
    after, out_after = greedy(model, Alphabet(NEW), OLD_LINES)
    assert after == before
    new_index = [Alphabet(NEW).index[c] for c in OLD]
    for head in ("ctc_logits", "shortcut_logits"):
        a, b = out_before[head], out_after[head]  # (T, B, classes)
        assert torch.allclose(b[..., [0] + new_index], a, atol=1e-5, rtol=0)
        fresh = b[..., [Alphabet(NEW).index["k"], Alphabet(NEW).index["m"]]]
        assert (fresh == fresh.flatten()[0]).all() and (fresh.max(-1).values < b.max(-1).values).all()


def test_fine_tune_learns_the_new_characters(sets, old_run):
    """(b) A short fine-tune on the new set makes the model write k and m on its training lines; the model it starts
    from writes neither (so the check can fail). Its exports and checkpoints hold the new alphabet."""
    start, _ = grown(old_run)
    texts = OLD_LINES + NEW_LINES
    read_before, _ = greedy(start, Alphabet(NEW), texts)
    assert not any(set("km") & set(t) for t in read_before)
    run = str(sets["root"] / "fine")
    run_train(f"data.path={sets['new']}", f"run.dir={run}", "train.max_steps=150", f"train.init_from={old_run}")
    rec = Recognizer.load(run)
    assert rec.alphabet.chars == NEW
    read = [r.text for r in rec.recognize([render_line(t) for t in texts])]
    assert any("k" in t for t in read) and any("m" in t for t in read), read
    assert recorded_alphabet(CheckpointManager(run, 1).latest()) == NEW


def test_a_character_the_data_lacks(sets, old_run, tmp_path):
    """(c) strict: one line naming the character; merge: the union, old order first, in the run's exports,
    checkpoints and evaluation; a resumed merge run keeps it."""
    args = [f"data.path={sets['no_c']}", f"train.init_from={old_run}", "train.max_steps=2"]
    with pytest.raises(InitFromError) as err:
        run_train(*args, f"run.dir={tmp_path / 'strict'}")
    assert "lacks: 'c'" in str(err.value) and "train.init_alphabet=merge" in str(err.value)
    assert "\n" not in str(err.value)
    run = str(tmp_path / "merge")
    run_train(*args, f"run.dir={run}", "train.init_alphabet=merge")
    union = OLD + "km"
    assert Recognizer.load(run).alphabet.chars == union
    assert recorded_alphabet(CheckpointManager(run, 1).latest()) == union
    result, _ = run_train(*args[:2], f"run.dir={run}", "train.init_alphabet=merge", "train.max_steps=3")
    assert result["step"] == 3 and Recognizer.load(run).alphabet.chars == union
    from htr_dist.evaluate import run_evaluation

    from htr_dist.cli.evaluate import parse_args

    scores = run_evaluation(parse_args(["--checkpoint", run, "--data", sets["no_c"], "--split", "val"]),
                            init_distributed(60))
    assert scores["lines"] == len([t for t in OLD_LINES + NEW_LINES if "c" not in t])


def test_another_architecture_is_one_line(old_run):
    """(d) Any shape but the alphabet's: one line naming the first differing weight and the arch key."""
    with pytest.raises(InitFromError) as err:
        grown(old_run, overrides=["arch.rnn_hidden_size=16"])
    msg = str(err.value)
    assert "\n" not in msg and "head.rnn.lower.weight_ih_l0 is (128, 48) there and (64, 48) here" in msg
    assert "arch.rnn_hidden_size is 32 there, 16 here" in msg
    with pytest.raises(InitFromError, match=r"head.rnn.upper.weight_ih_l1 \(128, 64\) is not in it"):
        grown(old_run, overrides=["arch.rnn_layers=3"])
    with pytest.raises(InitFromError, match=r"it has head.rnn.upper.weight_ih_l0 \(128, 64\), which this config"):
        grown(old_run, overrides=["arch.rnn_layers=1"])


def test_the_connector_is_taken_when_it_fits(tmp_path, caplog):
    cfg = load_config(None, BASE)
    torch.manual_seed(0)
    source = HTRModel(cfg.arch, cfg.connector, len(OLD) + 1, 32, 128, 16, False)
    from htr_dist.train.export import export_model

    path = export_model(source, cfg, OLD, str(tmp_path / "model.pt"))
    for hidden, taken in ((16, True), (24, False), (None, False)):
        model = HTRModel(cfg.arch, cfg.connector, len(NEW) + 1, 32, 128, hidden, False)
        with caplog.at_level(logging.WARNING):
            done = init_weights(model, read_init_source(path), Alphabet(NEW), cfg)
        assert (done["connector"] == "loaded") == taken
        if hidden is not None:
            same = torch.equal(model.connector.queries, source.connector.queries)
            assert same == taken
    assert "its connector does not fit this run's" in caplog.text


def test_resume_wins_over_init_from(sets, old_run, tmp_path, caplog):
    """(e) A fine-tuning run stopped and started again with the same settings resumes, ignoring init_from, and ends
    with the weights of the run that was never stopped."""
    common = [f"data.path={sets['new']}", f"train.init_from={old_run}", "train.max_steps=4", "train.save_every=2"]
    straight, split = str(tmp_path / "straight"), str(tmp_path / "split")
    run_train(*common, f"run.dir={straight}")
    run_train(*common, f"run.dir={split}", "train.stop_after=2")
    with caplog.at_level(logging.INFO):
        result, _ = run_train(*common, f"run.dir={split}")
    assert result["step"] == 4
    assert f"train.init_from={old_run} is ignored: resuming from" in caplog.text
    a = torch.load(os.path.join(straight, "model.pt"), weights_only=True)["state_dict"]
    b = torch.load(os.path.join(split, "model.pt"), weights_only=True)["state_dict"]
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), rtol=0, atol=1e-6), k


def test_two_deepspeed_ranks_start_from_the_loaded_weights(sets, old_run, tmp_path):
    """Loading happens on the plain model, before DeepSpeed wraps and broadcasts it: with lr 0, the weights a
    2-rank run exports are the grown source's; its own checkpoint then serves as init_from too."""
    run = str(tmp_path / "ds")
    args = ["--config", os.path.join(ROOT, "configs", "tiny_cpu.yaml")] + BASE + [
        f"data.path={sets['new']}", f"run.dir={run}", f"train.init_from={old_run}", "train.max_steps=1",
        "train.lr=0", "train.batch_size=2", "dist.strategy=deepspeed"]
    proc = deepspeed_launch(os.path.join(ROOT, "launch", "train.py"), args)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    expected, _ = grown(old_run)
    exported = torch.load(os.path.join(run, "model.pt"), weights_only=True)["state_dict"]
    for name, p in expected.named_parameters():  # buffers (norm statistics) move in a training step even at lr 0
        assert torch.equal(exported[name], p.detach()), name
    again = read_init_source(run)
    assert again.path == CheckpointManager(run, 1).latest() and again.alphabet == NEW
    for name, p in expected.named_parameters():
        assert torch.equal(again.state_dict[name].cpu(), p.detach()), name


def test_init_alphabet_takes_only_its_choices():
    with pytest.raises(InputError, match="train.init_alphabet: 'union' is not one of 'strict', 'merge'"):
        load_config(None, ["train.init_alphabet=union"])


def test_a_missing_source_is_one_line(sets, tmp_path):
    with pytest.raises(InitFromError, match="train.init_from: .*nowhere: not found"):
        run_train(f"data.path={sets['new']}", f"run.dir={tmp_path / 'run'}", f"train.init_from={tmp_path}/nowhere")
