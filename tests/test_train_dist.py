"""Real 2-rank CPU runs (gloo) of every strategy, through torchrun and through the deepspeed launcher."""

import glob
import json
import math
import os
import signal
import subprocess
import time

import pytest
import torch

from conftest import PY, ROOT
from htr_dist.config import load_config
from htr_dist.dist import env as dist_env
from htr_dist.dist.env import free_port, launcher_command
from htr_dist.train.optim import lr_factor


def torchrun(script, args, nproc=2, timeout=300):
    cmd = launcher_command("torchrun", nproc) + [script] + args
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def deepspeed_launch(script, args, nproc=2, timeout=300):
    port = free_port()
    cmd = launcher_command("deepspeed", nproc, port) + [script] + args
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    # DeepSpeed's CPU backend names a 69 MB /dev/shm file per rank after the port; init_distributed unlinks them
    proc.shm_left = glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_*_{port}_*")
    return proc


def run_dist_check(strategy, args, nproc=2):
    """tests/_dist_check.py under the launcher of ``strategy``; (finished process, the JSON it wrote). ``args`` start
    with the output path."""
    launch = deepspeed_launch if strategy == "deepspeed" else torchrun
    proc = launch(os.path.join(ROOT, "tests", "_dist_check.py"), args + [f"dist.strategy={strategy}"], nproc=nproc)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(args[0]) as f:
        return proc, json.load(f)


@pytest.mark.parametrize("strategy, llm_precision, memory_format", [
    ("ddp", "auto", "auto"), ("fsdp", "auto", "auto"), ("deepspeed", "auto", "auto"),
    ("fsdp", "bf16", "channels_last"), ("deepspeed", "bf16", "contiguous"),
])
def test_strategy_two_ranks_different_batch_sizes(strategy, llm_precision, memory_format, tiny_overrides, tmp_path):
    """Every strategy, and the sharded ones with a bf16 LLM under an fp32 trainable part (what the demo runs). The
    last two pin the backbone's layout, so both layouts run here whatever ``auto`` picks on this CPU."""
    out = str(tmp_path / "result.json")
    args = [out] + tiny_overrides + ["train.llm_sample_ratio=0.5", f"dist.llm_precision={llm_precision}",
                                     f"dist.memory_format={memory_format}"]
    # The demo's ZeRO-3 config: whole-module fetches, and parameters up to 3e7 elements (SmolLM2's tied embedding;
    # here the whole tiny LLM) kept whole on every rank.
    demo_zero3 = strategy == "deepspeed" and llm_precision == "bf16"
    if demo_zero3:
        args.append("dist.llm_deepspeed_config=configs/deepspeed/llm_zero3_smollm2.json")
    proc, res = run_dist_check(strategy, args)
    if strategy == "deepspeed":
        assert proc.shm_left == []  # no RAM left behind in /dev/shm
    # ZeRO-3 and FSDP2 gathered through shared memory (both ranks are local); DDP gathers nothing
    assert (res["shm_calls"] > 0) == (strategy != "ddp")
    assert res["llm_calls"] == [3, 3]
    assert all(math.isfinite(l["total"]) and l["llm"] > 0 for l in res["losses"])
    assert res["weights_equal"] is True
    if strategy != "deepspeed":
        assert res["grads_equal"] == [True, True, True]
    assert res["llm_after"] == pytest.approx(res["llm_before"], rel=0, abs=0)  # the frozen LLM never moves
    assert res["teacher_training"] is False
    assert res["llm_requires_grad"] is False and res["llm_grads"] is False
    assert res["channels_last"] == dist_env.pick_channels_last(torch.device("cpu"), memory_format)
    assert res["llm_dtypes"] == ["torch.bfloat16" if llm_precision == "bf16" else "torch.float32"]
    if strategy == "ddp":
        assert res["held"] == res["full"]  # replicated
    elif demo_zero3:
        assert res["held"] > res["full"]  # every parameter persists whole, and its partition is kept as well
    else:
        assert 0 < res["held"] < res["full"]  # sharded: a part on each rank


