"""The memory planner: its arithmetic on a hand-checkable shape, its verdicts, the CLI, and ddp's early refusal."""

import json
import subprocess

import torch

from conftest import PY, ROOT
from htr_dist.config import load_config
from htr_dist.plan import GIB, HEADROOM_BYTES, TeacherShape, ddp_refusal, plan, teacher_activation_bytes, teacher_shape


def test_teacher_shape_of_the_published_3b():
    cfg = load_config(None, ["llm.name_or_path=configs/llm/llama-3.2-3b"])
    shape = teacher_shape(cfg, torch.bfloat16)
    assert shape.params == 3_212_749_824 and shape.bytes_per_param == 2 and shape.layers == 28
    # a decoder layer: q and o 3072x3072, k and v 3072x1024, three MLP matrices 3072x8192, two norms
    assert shape.largest_layer == 2 * 3072 * 3072 + 2 * 3072 * 1024 + 3 * 3072 * 8192 + 2 * 3072
    assert shape.root_params == 128256 * 3072 + 3072  # tied embedding and final norm
    assert (shape.hidden, shape.kv_width, shape.intermediate, shape.heads) == (3072, 1024, 8192, 24)


def test_activation_arithmetic_by_hand():
    shape = TeacherShape(params=0, bytes_per_param=2, largest_layer=0, root_params=0, layers=3, hidden=8, kv_width=4,
                         intermediate=16, heads=2, vocab=10)
    per_token = 7 * 8 + 2 * 4 + 4 * 16  # 128 elements
    layer = per_token * 5 * 2  # 5 tokens, 2 bytes
    logits = 2 * 3 * 10 * 4
    assert teacher_activation_bytes(shape, 5, 3, eager=False, checkpointing=False) == 3 * layer + logits
    assert teacher_activation_bytes(shape, 5, 3, eager=True, checkpointing=False) == 3 * (layer + 2 * 25 * 2) + logits
    assert teacher_activation_bytes(shape, 5, 3, eager=False, checkpointing=True) == 3 * 8 * 5 * 2 + layer + logits


def test_plan_shards_offloads_and_finds_the_largest_batch(tiny_overrides):
    cfg = load_config(None, tiny_overrides + ["llm.name_or_path=configs/llm/llama-3.2-1b"])
    small = plan(cfg, gpus_per_node=4, nodes=2, gpu_mem_gb=8)
    rows = {r["strategy"]: r for r in small["strategies"]}
    whole = small["teacher"]["bytes"]
    assert small["world"] == 8 and whole == 2 * 1_235_814_400
    assert rows["ddp"]["teacher_held"] == whole and rows["ddp"]["teacher_working"] == 0
    assert rows["fsdp"]["teacher_held"] == -(-whole // 8) and rows["fsdp_offload"]["teacher_held"] == 0
    assert rows["deepspeed"]["trainable_states"] < rows["fsdp"]["trainable_states"]  # ZeRO-2 shards grads, moments
    for r in rows.values():
        for key in ("no_checkpointing", "checkpointing"):
            v = r[key]
            assert v["fits"] == (v["total"] <= small["capacity_bytes"])
        assert r["checkpointing"]["total"] < r["no_checkpointing"]["total"]
        assert r["checkpointing"]["max_batch_size"] >= r["no_checkpointing"]["max_batch_size"]
    # a device too small for the whole teacher: ddp does not fit, sharding does
    tiny_gpu = {r["strategy"]: r for r in plan(cfg, 8, 1, 3.0)["strategies"]}
    assert not tiny_gpu["ddp"]["no_checkpointing"]["fits"] and tiny_gpu["ddp"]["no_checkpointing"]["max_batch_size"] == 0
    assert tiny_gpu["fsdp"]["checkpointing"]["fits"]
    # a prompt lengthens every teacher sequence: more activation memory per line
    prompted = load_config(None, tiny_overrides + ["llm.name_or_path=configs/llm/llama-3.2-1b",
                                                    "llm.prompt=A handwritten line reads:"])
    more = {r["strategy"]: r for r in plan(prompted, 4, 2, 8)["strategies"]}
    assert more["fsdp"]["no_checkpointing"]["activations"] > rows["fsdp"]["no_checkpointing"]["activations"]


def test_ddp_is_refused_where_a_whole_teacher_cannot_fit():
    cfg = load_config(None, ["llm.name_or_path=configs/llm/llama-3.2-3b"])
    reason = ddp_refusal(cfg, 6 * GIB, torch.bfloat16)
    assert "dist.strategy=ddp keeps the whole teacher configs/llm/llama-3.2-3b (3.21 B parameters, 6.0 GiB in " \
           "bfloat16)" in reason and "use dist.strategy=fsdp or deepspeed" in reason
    assert ddp_refusal(cfg, int(6 * GIB + HEADROOM_BYTES + 2 ** 28), torch.bfloat16) == ""


def test_plan_command_prints_a_table_and_json():
    cmd = [PY, "launch/plan.py", "--config", "configs/iam_llama3b_fsdp.yaml", "llm.name_or_path=configs/llm/llama-3.2-3b",
           "--gpus", "8", "--gpu-mem", "24"]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "on 8 rank(s) of 24 GiB" in out.stdout and "| fsdp_offload |" in out.stdout
    result = json.loads(subprocess.run(cmd + ["--json"], capture_output=True, text=True, cwd=ROOT,
                                       timeout=300).stdout)
    assert [r["strategy"] for r in result["strategies"]] == ["ddp", "fsdp", "fsdp_offload", "deepspeed",
                                                             "deepspeed_offload"]
    bad = subprocess.run(cmd[:4] + ["llm.nme=1"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert bad.returncode == 2 and "llm.nme" in bad.stderr
