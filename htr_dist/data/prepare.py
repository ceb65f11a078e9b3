"""Line records of any format (see :mod:`htr_dist.data.formats`) -> WebDataset shards + manifest, in parallel,
atomically, reporting problems.

A format's parser turns its source into pages of line records and names every line it cannot use; this module does
the rest, once for every format: the split (the source's own, split lists given with ``--splits``, or by group:
:func:`htr_dist.data.formats.base.assign_by_group`), cutting the line images in parallel worker processes
(:func:`_page_samples`: a box, a masked polygon, or a line's own image file), the shards, the alphabet (the training
split's characters) and the manifest. Every line not written (and every line written with a flaw) is named in the log,
counted in the summary and recorded in the manifest's ``problems`` (see :class:`Problems`): nothing is dropped
silently. A split left without lines, or a line id met twice, is an error: nothing is written.

A run replaces the previous output as a whole or not at all: every split and the manifest are first written into a
staging folder ``OUT/.staging-<pid>`` (hidden, never named by a manifest, so never read as data), and only a complete
staging folder is moved into ``OUT`` (:func:`_commit`). A failed or interrupted run leaves ``OUT`` as it was; the
staging folder a killed run leaves behind is removed, or its move completed, by the next run (:func:`_recover`).
"""

from __future__ import annotations

import glob
import json
import logging
import os
import shutil
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from htr_dist.data import iam
from htr_dist.data.formats import FORMATS, Format
from htr_dist.data.formats.base import (Collected, ImportOptions, Line, Page, Problems, Report, assign_by_group,
                                        assign_from_lists, by_split, read_split_lists)
from htr_dist.data.shards import EXTRA_SPLITS, MANIFEST, SPLITS, png_bytes, write_manifest, write_split
from htr_dist.data.transforms import gray8
from htr_dist.data.workers import worker_pool
from htr_dist.errors import DataFormatError

log = logging.getLogger(__name__)

STAGING = ".staging-"
"""Prefix of the staging folder inside the output folder; the process id follows."""

__all__ = ["ImportOptions", "PrepareOptions", "Problems", "prepare", "prepare_format", "summary"]


@dataclass
class PrepareOptions:
    """IAM's options as :func:`prepare` takes them (formats ``iam`` and ``iam-lines`` of :func:`prepare_format`)."""

    forms_dir: str
    """Folder holding formsA-D/ formsE-H/ formsI-Z/ or forms/, or the form images (source=forms); or lines/
    (source=lines)."""
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
    """The messages of the problems met, filled in by :func:`prepare`."""


def _load_gray(path: str) -> np.ndarray:
    with Image.open(path) as im:
        return gray8(im)


class _Outside(ValueError):
    """A line's polygon has no pixel inside its page image."""


def masked_crop(page: np.ndarray, polygon: List[Tuple[int, int]], margin: int = 0,
                scale: float = 1.0) -> Tuple[np.ndarray, bool]:
    """The crop of ``polygon``'s bounding box (plus ``margin``) from ``page`` (a (H, W) uint8 array), every pixel
    outside the polygon white (255), then rescaled by ``scale``; and whether the polygon reaches outside the page
    (then only its part inside is cut out). A polygon with no pixel inside the page raises ``_Outside``."""
    h, w = page.shape
    xs, ys = [p[0] for p in polygon], [p[1] for p in polygon]
    if max(xs) < 0 or max(ys) < 0 or min(xs) >= w or min(ys) >= h:
        raise _Outside(f"polygon x {min(xs)}..{max(xs)}, y {min(ys)}..{max(ys)} lies outside the {w}x{h} image")
    clipped = min(xs) < 0 or min(ys) < 0 or max(xs) >= w or max(ys) >= h
    x0, y0 = max(0, min(xs) - margin), max(0, min(ys) - margin)
    x1, y1 = min(w, max(xs) + 1 + margin), min(h, max(ys) + 1 + margin)
    mask = Image.new("L", (x1 - x0, y1 - y0), 0)
    ImageDraw.Draw(mask).polygon([(x - x0, y - y0) for x, y in polygon], fill=255, outline=255)
    crop = np.where(np.asarray(mask) > 0, page[y0:y1, x0:x1], np.uint8(255)).astype(np.uint8)  # (h, w)
    if scale != 1.0:
        crop = iam.crop_line(crop, (0, 0, crop.shape[1], crop.shape[0]), 0, scale)
    return crop, clipped


