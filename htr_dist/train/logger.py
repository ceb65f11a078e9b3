"""Metrics writers. Rank 0 writes through the loggers that ``run.loggers`` names (TensorBoard, MLflow), every other
rank through a no-op, so callers never branch on the rank. Each logger takes the same calls: scalar(s), image, text,
hparams, close; the resolved config it records itself when it starts."""

from __future__ import annotations

import difflib
import importlib.util
import logging
import os
import time
from typing import List, Optional

import numpy as np

from htr_dist import registry
from htr_dist.errors import InputError
from htr_dist.io_utils import atomic_write_json

log = logging.getLogger(__name__)

EXTRAS = {"mlflow": ("mlflow", "mlflow")}
"""Logger name -> (module it imports, the htr-dist extra that installs it), for the loggers that need more than the
base install."""


class NullLogger:
    """Accepts everything, writes nothing: every rank but 0, and rank 0 with ``run.loggers=[]``."""

    def scalar(self, tag: str, value: float, step: int) -> None:
        pass

    def scalars(self, values: dict, step: int, prefix: str = "") -> None:
        for k, v in values.items():
            self.scalar(prefix + k, v, step)

    def text(self, tag: str, text: str, step: int) -> None:
        pass

    def image(self, tag: str, image: np.ndarray, step: int) -> None:
        """``image``: (H, W) gray or (H, W, 3) RGB, uint8 or float in [0, 1]."""

    def hparams(self, hparams: dict, metrics: dict) -> None:
        pass

    def close(self) -> None:
        pass


class Loggers(NullLogger):
    """Several loggers behind one: each call goes to every one, in ``run.loggers`` order."""

    def __init__(self, loggers: List[NullLogger]):
        self.loggers = loggers

    def scalar(self, tag: str, value: float, step: int) -> None:
        for lg in self.loggers:
            lg.scalar(tag, value, step)

    def text(self, tag: str, text: str, step: int) -> None:
        for lg in self.loggers:
            lg.text(tag, text, step)

    def image(self, tag: str, image: np.ndarray, step: int) -> None:
        for lg in self.loggers:
            lg.image(tag, image, step)

    def hparams(self, hparams: dict, metrics: dict) -> None:
        for lg in self.loggers:
            lg.hparams(hparams, metrics)

    def close(self) -> None:
        for lg in self.loggers:
            lg.close()


class TensorBoardLogger(NullLogger):
    """Event files under ``run.dir/tb``; the resolved config as a text entry at the start of a fresh run."""

    def __init__(self, cfg, resumed: bool = False):
        from torch.utils.tensorboard import SummaryWriter

        from htr_dist.config import dump_yaml

        folder = os.path.join(cfg.run.dir, "tb")
        os.makedirs(folder, exist_ok=True)
        self.writer = SummaryWriter(folder)
        if not resumed:
            self.writer.add_text("config", "```\n" + dump_yaml(cfg) + "\n```", 0)

    def scalar(self, tag: str, value: float, step: int) -> None:
        self.writer.add_scalar(tag, float(value), step)

    def text(self, tag: str, text: str, step: int) -> None:
        self.writer.add_text(tag, text, step)

    def image(self, tag: str, image: np.ndarray, step: int) -> None:
        self.writer.add_image(tag, image, step, dataformats="HW" if image.ndim == 2 else "HWC")

    def hparams(self, hparams: dict, metrics: dict) -> None:
        self.writer.add_hparams(hparams, metrics, run_name=".")

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()


def mlflow_uri(cfg) -> str:
    """The tracking URI ``run.loggers=[mlflow]`` writes to: ``run.mlflow_uri``, else the file store
    ``run.dir/mlruns``; a plain folder path becomes a ``file:`` URI."""
    uri = cfg.run.mlflow_uri or os.path.join(cfg.run.dir, "mlruns")
    return uri if "://" in uri or uri.startswith("file:") else "file://" + os.path.abspath(uri)


