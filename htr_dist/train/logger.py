"""Metrics writers: TensorBoard on rank 0, a no-op everywhere else (callers never branch on the rank)."""

from __future__ import annotations

import os
from typing import Optional

import numpy as np


class NullLogger:
    """Accepts everything, writes nothing."""

    def scalar(self, tag: str, value: float, step: int) -> None:
        pass

    def scalars(self, values: dict, step: int, prefix: str = "") -> None:
        for k, v in values.items():
            self.scalar(prefix + k, v, step)

    def text(self, tag: str, text: str, step: int) -> None:
        pass

    def image(self, tag: str, image: np.ndarray, step: int) -> None:
        pass

    def hparams(self, hparams: dict, metrics: dict) -> None:
        pass

    def close(self) -> None:
        pass


class TensorBoardLogger(NullLogger):
    """Event files under ``folder`` (``run.dir/tb``)."""

    def __init__(self, folder: str):
        from torch.utils.tensorboard import SummaryWriter

        os.makedirs(folder, exist_ok=True)
        self.writer = SummaryWriter(folder)

    def scalar(self, tag: str, value: float, step: int) -> None:
        self.writer.add_scalar(tag, float(value), step)

    def text(self, tag: str, text: str, step: int) -> None:
        self.writer.add_text(tag, text, step)

    def image(self, tag: str, image: np.ndarray, step: int) -> None:
        self.writer.add_image(tag, image, step, dataformats="HW")

    def hparams(self, hparams: dict, metrics: dict) -> None:
        self.writer.add_hparams(hparams, metrics, run_name=".")

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()


def make_logger(run_dir: str, is_main: bool) -> NullLogger:
    return TensorBoardLogger(os.path.join(run_dir, "tb")) if is_main else NullLogger()


def flat_hparams(cfg_dict: dict, prefix: str = "") -> dict:
    """Nested config -> flat {dotted key: scalar} for TensorBoard's hparams view (lists become strings)."""
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
