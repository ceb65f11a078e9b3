"""The whole recogniser: backbone + CTC heads (+ connector to the LLM during training), its losses, LLM sampling.

Pure modules and functions: nothing here knows about ranks or wrappers. The frozen teacher is passed in as a
callable (a plain :class:`~htr_dist.models.llm.PrefixLM`, an FSDP-sharded one, or a DeepSpeed engine's ``.module``).
"""

from __future__ import annotations

import fractions
import math
import time
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from htr_dist.config import CHOICES, not_one_of
from htr_dist.models.backbone import HybridBackboneCRNNMobileViT
from htr_dist.models.connector import build_connector
from htr_dist.models.heads import CTCtopB


class HTRModel(nn.Module):
    """The trainable part: backbone, CTC heads and (when ``llm_hidden`` is given) the connector."""

    def __init__(self, arch, connector, num_classes: int, img_height: int, img_width: int,
                 llm_hidden: Optional[int] = None, channels_last: bool = True):
        super().__init__()
        self.backbone = HybridBackboneCRNNMobileViT(
            arch.cnn_cfg, arch.stem_channels, arch.stem_stride, arch.mobilevit_patch_sizes, arch.mobilevit_dim,
            arch.mobilevit_depth, arch.mobilevit_heads, channels_last,
        )
        self.head = CTCtopB(self.backbone.out_channels, num_classes, arch.head_type, arch.rnn_type,
                            arch.rnn_hidden_size, arch.rnn_layers, arch.rnn_dropout, arch.llm_tap_layer)
        self.connector = build_connector(self.head.tap_dim, llm_hidden, connector) if llm_hidden else None
        self.llm_hidden = llm_hidden
        self.num_classes = num_classes
        self.img_size = (img_height, img_width)

    def forward(self, images: torch.Tensor, llm_index: Optional[torch.Tensor] = None) -> dict:
        """(B, 1, H, W) -> CTC logits (T, B, C), shortcut logits or None, visual tokens (k, Q, D_llm) or None.

        The connector reads the rows ``llm_index`` of the tap feature computed for the CTC pass: the sampled lines
        never go through the backbone twice.
        """
        seq = self.backbone(images)  # (B, T, C)
        main, short, tap = self.head(seq)
        tokens = None
        if llm_index is not None and self.connector is not None:
            tokens = self.connector(tap.index_select(0, llm_index))  # (k, Q, D_llm)
        return {
            "ctc_logits": main.transpose(0, 1),  # (T, B, classes)
            "shortcut_logits": short.transpose(0, 1) if short is not None and main is not short else None,
            "visual_tokens": tokens,
        }

    def class_row_keys(self) -> list:
        """State-dict keys whose dim 0 indexes the CTC classes (blank + alphabet): the only weights whose shape
        depends on the alphabet. The connector does not (it reads the tap feature and writes the LLM's width)."""
        return [f"head.{name}.{p}" for name, layer in self.head.class_layers().items()
                for p, _ in layer.named_parameters()]

    def export_state_dict(self) -> dict:
        """Backbone, heads and the trained connector (if any): never the LLM. Greedy and beam decoding use the
        first two only; ``beam+llm`` rescoring feeds the connector's visual tokens to the teacher."""
        return self.state_dict()


def num_llm_samples(batch_size: int, ratio: float) -> int:
    """Lines of a micro-batch sent through the LLM: ``max(1, floor(ratio * B + 0.5))``, at most B.

    Never 0: under ZeRO-3 and FSDP every rank must call the sharded LLM once per micro-step, or the others hang.
    """
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"train.llm_sample_ratio must be in (0, 1], got {ratio}")
    # ratio as the decimal it was written as: 0.29 * 50 is 14.499999999999998 in binary floating point, not 14.5
    exact = fractions.Fraction(repr(float(ratio))) * batch_size
    return min(batch_size, max(1, math.floor(exact + fractions.Fraction(1, 2))))