@pytest.mark.parametrize("offload", [False, True], ids=["on_device", "cpu_offload"])
def test_fsdp_sharded_load_gives_the_same_llm_as_a_whole_load(offload, tiny_overrides, tmp_path):
    """dist.fsdp_sharded_load: a meta-device skeleton, sharded, each rank reading its own rows of the safetensors
    weights, must be the very LLM that loading it whole and then sharding gives: same parameters (a tied embedding,
    grouped-query attention, a row count that 2 ranks do not divide), same rotary buffers, same losses bit for bit;
    with and without FSDP2's CPU offload (dist.fsdp_cpu_offload), whose shards live on the CPU between uses."""
    from htr_dist.testing import make_tiny_llama

    llm = make_tiny_llama(str(tmp_path / "tied_llama"), hidden=48, heads=4, kv_heads=2, intermediate=97,
                          tie_embeddings=True)
    overrides = [o for o in tiny_overrides if not o.startswith("llm.name_or_path=")]
    overrides += [f"llm.name_or_path={llm}", f"dist.fsdp_cpu_offload={offload}"]
    runs = {}
    for sharded in (True, False):
        out = str(tmp_path / f"sharded_{sharded}.json")
        _, runs[sharded] = run_dist_check("fsdp", [out] + overrides + [f"dist.fsdp_sharded_load={sharded}"])
    assert runs[True]["llm_load"] == "sharded" and runs[False]["llm_load"] == "whole"
    for run in runs.values():
        assert run["llm_offload"] == ("CPUOffloadPolicy" if offload else "OffloadPolicy")
    assert not runs[True]["llm_requires_grad"] and not runs[True]["llm_grads"]  # still frozen after to_empty
    assert 0 < runs[True]["held"] < runs[True]["full"]
    for key in ("llm_before", "llm_after", "losses", "held", "full"):
        assert runs[True][key] == runs[False][key], key


@pytest.mark.parametrize("strategy", ["fsdp", "deepspeed"])
def test_shared_memory_gathers_change_no_number(strategy, tiny_overrides, tmp_path):
    """The same 2-rank steps with the LLM gathered through gloo and through /dev/shm give the same losses, bit for
    bit (a wrong offset or a stale buffer would change the LLM loss)."""
    results = {}
    for shm in ("false", "true"):
        args = [str(tmp_path / f"result-{shm}.json")] + tiny_overrides + ["train.llm_sample_ratio=0.5",
                                                                         f"dist.shm_allgather={shm}"]
        results[shm] = run_dist_check(strategy, args)[1]
    assert results["false"]["shm_calls"] == 0 and results["true"]["shm_calls"] > 0
    assert results["true"]["losses"] == results["false"]["losses"]
    assert not glob.glob("/dev/shm/htr-dist-*")


def test_deepspeed_one_rank_leaves_no_shared_memory(tiny_overrides, tmp_path):
    """At one rank DeepSpeed makes its process group, and its 69 MB /dev/shm file, only inside deepspeed.initialize."""
    args = [str(tmp_path / "result.json")] + tiny_overrides + ["train.llm_sample_ratio=0.5"]
    proc, res = run_dist_check("deepspeed", args, nproc=1)
    assert proc.shm_left == []
    assert res["llm_calls"] == [3]


