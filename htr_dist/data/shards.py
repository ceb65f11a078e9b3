"""Writing and reading WebDataset shards of text lines, and their ``manifest.json``.

Per sample: ``__key__`` (the IAM line id), ``png`` (8-bit grayscale), ``txt`` (UTF-8 transcription) and ``json``
(form id, writer id, bbox, segmentation status). Shards are written under temporary names and renamed when complete,
so an interrupted run never leaves a half-written ``*.tar`` that a loader would read.
"""

from __future__ import annotations

import glob
import hashlib
import io
import json
import os
from typing import Iterable, List

import numpy as np
import webdataset as wds
from PIL import Image

from htr_dist.io_utils import atomic_write_json

MANIFEST = "manifest.json"
SPLITS = ("train", "val", "test")


class ManifestError(ValueError):
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
        # a fixed mtime makes the shards byte-for-byte reproducible (the manifest sha256 then identifies the content)
        with wds.ShardWriter(pattern, maxcount=max_count, verbose=0, mtime=0.0) as writer:
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
        entries.append({"file": os.path.basename(final), "count": counts[tmp], "sha256": sha256(final)})
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


def load_manifest(folder: str) -> dict:
    """Read and check ``folder/manifest.json``; the returned dict also carries ``_folder``."""
    path = os.path.join(folder, MANIFEST)
    if not os.path.isdir(folder):
        raise ManifestError(f"shard folder not found: {folder} (make it with launch/prepare_iam.py)")
    if not os.path.isfile(path):
        raise ManifestError(f"{path}: missing (make the shards with launch/prepare_iam.py)")
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
    for split, info in manifest["splits"].items():
        if not isinstance(info, dict) or not isinstance(info.get("shards"), list):
            raise ManifestError(f"{path}: split {split!r} has no 'shards' list")
        for entry in info["shards"]:
            if not isinstance(entry, dict) or not {"file", "count"} <= set(entry):
                raise ManifestError(f"{path}: split {split!r}: shard entry {entry!r} lacks 'file' or 'count'")
            if not os.path.isfile(os.path.join(folder, entry["file"])):
                raise ManifestError(f"{path}: split {split!r} lists {entry['file']}, which is not in {folder}")
        total = sum(e["count"] for e in info["shards"])
        if info.get("lines", total) != total:
            raise ManifestError(f"{path}: split {split!r} says {info['lines']} lines but its shards hold {total}")
    manifest["_folder"] = folder
    return manifest
