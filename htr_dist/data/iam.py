"""IAM Handwriting Database, exactly as distributed.

- form images: ``formsA-D/``, ``formsE-H/``, ``formsI-Z/`` (or one ``forms/`` folder), ``<form id>.png``; the
  folder of form images itself is accepted where the IAM root is expected
- ``xml/<form id>.xml`` (declared ISO-8859-1): ``form`` (id, writer-id) / ``handwritten-part`` / ``line`` (id, text,
  segmentation) / ``word`` (id, text) / ``cmp`` (x, y, width, height). The ``text`` attributes are escaped twice: a
  ``"`` is ``&amp;quot;`` in the file, which an XML parser reads as ``&quot;`` (:func:`decode_entities` decodes the
  second level). A line's ``text`` is spaced as written: ``Exchange.``, ``he's``.
- ``ascii/lines.txt``: ``a01-000u-00 ok 154 19 408 746 1661 89 A|MOVE|to|stop`` (id, segmentation, gray level,
  components, x y w h, word tokens joined by '|', ``"`` as ``&quot;``), with ``lines/a01/a01-000u/a01-000u-00.png``
  the pre-cropped lines. The tokens split punctuation and clitics off their words (``Exchange|.``,
  ``he|'s``), so joining them with spaces gives a space the ink does not have: the XML's ``text`` is the
  transcription, for either source (see :func:`same_text`).
- split lists: ``*.uttlist`` files of form ids (the Aachen split: train / validation / test), or IAM's own Large
  Writer Independent Text Line Recognition Task lists of line ids (``trainset.txt``, ``validationset1.txt``,
  ``validationset2.txt``, ``testset.txt``; both validation sets make the val split)

A line image is the crop of the union of its ``cmp`` boxes plus :data:`DEFAULT_MARGIN` pixels on every side (the
boxes are tight to the ink, so a few pixels of paper keep stroke ends and anti-aliasing intact), clipped to the form.
"""

from __future__ import annotations

import glob
import os
import xml.etree.ElementTree as ET
from xml.sax.saxutils import unescape
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import numpy as np

from htr_dist.errors import DataFormatError

FORM_FOLDERS = ("formsA-D", "formsE-H", "formsI-Z", "forms")
"""The folders of form images under the IAM root; a folder holding the form images directly is read as well."""
FORM_EXTENSIONS = (".png", ".jpg", ".tif")
DEFAULT_MARGIN = 8
"""Pixels of paper kept around the union of a line's cmp boxes (at the form's full resolution, before scaling)."""
_XML_ENTITIES = {"&quot;": '"', "&apos;": "'"}  # plus &amp; &lt; &gt;, which unescape() always decodes
SPLIT_NAMES = {"train": "train", "trainset": "train", "validation": "val", "valid": "val", "val": "val",
               "validationset1": "val", "validationset2": "val", "test": "test", "testset": "test",
               "validation_seen": "val_seen", "val_seen": "val_seen", "test_seen": "test_seen"}
"""Split list name -> split. ``val_seen``/``test_seen`` (optional, written by launch/synth_iam.py): held-out text by the
training writers, beside val/test by writers never trained on."""
TASK_LISTS = ("trainset.txt", "validationset1.txt", "validationset2.txt", "testset.txt")
"""IAM's line recognition task lists (line ids), read beside ``*.uttlist`` files; other ``*.txt`` files are not."""


IAMFormatError = DataFormatError
"""An IAM file does not have the expected format; the message names the file (and line id). The same class as every
format's error, so a caller catches one class whichever format it reads."""


@dataclass
class LineRecord:
    id: str
    form_id: str
    writer_id: str
    text: str
    bbox: Tuple[int, int, int, int]
    """x0, y0, x1, y1 (exclusive) in form pixels: the union of the line's cmp boxes (xml) or lines.txt's box."""
    segmentation: str = "ok"


@dataclass
class FormRecord:
    id: str
    writer_id: str
    lines: List[LineRecord] = field(default_factory=list)
    problems: List[str] = field(default_factory=list)
    """Lines of this form that cannot be used, each message naming the file and line id."""
    texts: Dict[str, str] = field(default_factory=dict)
    """Line id -> its decoded ``text``, for every ``<line>`` (usable or not): the transcription source=lines uses."""


def decode_entities(text: str) -> str:
    """An IAM transcription with its entities decoded: ``&quot;`` ``&apos;`` ``&amp;`` ``&lt;`` ``&gt;``.

    lines.txt writes ``"`` as ``&quot;``; the XML files hold their ``text`` attributes escaped twice (``&amp;quot;``),
    so a parsed attribute still needs this once. Text without entities, as single-escaped XML gives it, is unchanged.
    """
    return unescape(text, _XML_ENTITIES)


def same_text(a: str, b: str) -> bool:
    """Whether two transcriptions have the same characters, whatever their spaces (lines.txt's word tokens against
    the XML's ``text``)."""
    return "".join(a.split()) == "".join(b.split())


