"""The split vocabulary (htr_dist.models.vocab) gives what the whole matrix gives: embeddings, logits and the logits'
gradient, for ranks holding whole rows (FSDP2) or flat ranges that cut rows (ZeRO-3), with different token counts per
rank."""

import datetime
import os

import pytest
import torch
import torch.distributed as tdist
import torch.multiprocessing as tmp

from htr_dist.dist.env import free_port
from htr_dist.models.vocab import VocabShard, flat_segments, row_segments, take_rows

VOCAB, HIDDEN = 37, 12


def _matrices():
    g = torch.Generator().manual_seed(0)
    return torch.randn(VOCAB, HIDDEN, generator=g, dtype=torch.float64), \
        torch.randn(VOCAB, HIDDEN, generator=g, dtype=torch.float64)


def _shard(layout: str, tied: bool, rank: int, world: int) -> VocabShard:
    emb, head = _matrices()

    def segments(w):
        if layout == "rows":
            lo, hi = take_rows(w, rank, world)
            return row_segments(w[lo:hi].clone(), lo, HIDDEN)
        part = -(-w.numel() // world)  # ZeRO-3's partition: a flat range, padded at the end
        flat = torch.zeros(part, dtype=w.dtype)
        piece = w.reshape(-1)[rank * part:(rank + 1) * part]
        flat[:piece.numel()] = piece
        return flat_segments(flat, rank * part, w.numel(), HIDDEN)

    embed = segments(emb)
    return VocabShard(embed, embed if tied else segments(head), VOCAB, HIDDEN, torch.float64, owned=True)


def _worker(rank, world, port, layout, tied, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    tdist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    shard = _shard(layout, tied, rank, world)
    emb, head = _matrices()
    head = emb if tied else head
    g = torch.Generator().manual_seed(10 + rank)
    errors = []
    for k, length in ((1, 1 + rank), (2, 3), (1 + rank % 2, 5 - rank)):  # different sizes on different ranks
        ids = torch.randint(0, VOCAB, (k, length), generator=g)
        errors.append(float((shard.embed(ids) - emb[ids]).abs().max()))
        hidden = torch.randn(k * length, HIDDEN, generator=g, dtype=torch.float64, requires_grad=True)
        logits = shard.logits(hidden)
        weight = torch.randn(logits.shape, generator=g, dtype=torch.float64)
        (logits * weight).sum().backward()
        ref = hidden.detach().clone().requires_grad_(True)
        ref_logits = ref @ head.t()
        (ref_logits * weight).sum().backward()
        errors.append(float((logits - ref_logits).abs().max()))
        errors.append(float((hidden.grad - ref.grad).abs().max()))
    held = shard.bytes_on_rank()
    gathered = [None] * world
    tdist.all_gather_object(gathered, {"errors": errors, "held": held, "full": shard.bytes_full()})
    if rank == 0:
        torch.save(gathered, out)
    tdist.destroy_process_group()


@pytest.mark.parametrize("layout, tied, world", [("rows", True, 2), ("flat", False, 2), ("flat", True, 3),
                                                 ("rows", False, 3)])
def test_split_vocabulary_matches_the_whole_matrix(tmp_path, layout, tied, world):
    out = str(tmp_path / "out.pt")
    tmp.spawn(_worker, args=(world, free_port(), layout, tied, out), nprocs=world, join=True)
    ranks = torch.load(out)
    assert max(max(r["errors"]) for r in ranks) < 1e-12
    matrices = 1 if tied else 2
    assert ranks[0]["full"] == matrices * VOCAB * HIDDEN * 8
    # together the ranks hold each element once (the flat layout's padding holds nothing)
    assert sum(r["held"] for r in ranks) == ranks[0]["full"]


def test_flat_segments_cut_rows_where_the_partition_does():
    flat = torch.arange(10.0)
    segments = flat_segments(flat, start=7, total=20, hidden=4)  # elements 7..16 of a 5 x 4 matrix
    assert [(s.row_lo, s.row_hi, s.col_lo, s.col_hi) for s in segments] == [(1, 2, 3, 4), (2, 4, 0, 4), (4, 5, 0, 1)]
    assert torch.equal(torch.cat([s.rows.reshape(-1) for s in segments]), flat)
    # a partition past the end of the matrix (the padding of the last rank) holds nothing
    assert flat_segments(torch.zeros(6), start=20, total=20, hidden=4) == []
