"""Formats ``iam`` (lines cropped from IAM's forms with the XML's cmp boxes) and ``iam-lines`` (IAM's pre-cropped
``lines/`` images with ``ascii/lines.txt``), real IAM or the IAM-format data of launch/synth_iam.py.

Every line that cannot be used (missing form image, malformed XML, empty transcription, form or line in no split
list, XML and lines.txt disagreeing), every line written with a flaw (writer id unknown, or lines.txt's token spacing:
no readable XML gives them) and every form of the split lists without lines is named and counted. A line id met
twice is an error. Either source takes a line's transcription from its form's XML (``text``, spaced as written);
``iam-lines`` checks it against lines.txt's word tokens, which have a space before every punctuation mark and clitic.

Splits come from IAM's split lists (``SOURCE/splits`` or ``--splits``: the Aachen ``*.uttlist`` files of form ids or
IAM's task lists of line ids, see :func:`htr_dist.data.iam.read_split_lists`); without any, by writer.
"""

from __future__ import annotations

import logging
import os
from collections import defaultdict
from dataclasses import dataclass, field, replace
from typing import Dict, List, Optional, Set, Tuple

from htr_dist.data import iam
from htr_dist.data.formats.base import Collected, Format, ImportOptions, Line, Page, Report
from htr_dist.data.shards import SPLITS


@dataclass
class _Found:
    """What :func:`_collect_lines` found."""

    forms: Dict[str, list]
    """Form id -> its usable lines (:class:`htr_dist.data.iam.LineRecord`)."""
    present: Set[str]
    """Form ids with any line, usable or not, or with an XML file that cannot be parsed."""
    xml_of: Dict[str, str]
    """Form id -> its XML file (the form id of a file that cannot be parsed is its file name)."""
    line_ids: Set[str] = field(default_factory=set)
    """Every line id met, usable or not (in the XML, or in lines.txt with source=lines or for a malformed XML)."""


def _lines_txt_ids(opt: ImportOptions) -> Tuple[Optional[Dict[str, List[str]]], str]:
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


def _collect_lines(opt: ImportOptions, rep: Report) -> _Found:
    """Every form's usable lines; the problems met are named and counted in ``rep``.

    A form id named by two XML files, or a line id met twice (in lines.txt, in one XML or in two), raises
    IAMFormatError naming the files: it would give two samples of one key (a test line scored twice).
    """
    problems = rep.problems
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
        if not record.writer_id and (record.lines or opt.source_kind == "lines"):
            rep.say(f"{path}: <form> has no writer-id; its lines are written with writer_id \"\"")
        if opt.source_kind == "forms":  # with source=lines the XML gives writer ids and texts; lines.txt is read below
            for msg in record.problems:
                rep.skip("empty_transcription" if "empty transcription" in msg else "no_boxes", msg)
            forms[record.id].extend(record.lines)
            if record.lines or record.problems:
                present.add(record.id)
    if opt.source_kind == "forms" and broken:
        listed, why = _lines_txt_ids(opt)
        for form_id, err in sorted(broken.items()):
            problems.forms["malformed_xml"] += 1
            present.add(form_id)
            ids = (listed or {}).get(form_id, [])
            line_ids.update(ids)
            if ids:
                problems.lines["malformed_xml"] += len(ids)
                rep.say(f"{err}; lines not written: {', '.join(ids)}", logging.ERROR)
            else:
                problems.forms["malformed_xml_lines_unknown"] += 1
                rep.say(f"{err}; its lines are not written, how many is unknown: {why}", logging.ERROR)
    if opt.source_kind == "lines":
        unknown: Dict[str, List[str]] = defaultdict(list)  # form id without a readable XML -> its usable line ids
        for line in iam.parse_lines_txt(opt.lines_txt):  # a line id listed twice raises there
            present.add(line.form_id)
            line_ids.add(line.id)
            if not line.text.strip():
                rep.skip("empty_transcription", f"{opt.lines_txt}: line {line.id}: empty transcription")
                continue
            text = xml_text.get(line.id)
            if text is None:
                problems.written["text_from_lines_txt"] += 1
                if line.form_id in writers:  # else the form's message below says it
                    rep.say(f"{xml_of[line.form_id]}: no line {line.id}; its text is {opt.lines_txt}'s word "
                            f"tokens, a space before every punctuation mark: {line.text!r}")
            elif not iam.same_text(text, line.text):
                rep.skip("text_mismatch", f"line {line.id}: the text of {xml_of[line.form_id]} and of {opt.lines_txt} "
                                          f"differ in more than spaces ({text!r} vs {line.text!r}); line not written")
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
                rep.say(f"{err}; {opt.lines_txt} lists no usable line of form {form_id}", logging.ERROR)
        for form_id, ids in sorted(unknown.items()):
            why = broken.get(form_id) or f"form {form_id}: no XML file for it in {opt.xml_dir}"
            rep.say(f"{why}; writer id unknown: its lines from {opt.lines_txt} are written with writer_id \"\" "
                    f"and their word tokens for text (a space before every punctuation mark): {', '.join(ids)}")
    return _Found(forms, present, xml_of, line_ids | xml_text.keys())


