"""The benchmarks print exactly one JSON object on stdout, whatever libraries and child processes write."""

import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "benchmarks")


def test_reserve_stdout_keeps_stdout_for_the_report():
    # the three ways noise reached stdout: print, a write to descriptor 1 (C code, DeepSpeed's logger) and a child
    code = "\n".join([
        f"import os, subprocess, sys; sys.path.insert(0, {BENCH!r})",
        "from _report import reserve_stdout",
        "emit = reserve_stdout()",
        "print('noise from print')",
        "os.write(1, b'noise from fd 1\\n')",
        "subprocess.run([sys.executable, '-c', 'print(\"noise from a child\")'], check=True)",
        "emit({'answer': 42})",
    ])
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    machine = report.pop("machine")  # every report says where it was measured
    assert report == {"answer": 42}
    assert machine["cores"] == os.cpu_count() and machine["cpu_capability"] and machine["torch"]
    assert isinstance(machine["native_bf16"], bool)
    for noise in ("noise from print", "noise from fd 1", "noise from a child"):
        assert noise in out.stderr


def test_step_time_prints_one_json_object_with_paired_overhead(tiny_llama):
    cmd = [sys.executable, os.path.join(BENCH, "step_time.py"), "--llm", tiny_llama, "--steps", "2", "--warmup", "0",
           "--batch", "2", "--height", "32", "--width", "256",
           "--only", "no_llm,llm_sampled,llm_sampled_eager,llm_sampled_llm_bf16,llm_sampled_llm_bf16_eager",
           "--llm-attn", "sdpa,eager", "--llm-precision", "fp32,bf16"]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)  # the whole of stdout: progress and library logs went to stderr
    assert "round 2/2" in out.stderr
    assert result["llm_overhead"] == result["llm_sampled_s"] / result["no_llm_s"]
    # the teachers each case ran: every pair of LLM precision and attention
    assert (result["llm_precision"], result["llm_attn"]) == ("float32", "sdpa")
    assert result["llm_sampled_eager_llm"] == "float32 eager"
    assert result["llm_sampled_llm_bf16_llm"] == "bfloat16 sdpa"
    assert result["llm_sampled_llm_bf16_eager_llm"] == "bfloat16 eager"
    for key in ("llm_overhead_paired", "llm_overhead_eager_paired", "llm_overhead_llm_bf16_paired",
                "llm_overhead_llm_bf16_eager_paired"):
        paired = result[key]
        assert 0 < paired["min"] <= paired["median"] <= paired["max"]
    assert result["llm_sampled"]["llm_lines_per_step"] == 1
    # the floor: the no-LLM step plus the LLM path's counted arithmetic at this CPU's best matmul rate
    sampled = result["llm_sampled"]
    gflop = 2 * (2 * sampled["llm_macs_per_llm_line"] + 3 * sampled["connector_macs_per_llm_line"]) / 1e9
    assert result["llm_path_gflop_per_step"] == gflop and result["matmul_gflops"] > 0
    floor = (result["no_llm_s"] + gflop / result["matmul_gflops"]) / result["no_llm_s"]
    assert result["llm_overhead_floor"] == floor and floor > 1


def test_step_time_times_the_seed_code_in_the_same_rounds(tiny_llama):
    # 128 x 256: the seed's MobileViT needs whole 8 x 8 patches at 1/16 of the input
    cmd = [sys.executable, os.path.join(BENCH, "step_time.py"), "--llm", tiny_llama, "--steps", "2", "--warmup", "0",
           "--batch", "3", "--height", "128", "--width", "256", "--only", "seed_hybrid,seed_code,seed_code_llm"]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert "round 2/2" in out.stderr and "no_llm" not in result
    assert result["seed_code"]["params_trainable"] == 10401744  # the seed's "about 10.4 M" at its configuration
    assert result["seed_code_llm"]["params_trainable"] > result["seed_code"]["params_trainable"]  # + its connector
    assert result["seed_code_llm"]["llm_lines_per_step"] == 1
    assert result["seed_code"]["macs_per_line"] > 0
    for key in ("seed_hybrid_vs_seed_code_paired", "seed_code_llm_overhead_paired"):
        paired = result[key]
        assert 0 < paired["min"] <= paired["median"] <= paired["max"]