def sample_llm_index(batch_size: int, ratio: float, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """A random, sorted subset of ``num_llm_samples`` row indices of the micro-batch."""
    k = num_llm_samples(batch_size, ratio)
    return torch.randperm(batch_size, generator=generator)[:k].sort().values


def ctc_loss(logits: torch.Tensor, targets: torch.Tensor, target_lengths: torch.Tensor,
             reduction: str = "line") -> torch.Tensor:
    """CTC (blank 0, ``zero_infinity``) on (T, B, C) logits, in fp32 whatever the autocast dtype.

    ``reduction``: ``line`` = each line's negative log-likelihood, averaged over the lines (the reference system's
    ``sum / batch_size``); ``char`` = each line's divided by its length first (PyTorch's ``mean``), which divides the
    loss by about the mean line length (~40 characters on IAM).
    """
    if reduction not in CHOICES["train.ctc_reduction"]:
        raise ValueError(not_one_of("train.ctc_reduction", reduction))
    log_probs = logits.float().log_softmax(-1)
    t, b = log_probs.shape[:2]
    input_lengths = torch.full((b,), t, dtype=torch.long)
    loss = F.ctc_loss(log_probs, targets.cpu(), input_lengths, target_lengths.cpu(), blank=0,
                      reduction="sum" if reduction == "line" else "mean", zero_infinity=True)
    return loss / b if reduction == "line" else loss


@dataclass(frozen=True)
class LossSpec:
    """What :func:`compute_losses` needs to know: the loss weights, the CTC reduction and the teacher's sampling."""

    shortcut_weight: float = 0.1
    llm_weight: float = 1.0
    ctc_reduction: str = "line"
    use_llm: bool = True
    llm_sample_ratio: float = 0.125
    max_text_tokens: int = 48
    llm_every: int = 1
    llm_start_step: int = 0
    llm_weight_schedule: str = "constant"

    @classmethod
    def from_config(cls, cfg) -> "LossSpec":
        """The spec of a run's config (``train.*`` weights, sampling and schedule, ``llm.max_text_tokens``)."""
        t = cfg.train
        return cls(t.shortcut_weight, t.llm_loss_weight, t.ctc_reduction, t.use_llm, t.llm_sample_ratio,
                   cfg.llm.max_text_tokens, t.llm_every, t.llm_start_step, t.llm_weight_schedule)

    def llm_step(self, step: int) -> bool:
        """Whether optimizer step ``step`` (0-based) runs the teacher: from ``llm_start_step`` on, every
        ``llm_every``-th step counted from there. A function of the step alone, so every rank agrees and a resumed
        run skips the same steps."""
        return step >= self.llm_start_step and (step - self.llm_start_step) % self.llm_every == 0

    def llm_weight_at(self, step: int, steps: int) -> float:
        """alpha at optimizer step ``step`` of ``steps``: ``llm_weight`` from ``llm_start_step`` on, decayed to 0 at
        the last step by a ``linear`` or ``cosine`` schedule; 0 before ``llm_start_step``."""
        if step < self.llm_start_step:
            return 0.0
        if self.llm_weight_schedule == "constant":
            return self.llm_weight
        span = max(1, steps - 1 - self.llm_start_step)
        progress = min(1.0, (step - self.llm_start_step) / span)
        if self.llm_weight_schedule == "linear":
            return self.llm_weight * (1.0 - progress)
        if self.llm_weight_schedule == "cosine":
            return self.llm_weight * 0.5 * (1.0 + math.cos(math.pi * progress))
        raise ValueError(not_one_of("train.llm_weight_schedule", self.llm_weight_schedule))


def compute_losses(model, teacher, batch: dict, spec: LossSpec, generator: Optional[torch.Generator] = None,
                   llm_step: bool = True, llm_weight: Optional[float] = None) -> dict:
    """Named losses of one micro-batch: ``ctc``, ``ctc_shortcut``, ``llm``, ``total``; plus ``llm_s`` (seconds).

    ``total = ctc + shortcut_weight * ctc_shortcut + llm_weight * llm``, where ``llm_weight`` is this step's alpha
    (:meth:`LossSpec.llm_weight_at`) if given, else ``spec.llm_weight``. With a teacher and ``spec.use_llm``,
    the LLM is called exactly once, on ``num_llm_samples(B, ratio)`` lines whose tap features come from the same
    forward pass as the CTC logits; otherwise ``llm`` is a zero tensor. ``llm_step=False`` (``train.llm_every``)
    skips the LLM on this micro-batch; every rank must pass the same value, or a sharded LLM's collectives hang. The
    connector then runs on no line, so data-parallel wrappers still see each of its parameters used (zero gradient).
    """
    images = batch["images"]
    use_llm = teacher is not None and spec.use_llm and llm_step
    index = sample_llm_index(images.shape[0], spec.llm_sample_ratio, generator) if use_llm else None
    if teacher is not None and spec.use_llm and not llm_step:
        index = torch.zeros(0, dtype=torch.long)
    out = model(images, index.to(images.device) if index is not None else None)
    reduction = spec.ctc_reduction
    losses = {"ctc": ctc_loss(out["ctc_logits"], batch["targets"], batch["target_lengths"], reduction)}
    zero = losses["ctc"].new_zeros(())
    shortcut = out["shortcut_logits"]
    losses["ctc_shortcut"] = (ctc_loss(shortcut, batch["targets"], batch["target_lengths"], reduction)
                              if shortcut is not None else zero)
    losses["llm"], llm_s = zero, 0.0
    if use_llm:
        start = time.perf_counter()
        texts = [batch["texts"][i] for i in index.tolist()]
        input_ids, attention_mask = teacher.tokenize(texts, spec.max_text_tokens)
        device = out["visual_tokens"].device
        losses["llm"] = teacher(out["visual_tokens"], input_ids.to(device), attention_mask.to(device)).float()
        llm_s = time.perf_counter() - start
    alpha = spec.llm_weight if llm_weight is None else llm_weight
    losses["total"] = losses["ctc"] + spec.shortcut_weight * losses["ctc_shortcut"] + alpha * losses["llm"]
    if not use_llm and out["visual_tokens"] is not None:  # the connector's empty pass: zero, but in the graph
        losses["total"] = losses["total"] + 0.0 * out["visual_tokens"].sum()
    losses["llm_s"] = llm_s
    return losses


def count_parameters(module: Optional[nn.Module]) -> dict:
    """Trainable and frozen parameter counts."""
    if module is None:
        return {"trainable": 0, "frozen": 0}
    # ZeRO-3 leaves partitioned parameters empty between uses; ds_numel keeps their full size.
    trainable = sum(getattr(p, "ds_numel", p.numel()) for p in module.parameters() if p.requires_grad)
    frozen = sum(getattr(p, "ds_numel", p.numel()) for p in module.parameters() if not p.requires_grad)
    return {"trainable": trainable, "frozen": frozen}
