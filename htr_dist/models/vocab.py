"""The teacher's vocabulary split across ranks: each rank keeps, and computes with, only its own rows of the token
embedding and of the output projection.

A sharded teacher (FSDP2, ZeRO-3) gathers each unit it computes with. Its largest unit is the vocabulary matrix:
Llama-3.2-3B's tied embedding is 128,256 x 3,072 (788 MB in bf16), four times a decoder layer, and a step uses it
twice (the text tokens' embeddings, then the logits of the scored positions). Gathered whole, it is most of what a
rank holds at its peak beyond its own shard. Yet a step needs few of its rows for the embeddings and only a product
with it for the logits, both computable from the rows each rank already has:

- **embedding**: every rank looks up the token ids of every rank that fall in its rows; an all-reduce (sum) of the
  (ranks x tokens x hidden) result gives each rank its own lines' embeddings;
- **logits**: every rank multiplies every rank's hidden states (a few dozen per rank) by its rows; an all-reduce
  (sum) of the (ranks x positions x vocabulary) fp32 partial logits gives each rank its own lines' logits. The
  backward pass does the same with the logits' gradient and the rows, so the gradient reaches the visual prefix as it
  would through the whole matrix.

What moves is a few MB a step instead of the matrix. The rows are described as segments ``(row_lo, row_hi, col_lo,
col_hi, tensor)``: FSDP2 shards whole rows (one segment per rank), while a ZeRO-3 partition is a flat range of the
flattened matrix that may begin and end inside a row (up to three segments, partial rows summed like the others).

Every rank must call :meth:`VocabShard.embed` and :meth:`VocabShard.logits` the same number of times, in the same
order, with at least one token (the teacher already requires at least one line per rank and step).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
import torch.distributed as tdist


@dataclass
class Segment:
    row_lo: int
    row_hi: int
    col_lo: int
    col_hi: int
    rows: torch.Tensor  # (row_hi - row_lo, col_hi - col_lo)


def row_segments(rows: torch.Tensor, row_lo: int, hidden: int) -> List[Segment]:
    """Whole rows ``row_lo ..`` of a (V, hidden) matrix, as FSDP2 shards it (``rows`` may have none)."""
    if rows.shape[0] == 0:
        return []
    return [Segment(row_lo, row_lo + rows.shape[0], 0, hidden, rows)]


def flat_segments(flat: torch.Tensor, start: int, total: int, hidden: int) -> List[Segment]:
    """The elements ``start .. start + len(flat)`` (cut at ``total``) of a row-major (total / hidden, hidden) matrix,
    as ZeRO-3 partitions it: a partial first row, whole rows, a partial last row, each a view of ``flat``."""
    end = min(start + flat.numel(), total)
    segments, pos = [], start
    while pos < end:
        row, col = divmod(pos, hidden)
        if col or end - pos < hidden:  # a partial row
            stop = min(end, (row + 1) * hidden)
            view = flat[pos - start: stop - start].view(1, stop - pos)
            segments.append(Segment(row, row + 1, col, col + stop - pos, view))
        else:  # whole rows
            n = (end - pos) // hidden
            stop = pos + n * hidden
            segments.append(Segment(row, row + n, 0, hidden, flat[pos - start: stop - start].view(n, hidden)))
        pos = stop
    return segments


def _max_count(n: int, device: torch.device, group) -> int:
    t = torch.tensor([n], dtype=torch.long, device=device)
    tdist.all_reduce(t, op=tdist.ReduceOp.MAX, group=group)
    return int(t.item())


def _all_gather_padded(x: torch.Tensor, m: int, group, world: int) -> torch.Tensor:
    """(n, ...) on every rank -> (world * m, ...): each rank's rows padded with zeros to ``m``, in rank order."""
    padded = x.new_zeros((m, *x.shape[1:]))
    padded[: x.shape[0]] = x
    out = x.new_empty((world * m, *x.shape[1:]))
    tdist.all_gather_into_tensor(out, padded.contiguous(), group=group)
    return out


class _ShardedLogits(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, shard: "VocabShard") -> torch.Tensor:
        ctx.shard = shard
        n = hidden.shape[0]
        m = _max_count(n, hidden.device, shard.group)
        everyone = _all_gather_padded(hidden.detach(), m, shard.group, shard.world)  # (world * m, H)
        out_dtype = torch.promote_types(hidden.dtype, torch.float32)  # fp32 logits from a bf16 or fp32 teacher
        partial = torch.zeros((shard.world * m, shard.vocab), dtype=out_dtype, device=hidden.device)
        for seg in shard.head:
            w = seg.rows.to(hidden.device, non_blocking=True)
            partial[:, seg.row_lo:seg.row_hi] += (everyone[:, seg.col_lo:seg.col_hi] @ w.t()).to(out_dtype)
        tdist.all_reduce(partial, group=shard.group)
        ctx.n, ctx.m, ctx.dtype = n, m, hidden.dtype
        return partial[shard.rank * m: shard.rank * m + n].clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        shard, n, m = ctx.shard, ctx.n, ctx.m
        everyone = _all_gather_padded(grad.contiguous(), m, shard.group, shard.world)  # (world * m, V) fp32
        partial = torch.zeros((shard.world * m, shard.hidden), dtype=grad.dtype, device=grad.device)
        for seg in shard.head:
            w = seg.rows.to(grad.device, non_blocking=True)
            partial[:, seg.col_lo:seg.col_hi] += (everyone[:, seg.row_lo:seg.row_hi].to(w.dtype) @ w).to(grad.dtype)
        tdist.all_reduce(partial, group=shard.group)
        return partial[shard.rank * m: shard.rank * m + n].to(ctx.dtype), None


