"""IAM (real or synthetic, same format) -> WebDataset shards + manifest, in parallel, atomically, reporting problems.

Every line that cannot be used (missing form image, malformed XML, empty transcription, form in no split list) is
named in the log, counted in the summary and recorded in the manifest's ``problems``: nothing is dropped silently.

A run replaces the previous output as a whole or not at all: every split and the manifest are first written into a
staging folder ``OUT/.staging-<pid>`` (hidden, never named by a manifest, so never read as data), and only a complete
staging folder is moved into ``OUT`` (:func:`_commit`). A failed or interrupted run leaves ``OUT`` as it was; the
staging folder a killed run leaves behind is removed, or its move completed, by the next run (:func:`_recover`).
"""

from __future__ import annotations

import glob
import json
import logging
import multiprocessing as mp
import os
import shutil
from collections import Counter, defaultdict
from dataclasses import dataclass, field, replace
from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np
from PIL import Image
from tqdm import tqdm

from htr_dist.data import iam
from htr_dist.data.shards import MANIFEST, SPLITS, png_bytes, write_manifest, write_split
from htr_dist.data.transforms import gray8

log = logging.getLogger(__name__)

STAGING = ".staging-"
"""Prefix of the staging folder inside the output folder; the process id follows."""


@dataclass
class PrepareOptions:
    forms_dir: str
    """Folder holding formsA-D/ formsE-H/ formsI-Z/ or forms/ (source=forms), or lines/ (source=lines)."""
    xml_dir: str
    splits_dir: str
    out_dir: str
    source: str = "forms"
    lines_txt: Optional[str] = None
    scale: float = 1.0
    margin: int = 8
    shard_size: int = 2000
    workers: int = 0
    name: str = ""
    problems: List[str] = field(default_factory=list)


def _load_gray(path: str) -> np.ndarray:
    with Image.open(path) as im:
        return gray8(im)


def _form_samples(job: Tuple[str, PrepareOptions, list]) -> Tuple[List[dict], List[Tuple[str, str]]]:
    """Worker: the shard samples of one form, and the (kind, message) problems met on the way."""
    form_id, opt, lines = job
    problems: List[Tuple[str, str]] = []
    samples = []
    if opt.source == "forms":
        path = iam.find_form_image(opt.forms_dir, form_id)
        if path is None:  # one message per line, so each unwritten line is named
            where = f"form image {form_id}.png not found in {' or '.join(iam.FORM_FOLDERS)} under {opt.forms_dir}"
            return [], [("missing_form_image", f"{where}: line {l.id} not written") for l in lines]
        try:
            page = _load_gray(path)
        except (OSError, ValueError) as err:
            return [], [("unreadable_image", f"{path}: cannot decode ({err}); line {l.id} not written") for l in lines]
    for line in lines:
        try:
            if opt.source == "forms":
                crop = iam.crop_line(page, line.bbox, opt.margin, opt.scale)
            else:
                line_path = iam.line_image_path(opt.forms_dir, line.id)
                if not os.path.isfile(line_path):
                    problems.append(("missing_line_image", f"{line_path}: not found; line {line.id} not written"))
                    continue
                crop = _load_gray(line_path)
                if opt.scale != 1.0:
                    crop = iam.crop_line(crop, (0, 0, crop.shape[1], crop.shape[0]), 0, opt.scale)
        except (OSError, ValueError) as err:
            problems.append(("unreadable_image", f"line {line.id}: {err}"))
            continue
        meta = {"form_id": line.form_id, "writer_id": line.writer_id, "bbox": list(line.bbox),
                "segmentation": line.segmentation}
        samples.append({"key": line.id, "png": png_bytes(crop), "text": line.text, "meta": meta})
    return samples, problems


def collect_lines(opt: PrepareOptions) -> Tuple[Dict[str, list], Counter]:
    """Form id -> its usable lines, and the counted problems (also appended to ``opt.problems``)."""
    counts: Counter = Counter()
    forms: Dict[str, list] = defaultdict(list)
    writers: Dict[str, str] = {}
    xml_files = sorted(f for f in os.listdir(opt.xml_dir) if f.endswith(".xml"))
    for name in xml_files:
        path = os.path.join(opt.xml_dir, name)
        try:
            record = iam.parse_form_xml(path)
        except iam.IAMFormatError as err:
            counts["malformed_xml"] += 1
            opt.problems.append(str(err))
            log.error("%s", err)
            continue
        writers[record.id] = record.writer_id
        if opt.source == "forms":  # with source=lines the XML only gives writer ids; lines.txt is checked below
            for msg in record.problems:
                counts["empty_transcription" if "empty transcription" in msg else "no_boxes"] += 1
                opt.problems.append(msg)
                log.warning("%s", msg)
            forms[record.id].extend(record.lines)
    if opt.source == "lines":
        for line in iam.parse_lines_txt(opt.lines_txt):
            if not line.text.strip():
                counts["empty_transcription"] += 1
                opt.problems.append(f"{opt.lines_txt}: line {line.id}: empty transcription")
                log.warning("%s", opt.problems[-1])
                continue
            line.writer_id = writers.get(line.form_id, "")
            forms[line.form_id].append(line)
    return forms, counts


