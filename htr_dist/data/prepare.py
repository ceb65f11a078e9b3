"""IAM (real or synthetic, same format) -> WebDataset shards + manifest, in parallel, atomically, reporting problems.

Every line that cannot be used (missing form image, malformed XML, empty transcription, form or line in no split
list, XML and lines.txt disagreeing), every line written with a flaw (writer id unknown, or lines.txt's token spacing:
no readable XML gives them) and every form of the split lists without lines is named in the log, counted in the summary
and recorded in the manifest's ``problems`` (see :class:`Problems`): nothing is dropped silently.

A split left without lines, or a line id met twice, is an error: nothing is written. Either source takes a line's
transcription from its form's XML (``text``, spaced as written); ``source=lines`` checks it against lines.txt's word
tokens, which have a space before every punctuation mark and clitic.

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
from typing import Dict, Iterator, List, Optional, Set, Tuple

import numpy as np
from PIL import Image
from tqdm import tqdm

from htr_dist.data import iam
from htr_dist.data.shards import EXTRA_SPLITS, MANIFEST, SPLITS, png_bytes, write_manifest, write_split
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


@dataclass
class Problems:
    """The problems met, counted by kind in the unit each kind is counted in; each is also named in the messages."""

    lines: Counter = field(default_factory=Counter)
    """Lines NOT written, per kind: the manifest's ``counts``, whose sum is its ``total``. Among them
    ``text_mismatch`` (source=lines: the XML's ``text`` and lines.txt's tokens differ in more than spaces, and which
    is right is unknown), ``form_in_no_split`` and, with lists of line ids, ``line_in_no_split`` and
    ``split_line_not_found`` (listed, but the data has no such line)."""
    written: Counter = field(default_factory=Counter)
    """Lines written with a flaw (source=lines): ``writer_id_unknown`` (written with writer_id "": no readable XML
    gives it) and ``text_from_lines_txt`` (no readable XML has the line, so its text is lines.txt's word tokens joined
    by spaces: a space before every punctuation mark and clitic, which the ink does not have)."""
    forms: Counter = field(default_factory=Counter)
    """Forms: ``malformed_xml`` (XML files that cannot be parsed), ``malformed_xml_lines_unknown`` (of these, with
    source=forms, those whose unwritten lines no lines.txt lists, so they are not in ``lines``: how many is unknown),
    ``split_form_without_lines`` (in a split list, but no XML or no line of it)."""

    def manifest(self, messages: List[str]) -> dict:
        return {"counts": dict(self.lines), "total": sum(self.lines.values()), "written": dict(self.written),
                "forms": dict(self.forms), "messages": messages[:1000]}


@dataclass
class Collected:
    """What :func:`collect_lines` found."""

    forms: Dict[str, list]
    """Form id -> its usable lines."""
    problems: Problems
    present: Set[str]
    """Form ids with any line, usable or not, or with an XML file that cannot be parsed."""
    xml_of: Dict[str, str]
    """Form id -> its XML file (the form id of a file that cannot be parsed is its file name)."""
    line_ids: Set[str] = field(default_factory=set)
    """Every line id met, usable or not (in the XML, or in lines.txt with source=lines or for a malformed XML)."""


def _report(opt: PrepareOptions, msg: str, level: int = logging.WARNING) -> None:
    """Name one problem in the log and in the manifest's messages."""
    opt.problems.append(msg)
    log.log(level, "%s", msg)


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
        except (OSError, ValueError, Image.DecompressionBombError) as err:
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
        except (OSError, ValueError, Image.DecompressionBombError) as err:
            problems.append(("unreadable_image", f"line {line.id}: {err}"))
            continue
        meta = {"form_id": line.form_id, "writer_id": line.writer_id, "bbox": list(line.bbox),
                "segmentation": line.segmentation}
        samples.append({"key": line.id, "png": png_bytes(crop), "text": line.text, "meta": meta})
    return samples, problems


def _lines_txt_ids(opt: PrepareOptions) -> Tuple[Optional[Dict[str, List[str]]], str]:
    """Form id -> its line ids in lines.txt, to name the lines of a form whose XML cannot be parsed (source=forms);
    None and the reason when there is no usable lines.txt."""
    if not (opt.lines_txt and os.path.isfile(opt.lines_txt)):
        return None, "no lines.txt to list them" + (f" ({opt.lines_txt} not found)" if opt.lines_txt else "")
    try:
        records = iam.parse_lines_txt(opt.lines_txt)
    except iam.IAMFormatError as err:
        return None, f"lines.txt cannot list them: {err}"
    ids: Dict[str, List[str]] = defaultdict(list)
    for line in records:
        ids[line.form_id].append(line.id)
    return ids, f"{opt.lines_txt} lists none of its lines"


