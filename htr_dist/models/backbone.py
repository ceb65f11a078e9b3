"""The CNN backbone: ResNet-style basic blocks, max-pools and MobileViT blocks, then a column max-pool into a sequence.

With ``arch.cnn_cfg = [[2, 64], 'M', [3, 128], 'M', [2, 256]]`` it is the plain CNN of Retsinas et al. (DAS 2022);
the default inserts two MobileViT blocks (Mehta & Rastegari, 2021) after the first two stages.
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F


def fold_batch_norms(module: nn.Module) -> int:
    """Fold every eval-mode BatchNorm2d that directly follows a Conv2d into that convolution, in place: within a
    ``Sequential`` (conv, bn) and as a block's ``convN``/``bnN`` pair. The batch norm becomes an ``Identity`` and the
    convolution computes both, saving a pass over each feature map. For inference only: the module no longer trains
    as before, nor loads its training state dict. Returns how many were folded."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    def foldable(conv, bn) -> bool:
        return isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d) and not (conv.training or bn.training)

    folded = 0
    for sub in list(module.modules()):
        if isinstance(sub, nn.Sequential):
            for i in range(len(sub) - 1):
                if foldable(sub[i], sub[i + 1]):
                    sub[i], sub[i + 1] = fuse_conv_bn_eval(sub[i], sub[i + 1]), nn.Identity()
                    folded += 1
        for n in range(1, 10):
            conv, bn = getattr(sub, f"conv{n}", None), getattr(sub, f"bn{n}", None)
            if conv is None:
                break
            if foldable(conv, bn):
                setattr(sub, f"conv{n}", fuse_conv_bn_eval(conv, bn))
                setattr(sub, f"bn{n}", nn.Identity())
                folded += 1
    return folded


class BasicBlock(nn.Module):
    """3x3 conv - BN - ReLU - 3x3 conv - BN, plus the input (1x1 projection when the width changes), ReLU."""

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.shortcut = (
            nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, bias=False), nn.BatchNorm2d(out_ch))
            if in_ch != out_ch
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = self.bn2(self.conv2(out))
        shortcut = self.shortcut(x)
        # In place: batch norm's backward needs its input, not its output, so the sum may overwrite it; a fresh
        # (B, C, H, W) tensor per block would cost a few percent of a block's forward and backward. Out of place
        # when autocast left the summands in two dtypes, where the sum takes the wider one.
        out = out.add_(shortcut) if out.dtype == shortcut.dtype else out + shortcut
        return F.relu(out, inplace=True)