def _pid_running(pid: int) -> bool:
    """Whether another process with this id runs on this machine (our own id: an earlier call in this process)."""
    if pid == os.getpid() or os.name != "posix":  # (on Windows os.kill would end the process)
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    except OSError:
        return False
    return True


def _discard(staging: str) -> None:
    shutil.rmtree(staging, ignore_errors=True)


def _staged_files(staging: str) -> Optional[List[str]]:
    """The shard files named by the staging folder's manifest; None when the folder holds no complete manifest."""
    try:
        with open(os.path.join(staging, MANIFEST), encoding="utf-8") as f:
            manifest = json.load(f)
        return [e["file"] for info in manifest["splits"].values() for e in info["shards"]]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def _commit(staging: str, out_dir: str) -> None:
    """Move the shards and manifest of a complete staging folder into ``out_dir``, replacing the previous output.

    Order: the old manifest is removed first, then the new shards are renamed in (over same-named old ones), then
    the new manifest is renamed in, and only then are the old shards that it does not name removed. A reader that
    checks the manifest therefore sees the old output, no manifest (during these few renames), or the new output;
    never a manifest beside shards of another run. Interrupted half-way, the staging folder still holds the new
    manifest and the shards not yet moved, and the next run completes the move (:func:`_recover`).
    """
    files = _staged_files(staging)
    if files is None:
        raise RuntimeError(f"{staging}: no complete {MANIFEST}; not moved into {out_dir}")
    old = os.path.join(out_dir, MANIFEST)
    if os.path.exists(old):
        os.unlink(old)
    for name in files:
        if os.path.exists(os.path.join(staging, name)):  # absent: moved already by an interrupted commit
            os.replace(os.path.join(staging, name), os.path.join(out_dir, name))
    os.replace(os.path.join(staging, MANIFEST), old)
    keep, folder = set(files), glob.escape(out_dir)
    for split in SPLITS:
        stale = [p for p in glob.glob(os.path.join(folder, f"{split}-*.tar")) if os.path.basename(p) not in keep]
        stale += glob.glob(os.path.join(folder, f".{split}-*.tar.tmp"))  # left in OUT by a run of older code
        for path in stale:
            os.unlink(path)
    _discard(staging)


def _recover(out_dir: str) -> None:
    """Deal with the staging folders that earlier runs left in ``out_dir`` (killed, so they could not clean up).

    A complete staging folder (its manifest written) whose move was interrupted (``out_dir`` has no manifest) is
    moved in, so the output is whole again; any other is removed. A folder of a process that is still running
    (e.g. another prepare writing to the same output) is left alone and reported.
    """
    for staging in sorted(glob.glob(os.path.join(glob.escape(out_dir), STAGING + "*"))):
        if not os.path.isdir(staging):
            continue
        suffix = os.path.basename(staging)[len(STAGING):]
        pid = int(suffix) if suffix.isdigit() else None
        if pid is not None and _pid_running(pid):
            log.warning("%s: staging folder of process %d, which is still running: left alone (remove it by hand "
                        "if no prepare_iam.py is writing to %s)", staging, pid, out_dir)
            continue
        files = _staged_files(staging)
        if (files is not None and not os.path.exists(os.path.join(out_dir, MANIFEST))
                and all(os.path.isfile(os.path.join(staging, f)) or os.path.isfile(os.path.join(out_dir, f))
                        for f in files)):
            log.warning("%s: completing the replacement of %s that an interrupted run started", staging, out_dir)
            _commit(staging, out_dir)
        else:
            log.warning("%s: removing the staging folder left by an interrupted run", staging)
            _discard(staging)


