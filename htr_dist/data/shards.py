"""Writing and reading WebDataset shards of text lines, and their ``manifest.json``.

Per sample: ``__key__`` (the IAM line id), ``png`` (8-bit grayscale), ``txt`` (UTF-8 transcription) and ``json``
(form id, writer id, bbox, segmentation status). Shards are written under temporary names and renamed when complete,
so an interrupted run never leaves a half-written ``*.tar`` that a loader would read.

Reading: :func:`tar_samples` groups a shard's members into samples as ``webdataset.tarfile_to_samples`` does (a key is
the member name up to the first dot of its base name, the rest is the extension) over webdataset's tar iterator, and
wraps it with the manifest's checks: each shard must hold the samples the manifest counts.
"""

from __future__ import annotations

import glob
import hashlib
import io
import json
import os
import re
import tarfile
from typing import Callable, Iterable, Iterator, List

import numpy as np
import webdataset as wds
from PIL import Image

from htr_dist.errors import InputError
from htr_dist.io_utils import atomic_write_json

MANIFEST = "manifest.json"
SPLITS = ("train", "val", "test")
"""The splits every shard set has."""
EXTRA_SPLITS = ("val_seen", "test_seen")
"""Optional splits, written when a split list names them: held-out text by the training writers (synthetic sets)."""


class ManifestError(InputError, ValueError):
    """A shard folder or its manifest is missing or inconsistent; the message names the file."""


def png_bytes(gray: np.ndarray) -> bytes:
    """8-bit grayscale PNG bytes of a (h, w) uint8 array (fast compression: shards are written once, read often)."""
    if gray.ndim != 2 or gray.dtype != np.uint8:
        raise ValueError(f"expected a (h, w) uint8 image, got shape {gray.shape} dtype {gray.dtype}")
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(gray)).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def sha256(path: str) -> str:
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_split(samples: Iterable[dict], out_dir: str, split: str, max_count: int = 2000) -> List[dict]:
    """Write ``samples`` (dicts with key, png bytes, text, meta) as ``split-%06d.tar``; return the shard entries.

    Each shard is written as ``.split-%06d.tar.tmp`` and renamed once closed. Old shards of the split are removed
    only after the new ones are complete; if writing fails or is interrupted, the temporary files are removed and the
    old shards stay as they were. A key with a dot is refused (WebDataset would split it into key and extension).
    """
    os.makedirs(out_dir, exist_ok=True)
    pattern = os.path.join(out_dir, f".{split}-%06d.tar.tmp")
    _remove(glob.glob(os.path.join(out_dir, f".{split}-*.tar.tmp")))  # left by a run that was killed (SIGKILL)
    counts: dict = {}
    try:
        # A fixed mtime makes the shards byte-for-byte reproducible (the manifest sha256 then identifies the content).
        # It must be an int: tarfile writes a float mtime as an extra PAX header block before EVERY member, which
        # doubles the headers a reader parses in Python and the shard size.
        with wds.ShardWriter(pattern, maxcount=max_count, verbose=0, mtime=0) as writer:
            for s in samples:
                if "." in s["key"] or "/" in s["key"]:
                    raise ValueError(f"sample key {s['key']!r}: '.' and '/' are not allowed in WebDataset keys")
                writer.write({"__key__": s["key"], "png": s["png"], "txt": s["text"].encode("utf-8"),
                              "json": json.dumps(s["meta"], ensure_ascii=False).encode("utf-8")})
                counts[writer.fname] = counts.get(writer.fname, 0) + 1
    except BaseException:
        _remove(glob.glob(os.path.join(out_dir, f".{split}-*.tar.tmp")))
        raise
    # ShardWriter opens its first file before any sample arrives: an empty split leaves one empty temporary tar
    _remove(p for p in glob.glob(os.path.join(out_dir, f".{split}-*.tar.tmp")) if p not in counts)
    _remove(glob.glob(os.path.join(out_dir, f"{split}-*.tar")))
    entries = []
    for tmp in sorted(counts):
        final = os.path.join(out_dir, os.path.basename(tmp)[1:-4])
        os.replace(tmp, final)
        entries.append({"file": os.path.basename(final), "count": counts[tmp], "sha256": sha256(final),
                        "bytes": os.path.getsize(final)})
    return entries


def _remove(paths: Iterable[str]) -> None:
    for path in list(paths):
        if os.path.exists(path):
            os.unlink(path)


