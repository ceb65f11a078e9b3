"""The inference export ``run.dir/model.pt``: backbone and CTC heads only, with the alphabet and preprocessing
settings; loadable with ``torch.load(weights_only=True)`` and usable without the LLM."""

from __future__ import annotations

import os
import tempfile

import torch

from htr_dist.config import to_dict
from htr_dist.inference import EXPORT_FORMAT
from htr_dist.io_utils import plain_mode


def export_model(model, cfg, alphabet: str, path: str) -> str:
    blob = {
        "format": EXPORT_FORMAT,
        "state_dict": {k: v.detach().cpu().clone() for k, v in model.export_state_dict().items()},
        "config": to_dict(cfg),
        "alphabet": alphabet,
        "num_classes": model.num_classes,
        "img_height": cfg.data.img_height,
        "img_width": cfg.data.img_width,
    }
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".model-", suffix=".pt.tmp")
    os.close(fd)
    try:
        torch.save(blob, tmp)
        plain_mode(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path
