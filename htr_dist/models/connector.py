"""Connectors: what turns the recogniser's frames into the LLM's visual tokens (``connector.kind``).

``qformer``: learned queries cross-attend to the frames (:class:`QFormerConnector`). ``pool``: token j is the mean of
the j-th of Q equal parts of the line through an MLP (:class:`PoolConnector`), so each token is that part's own
content from the first step; ``docs/benchmarks.md`` measures what each passes to the LM."""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from htr_dist.config import CHOICES, not_one_of


class _Attention(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor,
                bias: Optional[torch.Tensor] = None) -> torch.Tensor:  # (N, Lq, D), (N, Lk, D), (Lq, Lk)
        n, lq, d = x.shape
        h = self.heads
        q = self.q(x).view(n, lq, h, d // h).transpose(1, 2)
        k, v = self.kv(context).view(n, context.shape[1], 2, h, d // h).permute(2, 0, 3, 1, 4)
        if bias is not None:
            bias = bias.to(q.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=self.dropout if self.training else 0.0)
        return self.proj(out.transpose(1, 2).reshape(n, lq, d))


class QFormerBlock(nn.Module):
    """Pre-norm: queries self-attend, cross-attend to the frames, then a feed-forward block."""

    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.norm_self, self.norm_cross, self.norm_ctx, self.norm_ff = (nn.LayerNorm(dim) for _ in range(4))
        self.self_attn = _Attention(dim, heads, dropout)
        self.cross_attn = _Attention(dim, heads, dropout)
        self.ff = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(4 * dim, dim))

    def forward(self, q: torch.Tensor, frames: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = self.norm_self(q)
        q = q + self.self_attn(x, x)
        q = q + self.cross_attn(self.norm_cross(q), self.norm_ctx(frames), bias)
        return q + self.ff(self.norm_ff(q))


def sinusoid(length: int, dim: int) -> torch.Tensor:
    pos = torch.arange(length, dtype=torch.float32)[:, None]
    freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    table = torch.zeros(length, dim)
    table[:, 0::2] = torch.sin(pos * freq)
    table[:, 1::2] = torch.cos(pos * freq[: dim // 2])
    return table


def locality_bias(queries: int, frames: int, width: float) -> torch.Tensor:
    """(queries, frames) additive cross-attention bias: a Gaussian in position around each query's share of the line.

    Query ``j`` of ``Q`` is centred on the fraction ``(j + 1/2) / Q`` of the line, and frame ``t`` of ``T`` sits at
    ``(t + 1/2) / T``; the bias is ``-d^2 / (2 s^2)`` for their distance ``d``, with ``s = width / Q``: at ``width``
    1 a query's attention falls to ``exp(-1/2)`` one query's share of the line away. Without it, every query starts
    by averaging the whole line (its scores are near zero), which is nearly the same vector for every line, and the
    connector settles on one fixed prefix for all of them before it learns to look at a part of the line."""
    centre = (torch.arange(queries, dtype=torch.float32) + 0.5) / queries
    pos = (torch.arange(frames, dtype=torch.float32) + 0.5) / frames
    s = width / queries
    return -((pos[None, :] - centre[:, None]) ** 2) / (2 * s * s)


class QFormerConnector(nn.Module):
    """(k, T, in_dim) frames -> (k, num_queries, llm_hidden) tokens.

    Frames get sinusoidal positions (so the connector knows left from right for any T); the output passes
    Linear(dim, proj_hidden) - GELU - Linear(proj_hidden, llm_hidden) - LayerNorm. ``llm_hidden`` always comes from
    the loaded LLM's config.
    """

    def __init__(self, in_dim: int, llm_hidden: int, cfg):
        super().__init__()
        if cfg.dim % cfg.num_heads:
            raise ValueError(f"connector.dim={cfg.dim} is not divisible by connector.num_heads={cfg.num_heads}")
        self.queries = nn.Parameter(torch.randn(cfg.num_queries, cfg.dim) * 0.02)
        self.inp = nn.Linear(in_dim, cfg.dim)
        self.blocks = nn.ModuleList([QFormerBlock(cfg.dim, cfg.num_heads, cfg.dropout) for _ in range(cfg.num_layers)])
        self.norm = nn.LayerNorm(cfg.dim)
        self.proj = nn.Sequential(
            nn.Linear(cfg.dim, cfg.proj_hidden), nn.GELU(), nn.Linear(cfg.proj_hidden, llm_hidden), nn.LayerNorm(llm_hidden)
        )
        self.dim, self.locality = cfg.dim, cfg.locality

    def forward(self, feats: torch.Tensor) -> torch.Tensor:  # (k, T, in_dim)
        frames = self.inp(feats) + sinusoid(feats.shape[1], self.dim).to(feats.device, feats.dtype)
        q = self.queries.unsqueeze(0).expand(feats.shape[0], -1, -1)
        bias = None
        if self.locality > 0:
            bias = locality_bias(q.shape[1], feats.shape[1], self.locality).to(feats.device)
        for block in self.blocks:
            q = block(q, frames, bias)
        return self.proj(self.norm(q))  # (k, Q, llm_hidden)


class PoolConnector(nn.Module):
    """(k, T, in_dim) frames -> (k, num_queries, llm_hidden) tokens: the mean of each of ``num_queries`` equal parts
    of the line, through Linear(in_dim, proj_hidden) - GELU - Linear(proj_hidden, llm_hidden).

    It has no attention and no learned queries, so no constant part that every line shares: a token can only carry
    what its part of the line holds. The Q-Former's own keys (``dim``, ``num_layers``, ``num_heads``, ``dropout``,
    ``locality``) do not apply."""

    def __init__(self, in_dim: int, llm_hidden: int, cfg):
        super().__init__()
        self.num_queries = cfg.num_queries
        self.proj = nn.Sequential(nn.Linear(in_dim, cfg.proj_hidden), nn.GELU(), nn.Linear(cfg.proj_hidden, llm_hidden))

    def forward(self, feats: torch.Tensor) -> torch.Tensor:  # (k, T, in_dim)
        parts = F.adaptive_avg_pool1d(feats.transpose(1, 2), self.num_queries).transpose(1, 2)  # (k, Q, in_dim)
        return self.proj(parts)


def build_connector(in_dim: int, llm_hidden: int, cfg) -> nn.Module:
    """The connector ``cfg.kind`` names (``connector.kind``)."""
    kinds = {"qformer": QFormerConnector, "pool": PoolConnector}
    assert tuple(kinds) == CHOICES["connector.kind"]
    if cfg.kind not in kinds:
        raise ValueError(not_one_of("connector.kind", cfg.kind))
    return kinds[cfg.kind](in_dim, llm_hidden, cfg)


def llm_hidden_of(state_dict: dict, prefix: str = "connector.") -> Optional[int]:
    """The LLM hidden size a saved connector projects to (the output rows of its second projection), or None when
    ``state_dict`` holds no connector: what rebuilds a model from its weights without the LLM's config. Both kinds
    name that layer ``proj.2``."""
    key = f"{prefix}proj.2.weight"
    return int(state_dict[key].shape[0]) if key in state_dict else None