class VocabShard:
    """This rank's rows of the teacher's input embedding and output projection (the same rows when they are tied),
    and the two collective computations that use them (module docstring).

    Not a module: the rows are not parameters (the teacher is frozen) and no wrapper, ``.to()`` or state dict sees
    them. ``owned`` says whether the rows are this object's own copy (FSDP2: taken out of the model, which then holds
    empty placeholders) or views of the strategy's partitions (ZeRO-3), for counting held bytes.
    """

    def __init__(self, embed: List[Segment], head: List[Segment], vocab: int, hidden: int, dtype: torch.dtype,
                 owned: bool, group=None):
        self.embed_segments, self.head, self.vocab, self.hidden, self.dtype = embed, head, vocab, hidden, dtype
        self.owned, self.group = owned, group
        self.rank, self.world = tdist.get_rank(group), tdist.get_world_size(group)
        self.tied = head is embed

    def bytes_on_rank(self) -> int:
        segments = self.embed_segments + ([] if self.tied else self.head)
        return sum(s.rows.numel() * s.rows.element_size() for s in segments)

    def bytes_full(self) -> int:
        return (1 if self.tied else 2) * self.vocab * self.hidden * torch.empty(0, dtype=self.dtype).element_size()

    @torch.no_grad()
    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(k, L) token ids -> (k, L, hidden) embeddings in the teacher's dtype (no gradient: ids are not
        differentiable and the teacher is frozen)."""
        flat = input_ids.reshape(-1)
        m = _max_count(flat.numel(), flat.device, self.group)
        everyone = _all_gather_padded(flat, m, self.group, self.world)  # (world * m,)
        out = torch.zeros((self.world * m, self.hidden), dtype=self.dtype, device=flat.device)
        for seg in self.embed_segments:
            mine = (everyone >= seg.row_lo) & (everyone < seg.row_hi)
            if mine.any():
                rows = seg.rows.to(flat.device, non_blocking=True)
                out[mine, seg.col_lo:seg.col_hi] = rows[everyone[mine] - seg.row_lo].to(self.dtype)
        tdist.all_reduce(out, group=self.group)
        return out[self.rank * m: self.rank * m + flat.numel()].view(*input_ids.shape, self.hidden)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(N, hidden) -> (N, vocab) logits in fp32 (or the hidden states' dtype if wider); differentiable with
        respect to ``hidden``."""
        return _ShardedLogits.apply(hidden, self)


def deepspeed_vocab_shard(lm, group=None) -> Optional[VocabShard]:
    """A :class:`VocabShard` over the ZeRO-3 partitions of ``lm``'s embedding and output projection, or None where
    one of them is not partitioned (kept whole on every rank below the persistence threshold: nothing to save) or is
    offloaded to NVMe (its partition is not in memory between uses)."""
    emb, head = lm.get_input_embeddings().weight, lm.get_output_embeddings().weight

    def resident_partition(p) -> bool:  # an NVMe-offloaded partition is on disk between uses: not readable here
        location = getattr(getattr(p, "ds_tensor", None), "final_location", None)
        return (hasattr(p, "ds_tensor") and not getattr(p, "ds_persist", False)
                and not str(getattr(location, "value", location)).endswith("nvme"))

    if not (resident_partition(emb) and resident_partition(head)):
        return None
    rank = tdist.get_rank(group)

    def segments(p) -> List[Segment]:
        vocab, hidden = p.ds_shape
        return flat_segments(p.ds_tensor.view(-1), rank * p.ds_tensor.numel(), p.ds_numel, hidden)

    embed = segments(emb)
    tied = head is emb
    vocab, hidden = emb.ds_shape
    return VocabShard(embed, embed if tied else segments(head), vocab, hidden, emb.dtype, owned=False, group=group)


def exchange_bytes(world: int, lines: int, scored: int, vocab: int) -> int:
    """What a split vocabulary exchanges instead of gathering the matrix: the full-width partial logits every rank
    computes for all ranks' ``lines x scored`` positions, fp32, forward and backward."""
    return 2 * world * lines * scored * vocab * 4


def split_pays(world: int, lines: int, scored: int, vocab: int, hidden: int, param_bytes: int, tied: bool) -> bool:
    """Whether splitting the vocabulary needs less memory than gathering it: :func:`exchange_bytes` against the
    gathered matrix (two when untied). The exchange grows with the number of ranks: at 8 ranks, 2 lines of 49 scored
    tokens each already cost more than Llama-3.2-1B's embedding."""
    return world > 1 and exchange_bytes(world, lines, scored, vocab) < (1 if tied else 2) * vocab * hidden * param_bytes


def take_rows(p: torch.nn.Parameter, rank: int, world: int) -> Tuple[int, int]:
    """The rows ``[lo, hi)`` of a (V, H) parameter that FSDP2 would give ``rank`` of ``world``: ``torch.chunk``'s."""
    rows = p.shape[0]
    chunk = -(-rows // world)
    lo = min(rank * chunk, rows)
    return lo, min(lo + chunk, rows)
