"""Inference: load an exported model, read line images, decode, evaluate a split.

The exported ``model.pt`` (written by :mod:`htr_dist.train.export`; ``htr-export`` writes it from a checkpoint of any
strategy, and also as the pair ``model.safetensors`` + ``model.json``) holds the backbone and CTC heads, the trained
connector of a run that had a teacher, the alphabet and the preprocessing settings. Only ``--decode beam+llm`` loads the
teacher LLM (named in the file); every other mode reads a line without it.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, field
from typing import Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch

from htr_dist.config import Config, from_dict
from htr_dist.data.alphabet import Alphabet
from htr_dist.data.transforms import gray8, preprocess
from htr_dist.decode import (DECODE_MODES, CharNgramLM, DecodeError, DecodeSettings, log_probs_of, nbest_lists, pick,
                             teacher_log_probs)
from htr_dist.dist.env import attn_implementation, inference_rnn_dtype, pick_channels_last, pick_dtype
from htr_dist.errors import InputError, first_line
from htr_dist.models.backbone import fold_batch_norms
from htr_dist.models.htr import HTRModel
from htr_dist.train.metrics import edit_distance

log = logging.getLogger(__name__)

EXPORT_FORMAT = "htr-dist-model/1"
SAFETENSORS_FILE = "model.safetensors"


class InferenceError(InputError, RuntimeError):
    """An input (model file or image) cannot be used; the message names it."""


def resolve_model_file(path: str) -> str:
    """A folder means its exported ``model.pt`` (or, without one, its ``model.safetensors``); a file is taken as is."""
    if os.path.isdir(path):
        for name in ("model.pt", SAFETENSORS_FILE):
            candidate = os.path.join(path, name)
            if os.path.isfile(candidate):
                return candidate
        raise InferenceError(f"{path}: no exported model.pt in this run folder (is the run finished?)")
    if not os.path.isfile(path):
        raise InferenceError(f"model file not found: {path}")
    return path


def pair_paths(path: str) -> Tuple[str, str]:
    """The (safetensors, JSON) files of the export pair that ``path`` (either of them) belongs to."""
    stem = os.path.splitext(path)[0]
    return stem + ".safetensors", stem + ".json"


def read_export(path: str) -> dict:
    """An export as one dict (format, state_dict, config, alphabet, sizes, teacher, validation), from ``model.pt`` or
    from the pair ``model.safetensors`` + ``model.json`` (either path). Nothing in either kind of file can run code."""
    if path.endswith((".safetensors", ".json")):
        return _read_pair(path)
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
    return blob


def _read_pair(path: str) -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    tensors, meta = pair_paths(path)
    for need in (tensors, meta):
        if not os.path.isfile(need):
            raise InferenceError(f"{need}: not found (an export in safetensors is the pair {os.path.basename(tensors)}"
                                 f" + {os.path.basename(meta)})")
    try:
        with open(meta, encoding="utf-8") as f:
            blob = json.load(f)
    except (OSError, ValueError) as err:
        raise InferenceError(f"{meta}: unreadable ({first_line(err)})") from None
    if not isinstance(blob, dict) or blob.get("format") != EXPORT_FORMAT:
        raise InferenceError(f"{meta}: not an htr-dist exported model (expected format {EXPORT_FORMAT!r})")
    try:
        blob["state_dict"] = load_file(tensors)
    except (SafetensorError, OSError, ValueError) as err:
        raise InferenceError(f"{tensors}: not a readable safetensors file ({first_line(err)})") from None
    return blob


@dataclass
class Recognizer:
    """An exported HTR model ready to read line images."""

    model: HTRModel
    alphabet: Alphabet
    img_height: int
    img_width: int
    device: torch.device
    config: Config
    path: str = ""
    teacher_name: Optional[str] = None
    """The LLM the connector was trained with (None: the run had no teacher, ``beam+llm`` is not available)."""
    settings: DecodeSettings = field(default_factory=DecodeSettings)
    """Decoding weights, read from ``<model>.decode.json`` when tuning wrote one."""
    dtype: torch.dtype = torch.float32
    """The forward pass's autocast dtype (weights stay fp32; the recurrence and the outputs are fp32)."""
    _teacher: Optional[torch.nn.Module] = None
    _lm: Optional[CharNgramLM] = None

    @classmethod
    def load(cls, path: str, device: Optional[torch.device] = None,
             memory_format: Optional[str] = None, precision: str = "fp32") -> "Recognizer":
        """``memory_format`` (auto | channels_last | contiguous) defaults to the training run's ``dist.memory_format``,
        resolved for ``device`` and a forward pass only (:func:`htr_dist.dist.env.pick_channels_last`).
        ``precision`` is a ``dist.precision`` value for the forward pass (:func:`htr_dist.dist.env.pick_dtype`): fp32
        by default, ``bf16_native`` for bf16 autocast where the device computes bf16 natively."""
        path = resolve_model_file(path)
        device = device or torch.device("cpu")
        blob = read_export(path)
        try:
            cfg = from_dict(blob["config"])
            channels_last = pick_channels_last(device, memory_format or cfg.dist.memory_format, backward=False)
            teacher = blob.get("teacher")  # exports of runs with a teacher keep the trained connector
            model = HTRModel(cfg.arch, cfg.connector, blob["num_classes"], blob["img_height"], blob["img_width"],
                             int(teacher["hidden_size"]) if teacher else None, channels_last)
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
        fold_batch_norms(model)  # inference only: each batch norm into the convolution before it
        dtype = pick_dtype(device, precision)
        if model.head.rnn is not None:  # inference only: the recurrence in bf16 where that is fast (env decides)
            rnn_dtype = inference_rnn_dtype(device, dtype)
            for rnn in filter(None, (model.head.rnn.lower, model.head.rnn.upper)):
                rnn.to(rnn_dtype)
        record = blob.get("validation")
        scored = (f", step {record['step']}, {record['split']} CER {100 * record['cer']:.2f}%"
                  if isinstance(record, dict) and {"step", "split", "cer"} <= record.keys() else "")
        log.info("loaded %s on %s, backbone %s%s", path, device, "channels_last" if channels_last else "contiguous",
                 scored)
        return cls(model, alphabet, blob["img_height"], blob["img_width"], device, cfg, path,
                   teacher["name_or_path"] if teacher else None, DecodeSettings.load(path), dtype)

    def batch_from_arrays(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """Gray uint8 (h, w) arrays -> (B, 1, H, W) float tensor, preprocessed exactly as in training."""
        arr = np.stack([preprocess(img, self.img_height, self.img_width) for img in images])  # (B, H, W)
        return torch.from_numpy(arr).unsqueeze(1).to(self.device)

    def check_mode(self, decode: str) -> None:
        """Fail early, with the reason, if ``decode`` cannot run with this model and its settings."""
        if decode not in DECODE_MODES:
            raise DecodeError(f"decode: {decode!r} is not one of {', '.join(DECODE_MODES)}")
        if decode == "beam+lm" and not self.settings.lm_texts:
            raise DecodeError(f"{self.path}: --decode beam+lm needs a language model, and "
                              f"{DecodeSettings.path_for(self.path)} holds none: build it with launch/evaluate.py "
                              "--tune --decode beam+lm --data SHARDS (it learns from the train split)")
        if decode == "beam+llm" and self.teacher_name is None:
            raise DecodeError(f"{self.path}: --decode beam+llm needs a model trained with a teacher (train.use_llm="
                              "true); this one has no connector")

    def use_teacher(self, name_or_path: Optional[str]) -> None:
        """Read ``beam+llm`` with this LLM instead of the one the export names (the same model, found elsewhere)."""
        if name_or_path and self.teacher_name is not None:
            self.teacher_name, self._teacher = name_or_path, None

    def teacher(self) -> torch.nn.Module:
        """The frozen LLM named in the export, loaded once (``beam+llm`` only), in the device's default dtype."""
        if self._teacher is None:
            from htr_dist.models.llm import LineFormat, PrefixLM, load_causal_lm

            dtype = pick_dtype(self.device)
            attn = attn_implementation(self.device, self.config.llm.attn_implementation, dtype)
            lm, tokenizer = load_causal_lm(self.teacher_name, self.config.llm.cache_dir, dtype, attn, str(self.device))
            if lm.config.hidden_size != self.model.llm_hidden:
                raise DecodeError(f"{self.path}: the connector projects to {self.model.llm_hidden} but the teacher "
                                  f"{self.teacher_name!r} has hidden size {lm.config.hidden_size}")
            self._teacher = PrefixLM(lm, tokenizer, line_format=LineFormat.from_config(self.config.llm)).eval()
        return self._teacher

    def use_lm_texts(self, texts: Sequence[str]) -> None:
        """Build the character LM of ``beam+lm`` from ``texts`` from now on (kept in the settings when they are saved)."""
        self.settings.lm_texts, self._lm = list(texts), None

    def char_lm(self) -> CharNgramLM:
        if self._lm is None:
            self._lm = CharNgramLM(self.settings.lm_texts, self.settings.lm_order)
        return self._lm

    def split_batches(self, data: str, split: str, batch_size: int, rank: int = 0, world: int = 1,
                      pin_memory: bool = False):
        """Batches of ``split`` of the shard folder ``data``, preprocessed at this model's input size as evaluation
        reads them; across ``world`` ranks, every line exactly once."""
        import copy

        from htr_dist.data.pipeline import build_eval_loader

        cfg = copy.deepcopy(self.config)
        cfg.data.path, cfg.train.batch_size = data, batch_size
        cfg.data.img_height, cfg.data.img_width = self.img_height, self.img_width
        return build_eval_loader(cfg, split, self.alphabet, rank, world, pin_memory)

    @torch.inference_mode()
    def forward(self, images: torch.Tensor, decode: str = "greedy") -> dict:
        """The model's outputs for ``decode``: visual tokens of every line only for ``beam+llm``."""
        images = images.to(self.device)
        index = torch.arange(images.shape[0], device=self.device) if decode == "beam+llm" else None
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
            out = self.model(images, index)
        return {k: v.float() if torch.is_tensor(v) else v for k, v in out.items()}

    def predict(self, images: torch.Tensor, decode: str = "greedy", beam_width: Optional[int] = None) -> List[str]:
        """(B, 1, H, W) preprocessed images -> transcriptions."""
        self.check_mode(decode)
        return self.decode_outputs(self.forward(images, decode), decode, beam_width)

    def decode_outputs(self, out: dict, decode: str = "greedy", beam_width: Optional[int] = None) -> List[str]:
        """The model's outputs -> transcriptions, by ``decode`` (one of :data:`htr_dist.decode.DECODE_MODES`)."""
        if decode == "beam+llm":
            s = self.settings
            return [cands[pick(*zip(*cands), s.llm_weight, s.llm_bonus)][0]
                    for cands in self.llm_candidates(out, beam_width)]
        return self.decode_logits(out["ctc_logits"], decode, beam_width)

    def decode_logits(self, logits: torch.Tensor, decode: str = "greedy", beam_width: Optional[int] = None) -> List[str]:
        """(T, B, C) CTC logits of the main head -> transcriptions (every mode but ``beam+llm``)."""
        mode = DECODE_MODES.get(decode)
        if mode is None or mode.paths is None:
            readable = ", ".join(name for name, m in DECODE_MODES.items() if m.paths is not None)
            raise DecodeError(f"decode: {decode!r} is not one of {readable} (a mode that needs the visual tokens, "
                              "such as beam+llm, is read by predict or decode_outputs)")
        paths = mode.paths(self, logits, beam_width or self.settings.beam_width)
        return [self.alphabet.decode(p) for p in paths]

    def recognize(self, images: Sequence, decode: str = "greedy", batch_size: int = 16,
                  beam_width: Optional[int] = None, bucket: bool = True) -> List[Recognition]:
        """Read line images (paths, gray uint8 arrays or PIL images), in batches of ``batch_size``; one
        :class:`Recognition` per image, in the order given. With ``bucket`` (the default) lines are grouped by width
        and each batch is as wide as its widest line needs (:func:`fitted_width`), not the training canvas: the
        same scale, far fewer empty columns. A path that cannot be read raises :class:`InferenceError` naming it."""
        self.check_mode(decode)
        loaded = []
        for i, item in enumerate(images):
            if isinstance(item, (str, os.PathLike)):
                loaded.append((str(item), read_gray(str(item))))
            elif isinstance(item, np.ndarray):
                loaded.append((f"<array {i}>", item))
            else:  # a PIL image
                loaded.append((f"<image {i}>", gray8(item)))
        widths = [fitted_width(img.shape, self.img_height, self.img_width) if bucket else self.img_width
                  for _, img in loaded]
        order = sorted(range(len(loaded)), key=lambda i: widths[i])
        results: List[Optional[Recognition]] = [None] * len(loaded)
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            width = max(widths[i] for i in chunk)
            arr = np.stack([preprocess(loaded[i][1], self.img_height, width) for i in chunk])
            out = self.forward(torch.from_numpy(arr).unsqueeze(1), decode)
            texts = self.decode_outputs(out, decode, beam_width)
            for i, text, lp in zip(chunk, texts, log_probs_of(out["ctc_logits"])):
                labels = self.alphabet.encode(text)
                probs = np.exp(lp)
                per_char = confidences(probs, lp, labels)
                # nothing read: how sure the model is that there is nothing, its mean blank probability
                mean = float(np.mean(per_char)) if per_char else float(probs[:, 0].mean())
                results[i] = Recognition(loaded[i][0], text, mean, per_char)
        return results  # type: ignore[return-value]

    @torch.inference_mode()
    def llm_candidates(self, out: dict, beam_width: Optional[int] = None) -> List[List[Tuple[str, float, float]]]:
        """Per line, the n-best hypotheses as (text, log P_ctc, log P_llm), best CTC score first."""
        self.check_mode("beam+llm")
        lists = nbest_lists(log_probs_of(out["ctc_logits"]), self.settings.n_best, beam_width or self.settings.beam_width)
        teacher = self.teacher()
        result = []
        for tokens, cands in zip(out["visual_tokens"], lists):
            texts = [self.alphabet.decode(labels) for labels, _ in cands]
            llm = teacher_log_probs(teacher, tokens, texts)
            result.append([(t, ctc, l) for t, (_, ctc), l in zip(texts, cands, llm)])
        return result


WIDTH_MULTIPLE = 32
"""Bucketed canvases are a multiple of this many pixels wide (every downsampling of the backbones divides it)."""


def fitted_width(shape: Tuple[int, int], height: int, max_width: int) -> int:
    """The canvas width a line of ``shape`` (h, w) needs at ``height`` with its aspect kept, rounded up to
    :data:`WIDTH_MULTIPLE`, at most ``max_width`` (the training canvas, where a long line is scaled down instead)."""
    h, w = shape
    need = math.ceil(w * height / max(1, h))
    return max(WIDTH_MULTIPLE, min(max_width, -(-need // WIDTH_MULTIPLE) * WIDTH_MULTIPLE))


def ctc_alignment(log_probs: np.ndarray, labels: Sequence[int]) -> Optional[List[List[int]]]:
    """The most likely CTC alignment (Viterbi) of ``labels`` to (T, C) log-probs: per label, the frames it holds;
    None if the frames are too few for the labels."""
    t_len, n = log_probs.shape[0], len(labels)
    if n == 0:
        return []
    ext = np.zeros(2 * n + 1, dtype=np.int64)
    ext[1::2] = labels
    states = len(ext)
    skip_ok = np.zeros(states, dtype=bool)  # a label may follow the previous label directly if the two differ
    skip_ok[3::2] = ext[3::2] != ext[1:-2:2]
    score = np.full(states, -np.inf)
    score[0], score[1] = log_probs[0, 0], log_probs[0, ext[1]]
    back = np.zeros((t_len, states), dtype=np.int8)  # 0 stay, 1 from s-1, 2 from s-2
    for t in range(1, t_len):
        prev1 = np.concatenate([[-np.inf], score[:-1]])
        prev2 = np.where(skip_ok, np.concatenate([[-np.inf, -np.inf], score[:-2]]), -np.inf)
        stacked = np.stack([score, prev1, prev2])
        back[t] = stacked.argmax(0)
        score = stacked.max(0) + log_probs[t, ext]
    end = states - 1 if score[-1] >= score[-2] else states - 2
    if not np.isfinite(score[end]):
        return None
    frames: List[List[int]] = [[] for _ in range(n)]
    s = end
    for t in range(t_len - 1, -1, -1):
        if s % 2 == 1:
            frames[s // 2].append(t)
        s -= int(back[t, s])
    return frames


@dataclass
class Recognition:
    """One line read: its text, the mean of its characters' confidences, and each character's: the highest
    probability the model gave that character in the frames the CTC alignment assigns to it."""

    source: str
    text: str
    confidence: float
    char_confidences: List[float]

    def as_dict(self) -> dict:
        return {"image": self.source, "text": self.text, "confidence": round(self.confidence, 4),
                "chars": [[c, round(p, 4)] for c, p in zip(self.text, self.char_confidences)]}


def best_path_confidences(probs: np.ndarray, labels: Sequence[int]) -> Optional[List[float]]:
    """Per label, its highest probability over the frames it holds in the best path (each frame's most likely class),
    if that path reads ``labels``; else None. The best path is then also the best alignment of ``labels`` (no path
    scores higher), so this equals what the Viterbi alignment gives, without its loop over the frames: greedy
    decoding reads exactly this path, and beam search usually does."""
    path = probs.argmax(1)
    starts = path != 0
    starts[1:] &= path[1:] != path[:-1]
    if int(starts.sum()) != len(labels) or not np.array_equal(path[starts], np.asarray(labels, dtype=path.dtype)):
        return None
    held = path != 0
    best = np.zeros(len(labels))
    np.maximum.at(best, (np.cumsum(starts) - 1)[held], probs[np.arange(len(path)), path][held])
    return best.tolist()


def confidences(probs: np.ndarray, log_probs: np.ndarray, labels: Sequence[int]) -> List[float]:
    fast = best_path_confidences(probs, labels)
    if fast is not None:
        return fast
    frames = ctc_alignment(log_probs, labels)
    if frames is None:
        return [0.0] * len(labels)
    return [float(probs[f, c].max()) if f else 0.0 for f, c in zip(frames, labels)]


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
                     beam_width: Optional[int] = None) -> List[LineResult]:
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