def parse_form_xml(path: str) -> FormRecord:
    """Parse one IAM form XML (bytes, so the encoding declaration is honoured)."""
    try:
        root = ET.parse(path).getroot()
    except (ET.ParseError, LookupError) as err:  # LookupError: an encoding declaration Python does not know
        raise IAMFormatError(f"{path}: malformed XML ({err})") from None
    except OSError as err:  # unreadable (permissions, I/O error): named, and the other forms go on
        raise IAMFormatError(f"{path}: cannot be read ({err.strerror or err})") from None
    if root.tag != "form" or "id" not in root.attrib:
        raise IAMFormatError(f"{path}: root element is <{root.tag}>, expected <form id=...>")
    form = FormRecord(root.attrib["id"], root.attrib.get("writer-id", ""))
    part = root.find("handwritten-part")
    if part is None:
        raise IAMFormatError(f"{path}: no <handwritten-part>")
    seen = set()
    for line in part.iter("line"):
        line_id = line.attrib.get("id", "?")
        if line_id in seen:  # two samples with one key: a line scored twice, or one overwriting the other
            raise IAMFormatError(f"{path}: line id {line_id} appears twice")
        seen.add(line_id)
        text = decode_entities(line.attrib.get("text", ""))
        form.texts[line_id] = text
        boxes = [_cmp_box(path, line_id, c) for c in line.iter("cmp")]
        if not text.strip():
            form.problems.append(f"{path}: line {line_id}: empty transcription")
            continue
        if not boxes:
            form.problems.append(f"{path}: line {line_id}: no <cmp> boxes to crop")
            continue
        x0 = min(b[0] for b in boxes)
        y0 = min(b[1] for b in boxes)
        x1 = max(b[0] + b[2] for b in boxes)
        y1 = max(b[1] + b[3] for b in boxes)
        form.lines.append(LineRecord(line_id, form.id, form.writer_id, text, (x0, y0, x1, y1),
                                     line.attrib.get("segmentation", "ok")))
    return form


def _cmp_box(path: str, line_id: str, cmp: ET.Element) -> Tuple[int, int, int, int]:
    """(x, y, width, height) of one ``<cmp>``; a missing or non-integer attribute names the file and line."""
    try:
        x, y, w, h = (int(cmp.attrib[k]) for k in ("x", "y", "width", "height"))
    except (KeyError, ValueError) as err:
        raise IAMFormatError(f"{path}: line {line_id}: bad <cmp> box {cmp.attrib} ({err!r})") from None
    if w < 0 or h < 0:
        raise IAMFormatError(f"{path}: line {line_id}: negative <cmp> size {cmp.attrib}")
    return x, y, w, h


def _read_text(path: str) -> str:
    """UTF-8 if it decodes, else ISO-8859-1 (IAM's own encoding; every byte string decodes)."""
    with open(path, "rb") as f:
        data = f.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1")


def parse_lines_txt(path: str) -> List[LineRecord]:
    """Parse ``ascii/lines.txt``; a malformed data line, or a line id listed twice, raises IAMFormatError naming the
    file and line number.

    Word tokens are joined by '|' in the file and by one space here (so a punctuation mark has a space before it:
    the XML's ``text`` has the spacing as written); entities (``&quot;`` ...) are decoded. A data line without a
    transcription is returned with ``text == ""`` so the caller reports it (it is not dropped here).
    """
    records = []
    first: Dict[str, int] = {}  # line id -> the number of the data line that lists it
    for number, raw in enumerate(_read_text(path).splitlines(), 1):
        if raw.startswith("#") or not raw.strip():
            continue
        parts = raw.rstrip("\r\n").split(" ", 8)
        if len(parts) == 8:  # the transcription itself is missing
            parts.append("")
        if len(parts) != 9:
            raise IAMFormatError(f"{path}:{number}: expected 9 fields, got {len(parts)}: {raw.strip()!r}")
        line_id, seg, _gray, _n, x, y, w, h, words = parts
        try:
            x, y, w, h = int(x), int(y), int(w), int(h)
        except ValueError:
            raise IAMFormatError(f"{path}:{number}: bad bounding box in {raw.strip()!r}") from None
        if not is_line_id(line_id):
            raise IAMFormatError(f"{path}:{number}: line id {line_id!r} is not of the form a01-000u-00")
        if line_id in first:
            raise IAMFormatError(f"{path}:{number}: line id {line_id} is already listed on line {first[line_id]}")
        first[line_id] = number
        form_id = "-".join(line_id.split("-")[:2])
        text = decode_entities(words.replace("|", " "))
        records.append(LineRecord(line_id, form_id, "", text, (x, y, x + w, y + h), seg))
    return records


def is_line_id(item_id: str) -> bool:
    """``a01-000u-00`` (a line) rather than ``a01-000u`` (a form)."""
    return item_id.count("-") == 2


