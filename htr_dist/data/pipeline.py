"""Streaming WebDataset loaders, as an explicit list of stages.

    shard list (manifest) -> this reader's pieces of the shards -> tar reading (with a counting handler) -> sample
    shuffle buffer -> raw batches -> [skip to the resume position] -> decode, preprocess, augment (train only),
    collate with CTC targets

Training: an epoch's sequence is the training shards in a seeded per-epoch order, concatenated and started at a
seeded per-epoch line. Readers (rank, loader worker) take consecutive stretches of it, each exactly as many lines as
its batches of the epoch need (:func:`reader_share`), so an epoch trains on every line at most once and on all but
fewer than ``world * batch`` of them, whatever the shard sizes; a reader opens only the shards its stretch crosses
and stops reading at its end. After its stretch a reader goes on along the sequence (only needed where samples were
undecodable): the stream is infinite, and the loop takes exactly :func:`steps_per_epoch` batches per epoch on every
rank, so uneven shards cannot leave one rank waiting for another in a DDP all-reduce.

Evaluation splits by sample index over the sorted shard list, so across N ranks every line is seen exactly once.

The data position is ``(epoch, batches taken)``; a stream is a pure function of (seed, epoch, rank, world, workers,
batch size, shard counts), and resuming skips the taken batches BEFORE decoding them.
"""

from __future__ import annotations

import io
import itertools
import logging
import os
import random
from typing import Iterator, List, Optional, Tuple

import numpy as np
import torch
import webdataset as wds
from PIL import Image

from htr_dist.data.alphabet import Alphabet
from htr_dist.data.shards import ManifestError, load_manifest, tar_samples
from htr_dist.data.transforms import AugmentParts, augment_preprocess, gray8, preprocess
from htr_dist.errors import InputError

log = logging.getLogger(__name__)

MIN_SAMPLES_BEFORE_ABORT = 100


class TooManySkipped(InputError, RuntimeError):
    """More samples were undecodable than ``data.max_skip_fraction`` allows."""


