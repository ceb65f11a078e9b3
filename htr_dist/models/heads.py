"""CTC heads of Retsinas et al.: a recurrent head and the 1x3-convolution CTC shortcut (``CTCtopB``)."""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn as nn


def _rnn(rnn_type: str, in_dim: int, hidden: int, layers: int, dropout: float) -> nn.Module:
    cls = {"lstm": nn.LSTM, "gru": nn.GRU}[rnn_type]
    return cls(in_dim, hidden, num_layers=layers, bidirectional=True, batch_first=True,
               dropout=dropout if layers > 1 else 0.0)


class RecurrentHead(nn.Module):
    """Bidirectional LSTM/GRU stack, then LayerNorm + Linear + GELU, then Linear -> CTC logits.

    The stack is split in two cuDNN-friendly modules at ``tap_layer`` so that the output of that layer (the feature
    handed to the LLM connector, (B, T, 2 * hidden)) is available without a second pass.
    """

    def __init__(self, in_dim: int, num_classes: int, rnn_type: str = "lstm", hidden: int = 256, layers: int = 3,
                 dropout: float = 0.2, tap_layer: int = 1):
        super().__init__()
        if not 1 <= tap_layer <= layers:
            raise ValueError(f"tap_layer must be in [1, {layers}], got {tap_layer}")
        self.lower = _rnn(rnn_type, in_dim, hidden, tap_layer, dropout)
        self.upper = _rnn(rnn_type, 2 * hidden, hidden, layers - tap_layer, dropout) if layers > tap_layer else None
        self.drop = nn.Dropout(dropout)
        self.out = nn.Sequential(
            nn.LayerNorm(2 * hidden), nn.Linear(2 * hidden, 2 * hidden), nn.GELU(), nn.Linear(2 * hidden, num_classes)
        )
        self.tap_dim = 2 * hidden

    def forward(self, seq: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:  # (B, T, C)
        # The recurrence runs in its weights' dtype whatever the autocast: fp32 in training, since CUDA autocast
        # would run cuDNN's LSTM in fp16 (its RNN cast is fp16 whatever the autocast dtype), with no loss scaling
        # under bf16, and CPU bf16 autocast fails in oneDNN's LSTM on CPUs without native bf16 ("could not create a
        # primitive descriptor"); bf16 where recognition converted it (htr_dist.dist.env.inference_rnn_dtype).
        with torch.autocast(seq.device.type, enabled=False):
            tap, _ = self.lower(seq.to(self.lower.weight_ih_l0.dtype))  # (B, T, 2H)
            y = tap
            if self.upper is not None:
                y, _ = self.upper(self.drop(tap))
        return self.out(y), tap  # (B, T, classes), (B, T, 2H)


class CTCShortcut(nn.Module):
    """Dropout + 1x3 convolution over the pooled sequence -> CTC logits (the auxiliary 'shortcut' of the paper)."""

    def __init__(self, in_dim: int, num_classes: int, dropout: float = 0.2):
        super().__init__()
        self.drop = nn.Dropout(dropout)
        self.conv = nn.Conv1d(in_dim, num_classes, kernel_size=3, padding=1)

    def forward(self, seq: torch.Tensor) -> torch.Tensor:  # (B, T, C)
        return self.conv(self.drop(seq).transpose(1, 2)).transpose(1, 2)  # (B, T, classes)


class CTCtopB(nn.Module):
    """``head_type`` both | rnn | cnn. Returns (main logits, shortcut logits or None, tap feature or None)."""

    def __init__(self, in_dim: int, num_classes: int, head_type: str = "both", rnn_type: str = "lstm",
                 hidden: int = 256, layers: int = 3, dropout: float = 0.2, tap_layer: int = 1):
        super().__init__()
        if head_type not in ("both", "rnn", "cnn"):
            raise ValueError(f"arch.head_type: {head_type!r} is not one of 'both', 'rnn', 'cnn'")
        self.head_type = head_type
        self.rnn = (
            RecurrentHead(in_dim, num_classes, rnn_type, hidden, layers, dropout, tap_layer)
            if head_type in ("both", "rnn") else None
        )
        self.shortcut = CTCShortcut(in_dim, num_classes, dropout) if head_type in ("both", "cnn") else None
        # Without a recurrent head the connector reads the pooled CNN sequence itself.
        self.tap_dim = self.rnn.tap_dim if self.rnn is not None else in_dim

    def class_layers(self) -> dict:
        """``{name: layer}`` of the layers whose output rows are the CTC classes (blank + alphabet): the recurrent
        head's last Linear and the shortcut's convolution. Their weights' and biases' dim 0 is the class."""
        layers = {}
        if self.rnn is not None:
            layers[f"rnn.out.{len(self.rnn.out) - 1}"] = self.rnn.out[-1]
        if self.shortcut is not None:
            layers["shortcut.conv"] = self.shortcut.conv
        return layers

    def forward(self, seq: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor]:
        short = self.shortcut(seq) if self.shortcut is not None else None
        if self.rnn is None:
            return short, None, seq
        main, tap = self.rnn(seq)
        return main, short, tap
