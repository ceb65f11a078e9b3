"""Format ``alto``: ALTO XML files (v2-v4, ``MeasurementUnit`` pixel), one page image each.

Every ``TextLine`` becomes one line: its ``Shape/Polygon@POINTS`` as a masked crop when it has one, else its box
``HPOS VPOS WIDTH HEIGHT`` (plus the margin). Its transcription is its ``String@CONTENT`` values joined by single
spaces (``SP`` elements are the spaces), with a line-end ``HYP@CONTENT`` appended. The page image is
``Description/sourceImageInformation/fileName``, found as PAGE-XML's is (:func:`locate_image`); the key and group
are as for PAGE-XML.
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from typing import List, Optional, Tuple

from htr_dist.data.formats.base import Collected, Format, ImportOptions, Line, Page, Report, safe_key
from htr_dist.data.formats.page import collect_xml, locate_image, page_id


def _polygon(line: ET.Element) -> Optional[List[Tuple[int, int]]]:
    """``Shape/Polygon@POINTS`` (``x,y x,y ...`` or ``x y x y ...``) as points; None when absent or unreadable."""
    shape = line.find("{*}Shape/{*}Polygon")
    if shape is None or not shape.get("POINTS"):
        return None
    try:
        numbers = [round(float(v)) for v in shape.get("POINTS").replace(",", " ").split()]
    except ValueError:
        return None
    points = list(zip(numbers[0::2], numbers[1::2]))
    return points if len(points) >= 3 and len(numbers) % 2 == 0 else None


def _box(line: ET.Element) -> Optional[Tuple[int, int, int, int]]:
    try:
        x, y, w, h = (float(line.get(k)) for k in ("HPOS", "VPOS", "WIDTH", "HEIGHT"))
    except (TypeError, ValueError):
        return None
    return (round(x), round(y), round(x + w), round(y + h)) if w > 0 and h > 0 else None


def _text(line: ET.Element) -> str:
    words = [s.get("CONTENT", "") for s in line.findall("{*}String")]
    hyphen = line.find("{*}HYP")
    return " ".join(w for w in words if w) + ("" if hyphen is None else hyphen.get("CONTENT", ""))


def _page(path: str, root: ET.Element, opt: ImportOptions, rep: Report, keys: list) -> Optional[Page]:
    unit = root.findtext("{*}Description/{*}MeasurementUnit", "pixel").strip()
    if unit != "pixel":
        rep.problems.forms["unsupported_unit"] += 1
        rep.say(f"{path}: MeasurementUnit {unit!r} (only pixel is read); its lines are not written")
        return None
    pid = page_id(path, opt.source)
    name = root.findtext("{*}Description/{*}sourceImageInformation/{*}fileName", "").strip()
    lines = []
    for el in root.findall(".//{*}TextLine"):
        lid = el.get("ID", "")
        where = f"{path}: TextLine {lid or '(no ID)'}"
        polygon, box = _polygon(el), _box(el)
        if polygon is None and box is None:
            rep.skip("bad_coords", f"{where}: no HPOS/VPOS/WIDTH/HEIGHT box nor Shape polygon; not written")
            continue
        text = _text(el)
        if not text.strip():
            rep.skip("empty_transcription", f"{where}: no String CONTENT; not written")
            continue
        key = safe_key(f"{pid}_{lid}")
        keys.append((key, where))
        if polygon is not None:
            xs, ys = [p[0] for p in polygon], [p[1] for p in polygon]
            box = (min(xs), min(ys), max(xs) + 1, max(ys) + 1)
        meta = {"page_id": pid, "writer_id": "", "group": pid, "line_id": lid,
                "file": pid + os.path.splitext(path)[1], "bbox": list(box)}
        lines.append(Line(key, " ".join(text.split()), pid, meta, bbox=box, polygon=polygon))
    if not lines:
        return None
    return Page(pid, lines, *locate_image(path, name))


def collect(opt: ImportOptions, rep: Report) -> Collected:
    return collect_xml(opt, rep, "alto", "alto", _page)


ALTO = Format("alto", "ALTO XML (v2-v4, pixel units) + page images: each TextLine box (or polygon) cut out", collect)