def steps_per_epoch(manifest: dict, world: int, batch_size: int, split: str = "train") -> int:
    """Optimizer micro-steps per epoch, the same on every rank: ``max(1, lines // (world * batch))``."""
    return max(1, manifest["splits"][split]["lines"] // (world * batch_size))


def shard_urls(manifest: dict, split: str) -> List[str]:
    info = manifest["splits"].get(split)
    where = os.path.join(manifest["_folder"], "manifest.json")
    if info is None:
        raise ManifestError(f"{where}: no split {split!r}; it has {', '.join(sorted(manifest['splits'])) or 'none'}")
    if not info["shards"]:
        raise ManifestError(f"{where}: split {split!r} has no shards (no lines)")
    return [os.path.join(manifest["_folder"], s["file"]) for s in info["shards"]]


def reader_share(steps: int, batch_size: int, rank: int, world: int, worker: int, workers: int) -> Tuple[int, int]:
    """(first line, lines) of reader ``(rank, worker)`` in an epoch's training sequence.

    Readers take consecutive stretches in the order rank 0 worker 0, rank 0 worker 1, ..., each as long as its
    batches need: the DataLoader deals a rank's ``steps`` batches to its workers round-robin, so worker ``w`` makes
    batches ``w, w + workers, ...``. All stretches together are ``world * steps * batch_size`` lines, at most the
    split's lines (see :func:`steps_per_epoch`).
    """
    need = [len(range(w, steps, workers)) * batch_size for w in range(workers)]
    return rank * sum(need) + sum(need[:worker]), need[worker]


class _Counter:
    """Per-reader counts of read and skipped samples; aborts past the allowed skip fraction."""

    def __init__(self, max_fraction: float):
        self.seen = self.skipped = self.unknown_chars = self.read = 0
        self.warned_chars: set = set()
        self.max_fraction = max_fraction
        self.last = ""

    def skip(self, what: str, lines: int = 0) -> None:
        """One sample skipped; or, with ``lines``, that many lines a broken shard should have held (they count as
        seen too: the fraction is of the lines the manifest promised)."""
        self.skipped += max(1, lines)
        self.seen += lines
        self.last = what
        log.warning("skipped %s: %s (%d skipped so far)", f"{lines} lines" if lines > 1 else "sample", what,
                    self.skipped)
        if self.seen >= MIN_SAMPLES_BEFORE_ABORT and self.skipped > self.max_fraction * self.seen:
            raise TooManySkipped(
                f"{self.skipped} of {self.seen} samples skipped ({self.skipped / self.seen:.1%}), more than "
                f"data.max_skip_fraction={self.max_fraction}: the shards look corrupt; last problem: {what}"
            )


def _usable(s: dict) -> bool:
    """Whether :meth:`StreamDataset._decode` would keep a sample, judged without decoding its pixels (the resume
    skip): both members present, an image header PIL reads, UTF-8 text. Batches skipped on resume then end where
    the interrupted run's did, around undecodable samples too; only an image whose header reads but whose pixel data
    is corrupt can still shift the resumed stream by one sample."""
    if "txt" not in s or "png" not in s:
        return False
    try:
        Image.open(io.BytesIO(s["png"])).close()  # lazy: reads the header only
        s["txt"].decode("utf-8")
    except Exception:  # noqa: BLE001 - any failure here is a failure in _decode as well
        return False
    return True


class StreamDataset(torch.utils.data.IterableDataset):
    """One rank's stream of batches for one epoch (train) or one pass (eval)."""

    def __init__(self, urls: List[str], alphabet: Alphabet, height: int, width: int, batch_size: int, rank: int,
                 world: int, train: bool, seed: int = 0, epoch: int = 0, skip_batches: int = 0,
                 shuffle_buffer: int = 256, augment: bool = True, max_skip_fraction: float = 0.01,
                 num_workers: int = 0, counts: Optional[List[int]] = None, steps: int = 1,
                 parts: AugmentParts = AugmentParts(), aug_warmup_batches: int = 0):
        """``counts``: lines per shard of ``urls`` (the manifest's), and ``steps``: batches per epoch per rank; both
        for training only. ``parts``: which parts of the augmentation run when ``augment`` is on (training only).
        ``aug_warmup_batches``: the share of augmented lines grows linearly to 1 over this many batches of the run
        (counted over epochs: ``epoch * steps`` plus the batch's place in the epoch)."""
        super().__init__()
        if train and (counts is None or len(counts) != len(urls) or sum(counts) <= 0):
            raise ValueError(f"StreamDataset: training needs a positive line count per shard, got {counts!r} for "
                             f"{len(urls)} shard(s)")
        self.__dict__.update(locals())
        del self.__dict__["self"]

    # -- stages -------------------------------------------------------------------------------------------------
    def _train_sources(self, worker: int, workers: int) -> Tuple[Iterator[dict], Iterator[dict]]:
        """This reader's stretch of the epoch's sequence, and the sequence after it (forever), as shard pieces."""
        rnd = random.Random(hash((self.seed, self.epoch)) & 0xFFFFFFFF)
        order = list(range(len(self.urls)))
        rnd.shuffle(order)
        total = sum(self.counts)
        first, length = reader_share(self.steps, self.batch_size, self.rank, self.world, worker, workers)
        start = (rnd.randrange(total) + first) % total
        return self._pieces(order, start, length), self._pieces(order, (start + length) % total, None)

    def _pieces(self, order: List[int], start: int, length: Optional[int]) -> Iterator[dict]:
        """``{"url", "first", "stop", "count"}`` pieces covering ``length`` lines (None: forever) of the cyclic
        sequence of the shards in ``order``, from line ``start``. Forever stops with an error after a whole pass over
        the shards that gave no sample at all (every shard unreadable), which would otherwise loop without end."""
        counts = [self.counts[i] for i in order]
        total, j, local = sum(counts), 0, start
        while local >= counts[j]:
            local -= counts[j]
            j += 1
        walked, mark, pass_end = 0, self._counter.read, total
        while length is None or walked < length:
            take = counts[j] - local if length is None else min(counts[j] - local, length - walked)
            if take > 0:
                yield {"url": self.urls[order[j]], "first": local, "stop": local + take, "count": counts[j]}
            walked += take
            local, j = 0, (j + 1) % len(counts)
            if length is None and walked >= pass_end:
                if self._counter.read == mark:
                    raise TooManySkipped(f"no sample could be read in a whole pass over the {len(counts)} training "
                                         f"shard(s) ({self.urls[order[0]]}, ...); last problem: {self._counter.last}")
                mark, pass_end = self._counter.read, pass_end + total

    def _handler(self, exn: Exception) -> bool:
        lost = getattr(exn, "lines_lost", 0)  # the lines the shard should still have given (tar_samples)
        if lost and not self.train:  # every reader reads every shard for its share: this reader lost its share
            lost = -(-lost // self._readers)
        self._counter.skip(f"unreadable shard data ({type(exn).__name__}: {exn})", lost)
        return True  # keep going with the next shard

    def _counted(self, samples: Iterator[dict]) -> Iterator[dict]:
        for s in samples:
            self._counter.read += 1
            yield s

    def augmented_share(self, batch: int) -> float:
        """The share of lines augmented in the epoch's ``batch``-th batch (0-based) of this rank."""
        if not (self.train and self.augment):
            return 0.0
        if self.aug_warmup_batches <= 0:
            return 1.0
        return min(1.0, (self.epoch * self.steps + batch + 1) / self.aug_warmup_batches)

    def _decode(self, s: dict, rng: np.random.Generator, share: float) -> Optional[tuple]:
        """One sample -> (key, text, preprocessed image, label ids), augmented with probability ``share``
        (:meth:`augmented_share`); None for a sample that cannot be read, counted and named."""
        where = f"{s.get('__url__', '?')}:{s.get('__key__', '?')}"
        self._counter.seen += 1
        if "txt" not in s or "png" not in s:
            missing = "txt" if "txt" not in s else "png"
            self._counter.skip(f"{where} has no {missing}")
            return None
        try:
            with Image.open(io.BytesIO(s["png"])) as im:
                img = gray8(im)
            text = s["txt"].decode("utf-8").strip()
        except Image.UnidentifiedImageError:  # PIL's own message names only a BytesIO object's address
            self._counter.skip(f"{where} cannot be decoded (png: {len(s['png'])} bytes that are not an image)")
            return None
        except Exception as err:  # noqa: BLE001 - any decoding failure is a skipped sample, counted and named
            self._counter.skip(f"{where} cannot be decoded ({type(err).__name__}: {err})")
            return None
        # below a share of 1 the coin comes first from the line's generator; at 1 nothing is drawn, so a run without
        # warm-up augments exactly as before the warm-up existed (and at 0, evaluation, nothing is drawn either)
        if share >= 1.0 or (share > 0.0 and rng.random() < share):
            x = augment_preprocess(img, self.height, self.width, rng, self.parts)
        else:
            x = preprocess(img, self.height, self.width)
        ids, unknown = self.alphabet.encode_counted(text)
        if unknown:
            self._counter.unknown_chars += unknown
            for c in sorted({c for c in text if c not in self.alphabet.index} - self._counter.warned_chars):
                self._counter.warned_chars.add(c)
                log.warning("%s: character %r is not in the manifest's alphabet: left out of the target (said once "
                            "per character; data/unknown_chars counts them all)", where, c)
        return s["__key__"], text, x, ids

    def _collate(self, items: list, worker: int) -> dict:
        keys, texts, images, ids = zip(*items)
        return {
            "images": torch.from_numpy(np.stack(images)).unsqueeze(1),  # (B, 1, H, W)
            "targets": torch.tensor([i for seq in ids for i in seq], dtype=torch.long),
            "target_lengths": torch.tensor([len(seq) for seq in ids], dtype=torch.long),
            "texts": list(texts),
            "keys": list(keys),
            "worker": worker,
        }

    def _stamped(self, batch: dict) -> dict:
        """Counters as of now: a batch leaves only after the next one is read (or the stream ends), so the last
        batch of a pass also reports the problems met after it was filled (e.g. a truncated final shard)."""
        batch["skipped"] = self._counter.skipped
        batch["unknown_chars"] = self._counter.unknown_chars
        return batch

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        # The DataLoader asks worker 0 for the first batch, then 1, ...; in the uninterrupted stream batch g came
        # from worker g % workers. A resumed loader's first batch is batch skip_batches, so loader worker i plays
        # the part of worker (i + skip_batches) % workers: the stream goes on in the same order, whatever the skip.
        worker = (worker + self.skip_batches) % workers
        self._counter = _Counter(self.max_skip_fraction)
        rng = np.random.default_rng([self.seed, self.epoch, self.rank, worker])
        if self.train:
            own, after = self._train_sources(worker, workers)
            shuffle = wds.filters.shuffle(self.shuffle_buffer, initial=min(64, self.shuffle_buffer),
                                          rng=random.Random(int(rng.integers(1 << 31))))
            # the stretch is shuffled on its own, so that the lines after it come only once it is used up
            samples = itertools.chain(shuffle(self._counted(tar_samples(own, handler=self._handler))),
                                      shuffle(self._counted(tar_samples(after, handler=self._handler))))
        else:  # every reader reads the shards and keeps every readers-th sample: each line once, any layout
            readers, reader = self.world * workers, self.rank * workers + worker
            self._readers = readers
            counts = self.counts or [None] * len(self.urls)
            sources = ({"url": u, "count": n} for u, n in zip(self.urls, counts))
            samples = self._counted(tar_samples(sources, handler=self._handler))
            samples = (s for i, s in enumerate(samples) if i % readers == reader)
        # Raw batches: the resume skip happens here, before any PNG is decoded. Batches are dealt to workers
        # round-robin by the DataLoader, so worker w owns global batches w, w + workers, ...
        skip = len(range(worker, self.skip_batches, workers))
        formed = 0  # batches this worker has filled (skipped ones too): the next is the epoch's worker + formed * workers
        pending: list = []
        ready = None
        for index, s in enumerate(samples):
            # One generator per sample, keyed by its place in the stream: augmentation does not depend on whether
            # earlier samples were decoded or skipped on resume, so a resumed run sees exactly the same images.
            share = self.augmented_share(worker + formed * workers)
            item = self._decode(s, np.random.default_rng([self.seed, self.epoch, self.rank, worker, index]), share) \
                if skip == 0 else s if _usable(s) else None
            if item is None:
                continue
            pending.append(item)
            if len(pending) == self.batch_size:
                formed += 1
                if skip:
                    skip -= 1
                else:
                    if ready is not None:
                        yield self._stamped(ready)
                    ready = self._collate(pending, worker)
                pending = []
        if pending and not self.train:
            if ready is not None:
                yield self._stamped(ready)
            ready = self._collate(pending, worker)
        if ready is not None:
            yield self._stamped(ready)


def _loader(ds: StreamDataset, workers: int, pin_memory: bool) -> torch.utils.data.DataLoader:
    # A private generator: creating a loader iterator must not draw from the global torch RNG (dropout's), or a
    # resumed run, which creates its loader at a different moment, would not reproduce an uninterrupted one.
    # pin_memory (for a GPU): page-locked batches, so that .to(device, non_blocking=True) really is asynchronous.
    return torch.utils.data.DataLoader(ds, batch_size=None, num_workers=workers, persistent_workers=False,
                                       prefetch_factor=4 if workers else None, generator=torch.Generator(),
                                       pin_memory=pin_memory)


class SkipStats:
    """Adds up the per-worker counters the batches carry (each cumulative within its loader), over the run's loaders:
    ``base`` holds what earlier loaders (earlier epochs, or the run before a resume) counted."""

    def __init__(self, base: int = 0):
        self.base = base
        self.base_unknown = 0
        self.by_worker: dict = {}

    def new_loader(self) -> None:
        """Call before taking batches from a new loader: the old one's counts move into ``base``."""
        self.base, self.base_unknown, self.by_worker = self.skipped, self.unknown_chars, {}

    def update(self, batch: dict) -> None:
        self.by_worker[batch["worker"]] = (batch["skipped"], batch["unknown_chars"])

    @property
    def skipped(self) -> int:
        return self.base + sum(v[0] for v in self.by_worker.values())

    @property
    def unknown_chars(self) -> int:
        return self.base_unknown + sum(v[1] for v in self.by_worker.values())


def augment_parts(data_cfg) -> AugmentParts:
    """The augmentation parts a ``DataConfig`` switches on: its ``aug_<part>`` keys, one per AugmentParts field."""
    return AugmentParts(**{name: getattr(data_cfg, f"aug_{name}") for name in AugmentParts.names()})


def build_train_loader(cfg, alphabet: Alphabet, rank: int, world: int, epoch: int = 0, skip_batches: int = 0,
                       pin_memory: bool = False):
    """This rank's training batches of ``epoch``; take exactly ``steps_per_epoch`` of them (the stream is infinite).
    ``pin_memory``: page-locked batches, for a copy to a GPU that overlaps with compute."""
    manifest = load_manifest(cfg.data.path)
    ds = StreamDataset(shard_urls(manifest, "train"), alphabet, cfg.data.img_height, cfg.data.img_width,
                       cfg.train.batch_size, rank, world, train=True, seed=cfg.train.seed, epoch=epoch,
                       skip_batches=skip_batches, shuffle_buffer=cfg.data.shuffle_buffer, augment=cfg.data.augment,
                       max_skip_fraction=cfg.data.max_skip_fraction, num_workers=cfg.data.num_workers,
                       counts=[s["count"] for s in manifest["splits"]["train"]["shards"]],
                       steps=steps_per_epoch(manifest, world, cfg.train.batch_size), parts=augment_parts(cfg.data),
                       aug_warmup_batches=cfg.data.aug_warmup_steps * cfg.train.grad_accum)
    return _loader(ds, cfg.data.num_workers, pin_memory)


def build_eval_loader(cfg, split: str, alphabet: Alphabet, rank: int, world: int, pin_memory: bool = False):
    """This rank's share of ``split``: across ranks, every line exactly once (the last batch may be short)."""
    manifest = load_manifest(cfg.data.path)
    workers = min(cfg.data.num_workers, 1)  # one worker keeps the sample order simple and is plenty for eval
    ds = StreamDataset(shard_urls(manifest, split), alphabet, cfg.data.img_height, cfg.data.img_width,
                       cfg.train.batch_size, rank, world, train=False,
                       max_skip_fraction=cfg.data.max_skip_fraction,
                       counts=[s["count"] for s in manifest["splits"][split]["shards"]])
    return _loader(ds, workers, pin_memory)
