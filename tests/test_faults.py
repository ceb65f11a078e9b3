"""The fault suite: each case a user has met or will meet, run small on CPU, so that each stays handled.

A diverging run never saves garbage; a damaged checkpoint never blocks a restart; a crafted checkpoint never runs
code; a damaged split is never scored as whole; bad input ends in one line naming the file and the cause.
"""

import json
import os
import shutil
import subprocess

import pytest
import torch

from conftest import PY, ROOT, reset_shard_sizes
from test_train_dist import deepspeed_launch, read_scalars, torchrun

TRAIN = os.path.join(ROOT, "launch", "train.py")
TINY = os.path.join(ROOT, "configs", "tiny_cpu.yaml")


def _errors(proc) -> list:
    return [line for line in proc.stderr.splitlines() if line.startswith(("error: ", "config error: "))]


def _train(args, timeout=300):
    return subprocess.run([PY, TRAIN, "--config", TINY] + args, capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT)


# -- 1. a diverging run -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("strategy, zero", [("ddp", None), ("deepspeed", 0), ("deepspeed", 2)])
def test_a_diverging_run_stops_and_writes_nothing_from_bad_weights(strategy, zero, tiny_overrides, tmp_path):
    """train.lr=1e9: the steps whose loss or gradients are not finite are skipped on both ranks and counted; after
    train.max_bad_steps in a row the run stops with exit status 1 and one line, and every checkpoint and export on
    disk holds finite weights."""
    run = str(tmp_path / "run")
    args = ["--config", TINY] + tiny_overrides + [
        f"run.dir={run}", f"dist.strategy={strategy}", "train.lr=1e9", "train.warmup_steps=0", "train.max_steps=40",
        "train.save_every=1", "train.keep_last=50", "train.eval_every=1", "train.max_bad_steps=3",
        "train.use_llm=false", "train.batch_size=2"]
    if strategy == "deepspeed":  # ZeRO-0 (the demo's) skips through the engine, ZeRO-2 by its own overflow check
        args.append(f"dist.deepspeed_config=configs/deepspeed/trainable_zero{zero}.json")
    launch = deepspeed_launch if strategy == "deepspeed" else torchrun
    proc = launch(TRAIN, args)
    assert proc.returncode != 0, proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    assert "training diverged: 3 steps in a row" in out and "train.max_bad_steps=3" in out
    assert "htr_dist/train/loop.py" not in out  # one line from the ranks (torchrun adds a traceback of its own)
    assert not os.path.exists(os.path.join(run, "model.pt"))
    ckpts = sorted(c for c in os.listdir(os.path.join(run, "checkpoints")) if c.startswith("step_"))
    assert ckpts
    last = int(ckpts[-1][5:])
    for name in ckpts:
        for root, _, files in os.walk(os.path.join(run, "checkpoints", name)):
            for f in files:
                if f.endswith(".pt"):
                    blob = torch.load(os.path.join(root, f), weights_only=False, map_location="cpu")
                    weights = blob.get("model") or blob.get("module")
                    if weights:
                        assert all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point()), f
    if os.path.exists(os.path.join(run, "best_model.pt")):
        state = torch.load(os.path.join(run, "best_model.pt"), weights_only=True)["state_dict"]
        assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
    scalars, _ = read_scalars(os.path.join(run, "tb"))
    assert scalars["train/skipped_steps"][-1] >= 3
    assert last <= 40 - 3


def test_a_skipped_step_changes_no_weight_and_no_optimizer_state(tiny_overrides):
    from htr_dist.config import load_config
    from htr_dist.dist.env import init_distributed
    from htr_dist.dist.strategy import build_strategy
    from htr_dist.models.htr import HTRModel

    cfg = load_config(TINY, tiny_overrides + ["train.use_llm=false"])
    env = init_distributed()
    model = HTRModel(cfg.arch, cfg.connector, 12, cfg.data.img_height, cfg.data.img_width, None, False)
    strategy = build_strategy(cfg, env, model, 10)
    images = torch.rand(2, 1, cfg.data.img_height, cfg.data.img_width)
    for skip in (False, True):
        strategy.model(images)["ctc_logits"].float().pow(2).mean().backward()
        before = {k: v.clone() for k, v in model.state_dict().items()}
        moments = {k: v.clone() for k, v in strategy.optimizer.state_dict()["state"].get(0, {}).items()}
        scheduled = strategy.scheduler.last_epoch
        strategy.step(skip=skip)
        changed = any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
        assert changed == (not skip) and strategy.step_applied == (not skip)
        if skip:
            after = strategy.optimizer.state_dict()["state"][0]
            assert all(torch.equal(moments[k], after[k]) for k in moments)
        assert strategy.scheduler.last_epoch == scheduled + 1  # the schedule moves on, as for a step taken
        assert all(p.grad is None for p in model.parameters())