def test_seed_code_step_does_the_seeds_work(tiny_llama, monkeypatch):
    """Its cost comes from the backbone run again on the LLM lines and the LLM scoring 128 positions each."""
    monkeypatch.syspath_prepend(BENCH)
    from _seed_code import SeedCodeCase
    from step_time import SEED_CFG, load_teacher, make_batch

    teacher = load_teacher(tiny_llama, "")
    case = SeedCodeCase("seed_code_llm", SEED_CFG, 80, teacher, llm_lines=2)
    seen = {"backbone": [], "llm": []}
    case.model.features.register_forward_hook(lambda m, args, out: seen["backbone"].append(args[0].shape[0]))
    teacher.lm.register_forward_hook(
        lambda m, args, kwargs, out: seen["llm"].append((kwargs["inputs_embeds"].shape, kwargs["labels"].shape)),
        with_kwargs=True)
    before = [p.detach().clone() for p in case.model.connector.parameters()]
    case.step(make_batch(5, 128, 256, 45))
    assert seen["backbone"] == [5, 2]
    # every frame of a 256-pixel line (T = 256 / 8) goes in, and every position is a label, padding included
    assert seen["llm"] == [((2, 32, teacher.hidden_size), (2, 32))]
    assert all(not torch.equal(a, p) for a, p in zip(before, case.model.connector.parameters()))
    assert not any(p.requires_grad for p in teacher.lm.parameters())