def _some(ids: List[str], n: int = 10) -> str:
    """The first ``n`` of ``ids``, comma-separated, and how many more there are."""
    return ", ".join(ids[:n]) + (f" and {len(ids) - n} more" if len(ids) > n else "")


def _assign_splits(opt: ImportOptions, split_of: Dict[str, str], found: _Found, rep: Report) -> Dict[str, str]:
    """Line id -> split, from lists of form ids (a form's lines go together) or of line ids (IAM's task lists: each
    line where it is listed). Lines in no list, and listed forms or lines that the data does not have, are
    reported."""
    problems = rep.problems
    by_line = any(iam.is_line_id(i) for i in split_of)  # read_split_lists allows one kind
    line_split: Dict[str, str] = {}
    for form_id in sorted(found.forms):
        lost = []
        for line in found.forms[form_id]:
            split = split_of.get(line.id if by_line else form_id)
            if split is None:
                lost.append(line)
            else:
                line_split[line.id] = split
        if lost:
            kind = "line_in_no_split" if by_line else "form_in_no_split"
            what = "lines of it in no split list" if by_line else "in no split list"
            rep.skip(kind, f"form {form_id}: {what} under {opt.splits_dir}; lines not written: "
                           f"{', '.join(l.id for l in lost)}", len(lost))
    if by_line:  # the reverse: listed, but no such line in the data (a line that is there but unusable is reported)
        absent: Dict[str, List[str]] = defaultdict(list)
        for line_id, split in sorted(split_of.items()):
            if line_id not in found.line_ids:
                absent[split].append(line_id)
        for split, ids in sorted(absent.items()):
            where = opt.lines_txt if opt.source_kind == "lines" else f"the XML files in {opt.xml_dir}"
            rep.skip("split_line_not_found", f"the {split} list under {opt.splits_dir} names {len(ids)} line(s) not "
                                             f"found in {where}: {_some(ids)}", len(ids))
        return line_split
    for form_id, split in sorted(split_of.items()):  # the reverse: listed in a split, but no line of it is there
        if form_id in found.present:
            continue
        problems.forms["split_form_without_lines"] += 1
        where = f"form {form_id}: in the {split} list under {opt.splits_dir}, but"
        if opt.source_kind == "lines":
            rep.say(f"{where} {opt.lines_txt} lists no line of it")
        elif form_id in found.xml_of:
            rep.say(f"{where} its XML {found.xml_of[form_id]} has no <line>")
        else:
            rep.say(f"{where} {opt.xml_dir} has no XML for it (no {form_id}.xml)")
    return line_split


def _check_inputs(opt: ImportOptions) -> None:
    """Each input folder and file there, or an error naming the one that is not."""
    folders = [("form images", opt.source), ("xml", opt.xml_dir)]
    if opt.splits_dir is not None:
        folders.append(("splits", opt.splits_dir))
    for label, folder in folders:
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"{label} folder not found: {folder}")
    if opt.source_kind == "lines" and not (opt.lines_txt and os.path.isfile(opt.lines_txt)):
        raise FileNotFoundError(f"lines.txt not found: {opt.lines_txt}")
    if opt.source_kind == "lines" and not os.path.isdir(os.path.join(opt.source, "lines")):
        raise FileNotFoundError(f"line image folder not found: {os.path.join(opt.source, 'lines')}")
    if opt.source_kind == "forms":
        iam.form_folders(opt.source)  # raises naming the folder when no forms*/ folder (nor form image) is there
    if not any(f.endswith(".xml") for f in os.listdir(opt.xml_dir)):
        raise FileNotFoundError(f"no *.xml files in the xml folder {opt.xml_dir}")


