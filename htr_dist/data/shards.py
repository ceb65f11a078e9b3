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
    buf = io.BytesIO()
    Image.fromarray(gray, mode="L").save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_split(samples: Iterable[dict], out_dir: str, split: str, max_count: int = 2000) -> List[dict]:
    """Write ``samples`` (dicts with key, png bytes, text, meta) as ``split-%06d.tar``; return the shard entries.

    Each shard is written as ``.split-%06d.tar.tmp`` and renamed once closed. Old shards of the split are removed
    only after the new ones are complete.
    """
    os.makedirs(out_dir, exist_ok=True)
    pattern = os.path.join(out_dir, f".{split}-%06d.tar.tmp")
    counts: dict = {}
    # a fixed mtime makes the shards byte-for-byte reproducible (the manifest sha256 then identifies the content)
    with wds.ShardWriter(pattern, maxcount=max_count, verbose=0, mtime=0.0) as writer:
        for s in samples:
            writer.write({"__key__": s["key"], "png": s["png"], "txt": s["text"].encode("utf-8"),
                          "json": json.dumps(s["meta"], ensure_ascii=False).encode("utf-8")})
            counts[writer.fname] = counts.get(writer.fname, 0) + 1
    for old in glob.glob(os.path.join(out_dir, f"{split}-*.tar")):
        os.unlink(old)
    entries = []
    for tmp in sorted(counts):
        final = os.path.join(out_dir, os.path.basename(tmp)[1:-4])
        os.replace(tmp, final)
        entries.append({"file": os.path.basename(final), "count": counts[tmp], "sha256": sha256(final)})
    return entries


def write_manifest(out_dir: str, name: str, source: str, splits: dict, alphabet: str, problems: dict) -> dict:
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
    for key in ("alphabet", "splits"):
        if key not in manifest:
            raise ManifestError(f"{path}: no '{key}' entry")
    for split, info in manifest["splits"].items():
        for entry in info.get("shards", []):
            if not os.path.isfile(os.path.join(folder, entry["file"])):
                raise ManifestError(f"{path}: split {split!r} lists {entry['file']}, which is not in {folder}")
    manifest["_folder"] = folder
    return manifest