def write_manifest(out_dir: str, name: str, source: str, splits: dict, alphabet: str, problems: dict) -> dict:
    """Write ``out_dir/manifest.json`` atomically; ``splits`` maps split -> the shard entries of :func:`write_split`."""
    manifest = {
        "version": 1,
        "name": name,
        "source": source,
        "alphabet": alphabet,
        "splits": {k: {"lines": sum(e["count"] for e in v), "shards": v} for k, v in splits.items()},
        "problems": problems,
    }
    atomic_write_json(os.path.join(out_dir, MANIFEST), manifest)
    return manifest


def load_manifest(folder: str, check_sizes: bool = True) -> dict:
    """Read and check ``folder/manifest.json`` (with each shard's size, where it records one); the returned dict also
    carries ``_folder``."""
    path = os.path.join(folder, MANIFEST)
    if not os.path.isdir(folder):
        raise ManifestError(f"shard folder not found: {folder} (make it with htr-prepare)")
    if not os.path.isfile(path):
        raise ManifestError(f"{path}: missing (make the shards with htr-prepare)")
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except json.JSONDecodeError as err:
        raise ManifestError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(manifest, dict):
        raise ManifestError(f"{path}: expected a JSON object, got {type(manifest).__name__}")
    for key in ("alphabet", "splits"):
        if key not in manifest:
            raise ManifestError(f"{path}: no '{key}' entry")
    if manifest.get("version", 1) != 1:
        raise ManifestError(f"{path}: version {manifest['version']!r} is not supported (expected 1)")
    if not isinstance(manifest["alphabet"], str) or not isinstance(manifest["splits"], dict):
        raise ManifestError(f"{path}: 'alphabet' must be a string and 'splits' an object")
    if not manifest["alphabet"]:
        raise ManifestError(f"{path}: 'alphabet' is empty: a model could only learn the blank")
    repeated = sorted({c for c in manifest["alphabet"] if manifest["alphabet"].count(c) > 1})
    if repeated:
        raise ManifestError(f"{path}: 'alphabet' lists {repeated[0]!r} more than once: each character needs one class")
    for split, info in manifest["splits"].items():
        if not isinstance(info, dict) or not isinstance(info.get("shards"), list):
            raise ManifestError(f"{path}: split {split!r} has no 'shards' list")
        for entry in info["shards"]:
            if not isinstance(entry, dict) or not {"file", "count"} <= set(entry):
                raise ManifestError(f"{path}: split {split!r}: shard entry {entry!r} lacks 'file' or 'count'")
            shard = os.path.join(folder, entry["file"])
            if not os.path.isfile(shard):
                raise ManifestError(f"{path}: split {split!r} lists {entry['file']}, which is not in {folder}")
            if not isinstance(entry["count"], int) or isinstance(entry["count"], bool) or entry["count"] < 0:
                raise ManifestError(f"{path}: split {split!r}: {entry['file']}: 'count' must be a whole number >= 0, "
                                    f"got {entry['count']!r}")
            size = entry.get("bytes")
            if check_sizes and size is not None and os.path.getsize(shard) != size:  # the cheap check; --verify reads every byte
                raise ManifestError(f"{shard}: {os.path.getsize(shard)} bytes, but the manifest says {size}: the shard "
                                    "was cut or changed after it was written (htr-prepare --verify checks them all)")
        total = sum(e["count"] for e in info["shards"])
        if info.get("lines", total) != total:
            raise ManifestError(f"{path}: split {split!r} says {info['lines']} lines but its shards hold {total}")
    manifest["_folder"] = folder
    return manifest


def verify_shards(folder: str) -> List[str]:
    """Every shard of ``folder``'s manifest read whole and checked against its SHA-256 (and size): the problems, one
    line each naming the file; an empty list if all match."""
    manifest = load_manifest(folder, check_sizes=False)
    problems = []
    for split, info in sorted(manifest["splits"].items()):
        for entry in info["shards"]:
            path = os.path.join(folder, entry["file"])
            want = entry.get("sha256")
            if entry.get("bytes") is not None and os.path.getsize(path) != entry["bytes"]:
                problems.append(f"{path}: {os.path.getsize(path)} bytes, but the manifest says {entry['bytes']} "
                                f"({split} split): cut or changed; prepare the shards again")
            elif not want:
                problems.append(f"{path}: the manifest records no sha256 for it")
            elif sha256(path) != want:
                problems.append(f"{path}: its SHA-256 differs from the manifest's ({split} split, {entry['count']} "
                                "lines): damaged or changed; prepare the shards again")
    return problems


def split_lines(manifest: dict, split: str) -> int:
    """The lines the manifest says ``split`` holds."""
    return sum(int(e["count"]) for e in manifest["splits"][split]["shards"])


# -- reading ------------------------------------------------------------------------------------------------------

_META = re.compile(r"__[^/]*__($|/)")  # names webdataset reserves (skipped, as it does)


