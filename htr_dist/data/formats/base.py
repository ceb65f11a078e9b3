"""What every format parser hands to the shared shard writer: line records grouped into pages, and the problems met.

A parser turns its source into :class:`Page` objects (a unit of work: one page image read once and its lines cut
out, or a few line images), each holding :class:`Line` records (id, transcription, group, split if the source says
it, where the pixels are). Every line it cannot use it reports through the :class:`Report` (one message naming the
file, counted by kind), so nothing is dropped silently. Splitting, the alphabet, the manifest and the atomic writing
are done once, in :mod:`htr_dist.data.prepare`, for every format.
"""

from __future__ import annotations

import glob
import hashlib
import logging
import os
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Tuple

from htr_dist.data.shards import EXTRA_SPLITS, SPLITS
from htr_dist.errors import DataFormatError

log = logging.getLogger("htr_dist.data.prepare")  # one logger for the whole preparation, whichever format

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp")
"""Image file extensions the parsers look for (compared in lower case)."""
SPLIT_NAMES = {"train": "train", "trainset": "train", "training": "train", "validation": "val", "valid": "val",
               "val": "val", "validationset1": "val", "validationset2": "val", "dev": "val", "test": "test",
               "testset": "test", "validation_seen": "val_seen", "val_seen": "val_seen", "test_seen": "test_seen"}
"""Split list file name (without extension, lower case) -> split."""
SPLIT_LIST_EXTENSIONS = (".txt", ".lst", ".list", ".uttlist", ".ids", "")


@dataclass
class Line:
    """One text line as every format describes it."""

    id: str
    """The sample key: unique in the data set, no '.' or '/' (WebDataset would split the key there)."""
    text: str
    group: str
    """Writer, page or folder: the automatic split never puts one group in two splits."""
    meta: dict
    """Written as the sample's ``json``."""
    split: Optional[str] = None
    """Set by the parser when the source says it (IAM's split lists, the reference's split folders)."""
    image: Optional[str] = None
    """Its own image file (line-image formats); None when it is cut from its page's image."""
    bbox: Optional[Tuple[int, int, int, int]] = None
    """x0, y0, x1, y1 (exclusive) in the page image: the region cut out (plus the margin)."""
    polygon: Optional[List[Tuple[int, int]]] = None
    """Outline in the page image: the crop of its bounding box with every pixel outside it made white."""
    flaws: Tuple[str, ...] = ()
    """Kinds of flaw it is written with (counted in the manifest's ``problems.written`` when written)."""


@dataclass
class Page:
    """A unit of work for one writer process: lines cut from one page image, or lines with their own images."""

    id: str
    lines: List[Line]
    image: Optional[str] = None
    """The page image the lines are cut from (None: each line has its own image file)."""
    missing: Optional[Tuple[str, str]] = None
    """(kind, why) when the page image was not found: each of its lines is reported, none written."""


@dataclass
class Problems:
    """The problems met, counted by kind in the unit each kind is counted in; each is also named in the messages."""

    lines: Counter = field(default_factory=Counter)
    """Lines NOT written, per kind: the manifest's ``counts``, whose sum is its ``total``. Among them (IAM)
    ``text_mismatch`` (source=lines: the XML's ``text`` and lines.txt's tokens differ in more than spaces, and which
    is right is unknown), ``form_in_no_split`` and, with lists of line ids, ``line_in_no_split`` and
    ``split_line_not_found`` (listed, but the data has no such line)."""
    written: Counter = field(default_factory=Counter)
    """Lines written with a flaw: (IAM lines) ``writer_id_unknown`` (written with writer_id "": no readable XML gives
    it) and ``text_from_lines_txt`` (no readable XML has the line, so its text is lines.txt's word tokens joined by
    spaces: a space before every punctuation mark and clitic, which the ink does not have); (PAGE) ``polygon_clipped``
    (the polygon reaches outside the page image: the part inside is written)."""
    forms: Counter = field(default_factory=Counter)
    """Forms, pages or split-list ids: ``malformed_xml`` (XML files that cannot be parsed),
    ``malformed_xml_lines_unknown`` (IAM forms whose unwritten lines no lines.txt lists, so they are not in ``lines``:
    how many is unknown), ``split_form_without_lines`` (in a split list, but no XML or no line of it),
    ``split_id_not_found`` (other formats: a split list names an id no line, page or group has)."""

    def manifest(self, messages: List[str]) -> dict:
        return {"counts": dict(self.lines), "total": sum(self.lines.values()), "written": dict(self.written),
                "forms": dict(self.forms), "messages": messages[:1000]}


