"""Synthetic IAM-format data (htr_dist/data/synth.py, launch/synth_iam.py), checked with xml.etree and numpy only:
layout, ink boxes, lines.txt against the XML, splits, determinism, XML entities, font errors, prose cleaning."""

import glob
import hashlib
import json
import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ET

import numpy as np
import pytest
from PIL import Image

from htr_dist.data import iam, synth
from htr_dist.data.synth import CHARSET, FontsNotFound, find_fonts, synthesize

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LINE_ATTRS = ("id", "text", "segmentation", "threshold", "lbx", "lby", "lrx", "lry", "ubx", "uby", "asx", "asy",
              "dsx", "dsy")


@pytest.fixture(scope="module")
def synth_set(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("synth") / "iam")
    summary = synthesize(out, forms=10, seed=5, workers=1, progress=False)
    return out, summary


def forms_of(folder):
    return sorted(os.path.basename(p)[:-4] for p in glob.glob(os.path.join(folder, "xml", "*.xml")))


def cmp_box(word):
    c = word.find("cmp").attrib
    return tuple(int(c[k]) for k in ("x", "y", "width", "height"))


def read_lines_txt(folder):
    rows = {}
    with open(os.path.join(folder, "ascii", "lines.txt"), encoding="utf-8") as f:
        for raw in f:
            if raw.startswith("#"):
                continue
            parts = raw.rstrip("\n").split(" ")
            assert len(parts) == 9, raw
            rows[parts[0]] = parts[1:]
    return rows


def digest(folder):
    h = hashlib.sha256()
    for p in sorted(glob.glob(os.path.join(folder, "**", "*"), recursive=True)):
        if os.path.isfile(p):
            h.update(os.path.relpath(p, folder).encode())
            with open(p, "rb") as f:
                h.update(f.read())
    return h.hexdigest()


def test_layout_files_parse(synth_set):
    out, summary = synth_set
    ids = forms_of(out)
    assert ids == [f"s01-{i:03d}" for i in range(10)]
    assert summary["forms"] == 10 and summary["lines"] == len(read_lines_txt(out))
    for form_id in ids:
        path = os.path.join(out, "xml", form_id + ".xml")
        with open(path, "rb") as f:
            assert f.readline().strip() == b"<?xml version='1.0' encoding='ISO-8859-1'?>"
        root = ET.parse(path).getroot()
        assert root.tag == "form" and root.get("id") == form_id
        assert len(root.get("writer-id")) == 3 and root.get("writer-id").isdigit()
        page = Image.open(os.path.join(out, "forms", form_id + ".png"))
        assert page.mode == "L" and page.size == (int(root.get("width")), int(root.get("height")))
        gray = np.asarray(page)
        assert np.median(gray) > 180 and gray.min() < 110  # dark ink on light paper
        printed = root.find("machine-printed-part").findall("machine-print-line")
        lines = root.find("handwritten-part").findall("line")
        assert printed and 6 <= len(lines) <= 10
        # the printed part holds the text the writer copied, as in IAM
        assert " ".join(p.get("text") for p in printed) == " ".join(l.get("text") for l in lines)
        for i, line in enumerate(lines):
            assert all(a in line.attrib for a in LINE_ATTRS), line.attrib
            assert line.get("id") == f"{form_id}-{i:02d}" and line.get("segmentation") == "ok"
            words = line.findall("word")
            text = iam.decode_entities(line.get("text"))
            # IAM's word tokens: punctuation and clitics split off each written word
            assert [iam.decode_entities(w.get("text")) for w in words] == [
                t for word in text.split(" ") for t in synth.iam_tokens(word)]
            assert [w.get("id") for w in words] == [f"{form_id}-{i:02d}-{j:02d}" for j in range(len(words))]
            assert all(w.get("tag") for w in words)
            assert 1 <= len(text) <= synth.MAX_LINE_CHARS


def test_boxes_enclose_ink(synth_set):
    out, _ = synth_set
    heights = []
    for form_id in forms_of(out):
        root = ET.parse(os.path.join(out, "xml", form_id + ".xml")).getroot()
        page = np.asarray(Image.open(os.path.join(out, "forms", form_id + ".png")))
        ink = np.median(page) - 50  # clearly darker than the (shaded, specked) paper
        covered = np.zeros(page.shape, bool)
        lines = root.find("handwritten-part").findall("line")
        for line in lines:
            for word in line.findall("word"):
                x, y, w, h = cmp_box(word)
                assert w > 0 and h > 0 and x >= 0 and y >= 0
                assert x + w <= page.shape[1] and y + h <= page.shape[0], word.get("id")
                crop = page[y : y + h, x : x + w]
                assert (crop < ink).sum() >= 10, f"no ink inside the box of {word.get('id')}"
                # the box is tight: ink touches each of its four sides (paper = the brightest pixels nearby, around
                # the box: a comma's box is nearly all ink)
                around = page[max(0, y - 6) : y + h + 6, max(0, x - 6) : x + w + 6]
                dark = crop < np.percentile(around, 95) - 10
                assert dark[0].any() and dark[-1].any() and dark[:, 0].any() and dark[:, -1].any(), word.get("id")
                covered[y : y + h, x : x + w] = True
            heights.append(int(line.get("dsy")) - int(line.get("asy")))
        top = min(int(l.get("asy")) for l in lines)
        outside = page[top:][~covered[top:]]
        assert (outside < ink).mean() < 1e-4, form_id  # no handwriting outside the word boxes
        assert (page[top:] < ink).sum() > 1000
    # documented size: ascender-to-descender 100-125 px, line crops about 100-140 px
    assert 95 <= np.median(heights) <= 145, heights