def _step_time_variants(size: list, only: str, flag: str, values: str, bad_value: str):
    """step_time.py without LLM over ``only`` with ``flag values``: its JSON, and the stderr of a run whose list
    ends in ``bad_value`` instead (which must fail)."""
    cmd = [sys.executable, os.path.join(BENCH, "step_time.py"), "--llm", "", "--steps", "2", "--warmup", "0",
           "--batch", "2", *size, "--only", only, flag]
    out = subprocess.run(cmd + [values], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr
    bad = subprocess.run(cmd + [values.rsplit(",", 1)[0] + "," + bad_value], capture_output=True, text=True,
                         cwd=ROOT, timeout=300)
    assert bad.returncode != 0
    return json.loads(out.stdout), bad.stderr


def test_step_time_compares_memory_formats_in_one_run():
    result, bad = _step_time_variants(["--height", "32", "--width", "128"], "no_llm,no_llm_channels_last",
                                      "--memory-format", "contiguous,channels_last", "nhwc")
    assert result["memory_format"] == "contiguous"
    assert {"no_llm", "no_llm_channels_last"} <= set(result) and "seed_hybrid" not in result
    ratio = result["no_llm_channels_last_paired_ratio"]
    assert 0 < ratio["min"] <= ratio["median"] <= ratio["max"]
    assert "dist.memory_format: 'nhwc' is not one of" in bad


def test_step_time_compares_precisions_in_one_run():
    """--precision fp32,bf16: our models also under bf16 autocast, in the same rounds; the seed's step stays fp32."""
    # 128 x 256: the seed's MobileViT needs whole 8 x 8 patches at 1/16 of the input
    result, bad = _step_time_variants(["--height", "128", "--width", "256"], "seed_hybrid,seed_hybrid_bf16,seed_code",
                                      "--precision", "fp32,bf16", "fp16")
    assert result["precision"] == "float32" and result["seed_precision"] == "fp32"
    assert {"seed_hybrid", "seed_hybrid_bf16", "seed_code"} <= set(result) and "no_llm_bf16" not in result
    for key in ("seed_hybrid_bf16_paired_ratio", "seed_hybrid_bf16_vs_seed_code_paired",
                "seed_hybrid_vs_seed_code_paired"):
        assert 0 < result[key]["min"] <= result[key]["median"] <= result[key]["max"], key
    assert "dist.precision: 'fp16' is not one of" in bad


def test_inference_compares_layouts_and_decoders_in_one_run(shard_dir):
    cmd = [sys.executable, os.path.join(BENCH, "inference.py"), "--batch", "2", "--height", "32", "--width", "128",
           "--steps", "2", "--warmup", "0", "--memory-format", "contiguous,channels_last,auto", "--recognize", "3"]
    out = subprocess.run(cmd + ["--data", shard_dir, "--split", "val"], capture_output=True, text=True, cwd=ROOT,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert "round 2/2" in out.stderr
    assert result["images"] == f"{shard_dir} (val)" and result["batch"] == 2
    forward = result["forward"]
    assert list(forward) == ["contiguous", "channels_last", "auto"]
    assert forward["contiguous"]["layout"] == "contiguous" and forward["channels_last"]["layout"] == "channels_last"
    assert forward["auto"]["layout"] == "channels_last"  # inference: NHWC wherever no backward runs
    assert "paired_ratio" not in forward["contiguous"]
    recognize = result["recognize"]  # 3 lines read end to end, against the plain fixed-size reference
    assert recognize["lines"] == 3 and recognize["lines_per_s"] > 0 and recognize["reference_lines_per_s"] > 0
    assert result["recognize_over_reference"] == recognize["over_reference"] and 0 <= recognize["agrees"] <= 1
    for layout in ("channels_last", "auto"):
        ratio = forward[layout]["paired_ratio"]
        assert 0 < ratio["min"] <= ratio["median"] <= ratio["max"]
    for stats in [f["seconds"] for f in forward.values()] + [d["seconds"] for d in result["decode"].values()]:
        assert 0 < stats["min"] <= stats["median"] <= stats["max"]
    assert forward["contiguous"]["lines_per_s"] == 2 / forward["contiguous"]["seconds"]["median"]
    assert set(result["decode"]) == {"greedy", "beam", "beam_python", "beam+lm"} and result["macs_per_line"] > 0
    assert "no connector" in result["skipped"]["beam+llm"]  # random weights, exported without a teacher
    assert result["beam_over_python"]["min"] > 0 and 0 <= result["beam_agrees"] <= 1
    for bad, message in ((["--memory-format", "nhwc"], "dist.memory_format: 'nhwc' is not one of"),
                         (["--decode", "greedy,viterbi"], "decode: 'viterbi' is not one of")):
        proc = subprocess.run(cmd[:2] + bad + ["--batch", "1", "--height", "32", "--width", "128", "--steps", "1"],
                              capture_output=True, text=True, cwd=ROOT, timeout=300)
        assert proc.returncode != 0 and message in proc.stderr, proc.stderr[-2000:]


def test_augment_prints_lines_per_second_per_part():
    transforms = os.path.join(ROOT, "htr_dist", "data", "transforms.py")
    cmd = [sys.executable, os.path.join(BENCH, "augment.py"), "--lines", "3", "--repeats", "2", "--sizes", "16x128",
           "32x256", "--baseline", transforms]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert "round 2/2" in out.stderr and result["lines"] == 3
    for size in ("16x128", "32x256"):
        cases = result["lines_per_s"][size]
        assert list(cases) == ["none", "affine", "elastic", "morph", "blur", "noise", "contrast", "all", "baseline"]
        assert all(0 < c["min"] <= c["median"] <= c["max"] for c in cases.values())
        assert result["cost_ratio"][size]["all_vs_none"] == cases["none"]["median"] / cases["all"]["median"]
    bad = subprocess.run(cmd[:2] + ["--sizes", "16by128"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert bad.returncode != 0 and "expected HEIGHTxWIDTH" in bad.stderr


def test_unseen_styles_reports_seen_and_unseen_figures_and_plots(tiny_llama, tmp_path):
    """The unseen-style benchmark end to end at a tiny size: writer-independent data, 2-rank training, both test
    splits, one JSON object with the issue's keys, and the PNG of the val curves."""
    from conftest import TINY_ARCH

    plot = str(tmp_path / "curves.png")
    cmd = [sys.executable, os.path.join(BENCH, "unseen_styles.py"), "--config", "configs/tiny_cpu.yaml",
           "--steps", "4", "--seeds", "0", "1", "--forms", "20", "--workdir", str(tmp_path / "work"), "--plot", plot
           ] + TINY_ARCH + [f"llm.name_or_path={tiny_llama}", "train.eval_every=2"]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout)
    for key in ("cer_seen", "cer_unseen", "wer_unseen", "minutes", "steps"):
        assert report[key] == report["spread"][key]["median"], key
    assert report["steps"] == 4 and [r["seed"] for r in report["runs"]] == [0, 1]
    for r in report["runs"]:
        assert r["lines_seen"] > 0 and r["lines_unseen"] > 0 and r["lines_seen"] != r["lines_unseen"]
        assert [p[1] for p in r["curves"]["unseen"]] == [2, 4] and [p[1] for p in r["curves"]["seen"]] == [2, 4]
    with open(plot, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_gpu_smoke_says_there_is_no_gpu_and_succeeds():
    out = subprocess.run([sys.executable, os.path.join(BENCH, "gpu_smoke.py"), "--steps", "1"], capture_output=True,
                         text=True, cwd=ROOT, timeout=120, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert out.returncode == 0 and "no CUDA device here" in out.stdout


def test_teacher_scale_reports_memory_plan_and_time_per_strategy(tmp_path):
    """The 3B-scale benchmark end to end on a shape of Llama-3.2-3B's kind at a tiny size (2 layers, hidden 256, a
    512-token vocabulary), FSDP2 at 2 ranks: one JSON object with the issue's keys per strategy and at the top."""
    with open(os.path.join(ROOT, "configs", "llm", "llama-3.2-3b", "config.json")) as f:
        config = json.load(f)
    config.update(num_hidden_layers=2, vocab_size=512, hidden_size=256, intermediate_size=512,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=64, bos_token_id=1, eos_token_id=2)
    shape = tmp_path / "config.json"
    shape.write_text(json.dumps(config))
    out = subprocess.run([sys.executable, os.path.join(BENCH, "teacher_scale.py"), "--llm", str(shape), "--steps", "1",
                          "--strategies", "fsdp"], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout)
    row = report["strategies"]["fsdp"]
    assert row["held_ratio"] == 0.5 and row["peak_gb"] > 0 and row["planned_gb"] > 0
    assert len(row["llm_loss"]) == 1 and row["teacher_s"]["median"] > 0 and row["step_s"]["median"] > 0
    assert 0 < row["activation_bytes_per_line"] and 0 < row["teacher_efficiency"] < 1
    assert report["teacher_flops"] > 0 and report["teacher_floor_s"] > 0 and report["matmul_gflops"] > 0
    assert set(report["goals"]) == {"held_ratio_le_0.55", "peak_ratio_le_0.75", "planner_within_25pct",
                                    "best_teacher_efficiency_ge_0.5"}


def test_teacher_format_scores_each_layout_on_the_same_tokens(tiny_llama, shard_dir):
    cmd = [sys.executable, os.path.join(BENCH, "teacher_format.py"), "--llm", tiny_llama, "--data", shard_dir,
           "--split", "val", "--lines", "6"]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    formats = json.loads(out.stdout)["formats"]
    legacy, newline = formats["legacy"], formats["bos_first_newline"]
    assert legacy["line_end"] == "eos" and newline["line_end"] == "newline"
    # the same first and middle tokens, scored after the same BOS: only the line end differs
    assert legacy["first"] == pytest.approx(newline["first"]) and legacy["middle"] == pytest.approx(newline["middle"])
    assert legacy["end"] != pytest.approx(newline["end"]) and 0 < legacy["end_share"] < 1
    assert all(f["all"] > 0 and f["tokens_per_line"] > 1 for f in formats.values())


def test_teacher_reads_tells_line_specific_tokens_from_a_constant_prefix(tiny_llama):
    sys.path.insert(0, BENCH)
    from teacher_reads import score_batch

    from htr_dist.models.llm import LineFormat, PrefixLM, load_causal_lm

    lm, tokenizer = load_causal_lm(tiny_llama, "/nonexistent-cache")
    teacher = PrefixLM(lm, tokenizer, line_format=LineFormat(bos_first=True, line_end="newline")).eval()
    texts = ["a line of text", "another one", "the third line"]
    torch.manual_seed(0)
    varied = torch.randn(3, 4, lm.config.hidden_size)
    same = varied[:1].expand_as(varied)
    out = score_batch(teacher, varied, texts, 24)
    assert out["tokens"] == teacher.label_mask(*teacher.tokenize(texts, 24)).sum().item()
    assert out["own"] != pytest.approx(out["other"]) and out["own"] != pytest.approx(out["mean"])
    assert 0 <= out["hits"] <= out["tokens"]
    # one prefix for every line: the image can tell the LM nothing, and the three scores agree
    flat = score_batch(teacher, same, texts, 24)
    assert flat["own"] == pytest.approx(flat["other"]) == pytest.approx(flat["mean"])


def tiny_teacher_export(tiny_llama, shard_dir, path):
    """An export of a tiny random recogniser whose connector feeds the tiny Llama, in the shards' alphabet."""
    from htr_dist.config import Config
    from htr_dist.data.shards import load_manifest
    from htr_dist.models.htr import HTRModel
    from htr_dist.train.export import export_model
    from test_htr_model import TINY_CONNECTOR, tiny_arch

    cfg = Config()
    cfg.arch, cfg.connector = tiny_arch(), TINY_CONNECTOR
    cfg.data.img_height, cfg.data.img_width = 32, 160
    cfg.llm.name_or_path = tiny_llama
    torch.manual_seed(0)
    alphabet = load_manifest(shard_dir)["alphabet"]
    model = HTRModel(cfg.arch, cfg.connector, len(alphabet) + 1, 32, 160, 64)
    return export_model(model, cfg, alphabet, str(path))


def test_teacher_reads_runs_on_an_export_with_a_connector(tiny_llama, shard_dir, tmp_path):
    path = tiny_teacher_export(tiny_llama, shard_dir, tmp_path / "model.pt")
    cmd = [sys.executable, os.path.join(BENCH, "teacher_reads.py"), "--model", path, "--data", shard_dir,
           "--split", "val", "--lines", "5", "--batch-size", "3"]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads(out.stdout)
    assert report["lines"] == 5 and report["teacher"] == tiny_llama and report["tokens"] > 5
    assert report["image_gain"] == pytest.approx(report["nll_other"] - report["nll_own"])
    assert all(report[f"nll_{k}"] > 0 for k in ("own", "other", "mean"))


def test_connector_probe_trains_a_fresh_connector_and_probes_it(tiny_llama, shard_dir, tmp_path):
    path = tiny_teacher_export(tiny_llama, shard_dir, tmp_path / "model.pt")
    base = [sys.executable, os.path.join(BENCH, "connector_probe.py"), "--model", path, "--data", shard_dir,
            "--split", "val", "--batch-size", "3", "--probe-lines", "6"]
    out = subprocess.run(base + ["--steps", "4", "--probe-every", "2", "--set", "connector.kind=pool",
                                 "connector.num_queries=3"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads(out.stdout)
    assert [p["step"] for p in report["probes"]] == [2, 4]
    assert report["connector"]["kind"] == "pool" and report["connector"]["num_queries"] == 3
    assert report["image_gain"] == report["probes"][-1]["image_gain"]
    assert all(0 <= p["spread_over_lines"] and p["nll_own"] > 0 for p in report["probes"])
    bad = subprocess.run(base + ["--set", "train.lr=1"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert bad.returncode == 2 and "only connector.* settings, not 'train.lr'" in bad.stderr
