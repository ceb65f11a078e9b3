"""Every public command answers --help and names its main options."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPTS = {
    "launch/train.py": ["--config", "key=value"],
    "launch/evaluate.py": ["--checkpoint", "--data", "--split", "--decode", "--json", "--predictions",
                           "--memory-format", "--tune", "--lm-split", "beam+llm", "--report"],
    "launch/recognize.py": ["--checkpoint", "IMAGE", "--decode", "--memory-format", "beam+lm"],
    "launch/prepare_iam.py": ["--iam", "--out", "--scale", "--workers"],
    "launch/prepare.py": ["FORMAT", "SOURCE", "--out", "--splits", "--val-fraction", "--seed", "iam-lines", "page"],
    "launch/synth_iam.py": ["--forms", "--seed", "--fonts", "--font-list"],
    "launch/fetch_fonts.py": ["--list", "--split", "--check"],
    "launch/fetch_browser.py": ["chromium"],
    "benchmarks/unseen_styles.py": ["--config", "--steps", "--minutes", "--seeds", "--plot"],
    "launch/demo.py": ["--variant", "--forms", "--fresh"],
    "launch/compare.py": ["--config", "--arm", "--seeds", "--eval", "--out", "--data"],
    "benchmarks/loader.py": ["--data"],
    "benchmarks/augment.py": ["--sizes", "--baseline"],
    "benchmarks/step_time.py": ["--steps", "--batch", "--llm-precision"],
    "benchmarks/allgather.py": ["--nproc", "--sizes-mb", "--repeats"],
    "benchmarks/inference.py": ["--checkpoint", "--memory-format", "--decode", "--batch"],
    "benchmarks/llm_memory.py": ["--help"],
    "benchmarks/gpu_smoke.py": ["--gpus", "--steps", "--strategies"],
    "benchmarks/teacher_reads.py": ["--model", "--data", "--split", "--lines"],
    "benchmarks/connector_probe.py": ["--model", "--data", "--steps", "--probe-every", "--set"],
    "launch/plan.py": ["--config", "--gpus", "--gpu-mem", "--nodes"],
    "launch/export.py": ["SOURCE", "--out", "--onnx", "--step", "--best", "--check-images"],
}


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_help(script):
    out = subprocess.run([sys.executable, os.path.join(ROOT, script), "--help"], capture_output=True, text=True,
                         cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "usage:" in out.stdout
    for option in SCRIPTS[script]:
        assert option in out.stdout, f"{script} --help does not mention {option}"
