"""Paired comparisons (launch/compare.py, htr_dist.experiment): the statistics against hand computations, the arm
syntax, and two tiny arms end to end with two seeds, reused when run again."""

import json
import os
import subprocess
import sys

import pytest

from htr_dist.errors import InputError
from htr_dist.experiment import mean_std, paired_difference, parse_arm, t_quantile_975

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_paired_difference_matches_a_hand_computation():
    # diffs 0.02, 0.00, 0.04: mean 0.02, sd 0.02, t(0.975, 2) = 4.303, half width 4.303 * 0.02 / sqrt(3) = 0.049687
    base, other = [0.10, 0.12, 0.08], [0.12, 0.12, 0.12]
    d = paired_difference(base, other)
    assert d["mean"] == pytest.approx(0.02)
    assert d["ci95"] == pytest.approx([0.02 - 0.049687, 0.02 + 0.049687], abs=1e-6)
    assert d["relative"] == pytest.approx(0.02 / 0.10) and d["n"] == 3 and not d["excludes_zero"]
    tight = paired_difference([0.10, 0.20], [0.08, 0.18])  # both 0.02 lower: sd 0, so the CI is the point
    assert tight["ci95"] == pytest.approx([-0.02, -0.02]) and tight["excludes_zero"]
    one = paired_difference([0.1], [0.2])
    assert one["ci95"] is None and not one["excludes_zero"]
    with pytest.raises(ValueError):
        paired_difference([0.1, 0.2], [0.1])


def test_t_quantiles_and_mean_std():
    assert t_quantile_975(1) == 12.706 and t_quantile_975(2) == 4.303 and t_quantile_975(22) == 2.086
    assert t_quantile_975(1000) == 1.960
    s = mean_std([1.0, 2.0, 3.0])
    assert s == {"mean": 2.0, "std": 1.0, "n": 3}
    assert mean_std([5.0])["std"] == 0.0


def test_parse_arm():
    a = parse_arm("llm_a10:train.use_llm=true,train.llm_loss_weight=10")
    assert a.name == "llm_a10" and a.overrides == ["train.use_llm=true", "train.llm_loss_weight=10"]
    b = parse_arm("splits:data.extra_val_splits=[val_seen,test_seen] train.lr=0.001")
    assert b.overrides == ["data.extra_val_splits=[val_seen,test_seen]", "train.lr=0.001"]
    assert parse_arm("base:").overrides == []
    c = parse_arm("""prompt:llm.prompt="A line, it reads:" train.lr=0.001,llm.prompt='x y'""")
    assert c.overrides == ['llm.prompt="A line, it reads:"', "train.lr=0.001", "llm.prompt='x y'"]
    for bad in ("no_colon", ":train.lr=1", "bad name:train.lr=1", "x:train.lr", 'x:llm.prompt="open'):
        with pytest.raises(InputError):
            parse_arm(bad)


def test_compare_two_tiny_arms_end_to_end(shard_dir, tiny_llama, tmp_path):
    from conftest import TINY_ARCH

    out = tmp_path / "cmp"
    cmd = [sys.executable, "launch/compare.py", "--config", "configs/tiny_cpu.yaml", "--data", shard_dir,
           "--arm", "ctc:train.use_llm=false", "--arm", "llm:train.use_llm=true,train.llm_loss_weight=2",
           "--seeds", "0", "1", "--out", str(out), "--no-progress", "--nproc", "1"] + TINY_ARCH + [
           f"llm.name_or_path={tiny_llama}", f"llm.cache_dir={tmp_path / 'cache'}", "train.max_steps=3",
           "train.eval_every=3", "dist.strategy=ddp"]
    first = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert first.returncode == 0, first.stderr[-3000:]
    report = json.loads((out / "compare.json").read_text())
    assert [a["name"] for a in report["arms"]] == ["ctc", "llm"] and report["seeds"] == [0, 1]
    assert len(report["runs"]) == 4 and report["eval"][0] == "test"
    for r in report["runs"]:
        assert r["scores"]["test"]["lines"] > 0 and [p[1] for p in r["curves"]["val"]] == [3]
    d = report["paired"]["llm"]["test"]["cer"]
    cer = {(r["arm"], r["seed"]): r["scores"]["test"]["cer"] for r in report["runs"]}
    assert d["mean"] == pytest.approx(((cer["llm", 0] - cer["ctc", 0]) + (cer["llm", 1] - cer["ctc", 1])) / 2)
    assert len(d["ci95"]) == 2 and d["ci95"][0] <= d["mean"] <= d["ci95"][1]
    md = (out / "compare.md").read_text()
    assert "| llm | test |" in md and md in first.stdout
    for png in ("val_cer.png", "cer.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # run again: every run is reused (no training), the same report comes out
    stamp = os.path.getmtime(out / "runs" / "llm" / "seed1" / "model.pt")
    again = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert os.path.getmtime(out / "runs" / "llm" / "seed1" / "model.pt") == stamp
    assert json.loads((out / "compare.json").read_text())["paired"] == report["paired"]
    # the same folder asked for other settings: an error naming it, nothing deleted
    other = subprocess.run(cmd[:-1] + ["train.max_steps=4"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert other.returncode == 1 and "made with other settings (overrides differ)" in other.stderr
    assert os.path.isfile(out / "runs" / "ctc" / "seed0" / "model.pt")


def test_compare_rejects_bad_arms_before_training(shard_dir, tmp_path):
    base = [sys.executable, "launch/compare.py", "--config", "configs/tiny_cpu.yaml", "--data", shard_dir,
            "--out", str(tmp_path / "c"), "--no-progress"]
    for arms, msg in ((["a:train.lr=1"], "at least two arms"), (["a:train.lr=1", "a:train.lr=2"], "its own name"),
                      (["a:train.lr=1", "b:train.nope=2"], "train.nope"),
                      (["a:", "b:"], None)):
        cmd = base + [x for a in arms for x in ("--arm", a)]
        if msg is None:
            cmd += ["--eval", "nosuchsplit"]
            msg = "no split 'nosuchsplit'"
        res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=120)
        assert res.returncode == 1 and msg in res.stderr, res.stderr
    assert not os.path.isdir(tmp_path / "c" / "runs")