def _line_image(line: Line, page: Optional[np.ndarray], margin: int, scale: float) -> Tuple[np.ndarray, List[str]]:
    """One line's pixels, and the flaws it is written with (besides its own)."""
    if line.polygon is not None:
        crop, clipped = masked_crop(page, line.polygon, margin, scale)
        return crop, ["polygon_clipped"] if clipped else []
    if line.bbox is not None and line.image is None:
        return iam.crop_line(page, line.bbox, margin, scale), []
    crop = _load_gray(line.image)
    if scale != 1.0:
        crop = iam.crop_line(crop, (0, 0, crop.shape[1], crop.shape[0]), 0, scale)
    return crop, []


def _page_samples(job: Tuple[Page, int, float]) -> Tuple[List[dict], List[Tuple[str, str]], List[str]]:
    """Worker: the shard samples of one page; the (kind, message) of each line not written; messages about lines
    written with a flaw."""
    page, margin, scale = job
    skipped: List[Tuple[str, str]] = []
    notes: List[str] = []
    samples = []
    if page.missing is not None:  # one message per line, so each unwritten line is named
        kind, why = page.missing
        return [], [(kind, f"{why}: line {l.id} not written") for l in page.lines], []
    image = None
    if page.image is not None:
        try:
            image = _load_gray(page.image)
        except (OSError, ValueError, Image.DecompressionBombError) as err:
            return [], [("unreadable_image", f"{page.image}: cannot decode ({err}); line {l.id} not written")
                        for l in page.lines], []
    for line in page.lines:
        if line.image is not None and not os.path.isfile(line.image):
            skipped.append(("missing_line_image", f"{line.image}: not found; line {line.id} not written"))
            continue
        try:
            crop, flaws = _line_image(line, image, margin, scale)
        except _Outside as err:
            skipped.append(("polygon_outside_image", f"{page.image}: line {line.id}: {err}; not written"))
            continue
        except (OSError, ValueError, Image.DecompressionBombError) as err:
            skipped.append(("unreadable_image", f"line {line.id}: {err}"))
            continue
        if flaws:
            notes.append(f"{page.image}: line {line.id}: its polygon reaches outside the image; the part inside is "
                         "written")
        samples.append({"key": line.id, "png": png_bytes(crop), "text": line.text, "meta": line.meta,
                        "flaws": list(line.flaws) + flaws})
    return samples, skipped, notes


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
                        "if no htr-prepare or prepare_iam.py is writing to %s)", staging, pid, out_dir)
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
    """IAM (``opt.source``: ``forms`` or ``lines``) -> ``opt.out_dir``; see :func:`prepare_format`. The messages of
    the problems met are also put in ``opt.problems``."""
    fmt = FORMATS["iam" if opt.source == "forms" else "iam-lines"]
    options = ImportOptions(opt.forms_dir, opt.out_dir, splits_dir=opt.splits_dir, scale=opt.scale,
                            margin=opt.margin, shard_size=opt.shard_size, workers=opt.workers, name=opt.name,
                            xml_dir=opt.xml_dir, lines_txt=opt.lines_txt or "")  # "": none (None: the default)
    report = Report()
    try:
        return prepare_format(fmt, options, progress, report)
    finally:
        opt.problems.extend(report.messages)


def _check_options(opt: ImportOptions) -> None:
    if not opt.scale > 0:
        raise ValueError(f"scale must be > 0, got {opt.scale!r}")
    if opt.shard_size < 1 or opt.workers < 0 or (opt.margin is not None and opt.margin < 0):
        raise ValueError("shard size must be >= 1, workers and margin >= 0")
    fractions = (opt.val_fraction, opt.test_fraction)
    if not all(0 <= f < 1 for f in fractions) or sum(fractions) >= 1:
        raise ValueError(f"val and test fractions must be in [0, 1) with a sum below 1, got {fractions}")


def _split(opt: ImportOptions, found: Collected, report: Report) -> Dict[str, List[Page]]:
    """Each line's split (the source's, the lists', or by group); split -> its pages. A split without lines is an
    error."""
    how = "as the source gives them"
    if not found.split_given and opt.splits_dir:
        assign_from_lists(found.pages, read_split_lists(opt.splits_dir), opt.splits_dir, report)
        how = f"from the lists under {opt.splits_dir}"
    elif not found.split_given:
        groups = assign_by_group(found.pages, opt.val_fraction, opt.test_fraction, opt.seed)
        per = Counter(groups.values())
        how = (f"by group (val {opt.val_fraction:g}, test {opt.test_fraction:g} of the lines, seed {opt.seed}): "
               f"groups per split {dict(sorted(per.items()))}")
    pages = by_split(found.pages)
    log.info("splits %s", how)
    for split in SPLITS:
        if not any(p.lines for p in pages.get(split, [])):
            raise DataFormatError(f"split {split!r}: no line to write ({how}; see the problems above); nothing "
                                  f"written to {opt.out_dir}")
    return pages