class MLflowLogger(NullLogger):
    """One MLflow run in a local store (no server): the flattened resolved config as params, the scalars as metrics
    with their step, images as step-keyed image artifacts, text as ``text/<tag>/step_N.txt`` artifacts. A resumed
    training run goes on in the MLflow run that ``run.dir/mlflow_run.json`` names."""

    BATCH = 1000  # metrics per log_batch call (MLflow's limit)

    def __init__(self, cfg, resumed: bool = False):
        from htr_dist.config import to_dict

        self.uri = mlflow_uri(cfg)
        local = self.uri.startswith("file:") or self.uri.startswith("sqlite:")
        if local:
            # the file store is in maintenance mode from MLflow 3.7 and refused unless allowed; it needs no database
            # package. No usage statistics leave the machine for a local store unless the user asks for them.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
        from mlflow.entities import Metric, Param
        from mlflow.tracking import MlflowClient

        self._metric, self._param = Metric, Param
        self.client = MlflowClient(tracking_uri=self.uri)
        self.id_file = os.path.join(cfg.run.dir, "mlflow_run.json")
        self.run_id = self._previous_run() if resumed else None
        if self.run_id is None:
            experiment = self._experiment(cfg.run.mlflow_experiment)
            name = os.path.basename(os.path.normpath(cfg.run.dir))
            self.run_id = self.client.create_run(experiment, run_name=name, tags={
                "htr_dist.run_dir": os.path.abspath(cfg.run.dir)}).info.run_id
            atomic_write_json(self.id_file, {"tracking_uri": self.uri, "run_id": self.run_id})
        else:
            self.client.update_run(self.run_id, status="RUNNING")
        self._log_params(flat_hparams(to_dict(cfg)))
        self.pending: list = []
        log.info("MLflow run %s in %s", self.run_id, self.uri)

    def _experiment(self, name: str) -> str:
        found = self.client.get_experiment_by_name(name)
        return found.experiment_id if found is not None else self.client.create_experiment(name)

    def _previous_run(self) -> Optional[str]:
        """The MLflow run of this run folder, if its file names one in this store that still exists."""
        import json

        from mlflow.exceptions import MlflowException

        try:
            with open(self.id_file, encoding="utf-8") as f:
                saved = json.load(f)
            if saved.get("tracking_uri") != self.uri:
                return None
            return self.client.get_run(saved["run_id"]).info.run_id
        except (OSError, ValueError, KeyError, MlflowException):
            return None

    def _log_params(self, params: dict) -> None:
        """Params are write-once in MLflow: a resumed run adds the keys it lacks and names the ones that changed."""
        have = self.client.get_run(self.run_id).data.params
        changed = sorted(k for k, v in params.items() if k in have and have[k] != str(v))
        if changed:
            log.warning("MLflow run %s keeps its first values of %s (params cannot change)", self.run_id,
                        ", ".join(changed))
        new = [self._param(k, str(v)) for k, v in params.items() if k not in have]
        for i in range(0, len(new), 100):  # MLflow takes at most 100 params a call
            self.client.log_batch(self.run_id, params=new[i:i + 100])

    def flush(self) -> None:
        for i in range(0, len(self.pending), self.BATCH):
            self.client.log_batch(self.run_id, metrics=self.pending[i:i + self.BATCH])
        self.pending = []

    def scalar(self, tag: str, value: float, step: int) -> None:
        # buffered per step: one log_batch call for everything a step logs
        if self.pending and self.pending[-1].step != step:
            self.flush()
        self.pending.append(self._metric(tag, float(value), int(time.time() * 1000), step))

    def text(self, tag: str, text: str, step: int) -> None:
        self.flush()
        self.client.log_text(self.run_id, text, f"text/{tag}/step_{step:07d}.txt")

    def image(self, tag: str, image: np.ndarray, step: int) -> None:
        self.flush()
        self.client.log_image(self.run_id, image, key=tag, step=step)

    def close(self) -> None:
        self.flush()
        self.client.set_terminated(self.run_id, "FINISHED")


