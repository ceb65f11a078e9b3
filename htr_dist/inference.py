"""Inference without the LLM: load an exported ``model.pt``, read line images, decode, evaluate a split.

The exported file (written by :mod:`htr_dist.train.export`) holds the backbone and CTC heads only, the alphabet and the
preprocessing settings, so recognising a line never needs the teacher LLM.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Iterable, List, Optional, Sequence

import numpy as np
import torch

from htr_dist.config import Config, from_dict
from htr_dist.data.alphabet import Alphabet
from htr_dist.data.transforms import gray8, preprocess
from htr_dist.dist.env import pick_channels_last
from htr_dist.errors import InputError, first_line
from htr_dist.models.htr import HTRModel
from htr_dist.train.metrics import beam_decode, edit_distance, greedy_decode

log = logging.getLogger(__name__)

EXPORT_FORMAT = "htr-dist-model/1"


class InferenceError(InputError, RuntimeError):
    """An input (model file or image) cannot be used; the message names it."""


def resolve_model_file(path: str) -> str:
    """A run folder means its exported ``model.pt``; a file is taken as it is."""
    if os.path.isdir(path):
        candidate = os.path.join(path, "model.pt")
        if not os.path.isfile(candidate):
            raise InferenceError(f"{path}: no exported model.pt in this run folder (is the run finished?)")
        return candidate
    if not os.path.isfile(path):
        raise InferenceError(f"model file not found: {path}")
    return path


@dataclass
class Recognizer:
    """An exported HTR model ready to read line images."""

    model: HTRModel
    alphabet: Alphabet
    img_height: int
    img_width: int
    device: torch.device
    config: Config

    @classmethod
    def load(cls, path: str, device: Optional[torch.device] = None,
             memory_format: Optional[str] = None) -> "Recognizer":
        """``memory_format`` (auto | channels_last | contiguous) defaults to the training run's ``dist.memory_format``,
        resolved for ``device`` and a forward pass only (:func:`htr_dist.dist.env.pick_channels_last`)."""
        path = resolve_model_file(path)
        device = device or torch.device("cpu")
        try:
            blob = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - any unpickling failure means the same thing to the user
            # torch's own message ends in advice to load with weights_only=False, i.e. to run what is in the file
            first = first_line(err)
            if "weights_only" in first or "Weights only" in first:
                first = "it holds more than tensors and plain values"
            raise InferenceError(f"{path}: not a loadable htr-dist model ({first})") from None
        if not isinstance(blob, dict) or blob.get("format") != EXPORT_FORMAT:
            raise InferenceError(f"{path}: not an htr-dist exported model (expected format {EXPORT_FORMAT!r})")
        try:
            cfg = from_dict(blob["config"])
            channels_last = pick_channels_last(device, memory_format or cfg.dist.memory_format, backward=False)
            model = HTRModel(cfg.arch, cfg.connector, blob["num_classes"], blob["img_height"], blob["img_width"], None,
                             channels_last)
            model.load_state_dict(blob["state_dict"])
            alphabet = Alphabet(blob["alphabet"])
        except KeyError as err:
            raise InferenceError(f"{path}: exported model lacks its {err} entry (damaged or hand-made file)") from None
        except (RuntimeError, ValueError) as err:  # ConfigError is a ValueError; a state dict mismatch a RuntimeError
            raise InferenceError(f"{path}: cannot rebuild the model from it ({err})") from None
        bad = [k for k, v in blob["state_dict"].items() if v.is_floating_point() and not torch.isfinite(v).all()]
        if bad:
            raise InferenceError(f"{path}: {len(bad)} weight tensor(s) are not finite (e.g. {bad[0]}): the run that "
                                 "wrote it diverged; use an earlier export or checkpoint")
        model.to(device).eval()
        record = blob.get("validation")
        scored = (f", step {record['step']}, {record['split']} CER {100 * record['cer']:.2f}%"
                  if isinstance(record, dict) and {"step", "split", "cer"} <= record.keys() else "")
        log.info("loaded %s on %s, backbone %s%s", path, device, "channels_last" if channels_last else "contiguous",
                 scored)
        return cls(model, alphabet, blob["img_height"], blob["img_width"], device, cfg)

    def batch_from_arrays(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """Gray uint8 (h, w) arrays -> (B, 1, H, W) float tensor, preprocessed exactly as in training."""
        arr = np.stack([preprocess(img, self.img_height, self.img_width) for img in images])  # (B, H, W)
        return torch.from_numpy(arr).unsqueeze(1).to(self.device)

    @torch.inference_mode()
    def predict(self, images: torch.Tensor, decode: str = "greedy", beam_width: int = 10) -> List[str]:
        """(B, 1, H, W) preprocessed images -> transcriptions."""
        return self.decode_logits(self.model(images.to(self.device), None)["ctc_logits"], decode, beam_width)

    def decode_logits(self, logits: torch.Tensor, decode: str = "greedy", beam_width: int = 10) -> List[str]:
        """(T, B, C) CTC logits of the main head -> transcriptions."""
        if decode == "greedy":
            paths = greedy_decode(logits)
        elif decode == "beam":
            paths = beam_decode(logits, beam_width)
        else:
            raise InferenceError(f"decode: {decode!r} is not one of 'greedy', 'beam'")
        return [self.alphabet.decode(p) for p in paths]


def read_gray(path: str) -> np.ndarray:
    """Read a PNG/JPEG/TIFF line image as 8-bit grayscale; raise InferenceError naming the file."""
    from PIL import Image, UnidentifiedImageError

    if not os.path.isfile(path):
        raise InferenceError(f"{path}: no such image file")
    try:
        with Image.open(path) as img:
            return gray8(img)
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as err:
        raise InferenceError(f"{path}: cannot decode image ({err})") from None


@dataclass
class LineResult:
    key: str
    reference: str
    prediction: str
    distance: int


def evaluate_batches(recognizer: Recognizer, batches: Iterable[dict], decode: str = "greedy",
                     beam_width: int = 10) -> List[LineResult]:
    """Decode every batch of an evaluation loader; one result per line."""
    results = []
    for batch in batches:
        hyps = recognizer.predict(batch["images"], decode, beam_width)
        for key, ref, hyp in zip(batch["keys"], batch["texts"], hyps):
            results.append(LineResult(key, ref, hyp, edit_distance(ref, hyp)))
    return results


def corpus_scores(results: Sequence[LineResult]) -> dict:
    """CER and WER over the whole corpus (sum of edit distances / total reference length), as the reference system."""
    from htr_dist.train.metrics import cer, wer

    refs = [r.reference for r in results]
    hyps = [r.prediction for r in results]
    return {"cer": cer(refs, hyps), "wer": wer(refs, hyps), "lines": len(results)}