def prepare(opt: PrepareOptions, progress: bool = True) -> dict:
    """Write ``opt.out_dir/{train,val,test}-%06d.tar`` and ``manifest.json``; return the manifest.

    All of it is written into ``opt.out_dir/.staging-<pid>`` first and moved in only once complete (see the module
    docstring): if writing fails or is interrupted, ``opt.out_dir`` holds the previous output, untouched; if the
    final renames are interrupted, the next run completes them.
    """
    for label, folder in (("form images", opt.forms_dir), ("xml", opt.xml_dir), ("splits", opt.splits_dir)):
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"{label} folder not found: {folder}")
    if opt.source == "lines" and not (opt.lines_txt and os.path.isfile(opt.lines_txt)):
        raise FileNotFoundError(f"lines.txt not found: {opt.lines_txt}")
    if opt.source == "lines" and not os.path.isdir(os.path.join(opt.forms_dir, "lines")):
        raise FileNotFoundError(f"line image folder not found: {os.path.join(opt.forms_dir, 'lines')}")
    if opt.source == "forms":
        iam.form_folders(opt.forms_dir)  # raises naming the folder when no forms*/ folder is there
    if not any(f.endswith(".xml") for f in os.listdir(opt.xml_dir)):
        raise FileNotFoundError(f"no *.xml files in the xml folder {opt.xml_dir}")
    split_of = iam.read_split_lists(opt.splits_dir)
    forms, counts = collect_lines(opt)
    by_split: Dict[str, List[str]] = defaultdict(list)
    for form_id in sorted(forms):
        split = split_of.get(form_id)
        if split is None:
            counts["form_in_no_split"] += len(forms[form_id])
            ids = ", ".join(l.id for l in forms[form_id])
            opt.problems.append(f"form {form_id}: in no *.uttlist under {opt.splits_dir}; lines not written: {ids}")
            log.warning("%s", opt.problems[-1])
            continue
        by_split[split].append(form_id)
    _recover(opt.out_dir)
    staging = os.path.join(opt.out_dir, f"{STAGING}{os.getpid()}")
    os.makedirs(staging)
    try:
        manifest = _write_staging(opt, staging, forms, counts, by_split, progress)
    except BaseException:  # failed or interrupted (Ctrl-C): the previous output stays as it was
        _discard(staging)
        raise
    try:
        _commit(staging, opt.out_dir)
    except BaseException:
        log.error("moving %s into %s was interrupted; the next run completes it", staging, opt.out_dir)
        raise
    return manifest


def _write_staging(opt: PrepareOptions, staging: str, forms: Dict[str, list], counts: Counter,
                   by_split: Dict[str, List[str]], progress: bool) -> dict:
    """Write every split's shards, then the manifest, into ``staging``; return the manifest."""
    workers = opt.workers or os.cpu_count() or 1
    log.info("%s source, %d forms with usable lines; forms per split: %s; %d worker(s) -> %s", opt.source, len(forms),
             {k: len(by_split.get(k, [])) for k in ("train", "val", "test")}, workers, opt.out_dir)
    job_opt = replace(opt, problems=[])  # the workers need the options, not the messages gathered so far
    bar = tqdm(total=sum(len(v) for v in by_split.values()), desc="forms", unit="form", disable=not progress)
    texts: Dict[str, List[str]] = defaultdict(list)
    entries = {}
    ctx = mp.get_context("fork") if hasattr(os, "fork") else mp.get_context()
    with ctx.Pool(workers) as pool:
        for split in ("train", "val", "test"):
            jobs = [(f, job_opt, forms[f]) for f in by_split.get(split, [])]

            def stream(jobs=jobs, split=split) -> Iterator[dict]:
                for samples, problems in pool.imap(_form_samples, jobs, chunksize=4):
                    bar.update(1)
                    for kind, msg in problems:
                        counts[kind] += 1
                        opt.problems.append(msg)
                        log.warning("%s", msg)
                    for s in samples:
                        texts[split].append(s["text"])
                        yield s

            entries[split] = write_split(stream(), staging, split, opt.shard_size)
            log.info("%s: %d lines in %d shard(s)", split, sum(e["count"] for e in entries[split]),
                     len(entries[split]))
    bar.close()
    alphabet = "".join(sorted(set("".join(texts["train"]))))
    problems = {"counts": dict(counts), "total": sum(counts.values()), "messages": opt.problems[:1000]}
    source = f"{opt.source}: {os.path.abspath(opt.forms_dir)}"
    return write_manifest(staging, opt.name or os.path.basename(os.path.normpath(opt.out_dir)), source, entries,
                          alphabet, problems)  # last: a staging folder with a manifest is complete


def summary(manifest: dict) -> str:
    lines = [f"{split}: {info['lines']} lines in {len(info['shards'])} shard(s)"
             for split, info in manifest["splits"].items()]
    lines.append(f"alphabet: {len(manifest['alphabet'])} characters")
    problems = manifest["problems"]
    if problems["total"]:
        lines.append(f"NOT written: {problems['total']} line(s): " +
                     ", ".join(f"{k} {v}" for k, v in sorted(problems["counts"].items())))
    else:
        lines.append("no problems: every line was written")
    return "\n".join(lines)