def collect_lines(opt: PrepareOptions) -> Collected:
    """Every form's usable lines, and the problems met (named in ``opt.problems`` and the log).

    A form id named by two XML files, or a line id met twice (in lines.txt, in one XML or in two), raises
    IAMFormatError naming the files: it would give two samples of one key (a test line scored twice).
    """
    problems = Problems()
    forms: Dict[str, list] = defaultdict(list)
    present: Set[str] = set()
    writers: Dict[str, str] = {}
    xml_of: Dict[str, str] = {}
    line_xml: Dict[str, str] = {}
    xml_text: Dict[str, str] = {}  # line id -> its XML text (source=lines)
    line_ids: Set[str] = set()  # besides the XML's (xml_text): those only lines.txt names
    broken: Dict[str, str] = {}  # form id (file name) -> why its XML cannot be parsed
    for name in sorted(f for f in os.listdir(opt.xml_dir) if f.endswith(".xml")):
        path = os.path.join(opt.xml_dir, name)
        try:
            record = iam.parse_form_xml(path)
        except iam.IAMFormatError as err:
            broken[name[: -len(".xml")]] = str(err)
            xml_of.setdefault(name[: -len(".xml")], path)
            continue
        if record.id in writers:
            raise iam.IAMFormatError(f"{path}: form id {record.id} is already the id of {xml_of[record.id]}")
        writers[record.id] = record.writer_id
        xml_of[record.id] = path
        for line_id in record.texts:  # every <line>: with either source its text may be the one written
            if line_id in line_xml:
                raise iam.IAMFormatError(f"{path}: line id {line_id} is already a line of {line_xml[line_id]}")
            line_xml[line_id] = path
        xml_text.update(record.texts)
        if not record.writer_id and (record.lines or opt.source == "lines"):
            _report(opt, f"{path}: <form> has no writer-id; its lines are written with writer_id \"\"")
        if opt.source == "forms":  # with source=lines the XML gives writer ids and texts; lines.txt is read below
            for msg in record.problems:
                problems.lines["empty_transcription" if "empty transcription" in msg else "no_boxes"] += 1
                _report(opt, msg)
            forms[record.id].extend(record.lines)
            if record.lines or record.problems:
                present.add(record.id)
    if opt.source == "forms" and broken:
        listed, why = _lines_txt_ids(opt)
        for form_id, err in sorted(broken.items()):
            problems.forms["malformed_xml"] += 1
            present.add(form_id)
            ids = (listed or {}).get(form_id, [])
            line_ids.update(ids)
            if ids:
                problems.lines["malformed_xml"] += len(ids)
                _report(opt, f"{err}; lines not written: {', '.join(ids)}", logging.ERROR)
            else:
                problems.forms["malformed_xml_lines_unknown"] += 1
                _report(opt, f"{err}; its lines are not written, how many is unknown: {why}", logging.ERROR)
    if opt.source == "lines":
        unknown: Dict[str, List[str]] = defaultdict(list)  # form id without a readable XML -> its usable line ids
        for line in iam.parse_lines_txt(opt.lines_txt):  # a line id listed twice raises there
            present.add(line.form_id)
            line_ids.add(line.id)
            if not line.text.strip():
                problems.lines["empty_transcription"] += 1
                _report(opt, f"{opt.lines_txt}: line {line.id}: empty transcription")
                continue
            text = xml_text.get(line.id)
            if text is None:
                problems.written["text_from_lines_txt"] += 1
                if line.form_id in writers:  # else the form's message below says it
                    _report(opt, f"{xml_of[line.form_id]}: no line {line.id}; its text is {opt.lines_txt}'s word "
                                 f"tokens, a space before every punctuation mark: {line.text!r}")
            elif not iam.same_text(text, line.text):
                problems.lines["text_mismatch"] += 1
                _report(opt, f"line {line.id}: the text of {xml_of[line.form_id]} and of {opt.lines_txt} differ in "
                             f"more than spaces ({text!r} vs {line.text!r}); line not written")
                continue
            else:
                line.text = text  # spaced as written
            if line.form_id not in writers:
                unknown[line.form_id].append(line.id)
            line.writer_id = writers.get(line.form_id, "")
            forms[line.form_id].append(line)
        for form_id, err in sorted(broken.items()):
            problems.forms["malformed_xml"] += 1
            if form_id not in unknown:
                _report(opt, f"{err}; {opt.lines_txt} lists no usable line of form {form_id}", logging.ERROR)
        for form_id, ids in sorted(unknown.items()):
            why = broken.get(form_id) or f"form {form_id}: no XML file for it in {opt.xml_dir}"
            _report(opt, f"{why}; writer id unknown: its lines from {opt.lines_txt} are written with writer_id \"\" "
                         f"and their word tokens for text (a space before every punctuation mark): {', '.join(ids)}")
    return Collected(forms, problems, present, xml_of, line_ids | xml_text.keys())


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
    for split in SPLITS + EXTRA_SPLITS:
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
    found = collect_lines(opt)
    forms, problems = found.forms, found.problems
    by_split = _assign_splits(opt, split_of, found)
    for split in SPLITS:
        if not any(lines for _, lines in by_split.get(split, [])):
            listed = sorted(i for i, s in split_of.items() if s == split)
            if not listed:
                raise iam.IAMFormatError(f"split {split!r}: no split list under {opt.splits_dir} names a form or line "
                                         f"for it")
            kind = "line(s)" if iam.is_line_id(listed[0]) else "form(s)"
            raise iam.IAMFormatError(f"split {split!r}: no line to write: none of its {len(listed)} {kind} listed "
                                     f"under {opt.splits_dir} has a usable line ({_some(listed)}; see the problems "
                                     f"above); nothing written to {opt.out_dir}")
    _recover(opt.out_dir)
    staging = os.path.join(opt.out_dir, f"{STAGING}{os.getpid()}")
    os.makedirs(staging)
    try:
        manifest = _write_staging(opt, staging, forms, problems, by_split, progress)
    except BaseException:  # failed or interrupted (Ctrl-C): the previous output stays as it was
        _discard(staging)
        raise
    try:
        _commit(staging, opt.out_dir)
    except BaseException:
        log.error("moving %s into %s was interrupted; the next run completes it", staging, opt.out_dir)
        raise
    return manifest


