"""The evaluation report of ``htr-eval --report DIR``: ``report.json`` and a static ``report.html`` people read.

Everything is derived from the per-line results (key, truth, prediction) that every rank gathers, plus what rank 0
reads again from the split's shards: each line's writer id (the ``writer_id`` of the sample's ``json`` member) and
the images of the worst lines only. Character errors come from a Levenshtein alignment of each line
(:func:`align`): its substitutions, deletions and insertions add up to the line's edit distance.

The HTML page needs no server, network, script or stylesheet file: CSS is inline, the CER histogram
(``cer_histogram.png``, drawn with PIL) and the worst lines' images (``lines/*.png``) are files beside it. The folder is
written under a temporary name and renamed into place, so a reader never sees half a report.
"""

from __future__ import annotations

import html
import io
import json
import os
import re
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence, Set, Tuple

from htr_dist.data.shards import load_manifest, tar_samples
from htr_dist.errors import InputError
from htr_dist.io_utils import plain_mode
from htr_dist.train.metrics import edit_distance

TOP_CONFUSIONS = 20
"""Confusion pairs listed (the most frequent)."""
WORST_LINES = 50
"""Lines shown with their image (highest CER first)."""
NONE = "∅"
"""How the report shows the missing side of a deletion or an insertion."""
SPACE = "␣"
"""How the report shows a space that is part of an error (a plain space would be invisible)."""
HIST_BINS = [(0.0, 0.0)] + [(i / 20, (i + 1) / 20) for i in range(20)] + [(1.0, float("inf"))]
"""CER histogram bins: exactly 0, then (lo, hi] in steps of 5 %, then above 100 % (insertions can exceed it)."""


class ReportError(InputError, ValueError):
    """The report folder cannot be written where asked; the message names it."""


# -- alignment ------------------------------------------------------------------------------------------------------

Op = Tuple[str, str, str]
"""One step of an alignment: (kind, truth char, predicted char), kind ``=`` match, ``S``, ``D`` (predicted '') or
``I`` (truth '')."""


def align(truth: str, pred: str) -> List[Op]:
    """A minimal Levenshtein alignment of ``truth`` to ``pred``; its S + D + I is their edit distance. Of equally short
    alignments, the backtrace prefers a match or substitution, then a deletion, then an insertion."""
    n, m = len(truth), len(pred)
    dist = [list(range(m + 1))] + [[i] + [0] * m for i in range(1, n + 1)]  # (n+1, m+1)
    for i in range(1, n + 1):
        row, prev, t = dist[i], dist[i - 1], truth[i - 1]
        for j in range(1, m + 1):
            row[j] = min(prev[j - 1] + (t != pred[j - 1]), prev[j] + 1, row[j - 1] + 1)
    ops: List[Op] = []
    i, j = n, m
    while i or j:
        if i and j and dist[i][j] == dist[i - 1][j - 1] + (truth[i - 1] != pred[j - 1]):
            ops.append(("=" if truth[i - 1] == pred[j - 1] else "S", truth[i - 1], pred[j - 1]))
            i, j = i - 1, j - 1
        elif i and dist[i][j] == dist[i - 1][j] + 1:
            ops.append(("D", truth[i - 1], ""))
            i -= 1
        else:
            ops.append(("I", "", pred[j - 1]))
            j -= 1
    return ops[::-1]


def error_counts(ops: Iterable[Op]) -> Dict[str, int]:
    kinds = Counter(kind for kind, _, _ in ops)
    return {"substitutions": kinds["S"], "deletions": kinds["D"], "insertions": kinds["I"]}


def confusions(ops: Iterable[Op]) -> Counter:
    """(truth char, predicted char) of every error; '' is the missing side of a deletion or an insertion."""
    return Counter((t, p) for kind, t, p in ops if kind != "=")


# -- the report's numbers -------------------------------------------------------------------------------------------


@dataclass
class Line:
    key: str
    truth: str
    pred: str
    errors: int
    writer: Optional[str]
    ops: List[Op]

    @property
    def cer(self) -> float:
        return self.errors / max(1, len(self.truth))


