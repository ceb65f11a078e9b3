"""What a user watches a run with: the loggers of run.loggers (TensorBoard, MLflow) and the validation figure, the
train command's --help and --print-config, and launch/slurm_train.sh's GPU count."""

import os
import subprocess

import numpy as np
import pytest

from conftest import PY, ROOT
from htr_dist.config import CHOICES, ConfigError, load_config
from htr_dist.errors import InputError
from htr_dist.train import logger as logger_mod


def _train(args, timeout=300):
    # one CPU thread: the tiny model gains nothing from more, and OpenMP threads that wait for a busy core slow it
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([PY, os.path.join(ROOT, "launch", "train.py")] + args, capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env=env)


def _errors(proc):
    return [line for line in proc.stderr.splitlines() if line.startswith(("error:", "config error:"))]


# -- the validation figure -------------------------------------------------------------------------------------------

def _red(figure):
    r, g, b = (figure[..., i].astype(int) for i in range(3))
    return (r > 150) & (g < 80) & (b < 80)


def test_sample_figure_shows_line_truth_and_prediction_with_errors_in_red():
    line = np.zeros((32, 256), np.float32)
    line[10:20, 20:200] = 1.0  # ink
    same = logger_mod.sample_figure(line, "a move to stop", "a move to stop")
    wrong = logger_mod.sample_figure(line, "a move to stop", "a mowe to stqp")
    assert same.shape == wrong.shape and same.dtype == np.uint8 and same.shape[2] == 3
    assert same.shape[0] > 32 + 2 * 8 and same.shape[1] == 256  # the line, then two text rows under it
    assert (same[15, 100] == 0).all() and (same[2, 2] == 255).all()  # ink dark, paper white
    assert not _red(same).any() and _red(wrong[32:]).any() and not _red(wrong[:32]).any()
    long_text = "x" * 200
    assert logger_mod.sample_figure(line, long_text, "")[..., 0].shape[1] > 256  # widened to fit the text


# -- run.loggers --------------------------------------------------------------------------------------------------

def test_loggers_come_from_the_registry_and_each_name_is_checked():
    from htr_dist import registry

    assert CHOICES["run.loggers"] == tuple(registry.LOGGERS) and load_config().run.loggers == ["tensorboard"]
    with pytest.raises(ConfigError, match=r"^run.loggers\[1\]: 'wandb' is not one of 'tensorboard', 'mlflow'$"):
        load_config(None, ["run.loggers=[tensorboard,wandb]"])
    with pytest.raises(ConfigError, match="names a value twice"):
        load_config(None, ["run.loggers=[mlflow,mlflow]"])
    assert load_config(None, ["run.loggers=[]"]).run.loggers == []


def test_a_bad_logger_name_is_one_line(tmp_path):
    proc = _train(["--config", "tiny_cpu", f"run.dir={tmp_path}", "run.loggers=[tensorboard,wandb]"])
    assert proc.returncode == 2 and _errors(proc) == [
        "config error: run.loggers[1]: 'wandb' is not one of 'tensorboard', 'mlflow'"]
    assert "Traceback" not in proc.stderr and not os.listdir(tmp_path)


def test_mlflow_missing_names_the_extra(monkeypatch):
    real = logger_mod.importlib.util.find_spec
    monkeypatch.setattr(logger_mod.importlib.util, "find_spec", lambda name: None if name == "mlflow" else real(name))
    logger_mod.check_loggers(["tensorboard"])
    with pytest.raises(InputError, match=r"^run.loggers: 'mlflow' needs the mlflow package: "
                                         r"pip install 'htr-dist\[mlflow\]'$"):
        logger_mod.check_loggers(["tensorboard", "mlflow"])


