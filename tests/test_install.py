"""The package runs without its checkout: console scripts, shipped configs, the reference code's command forms."""

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import PY, ROOT
from htr_dist.config import ConfigError, load_config


def test_an_installed_wheel_runs_from_any_directory(tmp_path):
    """Build the wheel, install it into a bare folder, and plan a run from elsewhere by a shipped config's name:
    the YAML, the DeepSpeed JSON files and the 3B shape it needs all come from the installed package."""
    subprocess.run([PY, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", ROOT, "-w",
                    str(tmp_path / "wheel")], check=True, capture_output=True, timeout=300)
    wheel, = (tmp_path / "wheel").iterdir()
    target = tmp_path / "site"
    subprocess.run([PY, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)], check=True,
                   capture_output=True, timeout=300)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = dict(os.environ, PYTHONPATH=str(target))
    proc = subprocess.run([str(target / "bin" / "htr-plan"), "--config", "iam_llama3b_zero3", "--gpus", "8",
                           "--gpu-mem", "80", "llm.name_or_path=configs/llm/llama-3.2-3b", "--json"],
                          capture_output=True, text=True, cwd=elsewhere, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(proc.stdout)
    assert plan["teacher"]["name_or_path"].startswith(str(target)) and plan["teacher"]["layers"] == 28
    assert "deepspeed" in [row["strategy"] for row in plan["strategies"]]
    where = subprocess.run([PY, "-c", "import htr_dist.config as c; print(c.SHIPPED); "
                                      "print(c.load_config('iam_llama3b_zero3').dist.deepspeed_config)"],
                           capture_output=True, text=True, cwd=elsewhere, env=env, timeout=120, check=True)
    shipped, deepspeed_json = where.stdout.split()
    assert shipped.startswith(str(target)) and os.path.isfile(deepspeed_json) and deepspeed_json.startswith(shipped)
    for script in ("htr-train", "htr-prepare", "htr-eval", "htr-export", "htr-recognize", "htr-synth", "htr-plan"):
        assert (target / "bin" / script).is_file(), script


def test_the_config_may_come_first_as_the_reference_code_takes_it(tmp_path):
    cfg = load_config(None, ["configs/demo.yaml", "train.lr=0.5"])
    assert cfg.train.lr == 0.5 and cfg.llm.name_or_path == load_config("demo").llm.name_or_path
    with pytest.raises(ConfigError, match="not a key=value override, and --config demo is given"):
        load_config("demo", ["iam_nollm"])


def test_the_reference_codes_top_level_keys(tmp_path):
    """`device` maps to dist.device; `resume` and `save` name what replaces them."""
    path = tmp_path / "c.yaml"
    path.write_text("device: 'cuda:0'\ntrain:\n  lr: 0.001\n")
    assert load_config(str(path)).dist.device == "cuda:0"
    assert load_config(None, ["device=cpu"]).dist.device == "cpu"
    with pytest.raises(ConfigError, match="'resume' is the reference code's key: .*train.init_from"):
        load_config(None, ["resume=./saved_models/htrnet.pt"])
    with pytest.raises(ConfigError, match="'save' is the reference code's key: .*run.dir"):
        load_config(None, ["save=./temp.pt"])
    with pytest.raises(ConfigError, match="dist.device: 'gpu0' is not one of"):
        load_config(None, ["dist.device=gpu0"])


def test_the_device_setting(monkeypatch):
    from htr_dist.dist.env import pick_device

    assert pick_device(0, "cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        assert pick_device(1, "auto", 2) == torch.device("cpu")
        with pytest.raises(ConfigError, match="dist.device=cuda:0: CUDA is not available here"):
            pick_device(0, "cuda:0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert pick_device(3, "cuda", 4) == torch.device("cuda", 1)
    assert pick_device(0, "cuda:1") == torch.device("cuda", 1)
    with pytest.raises(ConfigError, match="names one GPU, but this run has 2 ranks.*CUDA_VISIBLE_DEVICES"):
        pick_device(0, "cuda:1", 2)
    with pytest.raises(ConfigError, match="this machine has 2 GPU"):
        pick_device(0, "cuda:5")


def test_the_reference_codes_evaluate_form(tmp_path):
    """`evaluate.py CONFIG resume=MODEL` takes --data from the config; a config of the reference code's own
    keys gets one line with the new form."""
    sys.path.insert(0, ROOT)
    from htr_dist.cli.evaluate import parse_args

    ours = tmp_path / "ours.yaml"
    ours.write_text("data:\n  path: shards/mine\n")
    args = parse_args([str(ours), "resume=runs/x/best_model.pt"])
    assert (args.checkpoint, args.data, args.split) == ("runs/x/best_model.pt", "shards/mine", "test")
    theirs = tmp_path / "config.yaml"
    theirs.write_text("resume:\nsave: './temp.pt'\ndevice: 'cuda:0'\npreproc:\n  image_height: 128\n")
    proc = subprocess.run([PY, "launch/evaluate.py", str(theirs), "resume=htrnet.pt"], capture_output=True,
                          text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 2
    assert "the new form: htr-eval --checkpoint MODEL --data SHARDS" in proc.stderr.splitlines()[-1]
