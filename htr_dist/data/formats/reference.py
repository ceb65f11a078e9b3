"""Format ``reference``: the folders the reference HTR system's ``prepare_iam.py`` (and the seed's) write.

    SOURCE/train/gt.txt  SOURCE/train/a01-000u-00.png ...
    SOURCE/val/gt.txt    ...
    SOURCE/test/gt.txt   ...

Each line of ``gt.txt`` is ``<image name> <transcription>``: the name is everything before the first space and the
image is ``<split folder>/<name>.png``, as the reference's data set reads it; the transcription is the rest of the
line (its inner spaces kept, its ends stripped). A name that is already a file name with an image extension, or
whose image has another extension (``.jpg``, ``.tif`` ...), is found as well. The split is the folder's (``val``
and ``validation`` are both val), unless ``--splits`` gives lists of names.
"""

from __future__ import annotations

import os
from typing import List

from htr_dist.data.formats.base import (IMAGE_EXTENSIONS, SPLIT_NAMES, Collected, Format, ImportOptions, Line, Page,
                                        Report, check_unique, image_beside, safe_key)
from htr_dist.errors import DataFormatError

GT_FILE = "gt.txt"


def _image(folder: str, name: str) -> str:
    """The image a gt.txt name stands for: ``name.png`` (or another extension), or ``name`` itself when it is an
    image file; ``name.png`` when none exists (the writer then reports it missing)."""
    path = os.path.join(folder, name)
    if os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS and os.path.isfile(path):
        return path
    return image_beside(path) or path + ".png"


def _read_gt(path: str) -> List[str]:
    try:
        with open(path, encoding="utf-8-sig") as f:
            return f.read().splitlines()
    except UnicodeDecodeError as err:
        raise DataFormatError(f"{path}: not UTF-8 ({err})") from None


def collect(opt: ImportOptions, rep: Report) -> Collected:
    if not os.path.isdir(opt.source):
        raise FileNotFoundError(f"reference data folder not found: {opt.source}")
    folders = sorted(d for d in os.listdir(opt.source)
                     if d.lower() in SPLIT_NAMES and os.path.isfile(os.path.join(opt.source, d, GT_FILE)))
    if not folders:
        raise FileNotFoundError(f"{opt.source}: no train/{GT_FILE}, val/{GT_FILE} or test/{GT_FILE} (the layout the "
                                "reference's prepare_iam.py writes)")
    pages: List[Page] = []
    keys = []
    for folder in folders:
        split = SPLIT_NAMES[folder.lower()]
        gt = os.path.join(opt.source, folder, GT_FILE)
        for number, raw in enumerate(_read_gt(gt), 1):
            row = raw.strip()
            if not row:
                continue
            name, _, text = row.partition(" ")
            text = text.strip()
            where = f"{gt}:{number}"
            if not text:
                rep.skip("empty_transcription", f"{where}: {name}: empty transcription; not written")
                continue
            key = safe_key(os.path.splitext(name)[0] if os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS
                           else name)
            keys.append((key, where))
            image = _image(os.path.join(opt.source, folder), name)
            meta = {"page_id": key, "writer_id": "", "group": folder,
                    "file": os.path.relpath(image, opt.source).replace(os.sep, "/")}
            pages.append(Page(key, [Line(key, text, folder, meta, split=split, image=image)]))
    check_unique(keys)
    return Collected(pages, "reference", split_given=not opt.splits_dir, unit="line")


REFERENCE = Format("reference", "{train,val,test}/gt.txt (\"<name> <text>\" a line) + <name>.png, as the reference's "
                                "prepare_iam.py writes", collect)