@dataclass
class Report:
    """Where a parser (and the writer) name and count every problem: the log, the summary and the manifest."""

    problems: Problems = field(default_factory=Problems)
    messages: List[str] = field(default_factory=list)

    def say(self, msg: str, level: int = logging.WARNING) -> None:
        """Name one problem in the log and in the manifest's messages (counted by the caller, or not at all)."""
        self.messages.append(msg)
        log.log(level, "%s", msg)

    def skip(self, kind: str, msg: str, n: int = 1) -> None:
        """``n`` line(s) not written, for reason ``kind``."""
        self.problems.lines[kind] += n
        self.say(msg)


@dataclass
class Collected:
    """What a format's parser found."""

    pages: List[Page]
    label: str
    """How the manifest's ``source`` names what was read, e.g. ``page`` or IAM's ``forms``."""
    split_given: bool = False
    """Whether every line's split is set (or the line reported and left out) by the parser."""
    unit: str = "page"
    """What a :class:`Page` is, for the progress bar and the log (``form``, ``page``, ``line``)."""


@dataclass
class ImportOptions:
    """Options of one import, shared by every format (a format ignores those it has no use for)."""

    source: str
    """The folder (or file) the format reads."""
    out_dir: str
    splits_dir: Optional[str] = None
    """Folder of split lists (train/val/test files of ids); None: the format's own split, or split by group."""
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    seed: int = 0
    scale: float = 1.0
    margin: Optional[int] = None
    """Pixels of paper added around a cut-out region, before scaling; None: the format's default."""
    shard_size: int = 2000
    workers: int = 0
    name: str = ""
    xml_dir: Optional[str] = None
    """IAM: the folder of form XML files (default: SOURCE/xml)."""
    lines_txt: Optional[str] = None
    """IAM: ascii/lines.txt (default: SOURCE/ascii/lines.txt)."""
    source_kind: str = "forms"
    """IAM: ``forms`` (crop from the forms) or ``lines`` (read lines/ and lines.txt)."""


@dataclass
class Format:
    """One registered input format."""

    name: str
    summary: str
    """One line for ``htr-prepare --help``."""
    collect: Callable[[ImportOptions, Report], Collected]
    margin: int = 0
    """Default pixels of paper around a cut-out region."""


# -- helpers the parsers share ------------------------------------------------------------------------------------


def find_images(root: str) -> List[str]:
    """Every image file under ``root`` (recursive, sorted; hidden folders skipped)."""
    out = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        out += [os.path.join(folder, f) for f in sorted(files)
                if os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS and not f.startswith(".")]
    return out


def image_beside(stem_path: str) -> Optional[str]:
    """``stem_path`` + the first image extension that exists (lower or upper case), or None."""
    for ext in IMAGE_EXTENSIONS:
        for e in (ext, ext.upper()):
            if os.path.isfile(stem_path + e):
                return stem_path + e
    return None


_KEY_UNSAFE = re.compile(r"[./\\\s]+")


def safe_key(name: str) -> str:
    """A sample key from a file's relative path or a line id: '/', '.' and white space become '_'."""
    return _KEY_UNSAFE.sub("_", name).strip("_") or "_"


def read_text_file(path: str) -> str:
    """A transcription file's text: UTF-8 (a BOM dropped), its lines joined by one space, ends stripped."""
    with open(path, encoding="utf-8-sig") as f:
        return " ".join(part.strip() for part in f.read().splitlines() if part.strip())


def check_unique(lines: Iterable[Tuple[str, str]]) -> None:
    """(key, where) pairs: a key met twice raises DataFormatError naming both places (two samples of one key)."""
    first: Dict[str, str] = {}
    for key, where in lines:
        if key in first:
            raise DataFormatError(f"{where}: line id {key!r} is already the id of {first[key]} (ids must be unique)")
        first[key] = where