def read_split_lists(split_dir: str) -> Dict[str, str]:
    """``id -> train|val|test`` from the split lists: ``*.uttlist`` files and IAM's :data:`TASK_LISTS`.

    The ids are form ids (the Aachen split) or line ids (IAM's task, which leaves some lines of its forms out): one
    kind per folder. An id in two lists, or form ids beside line ids, is an error naming the files.
    """
    if not os.path.isdir(split_dir):
        raise FileNotFoundError(f"split folder not found: {split_dir}")
    out: Dict[str, str] = {}
    files = sorted(glob.glob(os.path.join(split_dir, "*.uttlist")))
    files += [os.path.join(split_dir, n) for n in TASK_LISTS if os.path.isfile(os.path.join(split_dir, n))]
    if not files:
        raise IAMFormatError(f"{split_dir}: no *.uttlist files (expected train/validation/test.uttlist) and none of "
                             f"IAM's task lists ({', '.join(TASK_LISTS)})")
    first_of_kind: Dict[bool, Tuple[str, str]] = {}  # is a line id -> (its first id, the file listing it)
    for path in files:
        stem = os.path.splitext(os.path.basename(path))[0].lower()
        split = SPLIT_NAMES.get(stem)
        if split is None:
            raise IAMFormatError(f"{path}: unknown split name {stem!r} (expected one of {sorted(SPLIT_NAMES)})")
        with open(path, encoding="utf-8") as f:
            for item in (x.strip() for x in f):
                if not item:
                    continue
                is_line = is_line_id(item)
                if out.get(item, split) != split:
                    raise IAMFormatError(f"{path}: {'line' if is_line else 'form'} {item} is already in split "
                                         f"{out[item]!r}")
                first_of_kind.setdefault(is_line, (item, path))
                if len(first_of_kind) > 1:
                    (line, line_file), (form, form_file) = first_of_kind[True], first_of_kind[False]
                    raise IAMFormatError(f"{split_dir}: the split lists name both lines ({line} in {line_file}) and "
                                         f"forms ({form} in {form_file}); use lists of one kind")
                out[item] = split
    return out


def _holds_images(folder: str) -> bool:
    """Whether ``folder`` directly holds form images (``*.png``, ``*.jpg``, ``*.tif``)."""
    return any(glob.glob(os.path.join(glob.escape(folder), "*" + ext)) for ext in FORM_EXTENSIONS)


def form_folders(root: str) -> List[str]:
    """The form image folders (``formsA-D`` ... or ``forms``) present under ``root``, or ``root`` itself when it
    holds the form images directly (the reference's ``prepare_iam.py IAM/forms/ ...``); an error names what is
    missing."""
    found = [os.path.join(root, f) for f in FORM_FOLDERS if os.path.isdir(os.path.join(root, f))]
    if not found and os.path.isdir(root) and _holds_images(root):
        found = [root]
    if not found:
        raise FileNotFoundError(f"form image folder not found: {root} holds none of {', '.join(FORM_FOLDERS)}, nor "
                                f"form images ({', '.join('*' + e for e in FORM_EXTENSIONS)}) itself")
    return found


def find_form_image(root: str, form_id: str) -> Optional[str]:
    """Path of ``form_id``'s image under ``root`` (any of :data:`FORM_FOLDERS`, or ``root`` itself), or None."""
    for folder in FORM_FOLDERS + ("",):
        for ext in FORM_EXTENSIONS:
            path = os.path.join(root, folder, form_id + ext)
            if os.path.isfile(path):
                return path
    return None


def line_image_path(root: str, line_id: str) -> str:
    """IAM's ``lines/a01/a01-000u/a01-000u-00.png`` for a line id."""
    parts = line_id.split("-")
    return os.path.join(root, "lines", parts[0], "-".join(parts[:2]), line_id + ".png")


def crop_line(form: np.ndarray, bbox: Tuple[int, int, int, int], margin: int = DEFAULT_MARGIN,
              scale: float = 1.0) -> np.ndarray:
    """Crop ``bbox`` (x0, y0, x1, y1 exclusive) plus ``margin`` pixels, clipped to the form, then rescale by ``scale``
    (bilinear; the reference uses 0.5). ``form`` is a (H, W) uint8 array; returns a (h, w) uint8 array."""
    from PIL import Image

    if not scale > 0:
        raise ValueError(f"scale must be > 0, got {scale!r}")
    h, w = form.shape
    x0, y0, x1, y1 = bbox
    x0, y0 = max(0, x0 - margin), max(0, y0 - margin)
    x1, y1 = min(w, x1 + margin), min(h, y1 + margin)
    if x1 <= x0 or y1 <= y0:
        raise ValueError(f"empty crop for bbox {bbox} in a {w}x{h} form")
    crop = form[y0:y1, x0:x1]
    if scale != 1.0:
        size = (max(1, round(crop.shape[1] * scale)), max(1, round(crop.shape[0] * scale)))
        crop = np.asarray(Image.fromarray(crop).resize(size, Image.BILINEAR))
    return np.ascontiguousarray(crop)