def prepare_format(fmt: Format, opt: ImportOptions, progress: bool = True, report: Optional[Report] = None) -> dict:
    """Read ``opt.source`` with format ``fmt``; write ``opt.out_dir/{train,val,test}-%06d.tar`` and
    ``manifest.json``; return the manifest.

    All of it is written into ``opt.out_dir/.staging-<pid>`` first and moved in only once complete (see the module
    docstring): if writing fails or is interrupted, ``opt.out_dir`` holds the previous output, untouched; if the
    final renames are interrupted, the next run completes them.
    """
    _check_options(opt)
    report = report if report is not None else Report()
    found = fmt.collect(opt, report)
    pages = _split(opt, found, report)
    _recover(opt.out_dir)
    staging = os.path.join(opt.out_dir, f"{STAGING}{os.getpid()}")
    os.makedirs(staging)
    try:
        margin = fmt.margin if opt.margin is None else opt.margin
        manifest = _write_staging(opt, staging, found, pages, report, margin, progress)
    except BaseException:  # failed or interrupted (Ctrl-C): the previous output stays as it was
        _discard(staging)
        raise
    try:
        _commit(staging, opt.out_dir)
    except BaseException:
        log.error("moving %s into %s was interrupted; the next run completes it", staging, opt.out_dir)
        raise
    return manifest


def _write_staging(opt: ImportOptions, staging: str, found: Collected, pages: Dict[str, List[Page]], report: Report,
                   margin: int, progress: bool) -> dict:
    """Write every split's shards, then the manifest, into ``staging``; return the manifest.

    A split of which no line could be written raises DataFormatError (the caller removes ``staging``).
    """
    problems, unit = report.problems, found.unit
    workers = opt.workers or os.cpu_count() or 1
    log.info("%s source, %d %ss with usable lines; %ss per split: %s; %d worker(s) -> %s", found.label,
             len({p.id for v in pages.values() for p in v}), unit, unit, {k: len(v) for k, v in pages.items()},
             workers, opt.out_dir)
    bar = tqdm(total=sum(len(v) for v in pages.values()), desc=unit + "s", unit=unit, disable=not progress)
    texts: Dict[str, List[str]] = defaultdict(list)
    entries = {}
    with worker_pool(workers) as pool:
        for split in SPLITS + tuple(s for s in EXTRA_SPLITS if s in pages):
            jobs = [(page, margin, opt.scale) for page in pages.get(split, [])]
            lost: Counter = Counter()

            def stream(jobs=jobs, split=split, lost=lost) -> Iterator[dict]:
                for samples, skipped, notes in pool.imap(_page_samples, jobs, chunksize=16 if unit == "line" else 4):
                    bar.update(1)
                    for kind, msg in skipped:
                        lost[kind] += 1
                        report.skip(kind, msg)
                    for msg in notes:
                        report.say(msg)
                    for s in samples:
                        for flaw in s["flaws"]:
                            problems.written[flaw] += 1
                        texts[split].append(s["text"])
                        yield s

            entries[split] = write_split(stream(), staging, split, opt.shard_size)
            log.info("%s: %d lines in %d shard(s)", split, sum(e["count"] for e in entries[split]),
                     len(entries[split]))
            if not entries[split]:
                raise DataFormatError(
                    f"split {split!r}: none of its {sum(lost.values())} line(s) could be written (" +
                    ", ".join(f"{k} {v}" for k, v in sorted(lost.items())) + f"; see the problems above); nothing "
                    f"written to {opt.out_dir}")
    bar.close()
    alphabet = "".join(sorted(set("".join(texts["train"]))))
    source = f"{found.label}: {os.path.abspath(opt.source)}"
    name = opt.name or os.path.basename(os.path.normpath(opt.out_dir))
    # last: a staging folder with a manifest is complete
    return write_manifest(staging, name, source, entries, alphabet, problems.manifest(report.messages))


_WRITTEN = {
    "writer_id_unknown": "written, but writer id unknown (writer_id \"\": no readable XML of the form gives it)",
    "text_from_lines_txt": "written, but with lines.txt's token spacing (no readable XML has the line's text)",
    "polygon_clipped": "written, but the polygon reaches outside the page image (the part inside is written)",
}


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
    for kind, n in written.items():
        if n:
            lines.append(f"{_WRITTEN.get(kind, 'written with flaw ' + kind)}: {n} line(s)")
    if forms:
        lines.append("forms with problems: " + ", ".join(f"{k} {v}" for k, v in sorted(forms.items())))
    if not (problems["total"] or uncounted or any(written.values()) or forms):
        lines.append("no problems: every line was written")
    return "\n".join(lines)
