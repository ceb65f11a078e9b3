"""Synthetic IAM: whole forms rendered with handwriting-style fonts, written in IAM's exact on-disk layout.

    OUT/forms/<form id>.png        grayscale form: a machine-printed header, then handwritten lines
    OUT/xml/<form id>.xml          ISO-8859-1 IAM XML: form / machine-printed-part / handwritten-part / line / word /
                                   cmp, text attributes escaped twice as in IAM (``&amp;quot;``)
    OUT/ascii/lines.txt            IAM's line list (id, segmentation, gray level, components, box, word tokens joined
                                   by |, ``"`` as ``&quot;``)
    OUT/splits/<list>.uttlist      form ids: train, validation, test (and validation_seen, test_seen)
    OUT/lines/s01/s01-000/s01-000-00.png   with ``line_images``: IAM's line images, each cropped at its lines.txt box

Words are listed as IAM lists them (:func:`iam_tokens`): punctuation marks and clitics are tokens of their own, each a
``<word>`` element with the ``cmp`` box of its own ink, while a line's ``text`` is spaced as written.

Writers. A :class:`Writer` is a font (the hand) with habits drawn once: ink height, slant, letter width, word spacing,
pen width (eroded to broad), ink darkness, pen-pressure variation, baseline drift and sharpness (rendering resolution).
A form is one writer's; IAM's ``writer-id`` names it, and a writer writes one or more forms. Each form and word varies
a little around the writer (size, slant, width, baseline slope and jitter, pressure), and each form has its own paper
(shade, grain). With the font list's splits (``htr_dist/data/fonts.tsv``), the set is writer-independent as IAM's:
:data:`ROLES` says which fonts write which split list, so the validation and test hands are never trained on, and
``validation_seen``/``test_seen`` measure the training hands on new text.

Text is English prose that ships with Python (``pydoc_data``), cleaned into sentences of ordinary characters, then
cut into lines on word boundaries (about 20-60 characters, as many words as fit the writer's line width) and drawn
without replacement, so no line of a held-out form appears in training. The same seed and fonts give the same bytes,
whatever the number of workers. It goes through the same ``prepare_iam.py`` as the real IAM.

Sizes: forms are ``FORM_WIDTH`` = 1800 px wide (IAM scans are 2479 px at 300 dpi). Each form draws an ink height
(tallest ascender to deepest descender of the font) of ``INK_HEIGHT`` = 100-125 px, so line crops (union of the word
boxes, plus slant, slope and jitter) are about 100-140 px tall at scale 1.0, like IAM's; a form is 1500-2000 px tall.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import random
import re
import shutil
import struct
import tempfile
import time
import xml.etree.ElementTree as ET
import zlib
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image, ImageChops, ImageDraw, ImageFilter, ImageFont
from tqdm import tqdm

from htr_dist.data.fonts import FontsNotFound
from htr_dist.data.iam import line_image_path
from htr_dist.data.workers import worker_pool
from htr_dist.io_utils import plain_mode

log = logging.getLogger(__name__)

FONT_DIRS = ("/usr/share/fonts", "/usr/local/share/fonts", os.path.expanduser("~/.local/share/fonts"))
FORM_WIDTH = 1800
INK_HEIGHT = (100, 125)  # px from the top of the ascenders to the bottom of the descenders of a handwritten line
MAX_LINE_CHARS = 60
# A word of the prose is kept when it is made of these characters (IAM's own set, minus the rare ones).
ALLOWED = re.compile(r"^[A-Za-z0-9.,;:'\"!?()&\-/+#]+$")
CHARSET = "".join(sorted(set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,;:'\"!?()&-/+#")))
_TYPOGRAPHIC = str.maketrans({"\u2019": "'", "\u2018": "'", "\u201c": '"', "\u201d": '"', "\u2014": "-",
                              "\u2013": "-", "\u2026": "...", "*": " ", "`": " "})
_MARGIN_RIGHT = 70
# A word's <cmp> box encloses every pixel of at least 10% ink coverage (the faint anti-aliased rim stays out, as
# IAM's boxes leave out the faintest pixels: at most ~12 gray levels darker than the paper).
_BOX_MIN_COVERAGE = 26


def find_fonts(names: Optional[Sequence[str]] = None) -> List[str]:
    """Paths of the given font files or installed font file names (searched under :data:`FONT_DIRS` and the font
    cache), or of every font of the font list (``htr_dist/data/fonts.tsv``) when ``names`` is empty."""
    from htr_dist.data.fonts import font_cache_dir, load_font_list, resolve_fonts

    if not names:
        return [path for _, path in resolve_fonts(load_font_list())]
    index = {}
    for root in FONT_DIRS + (font_cache_dir(),):
        for folder, _, files in sorted(os.walk(root)):
            for f in sorted(files):
                index.setdefault(f, os.path.join(folder, f))
    found = []
    for name in names:
        if os.path.isfile(name):
            found.append(name)
        elif name in index:
            found.append(index[name])
        else:
            raise FontsNotFound(f"font not found: {name} (give a file path, or the file name of a font installed "
                                f"under {', '.join(FONT_DIRS)} or by launch/fetch_fonts.py, e.g. Breip.ttf)")
    return found


def check_glyphs(path: str, chars: str = CHARSET) -> None:
    """Raise FontsNotFound naming the font and the characters it cannot draw (they would render as empty boxes)."""
    font = _font(path, 40)
    missing_mask = font.getmask("\ue000")  # a private-use code point: the font's .notdef glyph
    notdef = (bytes(missing_mask), missing_mask.size)
    missing = [c for c in chars if (bytes(m := font.getmask(c)), m.size) == notdef]
    if missing:
        raise FontsNotFound(f"font {path} has no glyph for {''.join(missing)!r}; choose another font")


# --------------------------------------------------------------------------------------------------------------------
# Text
# --------------------------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def prose_sentences() -> Tuple[str, ...]:
    """English sentences from Python's own documentation, of ordinary characters only, unique, in source order.

    Code blocks, headings and grammar rules are skipped; a sentence loses at most one word in eight that has other
    characters (``__init__``, ``x[i]``), else it is dropped.
    """
    from pydoc_data.topics import topics

    out = []
    for key in sorted(topics):
        for para in re.split(r"\n\s*\n", topics[key].translate(_TYPOGRAPHIC)):
            if re.search(r"^\s*[*=\-^~]{3,}\s*$", para, re.M) or ">>>" in para or "::=" in para:
                continue  # heading underline, interactive example, grammar rule
            text = " ".join(para.replace("::", ":").split())
            for sentence in re.split(r"(?<=[.!?:])\s+(?=[A-Z\"'(])", text):
                words = sentence.split()
                good = [w for w in words if ALLOWED.match(w) and len(w) <= 16]
                letters = sum(c.isalpha() for c in sentence)
                if len(words) - len(good) <= max(1, len(words) // 8) and len(good) >= 4 and letters > 0.7 * len(
                        sentence):
                    out.append(" ".join(good))
    return tuple(dict.fromkeys(out))


def prose_lines(rng: random.Random, min_chars: int = 20, max_chars: int = 60) -> List[str]:
    """The prose cut into unique line-sized chunks (``min_chars``..``max_chars``) on word boundaries, seeded order.

    (Font-independent; :func:`plan_forms` cuts lines by the rendered width of each writer's font instead.)
    """
    sentences = list(prose_sentences())
    rng.shuffle(sentences)
    lines, current = [], ""
    budget = rng.randint(min_chars, max_chars)
    for w in " ".join(sentences).split():
        if current and len(current) + 1 + len(w) > budget:
            lines.append(current)
            current, budget = "", rng.randint(min_chars, max_chars)
        current = f"{current} {w}" if current else w
    return list(dict.fromkeys(lines))


_CLOSED = {"a": "AT", "an": "AT", "the": "ATI", "and": "CC", "or": "CC", "but": "CCB", "of": "IN", "in": "IN",
           "to": "TO", "for": "IN", "with": "IN", "by": "IN", "on": "IN", "from": "IN", "is": "BEZ", "are": "BER",
           "be": "BE", "it": "PP3", "this": "DT", "that": "CS", "not": "XNOT"}


_OPENERS = "\"'("
_CLOSERS = ".,;:!?\"')"
_CLITICS = ("n't", "'s", "'re", "'ve", "'ll", "'d", "'m")


def iam_tokens(word: str) -> List[str]:
    """One written word as IAM's lines.txt and ``<word>`` elements list it: leading and trailing punctuation marks and
    a clitic are tokens of their own (``"Yes,`` -> ``"`` ``Yes`` ``,``; ``don't`` -> ``do`` ``n't``). The tokens
    concatenate to the word."""
    lead, tail = [], []
    while len(word) > 1 and word[0] in _OPENERS:
        lead.append(word[0])
        word = word[1:]
    while len(word) > 1 and word[-1] in _CLOSERS:
        tail.insert(0, word[-1])
        word = word[:-1]
    for clitic in _CLITICS:
        if len(word) > len(clitic) and word.lower().endswith(clitic):
            return lead + [word[: -len(clitic)], word[-len(clitic):]] + tail
    return lead + [word] + tail


def escaped_once(text: str) -> str:
    """A text attribute's value as IAM's XML files hold it before the XML writer escapes it again: ``&`` and ``"`` as
    entities, so the file has ``&amp;amp;`` and ``&amp;quot;``."""
    return text.replace("&", "&amp;").replace('"', "&quot;")


def word_tag(word: str) -> str:
    """A rough LOB-style part-of-speech tag for IAM's ``tag`` attribute (nothing downstream relies on it)."""
    core = word.strip(".,;:!?\"'()").lower()
    if not core:
        return word[:1] or "NN"
    if core[0].isdigit():
        return "CD"
    if core in _CLOSED:
        return _CLOSED[core]
    if word.strip("\"'(")[:1].isupper():
        return "NP"
    return "NN"


# --------------------------------------------------------------------------------------------------------------------
# Planning (main process): who writes which lines at which size
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Writer:
    """A synthetic writer: a font (the hand) and the habits that vary between writers of the same hand.

    Every value is drawn once per writer (:func:`new_writer`); the forms of one writer vary around it by small
    per-word and per-line amounts (:func:`render_form`).
    """

    writer_id: str
    font: str
    font_split: str
    """``train``, ``val`` or ``test``: the split of the font family in the font list (``train`` for --fonts)."""
    ink_height: float
    """px from the tallest ascender to the deepest descender."""
    slant: float
    """Shear of the writing: x shifts by ``slant`` px per px above the baseline (> 0 leans forward)."""
    width: float
    """Horizontal stretch of every word (letter width and spacing), 0.82-1.18."""
    word_space: float
    """Word gap as a multiple of the font's own space width."""
    pen: int
    """Stroke width: -1 thinner than the font (eroded), 0 as drawn, 1 broader, 2 broadest."""
    ink: int
    """Gray level of full ink (0 = black)."""
    pressure: float
    """Depth of the slow pen-pressure variation along the strokes, 0 (even ink) to 0.5 (half as dark in places)."""
    drift: float
    """Amplitude of the baseline's slow wave along a line, as a fraction of the ink height."""
    sharpness: float
    """Rendering scale before the word is scaled back up: 1.0 crisp, 0.55 a blurry pen or scan."""


# The forms of a writer-independent set (font list with splits), by role: the split list each role's forms go in, the
# font split its writers come from, and its share of the forms. ``validation_seen``/``test_seen`` hold text no other
# form has, written by the training writers: they measure the same-hand error beside the unseen-hand one.
ROLES = (("train", "train", 0.70), ("validation", "val", 0.06), ("test", "test", 0.12),
         ("validation_seen", "train", 0.04), ("test_seen", "train", 0.08))
NEW_WRITER_P = 0.5
"""Chance that a form is written by a new writer rather than one already drawn for its font (IAM: ~2.3 forms a
writer)."""


def new_writer(rng: random.Random, writer_id: str, font: str, font_split: str) -> Writer:
    """Draw one writer's habits for a font."""
    return Writer(
        writer_id=writer_id, font=font, font_split=font_split,
        ink_height=rng.uniform(*INK_HEIGHT),
        slant=rng.triangular(-0.2, 0.45, 0.12),  # most writers lean forward
        width=rng.uniform(0.82, 1.18),
        word_space=rng.uniform(0.7, 1.6),
        pen=rng.choices((-1, 0, 1, 2), weights=(0.2, 0.45, 0.25, 0.1))[0],
        ink=rng.randint(16, 110),
        pressure=rng.choice((0.0, rng.uniform(0.1, 0.5))),
        drift=rng.choice((0.0, rng.uniform(0.01, 0.06))),
        sharpness=rng.uniform(0.55, 1.0),
    )


def form_roles(forms: int, rng: random.Random, independent: bool) -> List[str]:
    """The split list of each form, shuffled: about the shares of :data:`ROLES` (writer-independent) or 70/10/20
    train/validation/test; validation and test always get a form when there are 3 forms or more (fewer are all
    train)."""
    if forms < 3:
        return ["train"] * forms
    if independent:
        counts = {name: round(share * forms) for name, _, share in ROLES}
    else:
        counts = {"train": 0, "validation": round(0.1 * forms), "test": round(0.2 * forms)}
    counts["validation"], counts["test"] = max(1, counts["validation"]), max(1, counts["test"])
    counts["train"] = forms - sum(v for k, v in counts.items() if k != "train")
    while counts["train"] < 1:  # tiny sets: the held-out "seen" roles give way first
        for name in ("validation_seen", "test_seen"):
            if counts.get(name) and counts["train"] < 1:
                counts[name] -= 1
                counts["train"] += 1
    roles = [name for name, n in counts.items() for _ in range(n)]
    rng.shuffle(roles)
    return roles


@dataclass
class FormSpec:
    form_id: str
    writer: Writer
    lines: List[str]
    seed: int
    role: str = "train"
    """The split list the form goes in (:data:`ROLES`)."""
    size: int = 48
    """Font size (px) of the handwritten part."""
    left: int = 120
    """Left margin of the handwritten lines, px."""

    @property
    def writer_id(self) -> str:
        return self.writer.writer_id

    @property
    def font(self) -> str:
        return self.writer.font


@functools.lru_cache(maxsize=None)
def _font(path: str, size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(path, size)


@functools.lru_cache(maxsize=None)
def _ink_ratio(path: str) -> float:
    """Ink height (tallest ascender to deepest descender) per pixel of font size."""
    _, top, _, bottom = _font(path, 100).getbbox("lhdkTbfgjpqy", anchor="ls")
    return (bottom - top) / 100.0


def plan_forms(forms: int, seed: int, fonts: Sequence[Tuple[str, str]], lines_per_form: Tuple[int, int],
               prose: Optional[Sequence[str]] = None, independent: bool = True) -> List[FormSpec]:
    """Deal prose lines to forms without replacement, each form with its role, writer, size and margin.

    ``fonts``: (path, font split) pairs. ``independent``: the roles of :data:`ROLES`, each form's writer drawn from
    the fonts of its role's split (the split lists are writer-independent: no val or test hand is trained on), else a
    70/10/20 train/validation/test split with every form's writer drawn from all the fonts.
    """
    rng = random.Random(seed)
    sentences = list(prose if prose is not None else prose_sentences())
    random.Random(seed).shuffle(sentences)
    words = " ".join(sentences).split()
    bad = sorted(set("".join(words)) - set(CHARSET))
    if bad:
        raise ValueError(f"prose: characters {''.join(bad)!r} are outside the synthetic character set {CHARSET!r}")
    split_of = dict(fonts)
    by_split: dict = {}
    for path, split in fonts:
        by_split.setdefault(split if independent else "train", []).append(path)
    roles = form_roles(forms, random.Random(seed + 1), independent)
    font_split_of = {name: split for name, split, _ in ROLES} if independent else {}
    for role in sorted(set(roles)):
        if not by_split.get(font_split_of.get(role, "train")):
            raise FontsNotFound(f"no font of split {font_split_of[role]!r} for the {role} forms (the font list must "
                                f"give every split a font)")
    writers: dict = {}  # font path -> its writers so far
    n_writers = 0
    cursor, used, specs = 0, set(), []
    for i, role in enumerate(roles):
        font_path = rng.choice(by_split[font_split_of.get(role, "train")])
        known = writers.setdefault(font_path, [])
        if not known or rng.random() < NEW_WRITER_P:
            known.append(new_writer(rng, f"{n_writers:03d}", font_path, split_of[font_path]))
            n_writers += 1
        writer = rng.choice(known)
        size = round(writer.ink_height * rng.uniform(0.95, 1.05) / _ink_ratio(font_path))
        left = rng.randint(90, 170)
        font = _font(font_path, size)
        space = font.getlength(" ") * writer.word_space
        # room for the slant overhang and the per-word size jitter of render_form
        usable = (FORM_WIDTH - left - _MARGIN_RIGHT - (0.1 + max(0.0, writer.slant)) * size) / 1.06
        lines = []
        n = rng.randint(*lines_per_form)
        while len(lines) < n:
            if cursor >= len(words):
                raise ValueError(f"the prose ran out after {i} of {forms} forms ({len(used)} distinct lines); ask for "
                                 f"fewer forms or fewer lines per form")
            target = usable * rng.uniform(0.8, 1.0)
            line, width = [], 0.0
            while cursor < len(words):
                w = words[cursor]
                extra = font.getlength(w) * writer.width + (space if line else 0.0)
                if line and (width + extra > target or len(" ".join(line)) + 1 + len(w) > MAX_LINE_CHARS):
                    break
                if not line and extra > usable:
                    raise ValueError(f"word {w!r} is wider than a line at font size {size} ({font_path})")
                line.append(w)
                width += extra
                cursor += 1
            text = " ".join(line)
            if text not in used:  # a repeated line could put training text into the test split
                used.add(text)
                lines.append(text)
        form_id = f"s{1 + i // 1000:02d}-{i % 1000:03d}"
        specs.append(FormSpec(form_id, writer, lines, seed * 1_000_003 + i, role, size, left))
    return specs


# --------------------------------------------------------------------------------------------------------------------
# Rendering (worker processes)
# --------------------------------------------------------------------------------------------------------------------


def _word_image(font: ImageFont.FreeTypeFont, word: str, shear: float, ink: int, scale: float = 1.0,
                stroke: int = 0, stretch: float = 1.0, thin: bool = False) -> Tuple[Image.Image, int, int]:
    """Ink coverage (0 = paper, 255 = full ink) of one slanted word, and the pen origin (x, baseline y) inside it.

    ``font`` is the word's size times ``scale``; the image is scaled back up by ``1 / scale`` (scale < 1 = a blurrier
    pen/scan) and ``stretch`` times wider. ``ink`` (0-255) scales the coverage (pen pressure). ``shear`` > 0 leans
    forward (about the baseline). ``stroke`` > 0 broadens the pen; ``thin`` erodes the strokes by a pixel.
    """
    left, top, right, bottom = font.getbbox(word, anchor="ls", stroke_width=stroke)
    m = 2
    src = Image.new("L", (right - left + 2 * m, bottom - top + 2 * m), 0)
    ImageDraw.Draw(src).text((m - left, m - top), word, font=font, fill=ink, anchor="ls", stroke_width=stroke,
                             stroke_fill=ink)
    k = scale
    h_out = int(src.height / k) + 1
    base_out = (m - top) / k  # baseline row in the output
    over_left = max(0.0, shear * (h_out - base_out), -shear * base_out)
    over_right = max(0.0, shear * base_out, -shear * (h_out - base_out))
    w_out = int(src.width * stretch / k + over_left + over_right) + 2
    x0_out = (m - left) * stretch / k + over_left  # pen origin in the output
    # output (x', y') samples input x = (k / stretch) * (x' - x0_out + shear * (y' - base_out)) + (m - left), y = k y'
    kx = k / stretch
    data = (kx, kx * shear, (m - left) - kx * x0_out - kx * shear * base_out, 0.0, k, 0.0)
    out = src.transform((w_out, h_out), Image.AFFINE, data, Image.BILINEAR, fillcolor=0)
    if thin:
        eroded = out.filter(ImageFilter.MinFilter(3))
        # a hairline stroke or a small mark (a dot, a comma) keeps its ink rather than shrink to a speck
        if _ink_pixels(eroded, ink) >= 0.5 * _ink_pixels(out, ink):
            out = eroded
    return out, round(x0_out), round(base_out)


def _ink_pixels(coverage: Image.Image, ink: int) -> int:
    """Pixels of a word's coverage image that are at least half inked."""
    return int((np.asarray(coverage) >= ink // 2).sum())


def render_form(spec: FormSpec) -> Tuple[np.ndarray, ET.Element, List[str]]:
    """Render one form; return the gray image, its IAM XML tree and its lines.txt rows."""
    rng = random.Random(spec.seed)
    wr = spec.writer
    size = spec.size
    ink_px = size * _ink_ratio(spec.font)
    shear = wr.slant + rng.uniform(-0.03, 0.03)  # the writer's slant, a little different on each form
    scale = min(1.0, wr.sharpness * rng.uniform(0.95, 1.05))  # < 1: rendered smaller, scaled up: a blurrier line
    stroke = max(0, wr.pen)
    ink, paper = min(120, max(16, wr.ink + rng.randint(-8, 8))), rng.randint(215, 248)
    pitch = int(ink_px * rng.uniform(1.15, 1.45))
    threshold = (ink + paper) // 2

    printed = ImageFont.load_default(size=30)
    title = ImageFont.load_default(size=44)
    max_printed = FORM_WIDTH - 2 * 150
    printed_lines = _wrap(" ".join(spec.lines), printed, max_printed)
    y_print = 200
    y_rule = y_print + 42 * len(printed_lines) + 40
    top = y_rule + 60  # top of the first handwritten line's ascenders
    height = top + pitch * (len(spec.lines) - 1) + int(ink_px * 1.3) + 160
    cov = Image.new("L", (FORM_WIDTH, height), 0)  # ink coverage of the whole page
    draw = ImageDraw.Draw(cov)

    root = ET.Element("form", {"created": "synthetic", "height": str(height), "id": spec.form_id,
                               "width": str(FORM_WIDTH), "writer-id": spec.writer_id})
    draw.text((150, 70), "Sentence Database", font=title, fill=255)
    draw.text((FORM_WIDTH - 150, 70), spec.form_id, font=title, fill=255, anchor="ra")
    mp_part = ET.SubElement(root, "machine-printed-part")
    for i, text in enumerate(printed_lines):
        draw.text((150, y_print + 42 * i), text, font=printed, fill=255)
        ET.SubElement(mp_part, "machine-print-line", {"text": escaped_once(text)})
    draw.rectangle((60, y_rule, FORM_WIDTH - 60, y_rule + 2), fill=255)

    hw = ET.SubElement(root, "handwritten-part")
    rows = []
    _, asc_top, _, _ = _font(spec.font, size).getbbox("lhdkTbf", anchor="ls")
    _, x_top, _, _ = _font(spec.font, size).getbbox("xoa", anchor="ls")
    space = _font(spec.font, size).getlength(" ") * wr.word_space
    for li, text in enumerate(spec.lines):
        line_id = f"{spec.form_id}-{li:02d}"
        line_el = ET.SubElement(hw, "line", {"id": line_id, "text": escaped_once(text), "segmentation": "ok",
                                             "threshold": str(threshold)})
        x = spec.left + rng.randint(-15, 15)
        x_start = x
        baseline0 = top - asc_top + li * pitch + rng.randint(-int(0.06 * pitch), int(0.06 * pitch))
        slope = rng.uniform(-0.012, 0.012)
        # the baseline's slow wave: one period over 500-1500 px, at the writer's amplitude
        wave, phase = rng.uniform(500, 1500), rng.uniform(0, 2 * math.pi)
        boxes, tokens = [], []
        for word in text.split(" "):
            word_size = max(8, round(size * rng.uniform(0.95, 1.05)))
            small = max(6, round(word_size * scale))  # rendered at this size, scaled up to word_size
            slant, pressure = shear + rng.uniform(-0.04, 0.04), rng.randint(225, 255)
            stretch = wr.width * rng.uniform(0.97, 1.03)
            baseline = (baseline0 + slope * (x - x_start) + rng.uniform(-0.03, 0.03) * ink_px
                        + wr.drift * ink_px * math.sin(2 * math.pi * (x - x_start) / wave + phase))
            prefix = ""
            for token in iam_tokens(word):  # IAM's word tokens, each drawn where the word's pen reaches it
                img, ox, oy = _word_image(_font(spec.font, small), token, slant, pressure, small / word_size, stroke,
                                          stretch, wr.pen < 0)
                if wr.pressure > 0:  # pen pressure: the ink is lighter in places, changing slowly along the strokes
                    field = 1.0 - wr.pressure * _smooth_field(rng, img.height, img.width, 24)
                    img = Image.fromarray((np.asarray(img, dtype=np.float32) * field).astype(np.uint8))
                pen = x + _font(spec.font, word_size).getlength(prefix) * stretch
                prefix += token
                px, py = int(round(pen)) - ox, int(round(baseline)) - oy
                if px < 0 or px + img.width > FORM_WIDTH or py < 0 or py + img.height > height:
                    raise ValueError(f"word {word!r} of line {line_id!r} falls outside the form ({spec.font}, "
                                     f"size {size})")
                bbox = _ink_box(img)
                box = (px, py, px + img.width, py + img.height)
                cov.paste(ImageChops.lighter(cov.crop(box), img), box)  # overlapping strokes: the darker one wins
                x0, y0, x1, y1 = px + bbox[0], py + bbox[1], px + bbox[2], py + bbox[3]
                word_el = ET.SubElement(line_el, "word", {"id": f"{line_id}-{len(tokens):02d}",
                                                          "tag": word_tag(token), "text": escaped_once(token)})
                ET.SubElement(word_el, "cmp", {"x": str(x0), "y": str(y0), "width": str(x1 - x0),
                                               "height": str(y1 - y0)})
                boxes.append((x0, y0, x1, y1))
                tokens.append(token)
            x += _font(spec.font, word_size).getlength(word) * stretch + space * rng.uniform(0.8, 1.25)
        lx0, ly0 = min(b[0] for b in boxes), min(b[1] for b in boxes)
        lx1, ly1 = max(b[2] for b in boxes), max(b[3] for b in boxes)
        base_l, base_r = round(baseline0), round(baseline0 + slope * (lx1 - x_start))
        # IAM's line geometry: baseline from (lbx, lby) to (lrx, lry), x-height line start (ubx, uby), ink box corners
        # (asx, asy) top-left and (dsx, dsy) bottom-right
        for k, v in (("lbx", lx0), ("lby", base_l), ("lrx", lx1), ("lry", base_r), ("ubx", lx0),
                     ("uby", base_l + x_top), ("asx", lx0), ("asy", ly0), ("dsx", lx1), ("dsy", ly1)):
            line_el.set(k, str(v))
        rows.append(f"{line_id} ok {threshold} {len(boxes)} {lx0} {ly0} {lx1 - lx0} {ly1 - ly0} "
                    + "|".join(t.replace('"', "&quot;") for t in tokens))
    return _ink_on_paper(cov, ink, paper, rng), root, rows


def _ink_box(coverage: Image.Image) -> Tuple[int, int, int, int]:
    """(x0, y0, x1, y1) of the pixels with at least _BOX_MIN_COVERAGE ink in a word's coverage image."""
    mask = np.asarray(coverage) >= _BOX_MIN_COVERAGE  # (h, w)
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if not len(rows):
        return 0, 0, 1, 1
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def _wrap(text: str, font: ImageFont.FreeTypeFont, width: int) -> List[str]:
    """Greedy word wrap of the machine-printed passage."""
    out, line = [], ""
    for w in text.split():
        trial = f"{line} {w}" if line else w
        if line and font.getlength(trial) > width:
            out.append(line)
            trial = w
        line = trial
    return out + ([line] if line else [])


@functools.lru_cache(maxsize=1)
def _grain_tile() -> np.ndarray:
    """A fixed tile of paper grain (0-7), the same in every process, so forms stay deterministic and cheap."""
    rng = np.random.default_rng(12345)
    shape = (2048, FORM_WIDTH)
    # sparse specks, not dense noise: dense noise triples the PNG size and the time to write it
    return ((rng.random(shape) < 0.04) * rng.integers(1, 8, shape)).astype(np.uint8)


def _smooth_field(rng: random.Random, h: int, w: int, cell: int) -> np.ndarray:
    """A smooth random field in [0, 1] of shape (h, w): uniform noise on a grid of ``cell``-px cells, upsampled
    bilinearly (slow changes, as pen pressure along a stroke or the shade of a sheet)."""
    grid = np.random.default_rng(rng.getrandbits(64)).random((h // cell + 2, w // cell + 2), dtype=np.float32)
    return np.asarray(Image.fromarray(grid, mode="F").resize((w, h), Image.BILINEAR), dtype=np.float32)


def _ink_on_paper(cov: Image.Image, ink: int, paper: int, rng: random.Random) -> np.ndarray:
    """Coverage -> gray page: ink over a paper of uneven shade with grain. Dark ink on light paper, uint8 (H, W)."""
    lut = [round(paper - v / 255.0 * (paper - ink)) for v in range(256)]  # >= ink >= 16: room for the shade below
    page = np.array(cov.point(lut))  # (H, W)
    h, w = page.shape
    # uneven shade (scanner light falloff): a gentle vertical and horizontal gradient, up to 8 levels darker
    dark = np.linspace(0, rng.uniform(0, 5), h).astype(np.uint8)[:, None] + np.linspace(
        rng.uniform(0, 3), 0, w).astype(np.uint8)[None, :]  # (H, W)
    amount = rng.choice((0, 0, 1, 2))  # grain: none (clean scan), specks of 0-3 levels, specks of 0-7 levels
    tile = _grain_tile()
    oy, ox = rng.randrange(tile.shape[0]), rng.randrange(tile.shape[1] - w + 1)
    if amount:
        rows = (np.arange(h) + oy) % tile.shape[0]
        dark += (tile[oy : oy + h, ox : ox + w] if oy + h <= tile.shape[0] else tile[rows, ox : ox + w]) >> (2 - amount)
    page -= dark  # dark <= 15 < 16 <= page: no wrap-around
    return page


def ImageOps_invert_bbox(img: Image.Image) -> Tuple[int, int, int, int]:  # noqa: N802 - reads as what it does
    """Bounding box of the ink (pixels darker than the paper) of a dark-on-light word image."""
    bbox = img.point(lambda v: 255 if v < 200 else 0).getbbox()
    return bbox or (0, 0, img.width, img.height)


def write_png(path: str, gray: np.ndarray) -> None:
    """Write an 8-bit grayscale PNG (no row filter, zlib level 1 run-length): 3x faster than PIL's adaptive filter,
    and smaller on mostly blank paper."""
    h, w = gray.shape
    rows = np.zeros((h, w + 1), np.uint8)  # a filter-type byte (0 = none) before each row
    rows[:, 1:] = gray

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)  # 8-bit, grayscale, deflate, no filter, no interlace
    with open(path, "wb") as f:
        deflate = zlib.compressobj(1, zlib.DEFLATED, 15, 9, zlib.Z_RLE)
        idat = deflate.compress(rows.tobytes()) + deflate.flush()
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def _render_job(args: Tuple[FormSpec, str, bool]) -> List[str]:
    spec, out, line_images = args
    arr, root, rows = render_form(spec)
    write_png(os.path.join(out, "forms", spec.form_id + ".png"), arr)
    if line_images:  # IAM's lines/: each line cropped from its form at its lines.txt box
        for row in rows:
            line_id, _, _, _, x, y, w, h = row.split(" ", 8)[:8]
            x, y, w, h = int(x), int(y), int(w), int(h)
            path = line_image_path(out, line_id)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            write_png(path, np.ascontiguousarray(arr[y : y + h, x : x + w]))
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
#     7           -> number of components for this line (here: word tokens)
#     120 361 900 60 -> bounding box around this line in x,y,w,h format
#     A|MOVE|...  -> transcription with | separating word tokens
#
"""


def synthesize(out_dir: str, forms: int = 100, seed: int = 0, fonts: Optional[Sequence[str]] = None,
               lines_per_form: Tuple[int, int] = (6, 10), workers: int = 0, progress: bool = True,
               prose: Optional[Sequence[str]] = None, line_images: bool = False, font_list: str = "") -> dict:
    """Write an IAM-format data set of ``forms`` forms into ``out_dir`` (atomically); return a summary.

    ``fonts``: font files or installed font file names, every form's writer drawn from all of them and the forms
    split 70/10/20 at random. Default: the font list (``font_list``, default ``htr_dist/data/fonts.tsv``), whose
    train/val/test fonts write the train/validation/test forms, plus ``validation_seen``/``test_seen`` forms by the
    training writers: a writer-independent set, as IAM's.
    ``workers``: processes (0 = all cores, 1 = this process). ``prose``: sentences to use instead of Python's docs.
    ``line_images``: also write IAM's ``lines/`` (each line cropped at its lines.txt box), for ``--source lines``.
    """
    if forms < 1:
        raise ValueError(f"forms: must be >= 1, got {forms}")
    lo, hi = lines_per_form
    if not 1 <= lo <= hi:
        raise ValueError(f"lines_per_form: expected 1 <= a <= b, got {lo}-{hi}")
    if fonts:
        font_splits = [(path, "train") for path in find_fonts(fonts)]
    else:
        from htr_dist.data.fonts import FONT_LIST, load_font_list, resolve_fonts

        font_splits = [(path, entry.split) for entry, path in resolve_fonts(load_font_list(font_list or FONT_LIST))]
    for path, _ in font_splits:
        check_glyphs(path)
    start = time.perf_counter()
    specs = plan_forms(forms, seed, font_splits, (lo, hi), prose, independent=not fonts)
    out_dir = os.path.abspath(out_dir)
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(out_dir)}-")
    try:
        plain_mode(tmp, directory=True)  # it becomes out_dir: the mode os.makedirs would give, not 0700
        for sub in ("forms", "xml", "ascii", "splits"):
            os.makedirs(os.path.join(tmp, sub))
        jobs = [(s, tmp, line_images) for s in specs]
        workers = min(workers or os.cpu_count() or 1, len(jobs))
        bar = dict(total=len(jobs), desc="forms", unit="form", disable=not progress)
        if workers == 1:
            rows = [r for job in tqdm(jobs, **bar) for r in _render_job(job)]
        else:
            with worker_pool(workers) as pool:
                chunk = max(1, min(8, len(jobs) // (4 * workers)))
                rows = [r for rs in tqdm(pool.imap(_render_job, jobs, chunksize=chunk), **bar) for r in rs]
        with open(os.path.join(tmp, "ascii", "lines.txt"), "w", encoding="utf-8") as f:
            f.write(LINES_HEADER + "\n".join(rows) + "\n")
        splits = {name: [s.form_id for s in specs if s.role == name] for name in dict.fromkeys(
            ["train", "validation", "test"] + [s.role for s in specs])}
        for name, ids in splits.items():
            with open(os.path.join(tmp, "splits", f"{name}.uttlist"), "w", encoding="utf-8") as f:
                f.write("".join(i + "\n" for i in ids))
        old = None
        if os.path.exists(out_dir):  # move the old set aside first: out_dir is never half-written
            old = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(out_dir)}-old-")
            os.replace(out_dir, os.path.join(old, "set"))
        os.replace(tmp, out_dir)
        if old:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    seconds = time.perf_counter() - start
    fonts_used = sorted({os.path.basename(s.font) for s in specs})
    return {"forms": len(specs), "lines": len(rows), "fonts": fonts_used, "writers": len({s.writer_id for s in specs}),
            "writer_independent": not fonts,
            "splits": {k: len(v) for k, v in splits.items()}, "out": out_dir, "seconds": round(seconds, 2),
            "forms_per_s": round(len(specs) / max(seconds, 1e-9), 2)}