def read_split_lists(split_dir: str) -> Dict[str, str]:
    """``id -> split`` from the files of ``split_dir`` named after a split (``train``, ``val``/``validation``,
    ``test``, with .txt .lst .list .uttlist .ids or no extension), one id per line; an id in two lists, or a folder
    without any such file, is an error naming the file."""
    if not os.path.isdir(split_dir):
        raise FileNotFoundError(f"split folder not found: {split_dir}")
    out: Dict[str, str] = {}
    found = []
    for path in sorted(glob.glob(os.path.join(glob.escape(split_dir), "*"))):
        stem, ext = os.path.splitext(os.path.basename(path))
        if os.path.isfile(path) and ext.lower() in SPLIT_LIST_EXTENSIONS and stem.lower() in SPLIT_NAMES:
            found.append(path)
    if not found:
        raise DataFormatError(f"{split_dir}: no split list (expected files named train, val or validation, test, "
                              f"e.g. train.txt, one id a line)")
    for path in found:
        split = SPLIT_NAMES[os.path.splitext(os.path.basename(path))[0].lower()]
        with open(path, encoding="utf-8-sig") as f:
            for item in (x.strip() for x in f):
                if not item:
                    continue
                if out.get(item, split) != split:
                    raise DataFormatError(f"{path}: {item} is already in split {out[item]!r}")
                out[item] = split
    return out


def assign_from_lists(pages: List[Page], split_of: Dict[str, str], split_dir: str, report: Report) -> None:
    """Set each line's split from lists naming line ids, page ids or groups (the most specific wins); lines in no list
    are reported (``line_in_no_split``) and dropped, listed ids that name nothing are reported."""
    known = set()
    for page in pages:
        known.add(page.id)
        kept = []
        for line in page.lines:
            known.update((line.id, line.group))
            line.split = split_of.get(line.id) or split_of.get(page.id) or split_of.get(line.group)
            if line.split is None:
                report.skip("line_in_no_split", f"line {line.id} (page {page.id}, group {line.group}): in no split "
                                                f"list under {split_dir}; not written")
            else:
                kept.append(line)
        page.lines = kept
    absent = sorted(i for i in split_of if i not in known)
    if absent:
        report.problems.forms["split_id_not_found"] += len(absent)
        shown = ", ".join(absent[:10]) + (f" and {len(absent) - 10} more" if len(absent) > 10 else "")
        report.say(f"the split lists under {split_dir} name {len(absent)} id(s) that no line, page or group has: "
                   f"{shown}")


def _rank(seed: int, group: str) -> str:
    return hashlib.sha256(f"{seed}\0{group}".encode("utf-8")).hexdigest()


def assign_by_group(pages: List[Page], val_fraction: float, test_fraction: float, seed: int) -> Dict[str, str]:
    """Split by group, deterministically: groups in the order of a seeded hash of their name; test takes groups
    until it holds ``test_fraction`` of the lines, then val ``val_fraction``, train the rest; each split at least
    one group, one group never in two splits. A group's place in the order depends only on its name and the seed,
    so adding data moves few groups. Returns group -> split."""
    sizes: Counter = Counter(line.group for page in pages for line in page.lines)
    if len(sizes) < 3:
        raise DataFormatError(f"only {len(sizes)} group(s) ({', '.join(sorted(sizes)) or 'none'}): splitting by "
                              "group needs at least 3 (one each for train, val, test); give split lists with "
                              "--splits, or data of more writers/pages/folders")
    order = sorted(sizes, key=lambda g: _rank(seed, g))
    total = sum(sizes.values())
    split_of: Dict[str, str] = {}
    pos = 0
    for split, fraction, keep in (("test", test_fraction, 2), ("val", val_fraction, 1)):
        taken = 0
        while pos < len(order) - keep and (taken == 0 or taken < fraction * total):
            split_of[order[pos]] = split
            taken += sizes[order[pos]]
            pos += 1
    for group in order[pos:]:
        split_of[group] = "train"
    for page in pages:
        for line in page.lines:
            line.split = split_of[line.group]
    return split_of


def by_split(pages: List[Page]) -> Dict[str, List[Page]]:
    """Split -> the pages with their lines of that split (a page whose lines are in two splits is cut in two)."""
    out: Dict[str, List[Page]] = defaultdict(list)
    for page in pages:
        parts: Dict[str, List[Line]] = defaultdict(list)
        for line in page.lines:
            parts[line.split].append(line)
        for split in sorted(parts):
            out[split].append(Page(page.id, parts[split], page.image, page.missing))
    unknown = sorted(set(out) - set(SPLITS) - set(EXTRA_SPLITS))
    if unknown:
        raise DataFormatError(f"unknown split(s) {unknown}: expected {', '.join(SPLITS + EXTRA_SPLITS)}")
    return out