class TransformerLayer(nn.Module):
    """Pre-norm transformer layer; attention through ``scaled_dot_product_attention``."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 2.0, dropout: float = 0.0):
        super().__init__()
        if dim % heads:
            raise ValueError(f"transformer width {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.SiLU(), nn.Dropout(dropout), nn.Linear(hidden, dim))
        self.dropout = dropout

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:  # (N, L, D)
        """``mask``: None, or bool (N, 1, 1, L), True where a key may be attended to."""
        n, length, dim = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(n, length, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        att = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0)
        x = x + self.proj(att.transpose(1, 2).reshape(n, length, dim))
        return x + self.mlp(self.norm2(x))


class MobileViTBlock(nn.Module):
    """MobileViT block: local convs, global attention across patches, fold back, fuse with the input.

    The feature map is cut into p x p patches; for every pixel position inside a patch, a transformer attends over
    ALL patches (sequence = patches, batch = B * p * p). After the local 3x3 conv each pixel already sees its
    neighbourhood, so every output pixel depends on the whole map: a global receptive field. A map whose sides are
    not multiples of p is zero-padded before unfolding and cropped after folding, and the padded patches are masked
    out as keys: a pixel attends to real patches only, so the result does not depend on the padding.
    """

    def __init__(self, channels: int, dim: int, depth: int, heads: int, patch: int):
        super().__init__()
        self.patch = patch
        self.local = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels), nn.SiLU(),
            nn.Conv2d(channels, dim, 1, bias=False),
        )
        self.transformer = nn.ModuleList([TransformerLayer(dim, heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.project = nn.Sequential(nn.Conv2d(dim, channels, 1, bias=False), nn.BatchNorm2d(channels), nn.SiLU())
        self.fuse = nn.Sequential(
            nn.Conv2d(2 * channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels), nn.SiLU()
        )

    def _key_mask(self, b: int, h: int, w: int, hh: int, ww: int, device) -> torch.Tensor:
        """(B*p*p, 1, 1, hh*ww) bool: patch (r, c) is a real key for in-patch pixel (i, j) where r*p + i < h and
        c*p + j < w. A pixel position that no patch holds for real (a map smaller than p) may attend to all, which
        keeps its softmax finite; its outputs are cropped anyway."""
        p = self.patch
        offs = torch.arange(p, device=device)
        rows = torch.arange(hh, device=device)[None, :] * p + offs[:, None] < h  # (p, hh)
        cols = torch.arange(ww, device=device)[None, :] * p + offs[:, None] < w  # (p, ww)
        keep = (rows[:, None, :, None] & cols[None, :, None, :]).reshape(p * p, hh * ww)
        keep = keep | ~keep.any(-1, keepdim=True)
        return keep[None].expand(b, -1, -1).reshape(b * p * p, 1, 1, hh * ww)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W)
        b, _, h, w = x.shape
        p = self.patch
        y = self.local(x)  # (B, D, H, W)
        ph, pw = -h % p, -w % p
        if ph or pw:
            y = F.pad(y, (0, pw, 0, ph))
        d, hh, ww = y.shape[1], y.shape[2] // p, y.shape[3] // p
        # Work on the (B, H, W, D) view: free for a channels_last map, and D stays innermost for the transformer.
        # (B, hh, p, ww, p, D) -> (B, p, p, hh, ww, D) -> (B*p*p, hh*ww, D): one sequence of patches per in-patch pixel
        seq = y.permute(0, 2, 3, 1).reshape(b, hh, p, ww, p, d).permute(0, 2, 4, 1, 3, 5).reshape(b * p * p, hh * ww, d)
        mask = self._key_mask(b, h, w, hh, ww, y.device) if ph or pw else None
        for layer in self.transformer:
            seq = layer(seq, mask)
        seq = self.norm(seq)
        y = seq.view(b, p, p, hh, ww, d).permute(0, 3, 1, 4, 2, 5).reshape(b, hh * p, ww * p, d)
        y = y[:, :h, :w].permute(0, 3, 1, 2)  # (B, D, H, W), channels_last in memory
        y = self.project(y)
        return self.fuse(torch.cat([x, y], dim=1))


def parse_cnn_cfg(cnn_cfg: Sequence) -> List[tuple]:
    """``[[2, 64], 'M', 'mobilevit1']`` -> ``[('res', 2, 64), ('pool',), ('vit', 0)]`` (vit index is 0-based)."""
    out = []
    for entry in cnn_cfg:
        if entry == "M":
            out.append(("pool",))
        elif isinstance(entry, str) and entry.startswith("mobilevit") and entry[9:].isdigit() and int(entry[9:]) >= 1:
            out.append(("vit", int(entry[9:]) - 1))
        elif isinstance(entry, (list, tuple)) and len(entry) == 2:
            out.append(("res", int(entry[0]), int(entry[1])))
        else:
            raise ValueError(f"arch.cnn_cfg: bad entry {entry!r} (expected [n, channels], 'M' or 'mobilevitK')")
    return out


class HybridBackboneCRNNMobileViT(nn.Module):
    """(B, 1, H, W) line image -> (B, T, C) sequence, T = W / (stem stride * 2^pools)."""

    def __init__(self, cnn_cfg: Sequence, stem_channels: int = 32, stem_stride: Sequence[int] = (4, 2),
                 patch_sizes: Sequence[int] = (4, 8), vit_dim: int = 0, vit_depth: int = 2, vit_heads: int = 4,
                 channels_last: bool = True):
        super().__init__()
        self.channels_last = channels_last
        self.stem = nn.Sequential(
            nn.Conv2d(1, stem_channels, 7, stride=tuple(stem_stride), padding=3, bias=False),
            nn.BatchNorm2d(stem_channels), nn.ReLU(inplace=True),
        )
        layers, ch = [], stem_channels
        for kind, *args in parse_cnn_cfg(cnn_cfg):
            if kind == "pool":
                layers.append(nn.MaxPool2d(2, 2))
            elif kind == "res":
                n, out_ch = args
                for _ in range(n):
                    layers.append(BasicBlock(ch, out_ch))
                    ch = out_ch
            else:
                (index,) = args
                if index >= len(patch_sizes):
                    raise ValueError(f"arch.cnn_cfg: mobilevit{index + 1} has no patch size in {list(patch_sizes)}")
                dim = vit_dim or ch
                heads = vit_heads if dim % vit_heads == 0 else 1
                layers.append(MobileViTBlock(ch, dim, vit_depth, heads, patch_sizes[index]))
        self.features = nn.Sequential(*layers)
        self.out_channels = ch
        if channels_last:  # 4-D conv weights in NHWC too, so oneDNN does not reorder them at every call
            self.to(memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 1, H, W)
        if self.channels_last:
            # oneDNN (CPU) and cuDNN convolutions and batch norms run faster on NHWC maps; every layer keeps the format.
            x = x.contiguous(memory_format=torch.channels_last)
        y = self.features(self.stem(x))  # (B, C, h, w)
        return y.amax(dim=2).transpose(1, 2)  # column max-pool over the height -> (B, T=w, C)
