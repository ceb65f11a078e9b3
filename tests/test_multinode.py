"""Two "nodes" on one machine (one rank each) against one node of two ranks: the same training, through torchrun's
c10d rendezvous and through the deepspeed launcher's hostfile. Tolerances: float order differs (a lone rank computes
with 2 threads, two ranks with 1 each), nothing else may."""

import os
import subprocess

import pytest
import torch

from conftest import ROOT
from htr_dist.dist import env as dist_env
from htr_dist.dist.env import free_port, launcher_command
from test_train_dist import read_scalars

STEPS = 4


def train_args(tiny_overrides, run, strategy):
    return ["--config", os.path.join(ROOT, "configs", "tiny_cpu.yaml")] + tiny_overrides + [
        f"run.dir={run}", f"dist.strategy={strategy}", f"train.max_steps={STEPS}", "train.batch_size=3",
        "train.eval_every=4", "train.save_every=4", "train.llm_sample_ratio=0.5"]


def two_nodes(launcher, args, tmp_path):
    """Start the two node launchers at once; both must exit 0."""
    port, script = free_port(), os.path.join(ROOT, "launch", "train.py")
    if launcher == "torchrun":
        base = launcher_command("torchrun", 1)[:3]  # python -m torch.distributed.run
        nodes = [base + ["--nnodes", "2", "--node_rank", str(r), "--nproc_per_node", "1", "--rdzv_backend", "c10d",
                         "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", "twonodes", script] + args
                 for r in (0, 1)]
    else:
        hostfile = tmp_path / "hostfile"
        hostfile.write_text("node-a slots=1\nnode-b slots=1\n")
        deepspeed = launcher_command("deepspeed", 1)[0]
        nodes = [[deepspeed, "--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(r), "--master_addr",
                  "127.0.0.1", "--master_port", str(port), script] + args for r in (0, 1)]
    procs = [subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for cmd in nodes]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]
    return outs


def one_node(launcher, args):
    cmd = launcher_command(launcher, 2) + [os.path.join(ROOT, "launch", "train.py")] + args
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def flat_weights(run):
    sd = torch.load(os.path.join(run, "model.pt"), weights_only=True)["state_dict"]
    return torch.cat([v.float().reshape(-1) for k, v in sorted(sd.items()) if v.is_floating_point()])


@pytest.mark.parametrize("launcher, strategy, loss_tol, weight_tol", [
    ("torchrun", "fsdp", 2e-3, 5e-3), ("deepspeed", "deepspeed", 2e-3, 1e-3)])
def test_two_nodes_train_as_one(launcher, strategy, loss_tol, weight_tol, tiny_overrides, tmp_path):
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    one_node(launcher, train_args(tiny_overrides, one, strategy))
    outs = two_nodes(launcher, train_args(tiny_overrides, two, strategy), tmp_path)
    a, _ = read_scalars(os.path.join(one, "tb"))
    b, _ = read_scalars(os.path.join(two, "tb"))
    assert len(a["train/loss_total"]) == len(b["train/loss_total"]) == STEPS
    # The first step's loss depends on the seeded weights and batch alone: equal to float rounding. Later steps follow
    # all-reduced gradients whose sums run in another order across two nodes (TCP, not shared memory); Adam turns
    # last-bit gradient differences into update differences (near-zero gradients change sign), which grow each step.
    assert b["train/loss_total"][0] == pytest.approx(a["train/loss_total"][0], rel=1e-5)
    assert b["train/loss_total"] == pytest.approx(a["train/loss_total"], rel=loss_tol)
    wa, wb = flat_weights(one), flat_weights(two)
    assert float((wa - wb).norm() / wa.norm()) <= weight_tol
    # global rank 0 alone writes: TensorBoard files of one process (events.out.tfevents.TIME.HOST.PID.N), one set of
    # checkpoints
    writers = {name.split(".")[-2] for name in os.listdir(os.path.join(two, "tb"))}
    assert len(writers) == 1
    assert sorted(c for c in os.listdir(os.path.join(two, "checkpoints")) if c.startswith("step_")) == [
        "step_0000004"]
    log = "\n".join(outs)
    assert "world size 2, strategy " + strategy in log


def test_shared_memory_collectives_stay_within_a_node(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")  # two nodes of one rank: /dev/shm is not common to both
    assert not dist_env.ranks_share_memory()
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert dist_env.ranks_share_memory() == os.path.isdir("/dev/shm")