def _assign_splits(opt: PrepareOptions, split_of: Dict[str, str], found: Collected
                   ) -> Dict[str, List[Tuple[str, list]]]:
    """Split -> [(form id, its usable lines in that split)], from lists of form ids (a form's lines go together) or
    of line ids (IAM's task lists: each line where it is listed). Lines in no list, and listed forms or lines that the
    data does not have, are reported."""
    problems, forms = found.problems, found.forms
    by_line = any(iam.is_line_id(i) for i in split_of)  # read_split_lists allows one kind
    by_split: Dict[str, List[Tuple[str, list]]] = defaultdict(list)
    for form_id in sorted(forms):
        groups: Dict[Optional[str], list] = defaultdict(list)
        for line in forms[form_id]:
            groups[split_of.get(line.id if by_line else form_id)].append(line)
        lost = groups.pop(None, [])
        if lost:
            kind = "line_in_no_split" if by_line else "form_in_no_split"
            problems.lines[kind] += len(lost)
            what = "lines of it in no split list" if by_line else "in no split list"
            _report(opt, f"form {form_id}: {what} under {opt.splits_dir}; lines not written: "
                         f"{', '.join(l.id for l in lost)}")
        for split, lines in sorted(groups.items()):
            by_split[split].append((form_id, lines))
    if by_line:  # the reverse: listed, but no such line in the data (a line that is there but unusable is reported)
        absent: Dict[str, List[str]] = defaultdict(list)
        for line_id, split in sorted(split_of.items()):
            if line_id not in found.line_ids:
                absent[split].append(line_id)
        for split, ids in sorted(absent.items()):
            problems.lines["split_line_not_found"] += len(ids)
            where = opt.lines_txt if opt.source == "lines" else f"the XML files in {opt.xml_dir}"
            _report(opt, f"the {split} list under {opt.splits_dir} names {len(ids)} line(s) not found in {where}: "
                         f"{_some(ids)}")
        return by_split
    for form_id, split in sorted(split_of.items()):  # the reverse: listed in a split, but no line of it is there
        if form_id in found.present:
            continue
        problems.forms["split_form_without_lines"] += 1
        where = f"form {form_id}: in the {split} list under {opt.splits_dir}, but"
        if opt.source == "lines":
            _report(opt, f"{where} {opt.lines_txt} lists no line of it")
        elif form_id in found.xml_of:
            _report(opt, f"{where} its XML {found.xml_of[form_id]} has no <line>")
        else:
            _report(opt, f"{where} {opt.xml_dir} has no XML for it (no {form_id}.xml)")
    return by_split