def read_split_extras(folder: str, split: str, image_keys: Set[str]) -> Tuple[Dict[str, str], Dict[str, bytes]]:
    """Writer id (the ``writer_id`` of each sample's json member, where it has a non-empty one) of every line of
    ``split``, and the PNG bytes of the lines in ``image_keys``. A shard that cannot be read is passed over: the
    evaluation has already reported it, and its lines count as without writer."""
    manifest = load_manifest(folder)
    sources = ({"url": os.path.join(folder, s["file"]), "count": s["count"]}
               for s in manifest["splits"][split]["shards"])
    writers, images = {}, {}
    for sample in tar_samples(sources, lambda err: True):
        key = sample["__key__"]
        try:
            writer = json.loads(sample["json"].decode("utf-8")).get("writer_id") if "json" in sample else None
        except (ValueError, AttributeError):  # a damaged or non-object json member: no writer for this line
            writer = None
        if writer not in (None, ""):
            writers[key] = str(writer)
        if key in image_keys and "png" in sample:
            images[key] = sample["png"]
    return writers, images


def worst_first(lines: Sequence[Line]) -> List[Line]:
    """Highest CER first; of equal CER the longer truth first (more errors), then by key."""
    return sorted(lines, key=lambda ln: (-ln.cer, -len(ln.truth), ln.key))


def writer_table(lines: Sequence[Line]) -> Optional[List[dict]]:
    """CER per writer, worst first; None when no line has a writer id. Lines without one form the writer None."""
    if all(ln.writer is None for ln in lines):
        return None
    groups: Dict[Optional[str], List[Line]] = {}
    for ln in lines:
        groups.setdefault(ln.writer, []).append(ln)
    rows = []
    for writer, group in groups.items():
        chars, errors = sum(len(ln.truth) for ln in group), sum(ln.errors for ln in group)
        rows.append({"writer": writer, "lines": len(group), "chars": chars, "errors": errors,
                     "cer": errors / max(1, chars)})
    return sorted(rows, key=lambda r: (-r["cer"], -r["chars"], str(r["writer"])))


def histogram(lines: Sequence[Line]) -> List[dict]:
    """Lines per CER bin of :data:`HIST_BINS`."""
    counts = [0] * len(HIST_BINS)
    for ln in lines:
        cer = ln.cer
        counts[next(i for i, (lo, hi) in enumerate(HIST_BINS) if (cer == 0 if hi == 0 else lo < cer <= hi))] += 1
    return [{"from": lo, "to": None if hi == float("inf") else hi, "lines": n}
            for (lo, hi), n in zip(HIST_BINS, counts)]


def build_report(results: Sequence, writers: Dict[str, str], scores: dict, model: str) -> Tuple[dict, List[Line]]:
    """The report's record (what ``report.json`` holds) and the lines, worst first. ``results``: the evaluation's
    :class:`~htr_dist.inference.LineResult` of every line; ``scores``: its corpus scores and split details."""
    lines = [Line(r.key, r.reference, r.prediction, r.distance, writers.get(r.key), align(r.reference, r.prediction))
             for r in results]
    totals = Counter()
    pairs = Counter()
    for ln in lines:
        totals.update(error_counts(ln.ops))
        pairs.update(confusions(ln.ops))
    ranked = worst_first(lines)
    table = writer_table(lines)
    record = {
        "model": model, "data": scores["data"], "split": scores["split"], "decode": scores["decode"],
        "cer": scores["cer"], "wer": scores["wer"], "lines": len(lines),
        "lines_expected": scores["lines_expected"], "lines_missing": scores["lines_missing"],
        "chars": sum(len(ln.truth) for ln in lines), "char_errors": sum(ln.errors for ln in lines),
        "words": sum(len(ln.truth.split()) for ln in lines),
        "word_errors": sum(edit_distance(ln.truth.split(), ln.pred.split()) for ln in lines),
        "substitutions": totals["substitutions"], "deletions": totals["deletions"], "insertions": totals["insertions"],
        "confusions": [{"truth": t, "prediction": p, "count": n} for (t, p), n in
                       sorted(pairs.items(), key=lambda kv: (-kv[1], kv[0]))[:TOP_CONFUSIONS]],
        "writers": table,
        "writers_note": None if table is not None else f"split {scores['split']!r} has no writer ids",
        "cer_histogram": histogram(lines),
        "worst_lines": [{"key": ln.key, "writer": ln.writer, "cer": ln.cer, "errors": ln.errors, "truth": ln.truth,
                         "prediction": ln.pred, "image": None} for ln in ranked[:WORST_LINES]],
    }
    return record, ranked


