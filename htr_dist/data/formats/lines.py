"""Format ``lines``: a folder (searched recursively) of line images, each with its transcription in a file of the same
name: ``x.png`` + ``x.gt.txt`` (kraken, OCR-D) or ``x.txt`` (PyLaia); ``.gt.txt`` wins when both are there.

The group a line is split with is its folder relative to SOURCE; for images directly in SOURCE, the file name up to
its last ``-`` or ``_`` (``page12_003.png`` -> ``page12``, ``a01-000u-00.png`` -> ``a01-000u``). The sample key is
the image's path relative to SOURCE without extension, with '/', '.' and spaces made '_'.
"""

from __future__ import annotations

import os
import re
from typing import List

from htr_dist.data.formats.base import (Collected, Format, ImportOptions, Line, Page, Report, check_unique,
                                        find_images, image_beside, read_text_file, safe_key)

_PREFIX = re.compile(r"^(.+)[-_][^-_]*$")


def group_of(rel: str) -> str:
    """A line image's group: its folder relative to SOURCE, or for a file directly in SOURCE its name up to the last
    '-' or '_' (the whole name when it has neither)."""
    folder, name = os.path.split(rel)
    if folder:
        return folder.replace(os.sep, "/")
    stem = os.path.splitext(name)[0]
    found = _PREFIX.match(stem)
    return found.group(1) if found else stem


def collect(opt: ImportOptions, rep: Report) -> Collected:
    if not os.path.isdir(opt.source):
        raise FileNotFoundError(f"line image folder not found: {opt.source}")
    images = find_images(opt.source)
    if not images:
        raise FileNotFoundError(f"no line images (*.png, *.jpg, *.tif ...) under {opt.source}")
    pages: List[Page] = []
    keys = []
    for path in images:
        stem = os.path.splitext(path)[0]
        rel = os.path.relpath(path, opt.source)
        text_file = next((p for p in (stem + ".gt.txt", stem + ".txt") if os.path.isfile(p)), None)
        if text_file is None:
            rep.skip("missing_transcription", f"{path}: no {os.path.basename(stem)}.gt.txt or .txt beside it; "
                                              "not written")
            continue
        try:
            text = read_text_file(text_file)
        except (OSError, UnicodeDecodeError) as err:
            rep.skip("unreadable_transcription", f"{text_file}: cannot be read as UTF-8 ({err}); {path} not written")
            continue
        if not text:
            rep.skip("empty_transcription", f"{text_file}: empty transcription; {path} not written")
            continue
        key = safe_key(os.path.splitext(rel)[0])
        keys.append((key, path))
        group = group_of(rel)
        meta = {"page_id": group, "writer_id": "", "group": group, "file": rel.replace(os.sep, "/")}
        pages.append(Page(key, [Line(key, text, group, meta, image=path)]))
    _orphans(opt, rep)
    check_unique(keys)
    return Collected(pages, "lines", unit="line")


def _orphans(opt: ImportOptions, rep: Report) -> None:
    """Report ``*.gt.txt`` files without an image (a plain ``.txt`` may be anything, so it is not)."""
    for folder, dirs, files in os.walk(opt.source):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(f for f in files if f.endswith(".gt.txt")):
            stem = os.path.join(folder, name[: -len(".gt.txt")])
            if image_beside(stem) is None:
                rep.skip("missing_line_image", f"{os.path.join(folder, name)}: no image {os.path.basename(stem)}.png "
                                               "(or .jpg, .tif ...) beside it; not written")


LINES = Format("lines", "a folder (recursive) of line images with same-name .gt.txt or .txt transcriptions", collect)
