"""End to end, as a user runs it: synth -> prepare -> 2-rank training -> export -> evaluate (2 ranks) -> recognize."""

import csv
import io
import json
import os
import re
import shutil
import subprocess
import tarfile

import pytest

from conftest import PY, ROOT, TINY_ARCH, reset_shard_sizes
from htr_dist.dist.env import launcher_command


def run(cmd, timeout=300):
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_end_to_end(tmp_path, tiny_llama):
    iam_dir, shards, run_dir = str(tmp_path / "iam"), str(tmp_path / "shards"), str(tmp_path / "run")
    run([PY, "launch/synth_iam.py", iam_dir, "--forms", "10", "--seed", "11", "--workers", "2"])
    out = run([PY, "launch/prepare_iam.py", "--iam", iam_dir, "--out", shards, "--scale", "0.5", "--workers", "2"])
    assert "no problems: every line was written" in out.stdout
    manifest = json.load(open(os.path.join(shards, "manifest.json")))
    run(launcher_command("torchrun", 2) + ["launch/train.py", "--config", "configs/tiny_cpu.yaml"] + TINY_ARCH +
        [f"data.path={shards}", f"llm.name_or_path={tiny_llama}", f"run.dir={run_dir}", "train.max_steps=8",
         "dist.strategy=ddp"])
    for name in ("config.yaml", "model.pt", "tb"):
        assert os.path.exists(os.path.join(run_dir, name)), name
    preds, scores = str(tmp_path / "preds.tsv"), str(tmp_path / "scores.json")
    out = run(launcher_command("torchrun", 2) + [
        "launch/evaluate.py", "--checkpoint", run_dir, "--data", shards, "--split", "test", "--json", scores,
        "--predictions", preds])
    result = json.load(open(scores))
    assert result["lines"] == manifest["splits"]["test"]["lines"]  # every line once across the 2 ranks
    assert 0.0 <= result["cer"] and 0.0 <= result["wer"]
    assert f"test CER {100 * result['cer']:.1f}% WER {100 * result['wer']:.1f}% ({result['lines']} lines)" in out.stdout
    rows = list(csv.DictReader(open(preds), delimiter="\t"))
    assert len(rows) == result["lines"] == len({r["id"] for r in rows})  # one row per line, no id twice
    # recognize.py on the same line images gives the same text as evaluate.py
    with tarfile.open(os.path.join(shards, manifest["splits"]["test"]["shards"][0]["file"])) as tar:
        pngs = [m for m in tar.getmembers() if m.name.endswith(".png")][:4]
        paths = []
        for m in pngs:
            path = str(tmp_path / m.name)
            open(path, "wb").write(tar.extractfile(m).read())
            paths.append(path)
    missing = str(tmp_path / "missing.png")
    proc = subprocess.run([PY, "launch/recognize.py", "--checkpoint", os.path.join(run_dir, "model.pt")] + paths +
                          [missing], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 1 and f"{missing}: no such image file" in proc.stderr
    got = dict(line.split("\t", 1) for line in proc.stdout.splitlines())
    expected = {r["id"]: r["prediction"] for r in rows}
    assert len(got) == 4
    for path, text in got.items():
        assert text == expected[os.path.basename(path)[: -len(".png")]]
    check_tuned_decoding(tmp_path, shards, run_dir, paths)


def check_tuned_decoding(tmp_path, shards, run_dir, images):
    """The exported model keeps its connector: beam+llm and beam+lm are tuned on val (2 ranks, summed over both),
    stored beside the model, and used by evaluate.py and recognize.py."""
    model = os.path.join(run_dir, "model.pt")
    settings_path = os.path.join(run_dir, "model.decode.json")
    for mode, launcher in (("beam+llm", launcher_command("torchrun", 2)), ("beam+lm", [PY])):
        record = str(tmp_path / f"tune-{mode}.json")
        out = run(launcher + ["launch/evaluate.py", "--checkpoint", model, "--data", shards, "--tune", "--decode",
                              mode, "--json", record])
        tuned = json.load(open(record))
        assert tuned["split"] == "val" and tuned["lines"] == json.load(open(os.path.join(
            shards, "manifest.json")))["splits"]["val"]["lines"]
        assert tuned["cer"] <= tuned["grid"][0]["cer"] and f"tuned {mode} on val" in out.stdout
        assert json.load(open(settings_path))["tuned"][mode]["cer"] == tuned["cer"]
    settings = json.load(open(settings_path))
    assert settings["lm_texts"] and set(settings["tuned"]) == {"beam+llm", "beam+lm"}  # the second kept the first
    for mode in ("beam+llm", "beam+lm"):
        scores = str(tmp_path / f"test-{mode}.json")
        run([PY, "launch/evaluate.py", "--checkpoint", model, "--data", shards, "--decode", mode, "--json", scores])
        assert json.load(open(scores))["decode"] == mode
    proc = run([PY, "launch/recognize.py", "--checkpoint", model, "--decode", "beam+llm"] + images)
    assert len(proc.stdout.splitlines()) == len(images)


@pytest.mark.parametrize("workers", [0, 1])
def test_train_reports_corrupt_shards_in_one_line(workers, shard_dir, tmp_path):
    """Too many undecodable images stop the run with the loader's own message, also when a DataLoader worker process
    found them (PyTorch re-raises a worker's error with the worker's whole traceback as its message)."""
    broken = tmp_path / "broken"
    shutil.copytree(shard_dir, broken)
    for name in os.listdir(broken):
        if name.startswith("train-") and name.endswith(".tar"):
            with tarfile.open(broken / name) as tar:
                members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
            with tarfile.open(broken / name, "w") as tar:
                for m, data in members:
                    data = b"not a png" if m.name.endswith(".png") else data
                    m.size = len(data)
                    tar.addfile(m, io.BytesIO(data))
    reset_shard_sizes(str(broken))
    proc = subprocess.run([PY, "launch/train.py", "--config", "configs/tiny_cpu.yaml", f"data.path={broken}",
                           f"data.num_workers={workers}", f"run.dir={tmp_path / 'run'}"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 1, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "samples skipped" in errors[0], proc.stderr[-3000:]
    assert "more than data.max_skip_fraction=" in errors[0]
    assert "cannot be decoded (png: 9 bytes that are not an image)" in errors[0]
    assert ("in DataLoader worker process 0" in errors[0]) == (workers == 1)
    assert "Traceback" not in proc.stderr and "Caught " not in proc.stderr


def test_a_validation_split_that_cannot_be_read_stops_the_run(shard_dir, tmp_path):
    """No readable validation line is an error, not a CER of 0.00% over 0 lines."""
    broken = tmp_path / "broken"
    shutil.copytree(shard_dir, broken)
    for name in os.listdir(broken):
        if name.startswith("val-") and name.endswith(".tar"):
            (broken / name).write_bytes(os.urandom(4096))
    reset_shard_sizes(str(broken))
    proc = subprocess.run([PY, "launch/train.py", "--config", "configs/tiny_cpu.yaml", f"data.path={broken}",
                           "train.max_steps=1", f"run.dir={tmp_path / 'run'}"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 1, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert errors == [f"error: {broken}: no line of split 'val' could be read for validation (see the warnings "
                      "above); a CER over 0 lines would read as 0%"], proc.stderr[-3000:]


@pytest.mark.parametrize("case", ["shards", "llm", "config", "resume", "not_a_checkpoint", "split"])
def test_train_reports_bad_input_in_one_line(case, shard_dir, tmp_path):
    """A missing shard folder, LLM folder or checkpoint, or a bad config value, is the user's to fix: train.py exits
    with one line that names it (2 for what the config check finds, before any process group exists; 1 for the rest),
    no traceback."""
    missing = str(tmp_path / "missing")
    override, code, expected = {
        "shards": (f"data.path={missing}", 1, f"error: shard folder not found: {missing} "),
        "llm": (f"llm.name_or_path={missing}", 1, f"error: llm.name_or_path: folder not found: {missing}"),
        "config": ("train.batch_size=0", 2, "config error: train.batch_size: must be > 0, got 0"),
        "resume": (f"train.resume={missing}", 1, f"error: train.resume: checkpoint folder not found: {missing}"),
        "not_a_checkpoint": (f"train.resume={shard_dir}", 1,
                             f"error: train.resume: {shard_dir}: not a checkpoint of this strategy (no trainer.pt)"),
        "split": ("data.val_split=validation", 1,  # found before training, not when the run validates at its end
                  f"error: {shard_dir}/manifest.json: no split 'validation'; it has test, test_seen, train, val, val_seen"),
    }[case]
    proc = subprocess.run([PY, "launch/train.py", "--config", "configs/tiny_cpu.yaml", f"data.path={shard_dir}",
                           "train.use_llm=true", f"run.dir={tmp_path / 'run'}", override],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == code, proc.stderr[-3000:]
    assert any(line.startswith(expected) for line in proc.stderr.splitlines()), proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr


DEMO_LINE = re.compile(r"^test CER (\d+\.\d)% WER (\d+\.\d)% \((\d+) lines, (seen|unseen) fonts\)$")


def parse_demo_summary(stdout: str) -> dict:
    """The demo's last two lines: ``{"seen": (cer %, wer %, lines), "unseen": (...)}``, in that order."""
    last = stdout.rstrip("\n").splitlines()[-2:]
    found = [DEMO_LINE.match(line) for line in last]
    assert all(found), last
    assert [m.group(4) for m in found] == ["seen", "unseen"], last
    return {m.group(4): (float(m.group(1)), float(m.group(2)), int(m.group(3))) for m in found}


def test_demo_ends_with_the_seen_and_unseen_font_figures(tmp_path, tiny_llama):
    """make demo's pipeline at a tiny size: a writer-independent set, shards, 2-rank DeepSpeed training, and the two
    test figures as its last lines, each over its own split's lines."""
    work = str(tmp_path / "work")
    proc = run([PY, "launch/demo.py", "--forms", "20", "--workdir", work, "--config", "configs/tiny_cpu.yaml"] +
               TINY_ARCH + [f"llm.name_or_path={tiny_llama}", "train.max_steps=2", "train.eval_every=0"], timeout=600)
    got = parse_demo_summary(proc.stdout)
    manifest = json.load(open(os.path.join(work, "shards", "synth", "manifest.json")))
    assert got["seen"][2] == manifest["splits"]["test_seen"]["lines"] > 0
    assert got["unseen"][2] == manifest["splits"]["test"]["lines"] > 0
    for cer, wer, _ in got.values():
        assert 0.0 <= cer and 0.0 <= wer
    scores = json.load(open(os.path.join(work, "runs", "demo_deepspeed", "test_scores.json")))
    assert f"{100 * scores['cer']:.1f}" == f"{got['unseen'][0]:.1f}"


def test_demo_summary_parser_rejects_other_endings():
    good = "x\ntest CER 2.0% WER 8.6% (971 lines, seen fonts)\ntest CER 9.5% WER 30.1% (480 lines, unseen fonts)\n"
    assert parse_demo_summary(good) == {"seen": (2.0, 8.6, 971), "unseen": (9.5, 30.1, 480)}
    with pytest.raises(AssertionError):
        parse_demo_summary("test CER 2.0% WER 8.6% (971 lines)\ntest CER 9.5% WER 30.1% (480 lines, unseen fonts)")
    with pytest.raises(AssertionError):  # the unseen figure must come last
        parse_demo_summary(good.splitlines()[0] + "\n" + "\n".join(good.splitlines()[:0:-1]))