# -- HTML -----------------------------------------------------------------------------------------------------------

CSS = """
body { font-family: sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
h1 { font-size: 1.5em; } h2 { border-bottom: 1px solid #ccc; margin-top: 2em; }
table { border-collapse: collapse; } td, th { border: 1px solid #ccc; padding: 2px 8px; text-align: right; }
th { background: #f0f0f0; } td.text { text-align: left; font-family: monospace; }
.big { font-size: 1.4em; font-weight: bold; }
.line { margin: 1em 0; padding: 0.5em; border: 1px solid #ddd; }
.line img { max-width: 100%; display: block; margin: 0.3em 0; border: 1px solid #eee; }
.tr, .pr { font-family: monospace; white-space: pre-wrap; font-size: 1.1em; }
del { background: #f8c8c8; text-decoration: line-through; } ins { background: #c8f0c8; text-decoration: none; }
.sub { background: #f8e8a0; } .note { color: #666; }
"""


def show_char(c: str) -> str:
    """A character as a cell of the confusion table shows it (escaped): ∅ for none, ␣ for a space."""
    return NONE if c == "" else SPACE if c == " " else html.escape(c)


def _runs(ops: Sequence[Op], side: int) -> Iterable[Tuple[str, str]]:
    """Consecutive characters of one side (1 truth, 2 prediction) with the same kind of step, merged."""
    kind, text = None, ""
    for op in ops:
        if not op[side]:
            continue
        if op[0] != kind and text:
            yield kind, text
            text = ""
        kind, text = op[0], text + op[side]
    if text:
        yield kind, text


def highlighted(ops: Sequence[Op], side: int) -> str:
    """One side of an alignment as escaped HTML: deletions as <del> (truth), insertions as <ins> (prediction),
    substitutions as <span class=sub>; a space inside an error shows as ␣."""
    tags = {"D": ("<del>", "</del>"), "I": ("<ins>", "</ins>"), "S": ('<span class="sub">', "</span>")}
    out = []
    for kind, text in _runs(ops, side):
        if kind == "=":
            out.append(html.escape(text))
        else:
            start, end = tags[kind]
            out.append(start + html.escape(text.replace(" ", SPACE)) + end)
    return "".join(out)


def _pct(x: Optional[float]) -> str:
    return "—" if x is None else f"{100 * x:.2f}%"


def _table(head: Sequence[str], rows: Iterable[Sequence[str]], section: str) -> str:
    """A table of already escaped cells."""
    out = [f'<table id="{section}-table"><tr>' + "".join(f"<th>{h}</th>" for h in head) + "</tr>"]
    out += ["<tr>" + "".join(row) + "</tr>" for row in rows]
    return "\n".join(out + ["</table>"])


def _td(value, text: bool = False) -> str:
    return f'<td class="text">{value}</td>' if text else f"<td>{value}</td>"


def _summary(r: dict) -> str:
    missing = (f'<p class="note">{r["lines_missing"]} of the {r["lines_expected"]} lines of the split could not be '
               "read and are not counted.</p>" if r["lines_missing"] else "")
    rows = [("CER", _pct(r["cer"])), ("WER", _pct(r["wer"])), ("lines", r["lines"]),
            ("lines expected", r["lines_expected"]), ("characters", r["chars"]),
            ("character errors", r["char_errors"]), ("words", r["words"]), ("word errors", r["word_errors"])]
    return (f'<p class="big">CER {_pct(r["cer"])} · WER {_pct(r["wer"])}</p>' + missing +
            _table(["", "value"], ([_td(k, True), _td(v)] for k, v in rows), "summary"))


