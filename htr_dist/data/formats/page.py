"""Format ``page``: PAGE-XML files (any schema version: 2010, 2013, 2017, 2019), one page image each.

Every ``TextLine`` with a ``Coords`` polygon (``points="x1,y1 x2,y2 ..."``, or the 2010 schema's ``<Point>``
children) becomes one line: the crop of the polygon's bounding box from the page image, with every pixel outside the
polygon made white (a masked crop: the ascenders and descenders of the lines above and below do not leak in). Its
transcription is the line's own ``TextEquiv/Unicode`` (the one with ``index="0"``, or the first; never the words').

The page image is ``Page@imageFilename`` resolved against the XML's folder, or against its parent (Transkribus puts
the XML in ``page/`` beside the images), or else an image of the XML's name beside it. SOURCE is one XML file or a
folder searched recursively for ``*.xml``. The sample key is ``<xml path relative to SOURCE>_<TextLine id>``; the
group (the automatic split keeps a page's lines together) is the page.
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from typing import Callable, List, Optional, Tuple

from htr_dist.data.formats.base import (Collected, Format, ImportOptions, Line, Page, Report, check_unique,
                                        image_beside, safe_key)

def xml_files(source: str) -> List[str]:
    """SOURCE itself when it is a file, else every ``*.xml`` under it (recursive, sorted, hidden folders skipped)."""
    if os.path.isfile(source):
        return [source]
    if not os.path.isdir(source):
        raise FileNotFoundError(f"XML folder not found: {source}")
    out = []
    for folder, dirs, files in os.walk(source):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        out += [os.path.join(folder, f) for f in sorted(files) if f.lower().endswith(".xml")]
    if not out:
        raise FileNotFoundError(f"no *.xml files under {source}")
    return out


def page_id(path: str, source: str) -> str:
    """A page's id: the XML's path relative to SOURCE (its name when SOURCE is the file), without extension."""
    base = os.path.dirname(source) if os.path.isfile(source) else source
    return os.path.splitext(os.path.relpath(path, base))[0].replace(os.sep, "/")


def find_page_image(xml_path: str, name: str) -> Optional[str]:
    """The page image: ``name`` against the XML's folder, then its parent, then an image named like the XML."""
    folder = os.path.dirname(xml_path)
    if name:
        for base in (folder, os.path.dirname(folder)):
            for candidate in (os.path.join(base, name), os.path.join(base, os.path.basename(name))):
                if os.path.isfile(candidate):
                    return os.path.normpath(candidate)
    return image_beside(os.path.splitext(xml_path)[0])


def locate_image(xml_path: str, name: str) -> Tuple[Optional[str], Optional[Tuple[str, str]]]:
    """(the page image, None), or (None, the (kind, why) of :attr:`Page.missing`) when it is not found."""
    image = find_page_image(xml_path, name)
    if image is not None:
        return image, None
    stem = os.path.splitext(os.path.basename(xml_path))[0]
    return None, ("missing_page_image", f"{xml_path}: page image {name or '(none named)'} not found beside it, nor "
                                        f"{stem}.png/.jpg/.tif")


def collect_xml(opt: ImportOptions, rep: Report, label: str, root_name: str,
                read_page: Callable[[str, ET.Element, ImportOptions, Report, list], Optional[Page]]) -> Collected:
    """The pages of every XML file under SOURCE whose root element is ``root_name`` (any namespace), read by
    ``read_page``; other XML files and malformed ones are reported. A line key met twice is an error."""
    pages, keys = [], []
    for path in xml_files(opt.source):
        root = parse_xml(path, rep)
        if root is None:
            continue
        if root.tag.rpartition("}")[2] != root_name:
            rep.problems.forms[f"not_{label}"] += 1
            rep.say(f"{path}: root element {root.tag} is not {root_name} ({label}); skipped")
            continue
        page = read_page(path, root, opt, rep, keys)
        if page is not None:
            pages.append(page)
    check_unique(keys)
    return Collected(pages, label, unit="page")


def parse_points(coords: ET.Element) -> Optional[List[Tuple[int, int]]]:
    """A ``Coords`` element's polygon (``points`` attribute, or ``<Point x y>`` children); None if it has fewer
    than 3 points or a number cannot be read."""
    try:
        if coords.get("points") is not None:
            pairs = [p.split(",") for p in coords.get("points").split()]
            points = [(round(float(x)), round(float(y))) for x, y in pairs]
        else:
            points = [(round(float(p.get("x"))), round(float(p.get("y")))) for p in coords.findall("{*}Point")]
    except (TypeError, ValueError):
        return None
    return points if len(points) >= 3 else None


def line_text(line: ET.Element) -> Optional[str]:
    """The line's own ``TextEquiv/Unicode`` (``index="0"``, or the first); None when it has none."""
    equivs = line.findall("{*}TextEquiv")
    if not equivs:
        return None
    chosen = next((e for e in equivs if e.get("index") == "0"), equivs[0])
    unicode = chosen.find("{*}Unicode")
    return None if unicode is None else (unicode.text or "")


def parse_xml(path: str, rep: Report) -> Optional[ET.Element]:
    """The root of one XML file, or None after reporting it as malformed (counted per file: its lines are
    unknown)."""
    try:
        return ET.parse(path).getroot()
    except (ET.ParseError, OSError, LookupError) as err:
        rep.problems.forms["malformed_xml"] += 1
        rep.say(f"{path}: malformed or unreadable XML ({err}); its lines are not written, how many is unknown")
        return None


def _page(path: str, root: ET.Element, opt: ImportOptions, rep: Report, keys: list) -> Optional[Page]:
    page_el = root.find("{*}Page")
    if page_el is None:
        rep.problems.forms["no_page_element"] += 1
        rep.say(f"{path}: PAGE-XML without a <Page> element; skipped")
        return None
    pid = page_id(path, opt.source)
    lines = []
    elements = page_el.findall(".//{*}TextLine")
    if not elements:
        rep.problems.forms["page_without_lines"] += 1
        rep.say(f"{path}: no TextLine; nothing to write")
    for el in elements:
        lid = el.get("id", "")
        where = f"{path}: TextLine {lid or '(no id)'}"
        key = safe_key(f"{pid}_{lid}")
        coords = el.find("{*}Coords")
        points = None if coords is None else parse_points(coords)
        if points is None:
            rep.skip("bad_coords", f"{where}: no Coords polygon of 3 or more points; not written")
            continue
        text = line_text(el)
        if not (text or "").strip():
            what = "no TextEquiv/Unicode" if text is None else "empty transcription"
            rep.skip("empty_transcription", f"{where}: {what}; not written")
            continue
        xs, ys = [p[0] for p in points], [p[1] for p in points]
        bbox = (min(xs), min(ys), max(xs) + 1, max(ys) + 1)
        meta = {"page_id": pid, "writer_id": "", "group": pid, "line_id": lid,
                "file": pid + os.path.splitext(path)[1],
                "bbox": list(bbox)}
        keys.append((key, where))
        lines.append(Line(key, " ".join(text.split()), pid, meta, bbox=bbox, polygon=points))
    if not lines:
        return None
    return Page(pid, lines, *locate_image(path, page_el.get("imageFilename", "")))


def collect(opt: ImportOptions, rep: Report) -> Collected:
    return collect_xml(opt, rep, "page", "PcGts", _page)


PAGE = Format("page", "PAGE-XML (2010-2019) + page images: each TextLine polygon cut out as a masked crop", collect)
