"""The inference exports of a run: ``run.dir/model.pt`` (the final weights) and ``run.dir/best_model.pt`` (the
lowest validation CER so far). Backbone and CTC heads, the trained connector if the run had a teacher (with the
teacher's name, for ``--decode beam+llm``), the alphabet and preprocessing settings; never the LLM's weights.
Loadable with ``torch.load(weights_only=True)`` and usable without the LLM. ``htr-export`` (htr_dist.cli.export)
writes the same export from any checkpoint, and as a pair that needs no pickle: ``model.safetensors`` (the weights)
+ ``model.json`` (the rest)."""

from __future__ import annotations

import logging
import os
from typing import Optional

import torch

from htr_dist.config import to_dict
from htr_dist.inference import EXPORT_FORMAT
from htr_dist.io_utils import atomic_path, atomic_write_json

log = logging.getLogger(__name__)
BEST_FILE = "best_model.pt"


def export_blob(model, cfg, alphabet: str, validation: Optional[dict] = None) -> dict:
    """What an export holds: the weights (``state_dict``) and what rebuilds the model around them."""
    blob = {
        "format": EXPORT_FORMAT,
        "state_dict": {k: v.detach().cpu().clone() for k, v in model.export_state_dict().items()},
        "config": to_dict(cfg),
        "alphabet": alphabet,
        "num_classes": model.num_classes,
        "img_height": cfg.data.img_height,
        "img_width": cfg.data.img_width,
    }
    if model.connector is not None:  # what --decode beam+llm needs to find the teacher again
        blob["teacher"] = {"name_or_path": cfg.llm.name_or_path, "hidden_size": model.llm_hidden}
    if validation is not None:
        blob["validation"] = dict(validation)
    return blob


def export_model(model, cfg, alphabet: str, path: str, validation: Optional[dict] = None) -> str:
    """Write ``path`` whole or not at all; ``validation`` (step, split, cer, wer, lines) says how the weights scored."""
    with atomic_path(path, suffix=".pt.tmp") as tmp:
        torch.save(export_blob(model, cfg, alphabet, validation), tmp)
    return path


def write_safetensors_pair(blob: dict, tensors_path: str, json_path: str) -> None:
    """An export as a pair that needs no pickle to read: the weights in ``tensors_path`` (safetensors, each tensor
    contiguous) and everything else of ``blob`` in ``json_path`` (:func:`htr_dist.inference.read_export` reads the
    pair back into the same blob). Each file is written whole or not at all."""
    from safetensors.torch import save_file

    tensors = {k: v.contiguous() for k, v in blob["state_dict"].items()}
    with atomic_path(tensors_path, suffix=".safetensors.tmp") as tmp:
        save_file(tensors, tmp, metadata={"format": blob["format"]})
    atomic_write_json(json_path, {k: v for k, v in blob.items() if k != "state_dict"})


class BestModel:
    """Keeps ``run.dir/best_model.pt``, the export of the lowest validation CER so far; a tie keeps the earlier step.

    Every rank calls :meth:`offer` with the same all-reduced result, so all agree on the best; only the main rank
    writes. A resumed run starts from the validation recorded in the file it finds (even one from steps that the
    resumed checkpoint predates: those weights were validated all the same), if it was on the same ``split``; a fresh
    run ignores an old file and replaces it at its first validation."""

    def __init__(self, run_dir: str, enabled: bool, is_main: bool, resumed: bool, split: str):
        self.path = os.path.join(run_dir, BEST_FILE)
        self.enabled, self.is_main = enabled, is_main
        self.validation: Optional[dict] = None
        if not (enabled and os.path.isfile(self.path)):
            return
        if not resumed:
            if is_main:
                log.warning("%s is from an earlier run in this folder: this run's first validation replaces it",
                            self.path)
            return
        self.validation = _recorded_validation(self.path)
        if self.validation is None:
            if is_main:
                log.warning("%s holds no readable validation record: this run's next validation replaces it",
                            self.path)
        elif self.validation.get("split") != split:
            if is_main:
                log.warning("%s was validated on split %r and this run validates on %r: this run's next validation "
                            "replaces it", self.path, self.validation.get("split"), split)
            self.validation = None
        elif is_main:
            log.info("best model so far: step %d, val CER %.2f%% (%s)", self.validation["step"],
                     100 * self.validation["cer"], self.path)

    def offer(self, model, cfg, alphabet: str, validation: dict) -> bool:
        """Export ``model`` if ``validation`` beats the best so far; True if it did."""
        if not self.enabled or (self.validation is not None and validation["cer"] >= self.validation["cer"]):
            return False
        self.validation = dict(validation)
        if self.is_main:
            export_model(model, cfg, alphabet, self.path, validation)
            log.info("step %d: new best val CER %.2f%%, exported %s", validation["step"], 100 * validation["cer"],
                     self.path)
        return True


def _recorded_validation(path: str) -> Optional[dict]:
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True, mmap=True)  # the record, not the weights
        record = blob["validation"]
        return {**record, "step": int(record["step"]), "cer": float(record["cer"])}
    except Exception:  # noqa: BLE001 - unreadable, damaged or without a record: the caller warns and replaces it
        return None