def _errors(r: dict) -> str:
    total = max(1, r["char_errors"])
    rows = [(name, r[key], f"{100 * r[key] / total:.1f}%") for name, key in
            (("substitutions", "substitutions"), ("deletions", "deletions"), ("insertions", "insertions"))]
    rows.append(("total (the edit distance)", r["substitutions"] + r["deletions"] + r["insertions"], "100.0%"))
    return _table(["kind", "characters", "share"], ([_td(a, True), _td(b), _td(c)] for a, b, c in rows), "errors")


def _confusions(r: dict) -> str:
    if not r["confusions"]:
        return '<p class="note">No character errors.</p>'
    rows = ([_td(show_char(c["truth"]), True), _td(show_char(c["prediction"]), True), _td(c["count"])]
            for c in r["confusions"])
    return _table(["truth", "prediction", "count"], rows, "confusions")


def _writers(r: dict) -> str:
    if r["writers"] is None:
        return f'<p class="note">{html.escape(r["writers_note"])}.</p>'
    rows = ([_td(html.escape("(none)" if w["writer"] is None else w["writer"]), True), _td(w["lines"]),
             _td(w["chars"]), _td(w["errors"]), _td(_pct(w["cer"]))] for w in r["writers"])
    return _table(["writer", "lines", "characters", "errors", "CER"], rows, "writers")


def _worst(r: dict, lines: Sequence[Line]) -> str:
    out = []
    for i, (entry, ln) in enumerate(zip(r["worst_lines"], lines), 1):
        image = (f'<img src="{html.escape(entry["image"])}" alt="line {html.escape(ln.key)}">' if entry["image"]
                 else '<p class="note">(image not readable from the shards)</p>')
        writer = f" · writer {html.escape(ln.writer)}" if ln.writer is not None else ""
        out.append(f'<div class="line" id="line-{i}"><strong>{i}. {html.escape(ln.key)}</strong> · CER {_pct(ln.cer)} '
                   f'({ln.errors} errors, {len(ln.truth)} characters){writer}{image}'
                   f'<div>truth: <span class="tr">{highlighted(ln.ops, 1)}</span></div>'
                   f'<div>prediction: <span class="pr">{highlighted(ln.ops, 2)}</span></div></div>')
    return "\n".join(out)


SECTIONS = ("summary", "errors", "confusions", "writers", "histogram", "worst")
"""The ids of the page's sections, in order (each an <h2> in a <section>)."""


def render_html(r: dict, lines: Sequence[Line], histogram_file: str) -> str:
    """The report page; ``lines``: the worst lines, as many as ``r["worst_lines"]`` lists."""
    title = f"{r['split']} of {r['data']} · {r['decode']} · {r['model']}"
    parts = {
        "summary": ("Summary", _summary(r)),
        "errors": ("Error types", _errors(r)),
        "confusions": (f"Top {TOP_CONFUSIONS} confusions", _confusions(r)),
        "writers": ("CER per writer", _writers(r)),
        "histogram": ("CER histogram", f'<img src="{histogram_file}" alt="histogram of the lines\' CER">'),
        "worst": (f"The {len(r['worst_lines'])} worst lines", _worst(r, lines)),
    }
    body = "\n".join(f'<section id="{sid}"><h2>{parts[sid][0]}</h2>\n{parts[sid][1]}\n</section>' for sid in SECTIONS)
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{CSS}</style></head><body>\n<h1>Evaluation report</h1>\n"
            f'<p>model {html.escape(r["model"])}<br>data {html.escape(r["data"])}, split {html.escape(r["split"])}, '
            f'decode {html.escape(r["decode"])}</p>\n{body}\n</body></html>\n')


