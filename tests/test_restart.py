"""A rank that crashes under ``torchrun --max-restarts`` resumes from the last checkpoint.

No fault injection in the package: a real 2-rank CPU run of launch/train.py under torchrun, one worker SIGKILLed from
outside once the first checkpoint is on disk, torchrun restarts the worker group, and ``train.resume=auto`` picks up
the newest checkpoint.
"""

import os
import re
import signal
import subprocess
import time
import uuid

import psutil
import pytest
import torch

from conftest import PY, ROOT, free_port

MAX_STEPS = 10
DEADLINE_S = 180  # hard bound on the whole torchrun run; it normally takes well under a minute


def _tagged_processes(tag: str) -> list:
    """Every live process started by this test (torchrun and all of its workers, even reparented ones)."""
    found = []
    for p in psutil.process_iter(["pid"]):
        try:
            if p.pid != os.getpid() and p.environ().get("HTR_TEST_RESTART_TAG") == tag:
                found.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            pass
    return found


def _worker(agent: "psutil.Process", local_rank: int):
    """The training worker with this LOCAL_RANK among torchrun's children, or None."""
    try:
        children = agent.children(recursive=False)
    except psutil.NoSuchProcess:
        return None
    for child in children:
        try:
            if child.environ().get("LOCAL_RANK") == str(local_rank) and "train.py" in " ".join(child.cmdline()):
                return child
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            pass
    return None


def _scalar_steps(path: str, tag: str = "train/loss_total") -> list:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(path)
    acc.Reload()
    return [e.step for e in acc.Scalars(tag)] if tag in acc.Tags()["scalars"] else []