# -- 2. a damaged checkpoint --------------------------------------------------------------------------------------

def test_resume_skips_a_damaged_checkpoint_and_says_why(tiny_overrides, tmp_path):
    run = str(tmp_path / "run")
    base = tiny_overrides + [f"run.dir={run}", "train.use_llm=false", "train.batch_size=2", "train.save_every=2",
                             "train.max_steps=6"]
    proc = _train(base + ["train.stop_after=4"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = os.path.join(run, "checkpoints")
    assert sorted(d for d in os.listdir(ckpt) if d.startswith("step_")) == ["step_0000002", "step_0000004"]
    record = json.load(open(os.path.join(ckpt, "step_0000004", "integrity.json")))
    assert record["step"] == 4 and set(record["files"]) == {"trainer.pt", "meta.json"}
    newest = os.path.join(ckpt, "step_0000004", "trainer.pt")
    size = os.path.getsize(newest)
    with open(newest, "r+b") as f:
        f.truncate(size // 2)
    # a path given explicitly: an error naming it, no fallback
    proc = _train(base + [f"train.resume={os.path.dirname(newest)}"])
    assert proc.returncode == 1 and _errors(proc) == [
        f"error: train.resume: {os.path.dirname(newest)} is damaged: trainer.pt has {size // 2} bytes, {size} were "
        "written (train.resume=auto takes the newest intact one)"], proc.stderr[-3000:]
    # auto: the newest intact one, naming the one skipped
    proc = _train(base + ["train.resume=auto"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resume: skipping {os.path.dirname(newest)}: trainer.pt has {size // 2} bytes" in proc.stderr
    assert "resumed from " + os.path.join(ckpt, "step_0000002") in proc.stderr
    assert torch.load(os.path.join(run, "model.pt"), weights_only=True)["validation"]["step"] == 6
    # a flipped byte of the same size: the checksum catches it
    victim = os.path.join(ckpt, "step_0000006", "trainer.pt")
    with open(victim, "r+b") as f:
        f.seek(os.path.getsize(victim) // 2)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0xFF]))
    proc = _train(base + ["train.resume=auto"])
    assert proc.returncode == 0 and "trainer.pt does not match its SHA-256" in proc.stderr, proc.stderr[-3000:]


def test_every_checkpoint_damaged_is_one_line(tiny_overrides, tmp_path):
    run = str(tmp_path / "run")
    base = tiny_overrides + [f"run.dir={run}", "train.use_llm=false", "train.batch_size=2", "train.max_steps=2"]
    assert _train(base).returncode == 0
    os.remove(os.path.join(run, "checkpoints", "step_0000002", "trainer.pt"))
    proc = _train(base + ["train.resume=auto"])
    assert proc.returncode == 1 and len(_errors(proc)) == 1, proc.stderr[-3000:]
    assert "no intact checkpoint in" in _errors(proc)[0] and "trainer.pt is missing" in _errors(proc)[0]


# -- 3. a crafted checkpoint --------------------------------------------------------------------------------------

class _RunsAShellCommand:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("strategy", ["ddp", "deepspeed"])
def test_a_crafted_checkpoint_is_refused_and_runs_nothing(strategy, tiny_overrides, tmp_path):
    from htr_dist.train.checkpoint import seal

    run = str(tmp_path / "run")
    base = tiny_overrides + [f"run.dir={run}", "train.use_llm=false", "train.batch_size=2", "train.max_steps=2",
                             f"dist.strategy={strategy}",
                             "dist.deepspeed_config=configs/deepspeed/trainable_zero0.json"]
    assert _train(base).returncode == 0
    folder = os.path.join(run, "checkpoints", "step_0000002")
    target = os.path.join(folder, "trainer.pt" if strategy == "ddp" else "mp_rank_00_model_states.pt")
    blob = torch.load(target, weights_only=False)
    marker = tmp_path / "pwned"
    blob["position"] = _RunsAShellCommand(marker)  # what a tampered file would carry
    torch.save(blob, target)
    seal(folder, 2)  # whoever tampered with it would fix the record as well
    proc = _train(base + ["train.resume=auto"])
    assert proc.returncode == 1 and not marker.exists(), proc.stderr[-3000:]
    errors = _errors(proc)
    assert len(errors) == 1 and target in errors[0] and "refused to load" in errors[0] and "posix.system" in \
        errors[0], proc.stderr[-3000:]
    assert "weights_only=False" not in proc.stderr and "Traceback" not in proc.stderr


# -- 4. a damaged split -------------------------------------------------------------------------------------------

def _run_with_model(tiny_overrides, tmp_path):
    run = str(tmp_path / "run")
    assert _train(tiny_overrides + [f"run.dir={run}", "train.use_llm=false", "train.max_steps=1"]).returncode == 0
    return run


def test_evaluation_of_a_cut_split_is_an_error_unless_allowed(shard_dir, tiny_overrides, tmp_path):
    run = _run_with_model(tiny_overrides, tmp_path)
    broken = tmp_path / "broken"
    shutil.copytree(shard_dir, broken)
    manifest = json.load(open(broken / "manifest.json"))
    expected = sum(e["count"] for e in manifest["splits"]["test"]["shards"])
    shard = broken / manifest["splits"]["test"]["shards"][0]["file"]
    with open(shard, "r+b") as f:
        f.truncate(os.path.getsize(shard) // 10)
    evaluate = [PY, "launch/evaluate.py", "--checkpoint", run, "--data", str(broken), "--split", "test"]
    # the manifest's sizes: caught at start-up, naming the shard
    proc = subprocess.run(evaluate, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 1 and _errors(proc)[0].startswith(f"error: {shard}: ") and "bytes, but the manifest " \
        "says" in _errors(proc)[0], proc.stderr[-3000:]
    # without them (an older manifest): the count of lines scored against the manifest's
    reset_shard_sizes(str(broken), forget=True)
    proc = subprocess.run(evaluate, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert f"of the {expected} lines of split 'test' could be read" in _errors(proc)[0]
    out = tmp_path / "scores.json"
    proc = subprocess.run(evaluate + ["--allow-partial", "--json", str(out)], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    scores = json.loads(out.read_text())
    assert scores["lines_expected"] == expected and scores["lines_missing"] == expected - scores["lines"] > 0
    assert f"{scores['lines_missing']} of {expected} MISSING" in proc.stdout


def test_verify_names_every_damaged_shard(shard_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(shard_dir, broken)
    verify = [PY, "launch/prepare_iam.py", "--verify", str(broken)]
    proc = subprocess.run(verify, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0 and "match the manifest" in proc.stdout, proc.stderr
    manifest = json.load(open(broken / "manifest.json"))
    flipped = broken / manifest["splits"]["train"]["shards"][0]["file"]
    cut = broken / manifest["splits"]["val"]["shards"][0]["file"]
    data = bytearray(flipped.read_bytes())
    data[700] ^= 0xFF
    flipped.write_bytes(bytes(data))
    with open(cut, "r+b") as f:
        f.truncate(1024)
    proc = subprocess.run(verify, capture_output=True, text=True, timeout=120, cwd=ROOT)
    errors = _errors(proc)
    assert proc.returncode == 1 and len(errors) == 2, proc.stderr
    assert any(str(flipped) in e and "SHA-256" in e for e in errors) and any(str(cut) in e and "1024 bytes" in e
                                                                             for e in errors)


# -- 5. bad input: one line naming the file -----------------------------------------------------------------------

def test_a_config_that_is_not_utf8(tmp_path):
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes("train:\n  lr: 0.001\n  # caf\xe9\n".encode("latin-1"))
    proc = subprocess.run([PY, TRAIN, "--config", str(bad)], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert proc.returncode == 2 and _errors(proc) == [f"config error: {bad}: line 3: not UTF-8 text (byte "
                                                      "0xe9): save the file as UTF-8"], proc.stderr


@pytest.mark.parametrize("edit, message", [
    (lambda m: m.update(alphabet="abca"), "'alphabet' lists 'a' more than once"),
    (lambda m: m.update(alphabet=""), "'alphabet' is empty"),
    (lambda m: m["splits"]["train"]["shards"][0].update(count="12"), "'count' must be a whole number >= 0, got '12'"),
])
def test_a_bad_manifest_is_one_line(edit, message, shard_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(shard_dir, broken)
    manifest = json.load(open(broken / "manifest.json"))
    edit(manifest)
    (broken / "manifest.json").write_text(json.dumps(manifest))
    proc = _train([f"data.path={broken}", f"run.dir={tmp_path / 'run'}", "train.use_llm=false"], timeout=120)
    assert proc.returncode == 1 and len(_errors(proc)) == 1 and message in _errors(proc)[0], proc.stderr[-3000:]
    assert str(broken / "manifest.json") in _errors(proc)[0]


# -- 6. the time limit under SLURM --------------------------------------------------------------------------------

def test_slurm_script_stops_the_ranks_cleanly_and_requeues(tiny_overrides, tmp_path):
    """launch/slurm_train.sh on this machine, with srun and scontrol replaced by local stand-ins: USR1 (what SLURM
    sends before the time limit) makes the ranks checkpoint and exit 0, torchrun and the script exit 0, and the job
    is requeued."""
    import signal
    import time

    from conftest import free_port

    shims = tmp_path / "bin"
    shims.mkdir()
    (shims / "srun").write_text('#!/bin/bash\nwhile [[ $# -gt 0 && $1 == -* ]]; do\n  case $1 in --nodes|-N) '
                                'shift 2;; *) shift;; esac\ndone\nexec "$@"\n')
    calls = tmp_path / "scontrol.log"
    (shims / "scontrol").write_text(f'#!/bin/bash\necho "$@" >> {calls}\n[ "$1" = show ] && echo localhost\n'
                                    'exit 0\n')
    for shim in ("srun", "scontrol"):
        os.chmod(shims / shim, 0o755)
    run = tmp_path / "run"
    env = dict(os.environ, PATH=f"{shims}:{os.environ['PATH']}", SLURM_JOB_NODELIST="localhost", SLURM_NNODES="1",
               SLURM_GPUS_PER_NODE="2", SLURM_JOB_ID="42", MASTER_PORT=str(free_port()), PYTHON=PY,
               OMP_NUM_THREADS="1")
    proc = subprocess.Popen(["bash", "launch/slurm_train.sh", TINY] + tiny_overrides + [
        f"run.dir={run}", "train.max_steps=100000", "train.batch_size=2", "train.use_llm=false"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 180
    while time.time() < deadline and not list(run.glob("tb/events.*")):
        time.sleep(0.5)
    time.sleep(5)  # a few steps in
    proc.send_signal(signal.SIGUSR1)
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode == 0, out[-4000:]
    assert out.count("stopped by SIGTERM at step") == 2  # both ranks
    assert "requeue 42" in calls.read_text() and "requeueing job 42" in out
    assert [c for c in os.listdir(run / "checkpoints") if c.startswith("step_")]
    assert "Traceback" not in out


def test_resuming_another_model_names_what_differs(tiny_overrides, tmp_path):
    run = str(tmp_path / "run")
    base = tiny_overrides + [f"run.dir={run}", "train.use_llm=false", "train.batch_size=2", "train.max_steps=4"]
    assert _train(base + ["train.stop_after=2"]).returncode == 0
    proc = _train(base + ["train.resume=auto", "arch.rnn_hidden_size=40"])
    assert proc.returncode == 1 and len(_errors(proc)) == 1, proc.stderr[-3000:]
    assert "holds another model than this config builds: arch.rnn_hidden_size 32 there, 40 here" in _errors(proc)[0]
    assert "Traceback" not in proc.stderr


def test_a_model_with_non_finite_weights_is_refused(tiny_overrides, tmp_path):
    run = _run_with_model(tiny_overrides, tmp_path)
    blob = torch.load(os.path.join(run, "model.pt"), weights_only=True)
    name = next(k for k, v in blob["state_dict"].items() if v.is_floating_point())
    blob["state_dict"][name].fill_(float("nan"))
    nan_model = tmp_path / "nan.pt"
    torch.save(blob, nan_model)
    image = tmp_path / "line.png"
    from PIL import Image

    Image.new("L", (200, 40), 255).save(image)
    proc = subprocess.run([PY, "launch/recognize.py", "--checkpoint", str(nan_model), str(image)],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode != 0 and f"{nan_model}: 1 weight tensor(s) are not finite (e.g. {name})" in proc.stderr
    junk = tmp_path / "junk.pt"
    junk.write_bytes(os.urandom(2000))
    proc = subprocess.run([PY, "launch/recognize.py", "--checkpoint", str(junk), str(image)],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode != 0 and f"{junk}: not a loadable htr-dist model" in proc.stderr
    assert "weights_only=False" not in proc.stderr and "Traceback" not in proc.stderr


def _png_bomb(path, side=20000):
    """A PNG whose header claims side x side pixels (4x PIL's decompression-bomb limit) and holds none."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0))
                     + chunk(b"IEND", b""))


def test_a_decompression_bomb_is_named_and_the_other_images_still_read(tiny_overrides, tmp_path):
    from PIL import Image

    run = _run_with_model(tiny_overrides, tmp_path)
    good, bomb = tmp_path / "good.png", tmp_path / "bomb.png"
    Image.new("L", (200, 40), 255).save(good)
    _png_bomb(bomb)
    proc = subprocess.run([PY, "launch/recognize.py", "--checkpoint", run, str(bomb), str(good)],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 1 and proc.stdout.startswith(f"{good}\t"), proc.stderr[-3000:]
    assert [e for e in _errors(proc) if str(bomb) in e and "decompression bomb" in e]
    assert "Traceback" not in proc.stderr


def test_prepare_names_a_bomb_and_an_unreadable_xml_and_writes_the_rest(synth_dir, tmp_path):
    iam_dir = tmp_path / "iam"
    shutil.copytree(synth_dir, iam_dir)
    forms = sorted(p for p in iam_dir.glob("forms*/*.png"))
    _png_bomb(forms[0])
    xml = sorted((iam_dir / "xml").glob("*.xml"))
    xml[-1].write_bytes(b"\xff\xfe not xml")
    out = tmp_path / "shards"
    proc = subprocess.run([PY, "launch/prepare_iam.py", "--iam", str(iam_dir), "--out", str(out), "--no-progress",
                           "--workers", "1"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"{forms[0]}: cannot decode" in proc.stderr and "decompression bomb" in proc.stderr
    assert f"{xml[-1]}: malformed XML" in proc.stderr
    manifest = json.load(open(out / "manifest.json"))
    assert sum(i["lines"] for i in manifest["splits"].values()) > 0
    # an output folder that cannot be written: one line naming it
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    proc = subprocess.run([PY, "launch/prepare_iam.py", "--iam", str(iam_dir), "--out", str(blocker / "shards"),
                           "--no-progress", "--workers", "1"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 1 and len(_errors(proc)) == 1 and str(blocker) in _errors(proc)[0], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr


def test_a_disk_that_fills_during_a_checkpoint_is_one_line(tiny_overrides, tmp_path):
    """Files may grow to 1 MB only (RLIMIT_FSIZE, as a full disk: writes fail with an OS error): the trainer state
    (~2 MB) cannot be written; the run stops with one line naming the folder, and leaves no partial checkpoint."""
    import resource
    import signal

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))

    run = tmp_path / "run"
    proc = subprocess.run([PY, TRAIN, "--config", TINY] + tiny_overrides + [
        f"run.dir={run}", "train.use_llm=false", "train.max_steps=2", "train.save_every=1"],
        capture_output=True, text=True, timeout=300, cwd=ROOT, preexec_fn=limit)
    assert proc.returncode == 1 and len(_errors(proc)) == 1, proc.stderr[-3000:]
    assert "checkpoint of step 1 could not be written" in _errors(proc)[0] and "disk full" in _errors(proc)[0]
    assert "Traceback" not in proc.stderr
    assert not [c for c in os.listdir(run / "checkpoints") if c.startswith((".tmp", "step_"))]