def _with_defaults(opt: ImportOptions, kind: str) -> ImportOptions:
    """A copy of ``opt`` with IAM's default places filled in: SOURCE/xml, SOURCE/ascii/lines.txt, and SOURCE/splits
    when it exists."""
    opt = replace(opt, source_kind=kind)
    if opt.xml_dir is None:
        opt.xml_dir = os.path.join(opt.source, "xml")
    if opt.lines_txt is None:
        opt.lines_txt = os.path.join(opt.source, "ascii", "lines.txt")
    if opt.splits_dir is None and os.path.isdir(os.path.join(opt.source, "splits")):
        opt.splits_dir = os.path.join(opt.source, "splits")
    return opt


def _line(record: iam.LineRecord, opt: ImportOptions) -> Line:
    meta = {"form_id": record.form_id, "writer_id": record.writer_id, "bbox": list(record.bbox),
            "segmentation": record.segmentation}
    flaws = () if record.writer_id else ("writer_id_unknown",)
    if opt.source_kind == "forms":
        return Line(record.id, record.text, record.writer_id or record.form_id, meta, bbox=record.bbox, flaws=flaws)
    return Line(record.id, record.text, record.writer_id or record.form_id, meta,
                image=iam.line_image_path(opt.source, record.id), flaws=flaws)


def _collect(opt: ImportOptions, rep: Report, kind: str) -> Collected:
    opt = _with_defaults(opt, kind)
    _check_inputs(opt)
    split_of = iam.read_split_lists(opt.splits_dir) if opt.splits_dir is not None else None
    found = _collect_lines(opt, rep)
    line_split = _assign_splits(opt, split_of, found, rep) if split_of is not None else None
    pages = []
    for form_id in sorted(found.forms):
        lines = [_line(r, opt) for r in found.forms[form_id]]
        if line_split is not None:
            lines = [l for l in lines if l.id in line_split]
            for l in lines:
                l.split = line_split[l.id]
        if not lines:
            continue
        page = Page(form_id, lines)
        if kind == "forms":
            page.image = iam.find_form_image(opt.source, form_id)
            if page.image is None:  # each unwritten line is named by the writer
                page.missing = ("missing_form_image", f"form image {form_id}.png not found in "
                                                      f"{' or '.join(iam.FORM_FOLDERS)} under {opt.source}")
        pages.append(page)
    if split_of is not None:
        _check_splits(opt, split_of, pages)
    return Collected(pages, kind, split_given=split_of is not None, unit="form")


def _check_splits(opt: ImportOptions, split_of: Dict[str, str], pages: List[Page]) -> None:
    """A split of the lists left without a usable line is an error naming what its list holds."""
    have = {l.split for p in pages for l in p.lines}
    for split in SPLITS:
        if split in have:
            continue
        listed = sorted(i for i, s in split_of.items() if s == split)
        if not listed:
            raise iam.IAMFormatError(f"split {split!r}: no split list under {opt.splits_dir} names a form or line "
                                     f"for it")
        kind = "line(s)" if iam.is_line_id(listed[0]) else "form(s)"
        raise iam.IAMFormatError(f"split {split!r}: no line to write: none of its {len(listed)} {kind} listed under "
                                 f"{opt.splits_dir} has a usable line ({_some(listed)}; see the problems above); "
                                 f"nothing written to {opt.out_dir}")


def collect_forms(opt: ImportOptions, rep: Report) -> Collected:
    """Format ``iam``: SOURCE holds formsA-D/ formsE-H/ formsI-Z/ (or forms/, or is the folder of form images)."""
    return _collect(opt, rep, "forms")


def collect_lines(opt: ImportOptions, rep: Report) -> Collected:
    """Format ``iam-lines``: SOURCE holds lines/ (and ascii/lines.txt, xml/)."""
    return _collect(opt, rep, "lines")


IAM = Format("iam", "IAM forms + xml/ (+ splits/): lines cropped from the forms with the XML's word boxes",
             collect_forms, margin=iam.DEFAULT_MARGIN)
IAM_LINES = Format("iam-lines", "IAM lines/ + ascii/lines.txt + xml/ (+ splits/): IAM's pre-cropped line images",
                   collect_lines, margin=iam.DEFAULT_MARGIN)
