"""Streaming WebDataset loaders, as an explicit list of stages.

    shard list (manifest) -> seeded per-epoch shard shuffle -> split by node and worker -> tar reading (with a
    counting handler) -> sample shuffle buffer -> raw batches -> [skip to the resume position] -> decode,
    preprocess, augment (train only), collate with CTC targets

Splitting: with at least ``world * workers`` shards, each (rank, worker) reads its own shards; with fewer, every
(rank, worker) reads the shards and keeps every ``world * workers``-th sample (robust for any layout, at the price of
reading bytes it drops). Evaluation always splits by sample index over the sorted shard list, so across N ranks
every line is seen exactly once, for any N and shard layout.

Training streams are infinite (a rank cycles over its shards) and the loop takes exactly
:func:`steps_per_epoch` batches per epoch on every rank: uneven shards cannot leave one rank waiting for another in a
DDP all-reduce. The data position is ``(epoch, batches taken)``; a stream is a pure function of (seed, epoch, rank,
world, workers), and resuming skips the taken batches BEFORE decoding them.
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
from htr_dist.data.shards import load_manifest, tar_samples
from htr_dist.data.transforms import augment_preprocess, preprocess
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
    if info is None or not info["shards"]:
        raise ValueError(f"{manifest['_folder']}/manifest.json: no shards for split {split!r}")
    return [os.path.join(manifest["_folder"], s["file"]) for s in info["shards"]]


def assign(urls: List[str], rank: int, world: int, worker: int, workers: int, by_sample: bool) -> Tuple[list, int, int]:
    """(urls this reader opens, sample stride, sample offset) for reader ``rank * workers + worker``."""
    readers, reader = world * workers, rank * workers + worker
    if not by_sample and len(urls) >= readers:
        return urls[reader::readers], 1, 0
    return urls, readers, reader


class _Counter:
    """Per-reader counts of read and skipped samples; aborts past the allowed skip fraction."""

    def __init__(self, max_fraction: float):
        self.seen = self.skipped = self.unknown_chars = 0
        self.max_fraction = max_fraction

    def skip(self, what: str) -> None:
        self.skipped += 1
        log.warning("skipped sample: %s (%d skipped so far)", what, self.skipped)
        if self.seen >= MIN_SAMPLES_BEFORE_ABORT and self.skipped > self.max_fraction * self.seen:
            raise TooManySkipped(
                f"{self.skipped} of {self.seen} samples skipped ({self.skipped / self.seen:.1%}), more than "
                f"data.max_skip_fraction={self.max_fraction}: the shards look corrupt; last problem: {what}"
            )


class StreamDataset(torch.utils.data.IterableDataset):
    """One rank's stream of batches for one epoch (train) or one pass (eval)."""

    def __init__(self, urls: List[str], alphabet: Alphabet, height: int, width: int, batch_size: int, rank: int,
                 world: int, train: bool, seed: int = 0, epoch: int = 0, skip_batches: int = 0,
                 shuffle_buffer: int = 256, augment: bool = True, max_skip_fraction: float = 0.01,
                 num_workers: int = 0):
        super().__init__()
        self.__dict__.update(locals())
        del self.__dict__["self"]

    # -- stages -------------------------------------------------------------------------------------------------
    def _shards(self, worker: int, workers: int) -> Iterator[dict]:
        urls = list(self.urls)
        if self.train:
            random.Random(hash((self.seed, self.epoch)) & 0xFFFFFFFF).shuffle(urls)
        mine, self._stride, self._offset = assign(urls, self.rank, self.world, worker, workers, by_sample=not self.train)
        rounds = itertools.count() if self.train else range(1)
        for _ in rounds:  # training cycles forever; the loop takes a fixed number of batches
            for url in mine:
                yield {"url": url}

    def _handler(self, exn: Exception) -> bool:
        self._counter.skip(f"unreadable shard data ({type(exn).__name__}: {exn})")
        return True  # keep going with the next shard

    def _select(self, samples: Iterator[dict]) -> Iterator[dict]:
        for i, s in enumerate(samples):
            if i % self._stride == self._offset:
                yield s

    def _decode(self, s: dict, rng: np.random.Generator) -> Optional[tuple]:
        where = f"{s.get('__url__', '?')}:{s.get('__key__', '?')}"
        self._counter.seen += 1
        if "txt" not in s or "png" not in s:
            missing = "txt" if "txt" not in s else "png"
            self._counter.skip(f"{where} has no {missing}")
            return None
        try:
            with Image.open(io.BytesIO(s["png"])) as im:
                img = np.asarray(im.convert("L"), dtype=np.uint8)
            text = s["txt"].decode("utf-8").strip()
        except Image.UnidentifiedImageError:  # PIL's own message names only a BytesIO object's address
            self._counter.skip(f"{where} cannot be decoded (png: {len(s['png'])} bytes that are not an image)")
            return None
        except Exception as err:  # noqa: BLE001 - any decoding failure is a skipped sample, counted and named
            self._counter.skip(f"{where} cannot be decoded ({type(err).__name__}: {err})")
            return None
        if self.train and self.augment:
            x = augment_preprocess(img, self.height, self.width, rng)
        else:
            x = preprocess(img, self.height, self.width)
        ids, unknown = self.alphabet.encode_counted(text)
        self._counter.unknown_chars += unknown
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
        self._counter = _Counter(self.max_skip_fraction)
        rng = np.random.default_rng([self.seed, self.epoch, self.rank, worker])
        samples = tar_samples(self._shards(worker, workers), handler=self._handler)
        samples = self._select(samples)
        if self.train:
            samples = wds.filters.shuffle(self.shuffle_buffer, initial=min(64, self.shuffle_buffer),
                                          rng=random.Random(int(rng.integers(1 << 31))))(samples)
        # Raw batches: the resume skip happens here, before any PNG is decoded. Batches are dealt to workers
        # round-robin by the DataLoader, so worker w owns global batches w, w + workers, ...
        skip = len(range(worker, self.skip_batches, workers))
        pending: list = []
        ready = None
        for index, s in enumerate(samples):
            # One generator per sample, keyed by its place in the stream: augmentation does not depend on whether
            # earlier samples were decoded or skipped on resume, so a resumed run sees exactly the same images.
            item = self._decode(s, np.random.default_rng([self.seed, self.epoch, self.rank, worker, index])) \
                if skip == 0 else s
            if item is None:
                continue
            pending.append(item)
            if len(pending) == self.batch_size:
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
    """Adds up the cumulative per-worker counters carried by the batches."""

    def __init__(self):
        self.by_worker: dict = {}

    def update(self, batch: dict) -> None:
        self.by_worker[batch["worker"]] = (batch["skipped"], batch["unknown_chars"])

    @property
    def skipped(self) -> int:
        return sum(v[0] for v in self.by_worker.values())

    @property
    def unknown_chars(self) -> int:
        return sum(v[1] for v in self.by_worker.values())