def test_lines_txt_matches_xml(synth_set):
    out, _ = synth_set
    rows = read_lines_txt(out)
    seen = []
    for form_id in forms_of(out):
        root = ET.parse(os.path.join(out, "xml", form_id + ".xml")).getroot()
        for line in root.iter("line"):
            seg, gray, n_comp, x, y, w, h, words = rows[line.get("id")]
            boxes = [cmp_box(word) for word in line.findall("word")]
            x0, y0 = min(b[0] for b in boxes), min(b[1] for b in boxes)
            x1, y1 = max(b[0] + b[2] for b in boxes), max(b[1] + b[3] for b in boxes)
            assert (seg, gray) == (line.get("segmentation"), line.get("threshold"))
            assert int(n_comp) == len(boxes)
            assert (int(x), int(y), int(w), int(h)) == (x0, y0, x1 - x0, y1 - y0)
            assert (x0, y0, x1, y1) == tuple(int(line.get(k)) for k in ("asx", "asy", "dsx", "dsy"))
            assert [iam.decode_entities(t) for t in words.split("|")] == [
                iam.decode_entities(word.get("text")) for word in line.findall("word")]
            seen.append(line.get("id"))
    assert seen == list(rows)  # same lines, same order


def read_splits(out):
    splits = {}
    for path in sorted(glob.glob(os.path.join(out, "splits", "*.uttlist"))):
        with open(path) as f:
            splits[os.path.basename(path)[: -len(".uttlist")]] = f.read().split()
    return splits


def writer_of(out, form_id):
    return ET.parse(os.path.join(out, "xml", form_id + ".xml")).getroot().get("writer-id")


def test_splits_partition_forms_and_text(synth_set):
    out, summary = synth_set
    splits = read_splits(out)
    assert {k: len(v) for k, v in splits.items()} == {"train": 7, "validation": 1, "test": 1, "test_seen": 1}
    assert sorted(sum(splits.values(), [])) == forms_of(out)  # a partition: every form exactly once
    assert summary["splits"] == {k: len(v) for k, v in splits.items()} and summary["writer_independent"]
    texts = {}
    for form_id in forms_of(out):
        texts[form_id] = [l.get("text") for l in ET.parse(os.path.join(out, "xml", form_id + ".xml")).iter("line")]
    every = sum(texts.values(), [])
    assert len(every) == len(set(every))  # drawn without replacement: no line is written twice
    train = {t for f in splits["train"] for t in texts[f]}
    assert train and not train & {t for f in splits["test"] + splits["test_seen"] for t in texts[f]}
    assert len({writer_of(out, f) for f in texts}) >= 3


def test_splits_are_writer_independent(tmp_path):
    """No writer, and no font, of the validation or test forms writes a training form; the *_seen forms are written
    by training writers' fonts. The fonts of each split are the font list's fonts of that split."""
    from htr_dist.data.fonts import load_font_list, resolve_fonts

    split_of_font = {path: e.split for e, path in resolve_fonts(load_font_list())}
    specs = synth.plan_forms(200, 11, sorted(split_of_font.items()), (2, 3))
    by_role = {}
    for spec in specs:
        by_role.setdefault(spec.role, []).append(spec)
    assert set(by_role) == {"train", "validation", "test", "validation_seen", "test_seen"}
    assert [len(by_role[r]) for r in ("train", "validation", "test", "validation_seen", "test_seen")] == [
        140, 12, 24, 8, 16]
    expected = {"train": "train", "validation": "val", "test": "test", "validation_seen": "train",
                "test_seen": "train"}
    for role, forms in by_role.items():
        assert {split_of_font[s.font] for s in forms} == {expected[role]}, role
        assert {s.writer.font_split for s in forms} == {expected[role]}
    train_writers = {s.writer_id for s in by_role["train"]}
    for role in ("validation", "test"):
        assert not train_writers & {s.writer_id for s in by_role[role]}
    assert len(train_writers) > len({s.font for s in by_role["train"]})  # a font plays several writers
    assert len({s.writer_id for s in specs}) < len(specs)  # and a writer writes several forms
    # one writer keeps one font and one set of habits
    habits = {}
    for s in specs:
        assert habits.setdefault(s.writer_id, s.writer) == s.writer


def test_the_written_set_keeps_test_writers_out_of_training(synth_set):
    """On disk: a test-split writer id never appears in train (checked through the XML's writer-id, as IAM's)."""
    out, _ = synth_set
    splits = read_splits(out)
    train = {writer_of(out, f) for f in splits["train"]}
    held_out = {writer_of(out, f) for f in splits["test"] + splits["validation"]}
    assert held_out and not train & held_out