def histogram_png(bins: Sequence[dict], width: int = 720, height: int = 300) -> bytes:
    """A bar chart of :func:`histogram`'s bins as PNG bytes, drawn with PIL (no plotting library needed)."""
    from PIL import Image, ImageDraw, ImageFont

    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default(size=12)
    left, right, top, bottom = 50, 10, 20, 40
    plot_w, plot_h = width - left - right, height - top - bottom
    peak = max(1, max(b["lines"] for b in bins))
    bar = plot_w / len(bins)
    for i, b in enumerate(bins):
        h = plot_h * b["lines"] / peak
        x0 = left + i * bar
        if b["lines"]:
            draw.rectangle([x0 + 1, top + plot_h - h, x0 + bar - 2, top + plot_h], fill=(70, 110, 180))
            draw.text((x0 + bar / 2, top + plot_h - h - 2), str(b["lines"]), fill="black", font=font, anchor="mb")
    draw.line([left, top + plot_h, width - right, top + plot_h], fill="black")
    draw.line([left, top, left, top + plot_h], fill="black")
    # bin i (1..20) ends at 5i %: 25 % steps under those right edges, the exact-0 bin's label under its middle; the
    # last edge's "100%" ends at it and the bin above 100 % has its label start there, so that the two do not overlap
    ticks = [(left + 0.5 * bar, "0", "mt")] + [(left + (i + 1) * bar, f"{5 * i}%", "mt") for i in (5, 10, 15)]
    ticks += [(left + 21 * bar - 2, "100%", "rt"), (left + 21 * bar + 2, ">100%", "lt")]
    for x, text, anchor in ticks:
        draw.text((x, top + plot_h + 4), text, fill="black", font=font, anchor=anchor)
    draw.text((left + plot_w / 2, height - 4), "CER of a line", fill="black", font=font, anchor="mb")
    draw.text((4, top + plot_h / 2), "lines", fill="black", font=font, anchor="lm")
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


# -- writing --------------------------------------------------------------------------------------------------------


def check_report_dir(path: str) -> None:
    """Refuse, before any work, a ``--report`` path that holds something other than an earlier report."""
    if os.path.exists(path) and not (os.path.isdir(path) and (not os.listdir(path) or
                                                              os.path.isfile(os.path.join(path, "report.json")))):
        raise ReportError(f"{path}: exists and is not a report folder (no report.json); choose another --report")


def write_report(out_dir: str, results: Sequence, scores: dict, model: str) -> dict:
    """Write ``report.json``, ``report.html``, ``cer_histogram.png`` and ``lines/*.png`` into ``out_dir`` (replacing
    an earlier report there); returns the record. The folder appears complete or not at all."""
    check_report_dir(out_dir)
    # the worst lines are known before any image is read: only their images are read from the shards
    provisional = worst_first([Line(r.key, r.reference, r.prediction, r.distance, None, []) for r in results])
    writers, images = read_split_extras(scores["data"], scores["split"],
                                        {ln.key for ln in provisional[:WORST_LINES]})
    record, ranked = build_report(results, writers, scores, model)
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix="." + os.path.basename(os.path.abspath(out_dir)) + ".")
    try:
        _fill(tmp, record, ranked[:WORST_LINES], images)
        plain_mode(tmp, directory=True)
        _swap(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return record


def _fill(folder: str, record: dict, worst: Sequence[Line], images: Dict[str, bytes]) -> None:
    os.makedirs(os.path.join(folder, "lines"))
    for i, (entry, ln) in enumerate(zip(record["worst_lines"], worst), 1):
        if ln.key in images:
            entry["image"] = f"lines/{i:02d}-{re.sub(r'[^A-Za-z0-9_-]', '_', ln.key)}.png"
            with open(os.path.join(folder, entry["image"]), "wb") as f:
                f.write(images[ln.key])
    with open(os.path.join(folder, "cer_histogram.png"), "wb") as f:
        f.write(histogram_png(record["cer_histogram"]))
    with open(os.path.join(folder, "report.json"), "w", encoding="utf-8") as f:
        f.write(json.dumps(record, indent=2, ensure_ascii=False) + "\n")
    with open(os.path.join(folder, "report.html"), "w", encoding="utf-8") as f:
        f.write(render_html(record, worst, "cer_histogram.png"))


def _swap(tmp: str, out_dir: str) -> None:
    """Rename the finished folder ``tmp`` to ``out_dir``; an earlier report there is moved aside first, then removed."""
    old = None
    if os.path.exists(out_dir):
        old = tmp + ".old"
        os.replace(out_dir, old)
    try:
        os.replace(tmp, out_dir)
    except BaseException:
        if old:
            os.replace(old, out_dir)
        raise
    if old:
        shutil.rmtree(old, ignore_errors=True)
