"""The seed system's training step, restated for timing: the baseline the issue's step-time goals are measured against.

The goals compare our step with the seed's own (6.4 s without the LLM, 7.7 s with it, on the machine where the seed
was timed). Absolute seconds only mean something on that machine; a step that does the seed's work, timed in the same
run as ours, gives the ratio on any machine. This module is written from a reading of the seed's public model file,
not copied from it, and keeps what decides its cost:

- ResNet basic blocks as ours; MobileViT blocks of width 80, 8 heads, 1 layer, MLP 160, whose transformer attends
  *within* each p x p patch (sequences of p*p pixels, one per patch), through ``nn.TransformerEncoder`` (pre-norm,
  sequence-first), with the layer norms of the local and fusion convolutions applied by permuting to NHWC and back;
- heads: BiLSTM layer 1, then layers 2-3, a dropout + linear CTC projection on each of layer 3 and layer 1, and the
  dropout + 1x3 convolution shortcut; loss = CTC(main) + 0.1 CTC(shortcut) + 0.1 CTC(layer 1), each summed over the
  batch and divided by its size (the layer-1 weight is not in the model file; its cost is the same at any weight);
- the LLM path: the sampled lines' images go through the backbone a *second* time and through BiLSTM layer 1 again;
  all 128 frames go through Linear(512, hidden) + GELU + LayerNorm into the LLM, with labels the tokenized text
  padded to 128 positions, so the LLM scores 128 positions, padding included (no -100);
- plain ``torch.optim.AdamW`` (lr 1e-3, weight decay 5e-5) over every trainable parameter.

Only ``benchmarks/step_time.py`` uses it; nothing in ``htr_dist`` may.
"""

from __future__ import annotations

import random
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from htr_dist.models.htr import ctc_loss

from _macs import forward_macs


class _NHWCLayerNorm(nn.Module):
    """LayerNorm over channels of an NCHW map, by permuting to NHWC and back (as the seed does)."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = nn.LayerNorm(channels)

    def forward(self, x):
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class _ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout)
        self.conv2, self.bn2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        out += self.shortcut(x)
        return F.relu(out)


class _PatchLocalViT(nn.Module):
    """The seed's MobileViT block: attention among the p*p pixels of each patch."""

    def __init__(self, channels: int, patch: int, width: int = 80):
        super().__init__()
        self.patch = patch
        self.local = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1, bias=False), _NHWCLayerNorm(channels), nn.SiLU(inplace=True),
            nn.Conv2d(channels, width, 1, bias=False), _NHWCLayerNorm(width), nn.SiLU(inplace=True))
        layer = nn.TransformerEncoderLayer(width, 8, 2 * width, dropout=0.0, activation="gelu", norm_first=True)
        self.transformer = nn.TransformerEncoder(layer, num_layers=1, enable_nested_tensor=False)
        self.fusion = nn.Sequential(nn.Conv2d(width + channels, channels, 1, bias=False), _NHWCLayerNorm(channels),
                                    nn.SiLU(inplace=True))

    def forward(self, x):
        p = self.patch
        y = self.local(x)
        b, d, h, w = y.shape
        if h % p or w % p:
            raise ValueError(f"seed MobileViT: a {h} x {w} map is not a whole number of {p} x {p} patches")
        hp, wp = h // p, w // p
        y = y.view(b, d, hp, p, wp, p).permute(3, 5, 0, 2, 4, 1).contiguous().view(p * p, b * hp * wp, d)
        y = self.transformer(y)
        y = y.view(p, p, b, hp, wp, d).permute(2, 5, 3, 0, 4, 1).contiguous().view(b, d, h, w)
        return self.fusion(torch.cat([x, y], dim=1))


