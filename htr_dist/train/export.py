"""The inference export ``run.dir/model.pt``: backbone and CTC heads only, with the alphabet and preprocessing
settings; loadable with ``torch.load(weights_only=True)`` and usable without the LLM."""

from __future__ import annotations

import torch

from htr_dist.config import to_dict
from htr_dist.inference import EXPORT_FORMAT
from htr_dist.io_utils import atomic_path


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
    with atomic_path(path, suffix=".pt.tmp") as tmp:
        torch.save(blob, tmp)
    return path