def _some(ids: List[str], n: int = 10) -> str:
    """The first ``n`` of ``ids``, comma-separated, and how many more there are."""
    return ", ".join(ids[:n]) + (f" and {len(ids) - n} more" if len(ids) > n else "")


def _write_staging(opt: PrepareOptions, staging: str, forms: Dict[str, list], problems: Problems,
                   by_split: Dict[str, List[Tuple[str, list]]], progress: bool) -> dict:
    """Write every split's shards, then the manifest, into ``staging``; return the manifest.

    A split of which no line could be written raises IAMFormatError (the caller removes ``staging``).
    """
    workers = opt.workers or os.cpu_count() or 1
    log.info("%s source, %d forms with usable lines; forms per split: %s; %d worker(s) -> %s", opt.source, len(forms),
             {k: len(v) for k, v in by_split.items()}, workers, opt.out_dir)
    job_opt = replace(opt, problems=[])  # the workers need the options, not the messages gathered so far
    bar = tqdm(total=sum(len(v) for v in by_split.values()), desc="forms", unit="form", disable=not progress)
    texts: Dict[str, List[str]] = defaultdict(list)
    entries = {}
    ctx = mp.get_context("fork") if hasattr(os, "fork") else mp.get_context()
    with ctx.Pool(workers) as pool:
        for split in SPLITS + tuple(s for s in EXTRA_SPLITS if s in by_split):
            jobs = [(f, job_opt, lines) for f, lines in by_split.get(split, [])]
            lost: Counter = Counter()

            def stream(jobs=jobs, split=split, lost=lost) -> Iterator[dict]:
                for samples, met in pool.imap(_form_samples, jobs, chunksize=4):
                    bar.update(1)
                    for kind, msg in met:
                        problems.lines[kind] += 1
                        lost[kind] += 1
                        _report(opt, msg)
                    for s in samples:
                        if not s["meta"]["writer_id"]:
                            problems.written["writer_id_unknown"] += 1
                        texts[split].append(s["text"])
                        yield s

            entries[split] = write_split(stream(), staging, split, opt.shard_size)
            log.info("%s: %d lines in %d shard(s)", split, sum(e["count"] for e in entries[split]),
                     len(entries[split]))
            if not entries[split]:
                raise iam.IAMFormatError(
                    f"split {split!r}: none of its {sum(lost.values())} line(s) could be written (" +
                    ", ".join(f"{k} {v}" for k, v in sorted(lost.items())) + f"; see the problems above); nothing "
                    f"written to {opt.out_dir}")
    bar.close()
    alphabet = "".join(sorted(set("".join(texts["train"]))))
    source = f"{opt.source}: {os.path.abspath(opt.forms_dir)}"
    found = problems.manifest(opt.problems)
    return write_manifest(staging, opt.name or os.path.basename(os.path.normpath(opt.out_dir)), source, entries,
                          alphabet, found)  # last: a staging folder with a manifest is complete


def summary(manifest: dict) -> str:
    lines = [f"{split}: {info['lines']} lines in {len(info['shards'])} shard(s)"
             for split, info in manifest["splits"].items()]
    lines.append(f"alphabet: {len(manifest['alphabet'])} characters")
    problems = manifest["problems"]
    written, forms = problems.get("written", {}), dict(problems.get("forms", {}))
    uncounted = forms.pop("malformed_xml_lines_unknown", 0)
    if problems["total"]:
        lines.append(f"NOT written: {problems['total']} line(s): " +
                     ", ".join(f"{k} {v}" for k, v in sorted(problems["counts"].items())))
    if uncounted:
        lines.append(f"NOT written either: the lines of {uncounted} form(s) whose XML is malformed (how many is "
                     "unknown: no lines.txt lists them)")
    if written.get("writer_id_unknown"):
        lines.append(f"written, but writer id unknown (writer_id \"\": no readable XML of the form gives it): "
                     f"{written['writer_id_unknown']} line(s)")
    if written.get("text_from_lines_txt"):
        lines.append(f"written, but with lines.txt's token spacing (no readable XML has the line's text): "
                     f"{written['text_from_lines_txt']} line(s)")
    if forms:
        lines.append("forms with problems: " + ", ".join(f"{k} {v}" for k, v in sorted(forms.items())))
    if not (problems["total"] or uncounted or any(written.values()) or forms):
        lines.append("no problems: every line was written")
    return "\n".join(lines)
