"""Synthetic IAM: whole forms rendered with handwriting-style fonts, written in IAM's exact on-disk layout.

    OUT/forms/<form id>.png        grayscale form: a machine-printed header, then handwritten lines
    OUT/xml/<form id>.xml          ISO-8859-1 IAM XML: form / machine-printed-part / handwritten-part / line / word / cmp
    OUT/ascii/lines.txt            IAM's line list (id, segmentation, gray level, components, box, words joined by |)
    OUT/splits/{train,validation,test}.uttlist   form ids

A font plays the part of a writer. Text is English prose that ships with Python (``pydoc_data``), cut into lines on
word boundaries and drawn without replacement, so no line of the test forms appears in training. Variation: font size,
slant (shear), baseline and word jitter, word spacing, ink darkness, blur and paper noise. The same seed and fonts give
the same bytes. It goes through the same ``prepare_iam.py`` as the real IAM.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import random
import re
import shutil
import tempfile
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont
from tqdm import tqdm

log = logging.getLogger(__name__)

# (Debian package, font file) pairs: handwriting-style fonts with lowercase letters (see the README).
FONT_PACKAGES = [
    ("fonts-dkg-handwriting", "dkg.ttf"),
    ("fonts-breip", "Breip.ttf"),
    ("fonts-femkeklaver", "femkeklaver.ttf"),
    ("fonts-rufscript", "Rufscript010.ttf"),
    ("fonts-ecolier-court", "Ecolier-court.ttf"),
    ("fonts-dancingscript", "DancingScript-Regular.otf"),
    ("fonts-kaushanscript", "KaushanScript-Regular.otf"),
    ("fonts-comic-neue", "ComicNeue-Regular.otf"),
]
FONT_DIRS = ("/usr/share/fonts", "/usr/local/share/fonts", os.path.expanduser("~/.local/share/fonts"))
FORM_WIDTH = 1800
ALLOWED = re.compile(r"^[A-Za-z0-9.,;:'\"!?()&\-]+$")


class FontsNotFound(RuntimeError):
    """No handwriting font is installed; the message names the apt packages to install."""


def find_fonts(names: Optional[Sequence[str]] = None) -> List[str]:
    """Paths of the handwriting fonts: the given paths/file names, or every known one that is installed."""
    wanted = list(names) if names else [f for _, f in FONT_PACKAGES]
    found = []
    index = {}
    for root in FONT_DIRS:
        for folder, _, files in os.walk(root):
            for f in files:
                index.setdefault(f, os.path.join(folder, f))
    for name in wanted:
        if os.path.isfile(name):
            found.append(name)
        elif name in index:
            found.append(index[name])
        elif names:
            raise FontsNotFound(f"font not found: {name} (give a file path or an installed font file name)")
    if not found:
        packages = " ".join(p for p, _ in FONT_PACKAGES)
        raise FontsNotFound(f"no handwriting font found under {', '.join(FONT_DIRS)}; install them with: "
                            f"sudo apt-get install {packages}")
    return found


def prose_lines(rng: random.Random, min_chars: int = 18, max_chars: int = 56) -> List[str]:
    """English prose shipped with Python, cut into unique line-sized chunks of plain words, in a seeded order."""
    from pydoc_data.topics import topics

    words = []
    for key in sorted(topics):
        for w in topics[key].split():
            if ALLOWED.match(w) and len(w) <= 14 and not w.startswith(("'", "(")) or w in ("(a", "(the"):
                words.append(w)
    lines, current = [], []
    for w in words:
        if current and len(" ".join(current + [w])) > rng.randint(min_chars, max_chars):
            lines.append(" ".join(current))
            current = []
        current.append(w)
    unique = sorted(set(lines))
    rng.shuffle(unique)
    return unique


@dataclass
class FormSpec:
    form_id: str
    writer_id: str
    font: str
    lines: List[str]
    seed: int


def _word_image(font: ImageFont.FreeTypeFont, word: str, shear: float, ink: int) -> Image.Image:
    """The word in dark ink on white, slanted by ``shear``; cropped to its ink."""
    ascent, descent = font.getmetrics()
    left, _, right, _ = font.getbbox(word, anchor="ls")
    pad = int(abs(shear) * (ascent + descent)) + 4
    # every word image has the baseline at the same height, so words pasted at one y share a baseline
    img = Image.new("L", (right - left + 2 * pad, ascent + descent + 8), 255)
    ImageDraw.Draw(img).text((pad - left, 4 + ascent), word, font=font, fill=ink, anchor="ls")
    if shear:
        h = img.height
        img = img.transform(img.size, Image.AFFINE, (1, shear, -shear * h / 2, 0, 1, 0), Image.BILINEAR,
                            fillcolor=255)
    return img


def render_form(spec: FormSpec) -> Tuple[np.ndarray, ET.Element, List[str]]:
    """Render one form; return the gray image, its IAM XML tree and its lines.txt rows."""
    rng = random.Random(spec.seed)
    size = rng.randint(38, 50)
    font = ImageFont.truetype(spec.font, size)
    shear = rng.uniform(-0.3, 0.15)
    ink = rng.randint(0, 70)
    line_h = int(size * rng.uniform(1.9, 2.3))
    top = 360
    height = top + line_h * (len(spec.lines) + 1) + 120
    page = Image.new("L", (FORM_WIDTH, height), 255)
    draw = ImageDraw.Draw(page)
    printed = ImageFont.load_default(size=26)
    root = ET.Element("form", {"id": spec.form_id, "writer-id": spec.writer_id, "width": str(FORM_WIDTH),
                               "height": str(height), "created": "synthetic"})
    mp_part = ET.SubElement(root, "machine-printed-part")
    draw.text((120, 60), f"Sentence Database   {spec.form_id}", font=printed, fill=0)
    for i, text in enumerate(spec.lines[:3]):
        draw.text((120, 130 + 40 * i), text, font=printed, fill=0)
        ET.SubElement(mp_part, "machine-print-line", {"text": text})
    hw = ET.SubElement(root, "handwritten-part")
    rows = []
    for li, text in enumerate(spec.lines):
        line_id = f"{spec.form_id}-{li:02d}"
        line_el = ET.SubElement(hw, "line", {"id": line_id, "text": text, "segmentation": "ok", "threshold": "160"})
        x = 120 + rng.randint(-20, 40)
        baseline = top + li * line_h + rng.randint(-4, 4)
        boxes = []
        for wi, word in enumerate(text.split(" ")):
            img = _word_image(font, word, shear, ink)
            bbox = ImageOps_invert_bbox(img)
            y = baseline + rng.randint(-3, 3)
            if x + img.width > FORM_WIDTH - 20:
                raise ValueError(f"line {line_id!r} is too long for the form at font size {size}")
            page.paste(img, (x, y), mask=Image.eval(img, lambda v: 255 - v))
            x0, y0, x1, y1 = x + bbox[0], y + bbox[1], x + bbox[2], y + bbox[3]
            word_el = ET.SubElement(line_el, "word", {"id": f"{line_id}-{wi:02d}", "tag": "NN", "text": word})
            ET.SubElement(word_el, "cmp", {"x": str(x0), "y": str(y0), "width": str(x1 - x0),
                                           "height": str(y1 - y0)})
            boxes.append((x0, y0, x1, y1))
            x += img.width + int(size * rng.uniform(0.25, 0.55))
        lx0, ly0 = min(b[0] for b in boxes), min(b[1] for b in boxes)
        lx1, ly1 = max(b[2] for b in boxes), max(b[3] for b in boxes)
        for k, v in (("asx", lx0), ("asy", ly0), ("dsx", lx1), ("dsy", ly1)):
            line_el.set(k, str(v))
        rows.append(f"{line_id} ok 160 {len(boxes)} {lx0} {ly0} {lx1 - lx0} {ly1 - ly0} {text.replace(' ', '|')}")
    if rng.random() < 0.7:
        page = page.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.0)))
    arr = np.asarray(page, dtype=np.int16)
    noise = np.random.default_rng(spec.seed).normal(0, rng.uniform(2, 8), arr.shape)
    arr = np.clip(arr - rng.randint(0, 25) + noise, 0, 255).astype(np.uint8)  # slightly grey, noisy paper
    return arr, root, rows


def ImageOps_invert_bbox(img: Image.Image) -> Tuple[int, int, int, int]:  # noqa: N802 - reads as what it does
    """Bounding box of the ink (pixels darker than the paper) of a word image."""
    bbox = Image.eval(img, lambda v: 255 if v < 200 else 0).getbbox()
    return bbox or (0, 0, img.width, img.height)


def _render_job(args: Tuple[FormSpec, str]) -> List[str]:
    spec, out = args
    arr, root, rows = render_form(spec)
    Image.fromarray(arr).save(os.path.join(out, "forms", spec.form_id + ".png"), compress_level=1)
    tree = ET.ElementTree(root)
    ET.indent(tree)
    tree.write(os.path.join(out, "xml", spec.form_id + ".xml"), encoding="ISO-8859-1", xml_declaration=True)
    return rows


LINES_HEADER = """#--- lines.txt ---------------------------------------------------------------#
#
# synthetic iam-format line information (htr-dist launch/synth_iam.py)
#
# format: s01-000-00 ok 160 7 120 361 900 60 A|MOVE|to|stop|Mr.|Gaitskell
#
#     s01-000-00  -> line id for form s01-000
#     ok          -> result of word segmentation
#     160         -> graylevel to binarize the line
#     7           -> number of components for this line
#     120 361 900 60 -> bounding box around this line in x,y,w,h format
#     A|MOVE|...  -> transcription with | separating words
#
"""


def plan_forms(forms: int, seed: int, fonts: List[str], lines_per_form: Tuple[int, int]) -> List[FormSpec]:
    rng = random.Random(seed)
    pool = prose_lines(random.Random(seed))
    specs, cursor = [], 0
    for i in range(forms):
        n = rng.randint(*lines_per_form)
        if cursor + n > len(pool):
            raise ValueError(f"not enough distinct prose lines for {forms} forms ({len(pool)} available)")
        font_index = rng.randrange(len(fonts))
        form_id = f"s{1 + i // 1000:02d}-{i % 1000:03d}"
        specs.append(FormSpec(form_id, f"{font_index:03d}", fonts[font_index], pool[cursor : cursor + n],
                              seed * 1_000_003 + i))
        cursor += n
    return specs


def split_forms(form_ids: List[str], seed: int, fractions=(0.7, 0.1, 0.2)) -> dict:
    ids = sorted(form_ids)
    random.Random(seed + 1).shuffle(ids)
    n = len(ids)
    n_val = max(1, round(fractions[1] * n)) if n >= 3 else 0
    n_test = max(1, round(fractions[2] * n)) if n >= 3 else 0
    n_train = n - n_val - n_test
    return {"train": sorted(ids[:n_train]), "validation": sorted(ids[n_train : n_train + n_val]),
            "test": sorted(ids[n_train + n_val :])}


def synthesize(out_dir: str, forms: int = 100, seed: int = 0, fonts: Optional[Sequence[str]] = None,
               lines_per_form: Tuple[int, int] = (6, 10), workers: int = 0, progress: bool = True) -> dict:
    """Write an IAM-format data set of ``forms`` forms into ``out_dir`` (atomically); return a summary."""
    font_paths = find_fonts(fonts)
    specs = plan_forms(forms, seed, font_paths, lines_per_form)
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(os.path.abspath(out_dir))}-")
    try:
        for sub in ("forms", "xml", "ascii", "splits"):
            os.makedirs(os.path.join(tmp, sub))
        jobs = [(s, tmp) for s in specs]
        workers = workers or os.cpu_count() or 1
        with mp.get_context("fork").Pool(workers) as pool:
            rows = [r for rs in tqdm(pool.imap(_render_job, jobs, chunksize=2), total=len(jobs), desc="forms",
                                     unit="form", disable=not progress) for r in rs]
        with open(os.path.join(tmp, "ascii", "lines.txt"), "w", encoding="utf-8") as f:
            f.write(LINES_HEADER + "\n".join(rows) + "\n")
        splits = split_forms([s.form_id for s in specs], seed)
        for name, ids in splits.items():
            with open(os.path.join(tmp, "splits", f"{name}.uttlist"), "w", encoding="utf-8") as f:
                f.write("".join(i + "\n" for i in ids))
        if os.path.exists(out_dir):
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fonts_used = sorted({os.path.basename(s.font) for s in specs})
    return {"forms": len(specs), "lines": len(rows), "fonts": fonts_used,
            "splits": {k: len(v) for k, v in splits.items()}, "out": out_dir}