@pytest.mark.timeout(DEADLINE_S + 60)
@pytest.mark.parametrize("rdzv", ["static", "c10d"])
def test_killed_rank_restarts_and_resumes_from_checkpoint(rdzv, tiny_overrides, tmp_path):
    """static: the plain ``torchrun --max-restarts 1``; c10d: the multi-node rendezvous of launch/slurm_train.sh.

    Both share torchrun's agent store across attempts; htr_dist.dist.env keys the process group by restart count.
    """
    run = str(tmp_path / "run")
    ckpt_root = os.path.join(run, "checkpoints")
    log_path = str(tmp_path / "torchrun.log")
    tag = uuid.uuid4().hex
    env = dict(os.environ, HTR_TEST_RESTART_TAG=tag, LOGLEVEL="INFO", PYTHONUNBUFFERED="1")  # INFO: restart lines
    cmd = [PY, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--max-restarts", "1"]
    if rdzv == "static":  # torchrun's default
        cmd += ["--master_port", str(free_port())]
    else:
        cmd += ["--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{free_port()}"]
    cmd += [os.path.join(ROOT, "launch", "train.py"), "--config", os.path.join(ROOT, "configs", "tiny_cpu.yaml")]
    cmd += tiny_overrides + [f"run.dir={run}", "dist.strategy=ddp", "dist.timeout_s=30", "train.resume=auto",
                             "train.save_every=2", "train.keep_last=10", f"train.max_steps={MAX_STEPS}",
                             "train.batch_size=2", "train.eval_every=0"]
    t_start = time.time()
    timings = {}
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log_file, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            agent = psutil.Process(proc.pid)
            # 1. wait for the first complete checkpoint (renamed from .tmp_, so it is whole)
            first = os.path.join(ckpt_root, "step_0000002")
            while not os.path.isdir(first):
                assert proc.poll() is None, "torchrun exited before the first checkpoint:\n" + open(log_path).read()
                assert time.time() - t_start < DEADLINE_S, "no checkpoint in time:\n" + open(log_path).read()
                time.sleep(0.05)
            timings["first_ckpt"] = time.time() - t_start
            # 2. SIGKILL one worker (local rank 1: the survivor is rank 0, which holds the TensorBoard writer)
            victim = _worker(agent, 1)
            assert victim is not None, "no worker with LOCAL_RANK=1 under torchrun"
            done_before_kill = sorted(d for d in os.listdir(ckpt_root) if d.startswith("step_"))
            victim.send_signal(signal.SIGKILL)
            t_kill = time.time()
            assert done_before_kill[-1] != f"step_{MAX_STEPS:07d}", "the run finished before the kill; raise MAX_STEPS"
            # 3. torchrun notices, tears the group down and starts a new one; wait for it to finish
            while proc.poll() is None:
                assert time.time() - t_start < DEADLINE_S, "torchrun did not finish in time:\n" + open(log_path).read()
                if "restart" not in timings and _worker(agent, 1) not in (None, victim):
                    timings["restart"] = time.time() - t_kill
                time.sleep(0.1)
            timings["total"] = time.time() - t_start
        finally:
            for p in _tagged_processes(tag):  # workers run in their own sessions: kill each one, not just the group
                try:
                    p.kill()
                except psutil.NoSuchProcess:
                    pass
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(timeout=30)
    out = open(log_path).read()
    print(f"[{rdzv}] timings (s): {timings}")

    # the run as a whole succeeded after exactly one restart
    assert proc.returncode == 0, out[-5000:]
    assert "will restart worker group" in out, out[-5000:]
    assert out.count("world size 2, strategy ddp") == 2, out[-5000:]  # rank 0 started twice
    assert not _tagged_processes(tag)

    # the second attempt resumed from a checkpoint that existed when the rank died
    resumed = re.findall(r"resumed from (\S+) at step (\d+)", out)
    assert len(resumed) == 1, out[-5000:]
    path, step = resumed[0][0], int(resumed[0][1])
    assert os.path.basename(path) == f"step_{step:07d}"
    assert 2 <= step < MAX_STEPS and step % 2 == 0
    assert f"step_{step:07d}" in done_before_kill or step > int(done_before_kill[-1][5:])

    # final checkpoint, export, no half-written checkpoint left behind
    ckpts = sorted(os.listdir(ckpt_root))
    assert not [c for c in ckpts if c.startswith(".tmp")], ckpts
    steps = [c for c in ckpts if c.startswith("step_")]
    assert steps[-1] == f"step_{MAX_STEPS:07d}"
    assert open(os.path.join(ckpt_root, "latest")).read().strip() == steps[-1]
    final = torch.load(os.path.join(ckpt_root, steps[-1], "trainer.pt"), weights_only=False)  # ddp: one file
    assert final["position"]["step"] == MAX_STEPS
    blob = torch.load(os.path.join(run, "model.pt"), weights_only=True)
    assert blob["state_dict"]

    # TensorBoard: one writer process per attempt; the restarted attempt logged exactly the steps after the resume point
    tb = os.path.join(run, "tb")
    by_pid = {}  # events.out.tfevents.<time>.<host>.<pid>.<n>: one writer process per attempt (+ its hparams file)
    for f in os.listdir(tb):
        if f.startswith("events."):
            by_pid.setdefault(f.split(".")[-2], []).append(f)
    assert len(by_pid) == 2, sorted(os.listdir(tb))
    attempts = sorted(by_pid.values(), key=lambda files: min(os.path.getmtime(os.path.join(tb, f)) for f in files))
    first_steps, second_steps = ([s for f in files for s in _scalar_steps(os.path.join(tb, f))] for files in attempts)
    print(f"[{rdzv}] TensorBoard steps: first attempt {first_steps}, after the resume {second_steps}")
    assert set(first_steps) <= set(range(1, MAX_STEPS))  # may be empty: rank 0 of the dead attempt was torn down
    assert sorted(second_steps) == list(range(step + 1, MAX_STEPS + 1)), (first_steps, second_steps)
    assert set(_scalar_steps(tb)) == set(range(1, MAX_STEPS + 1))  # the directory covers the whole run