class ShardReadError(InputError, ValueError):
    """A tar shard cannot be read on from some point (truncated, corrupt header, duplicate member)."""


def tar_members(f, url: str) -> Iterator[tuple]:
    """(name, data) of each regular file of an uncompressed tar stream, read by webdataset's own tar iterator
    (Python's ``tarfile`` underneath: ustar, GNU and PAX). Its errors become one :class:`ShardReadError` naming the
    shard. ``tarfile`` takes a stream that stops at a member boundary, or at a header it cannot parse, for the end of
    the archive: :func:`tar_samples` catches both with the manifest's sample count."""
    try:
        for member in wds.tariterators.tar_file_iterator(f, skip_meta=None):
            yield member["fname"], member["data"]
    except (tarfile.TarError, EOFError) as err:
        raise ShardReadError(f"{url}: {str(err).split(' @ ')[0]} (truncated or corrupt shard?)") from None


def tar_samples(sources: Iterable[dict], handler: Callable[[Exception], bool]) -> Iterator[dict]:
    """WebDataset samples (``__key__``, ``__url__``, one bytes value per extension) of the shards ``{"url": path}``.

    A source may also name ``first`` and ``stop``: only the shard's samples ``first <= i < stop`` (counted from 0) are
    passed on, and reading stops at ``stop``; and ``count``, the samples the manifest says the shard holds. A shard
    that ends before ``stop``, or read to its end holds other than ``count`` samples, goes to ``handler`` as well, and
    so does one where a piece that stops at ``count`` meets a sample after it. A shard that cannot be read on
    (missing, truncated, corrupt) goes to ``handler``, and reading goes on with the next shard if the handler returns
    True. The sample being assembled at that point is still passed on with the members read in whole, so that a
    consumer that needs the missing ones reports it by key.
    """
    for source in sources:
        url, sample, index, ended, beyond = source["url"], None, 0, False, False
        first, stop, count = source.get("first", 0), source.get("stop"), source.get("count")
        try:
            with open(url, "rb", buffering=1 << 20) as f:
                for name, data in tar_members(f, url):
                    if _META.match(name):
                        continue
                    slash = name.rfind("/") + 1
                    dot = name.find(".", slash)
                    if dot <= slash:
                        continue  # no extension: not part of a sample (webdataset skips these too)
                    key, ext = name[:dot], name[dot + 1 :].lower()
                    if sample is None or sample["__key__"] != key:
                        if sample is not None:
                            if index >= first:
                                yield sample
                            index += 1
                            if stop is not None and index >= stop:
                                beyond = count is not None and index >= count  # a sample past the manifest's count
                                sample = None
                                break
                        sample = {"__key__": key, "__url__": url}
                    elif ext in sample:
                        raise ShardReadError(f"{url}: member {name} appears twice in sample {key}")
                    sample[ext] = data
                else:
                    ended = True  # read to the end-of-archive blocks
        except (OSError, ValueError) as exn:  # ShardReadError and UnicodeDecodeError are ValueErrors
            expected = stop if stop is not None else count
            if expected is not None:  # the lines of this piece not read: what a skip of the shard costs
                exn.lines_lost = max(1, expected - max(first, index + (sample is not None)))
            if not handler(exn):
                raise
        total = index + (sample is not None)
        if sample is not None and index >= first:
            yield sample  # after an error too: its members are whole, and a sample missing one is named downstream
        found = None  # how many samples the shard was seen to hold, where that contradicts the manifest
        if ended and ((stop is not None and total < stop) or (count is not None and total != count)):
            found = f"{total} samples, but the manifest counts {count if count is not None else stop}"
        elif beyond:  # (a piece that breaks off at stop has not ended)
            found = f"more than the {count} samples the manifest counts"
        if found:
            exn = ShardReadError(f"{url}: {found} (changed after it was written?)")
            expected = stop if stop is not None else count
            if expected is not None and total < expected:
                exn.lines_lost = expected - max(first, total)
            if not handler(exn):
                raise exn


def split_texts(folder: str, split: str = "train") -> List[str]:
    """Every transcription of ``split`` in a shard folder, in shard order (the images are not decoded)."""
    manifest = load_manifest(folder)
    info = manifest["splits"].get(split)
    if not info or not info["shards"]:
        raise ManifestError(f"{os.path.join(folder, 'manifest.json')}: no lines in split {split!r}")
    texts = []
    sources = ({"url": os.path.join(folder, s["file"]), "count": s["count"]} for s in info["shards"])
    for sample in tar_samples(sources, lambda err: False):  # a damaged shard is an error naming it
        if "txt" in sample:
            texts.append(sample["txt"].decode("utf-8"))
    return texts