def test_deterministic_and_atomic(tmp_path):
    a, b, c = (str(tmp_path / n) for n in "abc")
    synthesize(a, forms=3, seed=7, workers=1, progress=False)
    synthesize(b, forms=3, seed=7, workers=2, progress=False)  # the worker count does not change a byte
    synthesize(c, forms=3, seed=8, workers=1, progress=False)
    assert digest(a) == digest(b)
    assert digest(a) != digest(c)
    for sub in ("forms", "xml"):  # every file differs with the seed, not just one
        for name in os.listdir(os.path.join(a, sub)):
            with open(os.path.join(a, sub, name), "rb") as fa, open(os.path.join(c, sub, name), "rb") as fc:
                assert fa.read() != fc.read(), name
    synthesize(a, forms=2, seed=7, workers=1, progress=False)  # re-run over an existing set replaces it
    assert forms_of(a) == ["s01-000", "s01-001"]
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]  # no temporary folder left


def test_xml_entities_round_trip(tmp_path):
    prose = ['Tom & Jerry said "no" to the cat\'s dinner again.', "Fish & chips (with salt) cost 3 pounds!",
             'She wrote "A & B" on the board; then she left.', "Nothing here but plain words to fill a line."]
    out = str(tmp_path / "iam")
    synthesize(out, forms=2, seed=1, workers=1, progress=False, lines_per_form=(2, 2), prose=prose)
    raw = b"".join(open(p, "rb").read() for p in glob.glob(os.path.join(out, "xml", "*.xml")))
    # escaped twice, as IAM's files are: a parser reads &quot; and &amp;, which IAM's readers decode once more
    assert b'text="&amp;amp;"' in raw and b"&amp;quot;" in raw and b' & ' not in raw
    texts = re.findall(rb'text="[^"]*"', raw)
    assert texts and not [t for t in texts if b"&quot;" in t.replace(b"&amp;quot;", b"")]  # never escaped once
    parsed = [iam.decode_entities(l.get("text")) for p in sorted(glob.glob(os.path.join(out, "xml", "*.xml")))
              for l in ET.parse(p).iter("line")]
    words = " ".join(parsed).split()
    assert set(words) <= set(" ".join(prose).split())
    assert "&" in words and ('"no"' in words or '"A' in words) and "cat's" in words
    rows = [row[-1] for row in read_lines_txt(out).values()]
    assert "&quot;" in "".join(rows) and '"' not in "".join(rows)  # lines.txt writes " as &quot;, as IAM's does
    listed = [iam.decode_entities(r.replace("|", " ")) for r in rows]
    assert all(iam.same_text(a, b) for a, b in zip(listed, parsed)) and len(listed) == len(parsed)
    assert "cat 's" in " ".join(listed) and "cat's" in " ".join(parsed)  # tokens: a space the ink has not
    with pytest.raises(ValueError, match="outside the synthetic character set"):
        synthesize(str(tmp_path / "bad"), forms=1, workers=1, progress=False, prose=["a <b> c d e f g h"])


def test_missing_fonts_name_the_fix(monkeypatch, tmp_path):
    with pytest.raises(FontsNotFound, match="no-such-font.ttf"):
        find_fonts(["no-such-font.ttf"])
    monkeypatch.setenv("HTR_DIST_FONT_DIR", str(tmp_path / "empty-cache"))  # the npm fonts are not installed there
    with pytest.raises(FontsNotFound, match="fetch_fonts.py"):
        synthesize(str(tmp_path / "x"), forms=3, progress=False)
    assert not os.path.exists(tmp_path / "x")


def test_cli_generates_and_reports(tmp_path):
    out = str(tmp_path / "cli")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "launch/synth_iam.py"), out, "--forms", "3",
                           "--seed", "4", "--fonts", "Breip.ttf", "--lines-per-form", "3-4", "--workers", "1",
                           "--no-progress"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["forms"] == 3 and summary["fonts"] == ["Breip.ttf"] and 9 <= summary["lines"] <= 12
    assert summary["writers"] == len({writer_of(out, f) for f in forms_of(out)}) and not summary["writer_independent"]
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "launch/synth_iam.py"), str(tmp_path / "y"),
                           "--fonts", "missing.otf"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 1 and "missing.otf" in proc.stderr
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "launch/synth_iam.py"), str(tmp_path / "z"),
                           "--forms", "2"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 2 and "--forms: expected an integer >= 3, got 2" in proc.stderr  # val and test need one


def test_prose_is_clean_and_lines_fit():
    sentences = synth.prose_sentences()
    assert len(sentences) > 2000
    assert set("".join(sentences)) <= set(CHARSET + " ")
    specs = synth.plan_forms(40, 0, [(path, "train") for path in find_fonts()], (6, 10), independent=False)
    lines = [t for s in specs for t in s.lines]
    assert len(lines) == len(set(lines))
    lengths = np.array([len(t) for t in lines])
    assert lengths.max() <= synth.MAX_LINE_CHARS and np.median(lengths) >= 25  # lines fill the writer's width
