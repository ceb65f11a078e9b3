"""IAM (real or synthetic, same format) -> WebDataset shards + manifest, in parallel, atomically, reporting problems.

Every line that cannot be used (missing form image, malformed XML, empty transcription, form in no split list) is
named in the log, counted in the summary and recorded in the manifest's ``problems``: nothing is dropped silently.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
from collections import Counter, defaultdict
from dataclasses import dataclass, field, replace
from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np
from PIL import Image
from tqdm import tqdm

from htr_dist.data import iam
from htr_dist.data.shards import png_bytes, write_manifest, write_split

log = logging.getLogger(__name__)


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
        return np.asarray(im.convert("L"), dtype=np.uint8)


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


def prepare(opt: PrepareOptions, progress: bool = True) -> dict:
    """Write ``opt.out_dir/{train,val,test}-%06d.tar`` and ``manifest.json``; return the manifest."""
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

            entries[split] = write_split(stream(), opt.out_dir, split, opt.shard_size)
            log.info("%s: %d lines in %d shard(s)", split, sum(e["count"] for e in entries[split]),
                     len(entries[split]))
    bar.close()
    alphabet = "".join(sorted(set("".join(texts["train"]))))
    problems = {"counts": dict(counts), "total": sum(counts.values()), "messages": opt.problems[:1000]}
    source = f"{opt.source}: {os.path.abspath(opt.forms_dir)}"
    manifest = write_manifest(opt.out_dir, opt.name or os.path.basename(os.path.normpath(opt.out_dir)), source,
                              entries, alphabet, problems)
    return manifest


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