def read_scalars(tb_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(tb_dir)
    acc.Reload()
    return {tag: [e.value for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}, acc


EXPECTED_TAGS = {"train/loss_total", "train/loss_ctc", "train/loss_ctc_shortcut", "train/loss_llm", "train/lr",
                 "train/grad_norm", "perf/lines_per_s", "perf/step_s", "perf/data_wait_s", "perf/llm_s",
                 "perf/mem_peak", "data/skipped", "data/unknown_chars", "train/skipped_steps", "val/cer", "val/wer",
                 "val/best_cer"}


@pytest.mark.parametrize("launcher, strategy, trainable_zero", [("torchrun", "fsdp", None),
                                                                 ("deepspeed", "deepspeed", 2),
                                                                 ("deepspeed", "deepspeed", 0)])
def test_train_script_two_ranks(launcher, strategy, trainable_zero, tiny_overrides, tmp_path):
    """launch/train.py end to end: TensorBoard scalars, checkpoints (last k), export, then an exact resume. DeepSpeed
    with the trainable part at ZeRO-2 (the production configs) and at ZeRO-0 (the demo's)."""
    run = str(tmp_path / "run")
    args = ["--config", os.path.join(ROOT, "configs", "tiny_cpu.yaml")] + tiny_overrides + [
        f"dist.strategy={strategy}", "train.max_steps=6", "train.save_every=2", "train.keep_last=2",
        "train.eval_every=3", "train.batch_size=3", f"run.dir={run}", "data.extra_val_splits=[val_seen]",
        # the LLM on steps 1, 3, 5 (from step 1, every 2nd): the wrappers see the connector used on the others too;
        # alpha decays linearly from 1 at step 1 to 0 at step 5
        "train.llm_every=2", "train.llm_start_step=1", "train.llm_weight_schedule=linear"]
    if trainable_zero is not None:
        args.append(f"dist.deepspeed_config=configs/deepspeed/trainable_zero{trainable_zero}.json")
    launch = deepspeed_launch if launcher == "deepspeed" else torchrun
    proc = launch(os.path.join(ROOT, "launch", "train.py"), args)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    scalars, acc = read_scalars(os.path.join(run, "tb"))
    assert EXPECTED_TAGS <= set(scalars)
    assert len(scalars["train/loss_total"]) == 6 and all(math.isfinite(v) for v in scalars["train/loss_total"])
    llm = scalars["train/loss_llm"]
    assert all(v > 0 for v in llm[1::2]) and not any(llm[0::2])  # logged over the steps that ran the LLM
    assert scalars["train/llm_weight"] == pytest.approx([1.0, 0.75, 0.5, 0.25])  # logged while alpha > 0
    assert all(math.isfinite(v) and v > 0 for v in scalars["train/grad_norm"])  # measured, whoever clips
    cfg = load_config(args[1], args[2:])
    warmup = min(cfg.train.warmup_steps, 5)
    used = [cfg.train.lr * lr_factor(k, 6, warmup, cfg.train.schedule) for k in range(6)]
    assert scalars["train/lr"] == pytest.approx(used)  # the rate each step used, not the next step's
    assert len(scalars["val/cer"]) == 2  # at step 3 and at the end
    assert len(scalars["val_seen/cer"]) == 2 and "val_seen/line_0" in acc.Tags()["images"]  # an extra split
    assert "val/line_0" in acc.Tags()["images"]
    ckpts = sorted(os.listdir(os.path.join(run, "checkpoints")))
    assert [c for c in ckpts if c.startswith("step_")] == ["step_0000004", "step_0000006"]
    assert not [c for c in ckpts if c.startswith(".tmp")]
    blob = torch.load(os.path.join(run, "model.pt"), weights_only=True)
    assert any(k.startswith("connector.") for k in blob["state_dict"])  # for --decode beam+llm
    assert blob["teacher"]["name_or_path"] == cfg_teacher(args)
    assert blob["validation"]["step"] == 6 and blob["validation"]["cer"] == pytest.approx(scalars["val/cer"][1])
    best = torch.load(os.path.join(run, "best_model.pt"), weights_only=True)["validation"]
    assert best["step"] == (3 if scalars["val/cer"][0] <= scalars["val/cer"][1] else 6)  # a tie keeps the earlier
    assert best["cer"] == pytest.approx(min(scalars["val/cer"])) and scalars["val/best_cer"][-1] == pytest.approx(
        best["cer"])
    assert "world size 2, strategy " + strategy in proc.stderr + proc.stdout
    # resume: a finished run resumes at its last step and only re-exports
    proc = launch(os.path.join(ROOT, "launch", "train.py"), args + ["train.resume=auto"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stderr + proc.stdout and "at step 6" in proc.stderr + proc.stdout


def cfg_teacher(args):
    return load_config(args[1], args[2:]).llm.name_or_path


def _final_weights(run_dir):
    return torch.load(os.path.join(run_dir, "model.pt"), weights_only=True)["state_dict"]


def test_resume_is_exact(tiny_overrides, tmp_path):
    """6 steps in one go == 3 steps + 3 resumed steps (same weights), one process on CPU."""
    base = ["--config", os.path.join(ROOT, "configs", "tiny_cpu.yaml")] + tiny_overrides + ["train.batch_size=3"]
    straight, split = str(tmp_path / "straight"), str(tmp_path / "split")
    script = os.path.join(ROOT, "launch", "train.py")
    for args in ([f"run.dir={straight}", "train.max_steps=6", "train.save_every=3"],
                 [f"run.dir={split}", "train.max_steps=6", "train.save_every=3", "train.stop_after=3"],
                 [f"run.dir={split}", "train.max_steps=6", "train.save_every=3", "train.stop_after=3",
                  "train.resume=auto"]):  # the same stop_after, as a job script passes it: 3 more steps
        proc = subprocess.run([PY, script] + base + args, capture_output=True, text=True, timeout=300, cwd=ROOT)
        assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = _final_weights(straight), _final_weights(split)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), rtol=0, atol=1e-6), k


def test_deepspeed_strategy_under_plain_python_is_one_rank(tiny_overrides, tmp_path):
    """`python launch/train.py` with dist.strategy=deepspeed trains on one rank (DeepSpeed alone would look for MPI)."""
    run = str(tmp_path / "run")
    args = ["--config", os.path.join(ROOT, "configs", "tiny_cpu.yaml")] + tiny_overrides + [
        f"run.dir={run}", "train.max_steps=2", "dist.strategy=deepspeed", "train.batch_size=2"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    proc = subprocess.run([PY, os.path.join(ROOT, "launch", "train.py")] + args, capture_output=True, text=True,
                          timeout=300, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "world size 1, strategy deepspeed" in proc.stderr and os.path.isfile(os.path.join(run, "model.pt"))


def test_max_minutes_ends_the_run_as_its_last_step(tiny_overrides, tmp_path):
    """train.max_minutes stops at the first step boundary past the budget, then checkpoints, validates and exports
    as at the last step (the schedule still spans train.max_steps)."""
    run = str(tmp_path / "run")
    args = ["--config", os.path.join(ROOT, "configs", "tiny_cpu.yaml")] + tiny_overrides + [
        f"run.dir={run}", "train.max_steps=50", "train.max_minutes=0.0001", "train.batch_size=2"]
    proc = subprocess.run([PY, os.path.join(ROOT, "launch", "train.py")] + args, capture_output=True, text=True,
                          timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "train.max_minutes=0.0001 reached at step 1 of 50" in proc.stderr
    assert torch.load(os.path.join(run, "model.pt"), weights_only=True)["validation"]["step"] == 1
    assert os.path.isdir(os.path.join(run, "checkpoints", "step_0000001"))


def test_resume_on_another_number_of_ranks(tiny_overrides, tmp_path):
    """A checkpoint of 1 rank resumes on 2 (a job that comes back on a bigger allocation): rank 1 starts its random
    streams fresh, the epoch position is rescaled, the log says the run is no longer exact, and it finishes."""
    run = str(tmp_path / "run")
    args = ["--config", os.path.join(ROOT, "configs", "tiny_cpu.yaml")] + tiny_overrides + [
        f"run.dir={run}", "train.max_steps=6", "train.save_every=3", "train.batch_size=2", "dist.strategy=ddp"]
    script = os.path.join(ROOT, "launch", "train.py")
    proc = subprocess.run([PY, script] + args + ["train.stop_after=3"], capture_output=True, text=True, timeout=300,
                          cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = torchrun(script, args + ["train.resume=auto"])
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "was written by 1 rank(s) and this run has 2: training goes on from step 3" in out
    assert "at step 3" in out and os.path.isfile(os.path.join(run, "model.pt"))
    assert os.path.isdir(os.path.join(run, "checkpoints", "step_0000006"))


def test_position_rescaled_for_another_number_of_ranks():
    from htr_dist.train.loop import Position, _rescale_position

    # 5 micro-steps of 1 rank = 2.5 of 2 ranks: 2 (a batch of each rank's share is seen again, none is skipped)
    assert _rescale_position(Position(3, 1, 5), 1, 2, 10) == Position(3, 1, 2)
    assert _rescale_position(Position(3, 1, 4), 2, 1, 10) == Position(3, 1, 8)
    assert _rescale_position(Position(9, 0, 9), 2, 1, 10) == Position(9, 1, 0)  # the whole epoch: the next one


def test_sigterm_checkpoints_and_exits_zero(tiny_overrides, tmp_path):
    run = str(tmp_path / "run")
    args = ["--config", os.path.join(ROOT, "configs", "tiny_cpu.yaml")] + tiny_overrides + [
        f"run.dir={run}", "train.max_steps=100000", "train.batch_size=2"]
    proc = subprocess.Popen([PY, os.path.join(ROOT, "launch", "train.py")] + args, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    tb = os.path.join(run, "tb")
    while time.time() < deadline and not glob.glob(os.path.join(tb, "events.*")):
        time.sleep(0.5)
    time.sleep(3)  # a few steps in
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out[-3000:]
    assert "stopped by SIGTERM at step" in out
    ckpts = [c for c in os.listdir(os.path.join(run, "checkpoints")) if c.startswith("step_")]
    assert len(ckpts) == 1
    step = int(ckpts[0][5:])
    assert 0 < step < 100000
    assert not os.path.exists(os.path.join(run, "model.pt"))  # not finished: no export


def test_validation_and_checkpoints_do_not_change_training(tiny_overrides, tmp_path):
    """Validating or checkpointing more or less often leaves the trained weights bit for bit the same (no random
    stream is drawn from, no state kept), so runs that differ only in train.eval_every or train.save_every compare."""
    weights = []
    for every in (1, 3):
        run = str(tmp_path / f"run{every}")
        proc = subprocess.run([PY, os.path.join(ROOT, "launch", "train.py"), "--config",
                               os.path.join(ROOT, "configs", "tiny_cpu.yaml")] + tiny_overrides + [
            f"run.dir={run}", "train.max_steps=6", f"train.eval_every={every}", f"train.save_every={every + 1}",
            "train.batch_size=3"], capture_output=True, text=True, timeout=300, cwd=ROOT)
        assert proc.returncode == 0, proc.stderr[-3000:]
        weights.append(_final_weights(run))
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


WHOLE_BUILD: dict = {}


@pytest.fixture(scope="module")
def wide_shape(tmp_path_factory):
    """Llama-3.2-3B's layer shape (hidden 3072, 24 query / 8 key-value heads of 128, MLP 8192, llama3 rope, tied
    embedding) with one decoder layer and a 512-token vocabulary: the production width at a cost CI can afford."""
    with open(os.path.join(ROOT, "configs", "llm", "llama-3.2-3b", "config.json")) as f:
        config = json.load(f)
    config.update(num_hidden_layers=1, vocab_size=512, bos_token_id=1, eos_token_id=2)
    folder = tmp_path_factory.mktemp("llama3b_width")
    with open(folder / "config.json", "w") as f:
        json.dump(config, f)
    return str(folder / "config.json")


@pytest.mark.parametrize("strategy, offload, checkpointing", [("fsdp", False, True), ("deepspeed", True, True)])
def test_a_teacher_by_shape_trains_sharded_on_every_strategy(strategy, offload, checkpointing, wide_shape,
                                                             tiny_overrides, tmp_path):
    """A teacher given by its config alone is built directly sharded (FSDP: meta device, each rank fills its rows;
    ZeRO-3: zero.Init, each rank writes its partition), holds about half of itself per rank, stays frozen, and is the
    same model on every strategy: the same weights and, on the same batches, the same losses as a whole build (ddp),
    with activation checkpointing of its layers (llm.gradient_checkpointing, whose recomputation must gather the
    sharded parameters again) and a split vocabulary (dist.shard_vocab): losses within 1e-5 relative at the first
    step, fp32. FSDP2 on the device and ZeRO-3 with parameter offload here; the other two settings of each run at the
    tiny teacher's size above."""
    overrides = [o for o in tiny_overrides if not o.startswith("llm.name_or_path=")]
    overrides += [f"llm.name_or_path={wide_shape}", "train.llm_sample_ratio=0.34"]
    mine = overrides + [f"llm.gradient_checkpointing={checkpointing}"]
    if strategy == "fsdp":
        mine.append(f"dist.fsdp_cpu_offload={offload}")
    elif offload:
        mine.append("dist.llm_deepspeed_config=configs/deepspeed/llm_zero3_offload.json")
    _, res = run_dist_check(strategy, [str(tmp_path / "sharded.json")] + mine)
    if "ddp" not in WHOLE_BUILD:  # the reference, run once for both cases
        WHOLE_BUILD["ddp"] = run_dist_check("ddp", [str(tmp_path / "whole.json")] + overrides)[1]
    whole = WHOLE_BUILD["ddp"]
    assert res["llm_load"] == "sharded" or strategy == "deepspeed"
    assert res["vocab_split"] and not whole["vocab_split"]  # dist.shard_vocab: each rank computes with its rows
    assert all(math.isfinite(l["total"]) and l["llm"] > 0 for l in res["losses"])
    assert res["llm_requires_grad"] is False and res["llm_grads"] is False
    assert res["llm_after"] == res["llm_before"]  # frozen
    assert res["held"] <= 0.55 * res["full"] and whole["held"] == whole["full"]
    assert res["llm_before"] == pytest.approx(whole["llm_before"], rel=1e-6)  # the same weights
    # Three steps: the first forward pass agrees to float rounding, and the gradients too. The sum orders differ
    # (split vocabulary, offloaded optimizer step), and Adam, which divides each gradient by its own running scale,
    # turns those last-bit differences into update differences: the gap grows about tenfold a step (1e-7, 1e-6, 1e-5
    # relative, in both teacher layouts), so each step gets ten times the tolerance of the one before.
    for step, (a, b) in enumerate(zip(res["losses"], whole["losses"])):
        rel = 1e-5 * 10 ** step
        assert a["llm"] == pytest.approx(b["llm"], rel=rel) and a["total"] == pytest.approx(b["total"], rel=rel)