def build_train_loader(cfg, alphabet: Alphabet, rank: int, world: int, epoch: int = 0, skip_batches: int = 0,
                       pin_memory: bool = False):
    """This rank's training batches of ``epoch``; take exactly ``steps_per_epoch`` of them (the stream is infinite).
    ``pin_memory``: page-locked batches, for a copy to a GPU that overlaps with compute."""
    manifest = load_manifest(cfg.data.path)
    ds = StreamDataset(shard_urls(manifest, "train"), alphabet, cfg.data.img_height, cfg.data.img_width,
                       cfg.train.batch_size, rank, world, train=True, seed=cfg.train.seed, epoch=epoch,
                       skip_batches=skip_batches, shuffle_buffer=cfg.data.shuffle_buffer, augment=cfg.data.augment,
                       max_skip_fraction=cfg.data.max_skip_fraction, num_workers=cfg.data.num_workers)
    return _loader(ds, cfg.data.num_workers, pin_memory)


def build_eval_loader(cfg, split: str, alphabet: Alphabet, rank: int, world: int, pin_memory: bool = False):
    """This rank's share of ``split``: across ranks, every line exactly once (the last batch may be short)."""
    manifest = load_manifest(cfg.data.path)
    workers = min(cfg.data.num_workers, 1)  # one worker keeps the sample order simple and is plenty for eval
    ds = StreamDataset(shard_urls(manifest, split), alphabet, cfg.data.img_height, cfg.data.img_width,
                       cfg.train.batch_size, rank, world, train=False,
                       max_skip_fraction=cfg.data.max_skip_fraction)
    return _loader(ds, workers, pin_memory)