def _tb(tb_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(tb_dir, size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}, acc


def test_tensorboard_and_mlflow_get_the_same_metrics_and_figures(tiny_overrides, tmp_path, monkeypatch):
    pytest.importorskip("mlflow", reason="the mlflow extra is not installed")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # the reader too: MLflow 3.7+ asks for it
    from mlflow.tracking import MlflowClient

    run = tmp_path / "run"
    args = ["--config", "tiny_cpu"] + tiny_overrides + [
        f"run.dir={run}", "run.loggers=[tensorboard,mlflow]", "train.use_llm=false", "train.batch_size=2",
        "train.max_steps=3", "train.eval_every=2", "train.stop_after=2"]
    proc = _train(args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    first = (run / "mlflow_run.json").read_text()
    proc = _train(args + ["train.resume=auto"])  # a resumed run goes on in the same MLflow run
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (run / "mlflow_run.json").read_text() == first

    scalars, acc = _tb(str(run / "tb"))
    client = MlflowClient(tracking_uri=f"file://{run / 'mlruns'}")
    (mlrun,) = client.search_runs([client.get_experiment_by_name("htr-dist").experiment_id])
    assert mlrun.info.status == "FINISHED" and mlrun.info.run_name == "run"
    assert mlrun.data.params["train.max_steps"] == "3" and mlrun.data.params["run.loggers"] == \
        "['tensorboard', 'mlflow']"
    tags = {t for t in scalars if not t.startswith("hparam/")}  # TensorBoard's hparams view keeps its own copy
    assert {"train/loss_total", "train/lr", "val/cer", "val/wer", "val/best_cer"} <= tags
    assert tags == set(mlrun.data.metrics)
    for tag in tags:
        history = {m.step: m.value for m in client.get_metric_history(mlrun.info.run_id, tag)}
        assert history.keys() == scalars[tag].keys(), tag
        for step, value in history.items():
            assert value == pytest.approx(scalars[tag][step], rel=1e-6, abs=1e-9), (tag, step)
    assert sorted(scalars["train/loss_total"]) == [1, 2, 3] and sorted(scalars["val/cer"]) == [2, 3]

    # the validation figure: in TensorBoard under val/line_i at each validation, in MLflow as step-keyed images
    images = acc.Images("val/line_0")
    assert [e.step for e in images] == [2, 3] and images[0].height > 32 and images[0].width >= 256
    assert "val/line_0/text_summary" in acc.Tags()["tensors"]  # the same as text, kept beside the figure
    pngs = [a.path for a in client.list_artifacts(mlrun.info.run_id, "images") if a.path.endswith(".png")]
    assert len([p for p in pngs if "val~line_0+step+2+" in p]) == 1, pngs
    assert len([p for p in pngs if "val~line_0+step+3+" in p]) == 1, pngs
    from PIL import Image

    local = client.download_artifacts(mlrun.info.run_id, next(p for p in pngs if "val~line_0+step+2+" in p),
                                      str(tmp_path))
    with Image.open(local) as im:
        assert im.mode == "RGB" and (im.height, im.width) == (images[0].height, images[0].width)


# -- the train command ----------------------------------------------------------------------------------------------

def test_train_help_lists_the_config_groups():
    proc = _train(["--help"], timeout=120)
    assert proc.returncode == 0, proc.stderr
    for group in ("data", "arch", "connector", "llm", "train", "dist", "run"):
        lines = [line for line in proc.stdout.splitlines() if line.startswith(f"  {group} ")]
        assert len(lines) == 1 and len(lines[0].split()) > 4, group  # the group and a description
    assert "docs/config.md" in proc.stdout and "--print-config" in proc.stdout


def test_print_config_round_trips_through_load_config(tmp_path):
    overrides = ["train.lr=2e-4", "run.loggers=[mlflow]", "run.dir=2024", "arch.cnn_cfg=[[1, 16], 'M', [1, 32]]",
                 "arch.mobilevit_patch_sizes=[]", "dist.strategy=deepspeed", f"data.path={tmp_path / 'shards'}"]
    proc = _train(["--config", "tiny_cpu", "--print-config"] + overrides, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert not (tmp_path / "shards").exists() and not os.path.exists(os.path.join(ROOT, "2024"))  # nothing started
    printed = tmp_path / "printed.yaml"
    printed.write_text(proc.stdout)
    expected = load_config("tiny_cpu", overrides)
    assert load_config(str(printed)) == expected
    assert os.path.isabs(expected.dist.deepspeed_config)  # printed with its path resolved


# -- launch/slurm_train.sh ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("variables, nproc", [
    ({"SLURM_GPUS_PER_NODE": "8"}, 8),
    ({"SLURM_GPUS_PER_NODE": "a100:8"}, 8),
    ({"SLURM_GPUS_PER_NODE": "gpu:a100:8"}, 8),
    ({"SLURM_GPUS_PER_NODE": "a100:4(IDX:0-3)"}, 4),
    ({"SLURM_GPUS_PER_NODE": "gpu:a100:2(IDX:0,2),gpu:v100:1(IDX:3)"}, 3),
    ({"SLURM_GPUS_ON_NODE": "4"}, 4),
    ({"SLURM_GPUS_PER_NODE": "h100:2", "SLURM_GPUS_ON_NODE": "2"}, 2),
    ({"SLURM_GPUS_PER_NODE": "a100:8", "NPROC_PER_NODE": "1"}, 1),
    ({"SLURM_GPUS_PER_NODE": "a100:x"}, None),
    ({"SLURM_GPUS_PER_NODE": "a100:0"}, None),
    ({}, None),
])
def test_slurm_script_reads_typed_gpu_counts(variables, nproc, tmp_path):
    """launch/slurm_train.sh with srun and scontrol replaced by stand-ins (as in test_faults.py); srun records the
    torchrun command instead of running it."""
    shims = tmp_path / "bin"
    shims.mkdir()
    calls = tmp_path / "srun.log"
    (shims / "srun").write_text(f'#!/bin/bash\necho "$@" >> {calls}\n')
    (shims / "scontrol").write_text('#!/bin/bash\n[ "$1" = show ] && echo node1\nexit 0\n')
    for shim in ("srun", "scontrol"):
        os.chmod(shims / shim, 0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k != "NPROC_PER_NODE"}
    env.update(variables, PATH=f"{shims}:{os.environ['PATH']}", SLURM_JOB_NODELIST="node1", SLURM_NNODES="1",
               SLURM_JOB_ID="7")
    proc = subprocess.run(["bash", "launch/slurm_train.sh", "tiny_cpu", "train.max_steps=1"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    if nproc is None:
        assert proc.returncode == 2 and len(proc.stderr.splitlines()) == 1, proc.stderr
        assert proc.stderr.startswith("slurm_train.sh: ") and not calls.exists()
        return
    assert proc.returncode == 0, proc.stderr
    assert f"--nnodes 1 --nproc_per_node {nproc} --rdzv-backend c10d" in calls.read_text()