def check_loggers(names: List[str]) -> None:
    """Fail at the start, on every rank alike, when a requested logger's package is not installed."""
    for name in names:
        module, extra = EXTRAS.get(name, (None, None))
        if module and importlib.util.find_spec(module) is None:
            raise InputError(f"run.loggers: {name!r} needs the {module} package: pip install 'htr-dist[{extra}]'")


def make_logger(cfg, is_main: bool, resumed: bool = False) -> NullLogger:
    """The loggers ``run.loggers`` names on rank 0 (``resumed``: the run goes on from a checkpoint), a no-op on the
    other ranks."""
    if not is_main or not cfg.run.loggers:
        return NullLogger()
    check_loggers(cfg.run.loggers)
    return Loggers([registry.resolve(registry.LOGGERS[name])(cfg, resumed) for name in cfg.run.loggers])


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1: a scalable font shipped with Pillow
    except TypeError:
        return ImageFont.load_default()


def _marked(truth: str, pred: str) -> tuple:
    """Per-character flags: which characters of ``truth`` and of ``pred`` lie outside their alignment."""
    miss, wrong = [True] * len(truth), [True] * len(pred)
    for a, b, n in difflib.SequenceMatcher(None, truth, pred, autojunk=False).get_matching_blocks():
        miss[a:a + n] = [False] * n
        wrong[b:b + n] = [False] * n
    return miss, wrong


def sample_figure(image: np.ndarray, truth: str, pred: str) -> np.ndarray:
    """One validation line as one RGB picture, (H', W', 3) uint8: the network's input ``image`` ((H, W) float, ink
    = 1) as dark ink on white, then the rows ``truth: ...`` and ``pred: ...`` in a font scaled to the line's height.
    Characters of the prediction outside its alignment with the truth (wrong or extra) are red, characters of the
    truth it missed are blue."""
    from PIL import Image, ImageDraw

    line = Image.fromarray((255.0 * (1.0 - np.clip(image, 0.0, 1.0))).astype(np.uint8)).convert("RGB")
    font = _font(max(12, round(0.16 * line.height)))
    miss, wrong = _marked(truth, pred)
    rows = [("truth:", truth, miss, (0, 70, 200)), ("pred:", pred, wrong, (210, 0, 0))]
    pad = 4
    row_h = font.getbbox("Ag|")[3] + pad
    indent = pad + max(font.getlength(label + " ") for label, *_ in rows)  # the texts start in one column
    width = max([line.width] + [int(indent + font.getlength(text)) + pad for _, text, *_ in rows])
    canvas = Image.new("RGB", (width, line.height + 2 * row_h + pad), "white")
    canvas.paste(line, (0, 0))
    draw = ImageDraw.Draw(canvas)
    for r, (label, text, flags, colour) in enumerate(rows):
        y = line.height + pad + r * row_h
        draw.text((pad, y), label, fill="black", font=font)
        x, start = indent, 0
        for end in range(1, len(text) + 1):  # runs of characters of one colour
            if end == len(text) or flags[end] != flags[start]:
                run = text[start:end]
                draw.text((x, y), run, fill=colour if flags[start] else "black", font=font)
                x += font.getlength(run)
                start = end
    return np.asarray(canvas)


def flat_hparams(cfg_dict: dict, prefix: str = "") -> dict:
    """Nested config -> flat {dotted key: scalar} for TensorBoard's hparams view and MLflow's params (lists become
    strings)."""
    out: dict = {}
    for k, v in cfg_dict.items():
        key = prefix + k
        if isinstance(v, dict):
            out.update(flat_hparams(v, key + "."))
        else:
            out[key] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return out


def memory_peak_bytes(device) -> Optional[int]:
    """Peak GPU memory allocated, or the process's peak RSS on CPU."""
    import torch

    if getattr(device, "type", "cpu") == "cuda":
        return torch.cuda.max_memory_allocated(device)
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