class SeedCodeNet(nn.Module):
    """Backbone + heads (+ the seed's connector when ``lm`` is given) of the seed, for ``cnn_cfg``."""

    def __init__(self, cnn_cfg, num_classes: int, lm=None, hidden: int = 256):
        super().__init__()
        layers, ch = [nn.Conv2d(1, 32, 7, (4, 2), 3), nn.ReLU()], 32
        for entry in cnn_cfg:
            if entry == "M":
                layers.append(nn.MaxPool2d(2, 2))
            elif entry in ("mobilevit1", "mobilevit2"):
                layers.append(_PatchLocalViT(ch, 4 if entry == "mobilevit1" else 8))
            else:
                for _ in range(int(entry[0])):
                    layers.append(_ResBlock(ch, int(entry[1])))
                    ch = int(entry[1])
        self.features = nn.Sequential(*layers)
        self.rec1 = nn.LSTM(ch, hidden, 1, bidirectional=True)
        self.rec_rest = nn.LSTM(2 * hidden, hidden, 2, bidirectional=True, dropout=0.2)
        self.fnl = nn.Sequential(nn.Dropout(0.5), nn.Linear(2 * hidden, num_classes))
        self.fnl_layer1 = nn.Sequential(nn.Dropout(0.5), nn.Linear(2 * hidden, num_classes))
        self.shortcut = nn.Sequential(nn.Dropout(0.5), nn.Conv2d(ch, num_classes, (1, 3), padding=(0, 1)))
        self.lm = lm  # frozen; its parameters stay out of the optimizer
        if lm is not None:
            size = lm.config.hidden_size
            self.connector = nn.Sequential(nn.Linear(2 * hidden, size), nn.GELU(), nn.LayerNorm(size))

    def pooled(self, images):
        y = self.features(images)
        return F.max_pool2d(y, [y.size(2), 1], stride=[y.size(2), 1])  # (B, C, 1, W)

    def forward(self, images):
        y = self.pooled(images)
        layer1 = self.rec1(y.permute(2, 3, 0, 1)[0])[0]  # (T, B, 512)
        return self.fnl(self.rec_rest(layer1)[0]), self.shortcut(y).permute(2, 3, 0, 1)[0], self.fnl_layer1(layer1)

    def llm_loss(self, images, label_ids):
        """The seed's LLM path: backbone and BiLSTM layer 1 again on ``images``, every frame into the LLM."""
        layer1 = self.rec1(self.pooled(images).permute(2, 3, 0, 1)[0])[0]
        embeds = self.connector(layer1.permute(1, 0, 2))
        return self.lm(inputs_embeds=embeds.to(self.lm.dtype), labels=label_ids).loss


class SeedCodeCase:
    """A step_time case (same ``step`` / ``report`` / ``times`` as its ``Case``) running the seed's step."""

    def __init__(self, name: str, cnn_cfg, num_classes: int, teacher=None, llm_lines: int = 0, bf16: bool = False):
        torch.manual_seed(0)
        self.name, self.llm_lines, self.bf16 = name, llm_lines, bf16
        lm = teacher.lm if teacher is not None else None
        self.tokenizer = teacher.tokenizer if teacher is not None else None
        self.model = SeedCodeNet(cnn_cfg, num_classes, lm).train()
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(trainable, lr=1e-3, weight_decay=5e-5)
        self.rng = random.Random(0)
        self.times: list = []

    def _labels(self, texts, length: int) -> torch.Tensor:
        """Token ids padded (with EOS, the seed's pad token) or cut to ``length``, as the seed's tokenizer call."""
        pad = self.tokenizer.eos_token_id
        rows = [ids[:length] + [pad] * max(0, length - len(ids)) for ids in self.tokenizer(list(texts))["input_ids"]]
        return torch.tensor(rows, dtype=torch.long)

    def step(self, batch: dict) -> float:
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
            images = batch["images"]
            outputs = self.model(images)
        n = images.shape[0]
        # the seed's CTC, summed over the lines and divided by their number, is ctc_loss's "line" reduction
        targets, lengths = batch["targets"], batch["target_lengths"]
        main, shortcut, layer1 = (ctc_loss(logits, targets, lengths, "line") for logits in outputs)
        loss = main + 0.1 * shortcut + 0.1 * layer1
        if self.llm_lines:
            picked = self.rng.sample(range(n), self.llm_lines)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
                labels = self._labels([batch["texts"][i] for i in picked], outputs[0].shape[0])
                loss = loss + self.model.llm_loss(images[picked], labels)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return time.perf_counter() - start

    def report(self, args, batch: dict) -> dict:
        self.model.eval()
        one = batch["images"][:1]
        out = {"params_trainable": sum(p.numel() for p in self.model.parameters() if p.requires_grad),
               "macs_per_line": forward_macs(self.model, lambda: self.model(one))}
        self.model.train()
        if self.llm_lines:
            out["llm_lines_per_step"] = self.llm_lines
        return out
