"""IAM -> shards on small IAM-format folders drawn here with PIL (no synth module): parsing, crops, splits, round trip,
re-runs, interruption, and every kind of bad input being named and counted."""

import glob
import hashlib
import io
import json
import logging
import os
import signal
import subprocess
import sys
import shutil
import tarfile
from xml.sax.saxutils import quoteattr

import numpy as np
import pytest
from PIL import Image, ImageDraw

import htr_dist.data.prepare as prepare_mod
from htr_dist.data import iam
from htr_dist.data.prepare import PrepareOptions, _page_samples, prepare
from htr_dist.data.shards import ManifestError, load_manifest, png_bytes, write_split

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "launch"))
import prepare_iam  # noqa: E402  (the launch script, called in-process)

# form id -> folder, writer, lines [(text, [word boxes (x, y, w, h) ...])]; words split on spaces, one cmp per word,
# except the first word of a01-000u-00, which has two cmp boxes (IAM splits words into connected components)
FORMS = {
    "a01-000u": ("formsA-D", "000", [('"Café" & co\'s <b>', [(40, 60, 60, 30), (120, 55, 30, 40), (170, 62, 50, 25)]),
                                      ("naïve Zoë", [(40, 140, 80, 35), (140, 138, 60, 30)])]),
    "b02-001": ("formsA-D", "017", [("A MOVE to", [(30, 70, 20, 30), (70, 72, 90, 28), (180, 75, 30, 20)]),
                                     ("stop Mr.", [(30, 150, 60, 30), (110, 152, 50, 28)])]),
    "e03-010": ("formsE-H", "102", [("Labour life", [(50, 80, 100, 40), (170, 85, 60, 35)])]),
    "n04-002x": ("formsI-Z", "551", [("Peers is", [(60, 90, 90, 30), (170, 95, 30, 25)]),
                                      ("from 1957.", [(60, 170, 70, 30), (150, 172, 80, 30)])]),
}
SPLITS = {"train": ["a01-000u", "n04-002x"], "validation": ["b02-001"], "test": ["e03-010"]}
SPLIT_OF = {"a01-000u": "train", "n04-002x": "train", "b02-001": "val", "e03-010": "test"}


def line_boxes(spec):
    """[(word text, [cmp boxes])] for one line spec; the first word of a01-000u-00 gets two cmp boxes."""
    text, boxes = spec
    words = text.split(" ")
    if len(boxes) == len(words) + 1:
        return [(words[0], boxes[:2])] + [(w, [b]) for w, b in zip(words[1:], boxes[2:])]
    return [(w, [b]) for w, b in zip(words, boxes)]


def union(boxes):
    return (min(b[0] for b in boxes), min(b[1] for b in boxes), max(b[0] + b[2] for b in boxes),
            max(b[1] + b[3] for b in boxes))


# lines.txt's word tokens where they are not the words: IAM splits punctuation and clitics off
TOKENS = {"a01-000u-00": ['"', "Café", '"', "&", "co", "'s", "<b>"], "n04-002x-01": ["from", "1957", "."]}


def form_xml(form_id, writer, lines, text_override=None):
    """IAM's XML for one form, as ISO-8859-1 bytes, text attributes escaped twice as in IAM's files (``&amp;quot;``
    for ``"``: a parser reads ``&quot;``)."""
    esc = lambda s: quoteattr(s.replace("&", "&amp;").replace('"', "&quot;"))  # noqa: E731
    out = ['<?xml version="1.0" encoding="ISO-8859-1"?>',
           f'<form created="2000-01-01" height="400" id="{form_id}" width="600" writer-id="{writer}">',
           "<machine-printed-part>", f"<machine-print-line text={esc(' '.join(t for t, _ in lines))}/>",
           "</machine-printed-part>", "<handwritten-part>"]
    for i, spec in enumerate(lines):
        line_id = f"{form_id}-{i:02d}"
        text = (text_override or {}).get(line_id, spec[0])
        out.append(f'<line id="{line_id}" segmentation="ok" text={esc(text)} threshold="154">')
        for j, (word, boxes) in enumerate(line_boxes(spec)):
            out.append(f'<word id="{line_id}-{j:02d}" tag="NN" text={esc(word)}>')
            out += [f'<cmp x="{x}" y="{y}" width="{w}" height="{h}"/>' for x, y, w, h in boxes]
            out.append("</word>")
        out.append("</line>")
    out += ["</handwritten-part>", "</form>", ""]
    return "\n".join(out).encode("latin-1")


def make_iam(root, text_override=None):
    """A small IAM folder: 600x400 PIL forms in formsA-D/E-H/I-Z, xml/, splits/*.uttlist, ascii/lines.txt."""
    rng = np.random.default_rng(0)
    os.makedirs(os.path.join(root, "xml"))
    os.makedirs(os.path.join(root, "splits"))
    os.makedirs(os.path.join(root, "ascii"))
    lines_txt = ["#--- lines.txt ---#", "# format: a01-000u-00 ok 154 19 408 746 1661 89 A|MOVE|to|stop|Mr.", "#"]
    for form_id, (folder, writer, lines) in FORMS.items():
        os.makedirs(os.path.join(root, folder), exist_ok=True)
        page = Image.fromarray(rng.integers(225, 256, (400, 600), dtype=np.uint8))  # noisy paper
        draw = ImageDraw.Draw(page)
        for i, spec in enumerate(lines):
            all_boxes = [b for _, boxes in line_boxes(spec) for b in boxes]
            for x, y, w, h in all_boxes:  # "ink" filling each cmp box exactly, a different grey per box
                draw.rectangle([x, y, x + w - 1, y + h - 1], fill=int(rng.integers(0, 90)))
            x0, y0, x1, y1 = union(all_boxes)
            words = "|".join(TOKENS.get(f"{form_id}-{i:02d}", spec[0].split(" "))).replace('"', "&quot;")
            lines_txt.append(f"{form_id}-{i:02d} ok 154 {len(all_boxes)} {x0} {y0} {x1 - x0} {y1 - y0} {words}")
        page.save(os.path.join(root, folder, form_id + ".png"))
        with open(os.path.join(root, "xml", form_id + ".xml"), "wb") as f:
            f.write(form_xml(form_id, writer, lines, text_override))
    for name, ids in SPLITS.items():
        with open(os.path.join(root, "splits", name + ".uttlist"), "w") as f:
            f.write("\n".join(ids) + "\n")
    with open(os.path.join(root, "ascii", "lines.txt"), "wb") as f:
        f.write(("\n".join(lines_txt) + "\n").encode("latin-1"))  # IAM's own encoding
    return str(root)


def expected_lines():
    """line id -> (text, form id, writer id, cmp union)."""
    out = {}
    for form_id, (_, writer, lines) in FORMS.items():
        for i, spec in enumerate(lines):
            boxes = [b for _, bs in line_boxes(spec) for b in bs]
            out[f"{form_id}-{i:02d}"] = (spec[0], form_id, writer, union(boxes))
    return out


def read_shards(folder, split):
    """key -> {ext: bytes}, read with plain tarfile; also checks each key appears once."""
    out = {}
    for path in sorted(glob.glob(os.path.join(folder, f"{split}-*.tar"))):
        with tarfile.open(path) as tar:
            for m in tar.getmembers():
                key, ext = m.name.split(".", 1)
                assert ext not in out.get(key, {}), f"{key}.{ext} twice"
                out.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return out


def add_form(root, form_id, folder, split, lines, writer="9"):
    """One more form (XML, white page image) in ``split``'s uttlist (None: in no split list)."""
    with open(os.path.join(root, "xml", form_id + ".xml"), "wb") as f:
        f.write(form_xml(form_id, writer, lines))
    os.makedirs(os.path.join(root, folder), exist_ok=True)
    Image.new("L", (600, 400), 255).save(os.path.join(root, folder, form_id + ".png"))
    if split:
        with open(os.path.join(root, "splits", split + ".uttlist"), "a") as f:
            f.write(form_id + "\n")


def write_line_images(root):
    """IAM's lines/ images for every line of lines.txt (for source=lines)."""
    for rec in iam.parse_lines_txt(os.path.join(root, "ascii", "lines.txt")):
        path = iam.line_image_path(root, rec.id)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        Image.new("L", (80, 30), 40).save(path)


def run_prepare(root, out, **kw):
    kw.setdefault("workers", 1)
    opt = PrepareOptions(root, os.path.join(root, "xml"), os.path.join(root, "splits"), out, **kw)
    return prepare(opt, progress=False)


@pytest.fixture
def iam_root(tmp_path):
    return make_iam(tmp_path / "iam")


# ------------------------------------------------------------------------------------------------------------------
# Parsing
# ------------------------------------------------------------------------------------------------------------------


def test_xml_entities_latin1_and_cmp_union(iam_root):
    raw = open(os.path.join(iam_root, "xml", "a01-000u.xml"), "rb").read()
    # really ISO-8859-1 bytes and XML entities, as in IAM
    assert b"Caf\xe9" in raw and b"&amp;quot;" in raw and b"&amp;amp;" in raw and b"&lt;b&gt;" in raw
    form = iam.parse_form_xml(os.path.join(iam_root, "xml", "a01-000u.xml"))
    assert (form.id, form.writer_id, form.problems) == ("a01-000u", "000", [])
    truth = expected_lines()
    assert [(l.id, l.text, l.bbox) for l in form.lines] == [
        ("a01-000u-00", '"Café" & co\'s <b>', (40, 55, 220, 95)),  # union of 4 cmp boxes, exclusive right/bottom
        ("a01-000u-01", "naïve Zoë", truth["a01-000u-01"][3])]
    assert all(l.form_id == "a01-000u" and l.writer_id == "000" and l.segmentation == "ok" for l in form.lines)


def test_lines_txt_latin1_entities_and_empty(iam_root):
    path = os.path.join(iam_root, "ascii", "lines.txt")
    with open(path, "ab") as f:
        f.write(b"e03-010-01 err 154 0 10 20 30 40\n")  # no transcription at all
    lines = iam.parse_lines_txt(path)
    truth = expected_lines()
    assert [l.id for l in lines] == list(truth) + ["e03-010-01"]
    for line in lines[:-1]:
        text, form_id, _, bbox = truth[line.id]
        assert (line.form_id, line.bbox) == (form_id, bbox) and iam.same_text(line.text, text)
    assert lines[0].text == '" Café " & co \'s <b>'  # tokens; &quot; decoded, é read as ISO-8859-1
    assert (lines[-1].text, lines[-1].segmentation, lines[-1].bbox) == ("", "err", (10, 20, 40, 60))


def test_bad_cmp_names_file_and_line(tmp_path):
    path = tmp_path / "c01-000.xml"
    path.write_bytes(b'<?xml version="1.0" encoding="ISO-8859-1"?><form id="c01-000" writer-id="1"><handwritten-part>'
                     b'<line id="c01-000-00" text="x"><word id="c01-000-00-00" text="x"><cmp x="1" y="a" width="2" '
                     b'height="3"/></word></line></handwritten-part></form>')
    with pytest.raises(iam.IAMFormatError, match=r"c01-000.xml: line c01-000-00: bad <cmp> box"):
        iam.parse_form_xml(str(path))


def test_form_folders_error_names_root(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"form image folder not found: {tmp_path}"):
        iam.form_folders(str(tmp_path))


# ------------------------------------------------------------------------------------------------------------------
# Round trip
# ------------------------------------------------------------------------------------------------------------------


def test_round_trip_crops_splits_manifest(iam_root, tmp_path):
    out = str(tmp_path / "shards")
    manifest = run_prepare(iam_root, out, margin=6, shard_size=2, workers=2)
    assert manifest == {k: v for k, v in load_manifest(out).items() if k != "_folder"}
    truth = expected_lines()
    pages = {f: np.asarray(Image.open(os.path.join(iam_root, d, f + ".png"))) for f, (d, _, _) in FORMS.items()}
    seen = set()
    for split in ("train", "val", "test"):
        samples = read_shards(out, split)
        info = manifest["splits"][split]
        assert info["lines"] == len(samples) == sum(e["count"] for e in info["shards"])
        assert [e["file"] for e in info["shards"]] == [f"{split}-{i:06d}.tar" for i in range(len(info["shards"]))]
        assert sorted(os.path.basename(p) for p in glob.glob(os.path.join(out, f"{split}-*.tar"))) == \
            [e["file"] for e in info["shards"]]
        for entry in info["shards"]:
            assert entry["sha256"] == hashlib.sha256(open(os.path.join(out, entry["file"]), "rb").read()).hexdigest()
            assert 1 <= entry["count"] <= 2
        for key, s in samples.items():
            text, form_id, writer, (x0, y0, x1, y1) = truth[key]
            assert SPLIT_OF[form_id] == split  # split assignment by the uttlist of the line's form
            assert s["txt"].decode("utf-8") == text
            assert json.loads(s["json"]) == {"form_id": form_id, "writer_id": writer, "bbox": [x0, y0, x1, y1],
                                             "segmentation": "ok"}
            img = Image.open(io.BytesIO(s["png"]))
            assert img.mode == "L"
            # the crop is the union of the cmp boxes plus the margin, cut from the form pixel for pixel
            assert np.array_equal(np.asarray(img), pages[form_id][y0 - 6 : y1 + 6, x0 - 6 : x1 + 6])
            seen.add(key)
    assert seen == set(truth)
    train_text = "".join(truth[k][0] for k in truth if SPLIT_OF[truth[k][1]] == "train")
    assert manifest["alphabet"] == "".join(sorted(set(train_text)))
    assert "Z" in manifest["alphabet"] and "M" not in manifest["alphabet"]  # train only ("MOVE" is in val)
    assert manifest["problems"]["total"] == 0 and manifest["version"] == 1 and manifest["name"] == "shards"
    assert not [p for p in os.listdir(out) if p.startswith(".")]


def test_scale_half(iam_root, tmp_path):
    out = str(tmp_path / "half")
    run_prepare(iam_root, out, margin=8, scale=0.5)
    samples = read_shards(out, "test")
    x0, y0, x1, y1 = expected_lines()["e03-010-00"][3]
    img = np.asarray(Image.open(io.BytesIO(samples["e03-010-00"]["png"])))
    assert img.shape == (round((y1 - y0 + 16) * 0.5), round((x1 - x0 + 16) * 0.5))
    page = Image.open(os.path.join(iam_root, "formsE-H", "e03-010.png"))
    full = page.crop((x0 - 8, y0 - 8, x1 + 8, y1 + 8))
    ref = np.asarray(full.resize((img.shape[1], img.shape[0]), Image.BILINEAR))
    assert np.abs(img.astype(int) - ref).max() <= 1  # the half-size image of the full-resolution crop
    assert img[:2].min() > 200 and img.min() < 90  # paper margin on top, dark ink inside


def test_lines_source(iam_root, tmp_path):
    """IAM's pre-cropped lines/ + ascii/lines.txt (latin-1) as the source; writer ids still come from the XML."""
    truth = expected_lines()
    for line_id, (_, form_id, _, (x0, y0, x1, y1)) in truth.items():
        path = iam.line_image_path(iam_root, line_id)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        Image.new("L", (x1 - x0, y1 - y0), 30).save(path)
    os.unlink(iam.line_image_path(iam_root, "b02-001-01"))
    with open(os.path.join(iam_root, "ascii", "lines.txt"), "ab") as f:
        f.write(b"b02-001-02 ok 154 1 10 20 30 40\n")  # no transcription
    out = str(tmp_path / "lines")
    manifest = run_prepare(iam_root, out, source="lines", lines_txt=os.path.join(iam_root, "ascii", "lines.txt"),
                           scale=0.5)
    assert manifest["problems"]["counts"] == {"missing_line_image": 1, "empty_transcription": 1}
    messages = "\n".join(manifest["problems"]["messages"])
    assert "b02-001-01.png: not found; line b02-001-01 not written" in messages
    assert "lines.txt: line b02-001-02: empty transcription" in messages
    got = {}
    for split in ("train", "val", "test"):
        got.update(read_shards(out, split))
    assert {k: v["txt"].decode() for k, v in got.items()} == {k: v[0] for k, v in truth.items() if k != "b02-001-01"}
    meta = json.loads(got["n04-002x-01"]["json"])
    assert meta["writer_id"] == "551"
    w, h = Image.open(io.BytesIO(got["n04-002x-01"]["png"])).size
    x0, y0, x1, y1 = truth["n04-002x-01"][3]
    assert (w, h) == (round((x1 - x0) * 0.5), round((y1 - y0) * 0.5))


def test_lines_source_text_is_the_xml_text_checked_against_the_tokens(iam_root, tmp_path, capsys):
    """source=lines writes the XML's text (spaced as written), not lines.txt's tokens joined by spaces; a line whose
    two texts differ in more than spaces is not written, and a line no XML has keeps its tokens, counted."""
    lines_txt = os.path.join(iam_root, "ascii", "lines.txt")
    rows = open(lines_txt, encoding="latin-1").read().replace(" A|MOVE|to\n", " A|MOVE|too\n")
    rows += "a01-000u-02 ok 154 2 40 200 100 30 Zoë|'s|.\n"  # its XML has lines 00 and 01 only
    with open(lines_txt, "w", encoding="latin-1") as f:
        f.write(rows)
    write_line_images(iam_root)
    out = str(tmp_path / "lines")
    manifest = run_prepare(iam_root, out, source="lines", lines_txt=lines_txt)
    problems = manifest["problems"]
    assert problems["counts"] == {"text_mismatch": 1} and problems["written"] == {"text_from_lines_txt": 1}
    messages = "\n".join(problems["messages"])
    assert ("line b02-001-00: the text of " + os.path.join(iam_root, "xml", "b02-001.xml")) in messages
    assert "differ in more than spaces ('A MOVE to' vs 'A MOVE too'); line not written" in messages
    assert os.path.join(iam_root, "xml", "a01-000u.xml") + ": no line a01-000u-02" in messages
    text = prepare_mod.summary(manifest)
    assert "NOT written: 1 line(s): text_mismatch 1" in text and "lines.txt's token spacing" in text
    got = {}
    for split in ("train", "val", "test"):
        got.update(read_shards(out, split))
    texts = {k: v["txt"].decode() for k, v in got.items()}
    assert texts["a01-000u-00"] == '"Café" & co\'s <b>' and texts["n04-002x-01"] == "from 1957."  # as written
    assert texts["a01-000u-02"] == "Zoë 's ." and "b02-001-00" not in texts


def test_iam_task_line_lists_assign_each_line(iam_root, tmp_path):
    """IAM's task lists name lines, not forms: each line goes where it is listed, a line of a listed form that no
    list names is not written, and a listed line the data does not have is reported; both counted."""
    splits = os.path.join(iam_root, "splits")
    for name in os.listdir(splits):
        os.unlink(os.path.join(splits, name))
    lists = {"trainset": ["a01-000u-00", "n04-002x-00", "n04-002x-01"], "validationset1": ["b02-001-00"],
             "validationset2": ["b02-001-01"], "testset": ["e03-010-00", "z99-000-00"]}
    for name, ids in lists.items():
        with open(os.path.join(splits, name + ".txt"), "w") as f:
            f.write("\n".join(ids) + "\n")
    out = str(tmp_path / "shards")
    manifest = run_prepare(iam_root, out)
    assert manifest["problems"]["counts"] == {"line_in_no_split": 1, "split_line_not_found": 1}
    messages = "\n".join(manifest["problems"]["messages"])
    assert "form a01-000u: lines of it in no split list under " in messages and ": a01-000u-01" in messages
    assert "the test list under " + splits + " names 1 line(s) not found in the XML files in" in messages
    assert messages.endswith("z99-000-00")
    keys = {split: set(read_shards(out, split)) for split in ("train", "val", "test")}
    assert keys == {"train": {"a01-000u-00", "n04-002x-00", "n04-002x-01"}, "val": {"b02-001-00", "b02-001-01"},
                    "test": {"e03-010-00"}}


# ------------------------------------------------------------------------------------------------------------------
# Re-runs and interruption
# ------------------------------------------------------------------------------------------------------------------


def test_rerun_is_deterministic_and_replaces_old_shards(iam_root, tmp_path):
    out = str(tmp_path / "shards")
    first = run_prepare(iam_root, out, shard_size=1)
    assert len(first["splits"]["train"]["shards"]) == 4
    again = run_prepare(iam_root, out, shard_size=1, workers=2)
    assert again["splits"] == first["splits"]  # same bytes (sha256), whatever the worker count
    bigger = run_prepare(iam_root, out, shard_size=100)
    assert [e["file"] for e in bigger["splits"]["train"]["shards"]] == ["train-000000.tar"]
    assert sorted(os.listdir(out)) == ["manifest.json", "test-000000.tar", "train-000000.tar", "val-000000.tar"]
    assert len(read_shards(out, "train")) == 4


def test_interrupted_split_leaves_old_shards_and_no_temp(tmp_path):
    out = str(tmp_path)
    gray = np.full((10, 20), 200, np.uint8)
    sample = lambda i: {"key": f"a01-000-{i:02d}", "png": png_bytes(gray), "text": f"t{i}", "meta": {}}  # noqa: E731
    old = write_split([sample(i) for i in range(3)], out, "train", max_count=2)
    before = {e["file"]: open(os.path.join(out, e["file"]), "rb").read() for e in old}

    def interrupted():
        for i in range(5):
            if i == 3:
                raise KeyboardInterrupt
            yield sample(10 + i)

    with pytest.raises(KeyboardInterrupt):
        write_split(interrupted(), out, "train", max_count=2)
    assert sorted(os.listdir(out)) == sorted(before)  # no temporary file, no half-written shard
    assert all(open(os.path.join(out, f), "rb").read() == b for f, b in before.items())
    open(os.path.join(out, ".val-000007.tar.tmp"), "wb").close()  # left by a killed run
    assert write_split([], out, "val") == []  # an empty split writes nothing and cleans up
    assert sorted(os.listdir(out)) == sorted(before)
    with pytest.raises(ValueError, match="'a01.x'"):
        write_split([dict(sample(0), key="a01.x")], out, "test")
    assert sorted(os.listdir(out)) == sorted(before)


def snapshot(folder):
    """name -> bytes of the files directly in ``folder``; sub-folders (a staging folder) are listed as None."""
    return {n: None if os.path.isdir(os.path.join(folder, n)) else open(os.path.join(folder, n), "rb").read()
            for n in sorted(os.listdir(folder))}


def assert_whole(folder):
    """``folder`` holds the manifest and exactly the shards it names, with their sha256s; returns the manifest."""
    manifest = load_manifest(folder)
    named = {e["file"]: e["sha256"] for info in manifest["splits"].values() for e in info["shards"]}
    assert sorted(os.listdir(folder)) == sorted(["manifest.json", *named])
    for name, digest in named.items():
        assert hashlib.sha256(open(os.path.join(folder, name), "rb").read()).hexdigest() == digest, name
    return manifest


def test_killed_run_leaves_previous_output_and_next_run_cleans_up(iam_root, tmp_path, caplog):
    """A real SIGKILL in the middle of the second split (val): no clean-up code runs at all."""
    out = str(tmp_path / "shards")
    first = run_prepare(iam_root, out, shard_size=1)
    before = snapshot(out)
    code = f"""if True:
        import os, signal
        import htr_dist.data.prepare as p
        real = p.write_split
        def write_split(samples, out_dir, split, max_count):
            def killed():
                for i, s in enumerate(samples):
                    if split == "val" and i == 1:
                        os.kill(os.getpid(), signal.SIGKILL)
                    yield s
            return real(killed(), out_dir, split, max_count)
        p.write_split = write_split
        root = {iam_root!r}
        p.prepare(p.PrepareOptions(root, os.path.join(root, "xml"), os.path.join(root, "splits"), {out!r},
                                   scale=0.5, workers=1), progress=False)
    """
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONPATH=ROOT))
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    staging = [n for n in os.listdir(out) if n.startswith(".staging-")]
    assert len(staging) == 1
    assert sorted(os.listdir(os.path.join(out, staging[0]))) == [".val-000000.tar.tmp", "train-000000.tar"]
    assert {n: b for n, b in snapshot(out).items() if n != staging[0]} == before  # byte for byte, nothing else
    assert load_manifest(out)["splits"] == first["splits"]
    assert len(read_shards(out, "train")) == 4 and len(read_shards(out, "val")) == 2  # loadable, old content
    caplog.set_level(logging.WARNING, logger="htr_dist.data.prepare")
    again = run_prepare(iam_root, out, scale=0.5)
    assert f"{staging[0]}: removing the staging folder left by an interrupted run" in caplog.text
    assert assert_whole(out)["splits"] == again["splits"]  # staging gone, train-000001..3.tar gone
    assert [len(v["shards"]) for v in again["splits"].values()] == [1, 1, 1]


def test_interrupted_move_is_completed_by_next_run(iam_root, tmp_path, monkeypatch, caplog):
    """Killed while moving the complete staging folder in: readers find no manifest (never a mix of runs), and the
    next run first completes the move, so the output is whole again even if that run fails in turn."""
    out = str(tmp_path / "shards")
    run_prepare(iam_root, out, shard_size=1)
    ref = run_prepare(iam_root, str(tmp_path / "ref"), shard_size=2, scale=0.5)
    real_replace, moved = os.replace, []

    def replace(src, dst):
        if os.path.dirname(dst) == out:
            if len(moved) == 2:
                raise KeyboardInterrupt
            moved.append(os.path.basename(dst))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        run_prepare(iam_root, out, shard_size=2, scale=0.5)
    monkeypatch.undo()
    assert moved == ["train-000000.tar", "train-000001.tar"]
    with pytest.raises(ManifestError, match="manifest.json: missing"):
        load_manifest(out)
    staging = [n for n in os.listdir(out) if n.startswith(".staging-")]
    assert len(staging) == 1 and os.path.isfile(os.path.join(out, staging[0], "manifest.json"))

    def fail(*args, **kwargs):
        raise RuntimeError("injected failure")

    monkeypatch.setattr(prepare_mod, "write_split", fail)
    caplog.set_level(logging.WARNING, logger="htr_dist.data.prepare")
    with pytest.raises(RuntimeError, match="injected failure"):
        run_prepare(iam_root, out, shard_size=1)
    assert f"{staging[0]}: completing the replacement of {out}" in caplog.text
    got = assert_whole(out)  # train-000002.tar, train-000003.tar and val-000001.tar of the first run are gone
    assert got["splits"] == ref["splits"] and got["alphabet"] == ref["alphabet"]


def test_staging_folder_of_running_process_left_alone(iam_root, tmp_path, caplog):
    out = str(tmp_path / "shards")
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live = os.path.join(out, f".staging-{sleeper.pid}")
        os.makedirs(live)
        open(os.path.join(live, "train-000000.tar"), "wb").close()
        dead = os.path.join(out, ".staging-junk")  # no process id: removed
        os.makedirs(dead)
        caplog.set_level(logging.WARNING, logger="htr_dist.data.prepare")
        run_prepare(iam_root, out)
        assert f"staging folder of process {sleeper.pid}, which is still running: left alone" in caplog.text
        assert os.listdir(live) == ["train-000000.tar"] and not os.path.exists(dead)
        assert [e["file"] for e in load_manifest(out)["splits"]["train"]["shards"]] == ["train-000000.tar"]
    finally:
        sleeper.kill()
        sleeper.wait()
    run_prepare(iam_root, out)  # its process has ended: now it is a leftover
    assert_whole(out)


def _samples_with_default_sigterm(job):
    """prepare's worker function, run only where SIGTERM has its default action (checked in the worker)."""
    if signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        raise RuntimeError("a pool worker kept its parent's SIGTERM handler")
    return _page_samples(job)


def test_pool_workers_end_on_sigterm_whatever_the_parents_handler(iam_root, tmp_path, monkeypatch):
    """Pool.terminate ends the workers with SIGTERM: a handler the parent had when it forked (a training run's, say)
    must not keep them alive, or the pool may wait for them forever."""
    import htr_dist.data.prepare as prepare_module

    monkeypatch.setattr(prepare_module, "_page_samples", _samples_with_default_sigterm)
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: None)
    try:
        run_prepare(iam_root, str(tmp_path / "shards"), workers=2)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert_whole(str(tmp_path / "shards"))


# ------------------------------------------------------------------------------------------------------------------
# Bad inputs: named, counted, in the manifest, never silently dropped
# ------------------------------------------------------------------------------------------------------------------


def test_bad_inputs_reported_counted_and_in_manifest(tmp_path, capsys, caplog):
    root = make_iam(tmp_path / "iam", text_override={"n04-002x-01": "  "})
    os.unlink(os.path.join(root, "formsE-H", "e03-010.png"))  # missing form image (1 line)
    with open(os.path.join(root, "xml", "b02-001.xml"), "ab") as f:
        f.write(b"<oops>")  # malformed XML: its 2 lines cannot be read (lines.txt names them)
    add_form(root, "p05-000", "formsI-Z", None, [("orphan line", [(10, 10, 50, 20), (70, 10, 40, 20)])])
    add_form(root, "c03-000", "formsA-D", "validation", [("val line", [(10, 10, 50, 20), (70, 10, 40, 20)])])
    add_form(root, "f04-000", "formsE-H", "test", [("test line", [(10, 10, 50, 20), (70, 10, 40, 20)])])
    out = str(tmp_path / "shards")
    caplog.set_level(logging.INFO)
    assert prepare_iam.main(["--iam", root, "--out", out, "--workers", "2", "--no-progress"]) == 0
    stdout = capsys.readouterr().out
    manifest = load_manifest(out)
    counts = manifest["problems"]["counts"]
    assert counts == {"missing_form_image": 1, "malformed_xml": 2, "empty_transcription": 1, "form_in_no_split": 1}
    assert manifest["problems"]["total"] == 5
    assert manifest["problems"]["forms"] == {"malformed_xml": 1} and manifest["problems"]["written"] == {}
    assert "NOT written: 5 line(s): empty_transcription 1, form_in_no_split 1, malformed_xml 2, " \
           "missing_form_image 1" in stdout
    assert "forms with problems: malformed_xml 1" in stdout and "no problems" not in stdout
    messages = "\n".join(manifest["problems"]["messages"])
    log_text = caplog.text
    for needle in ("e03-010.png not found", "e03-010-00 not written", os.path.join(root, "xml", "b02-001.xml"),
                   "malformed XML", "lines not written: b02-001-00, b02-001-01",
                   "n04-002x.xml: line n04-002x-01: empty transcription", "p05-000-00"):
        assert needle in messages and needle in log_text, needle
    written = {k for s in ("train", "val", "test") for k in read_shards(out, s)}
    assert written == {"a01-000u-00", "a01-000u-01", "n04-002x-00", "c03-000-00", "f04-000-00"}
    assert [manifest["splits"][s]["lines"] for s in ("train", "val", "test")] == [3, 1, 1]


def test_malformed_xml_lines_counted_in_each_source(iam_root, tmp_path, capsys):
    """A truncated XML of a 2-line form: with source=forms its 2 lines are not written (named from lines.txt, or
    said to be uncounted without one); with source=lines they are written with an empty writer id, and said so, as
    are the lines of a form that has no XML at all."""
    with open(os.path.join(iam_root, "xml", "n04-002x.xml"), "wb") as f:
        f.write(b"<form id='n04-002x'><handwritten-part><line")
    lines_txt = os.path.join(iam_root, "ascii", "lines.txt")
    forms = run_prepare(iam_root, str(tmp_path / "forms"), lines_txt=lines_txt)
    assert forms["problems"]["counts"] == {"malformed_xml": 2} and forms["problems"]["total"] == 2
    assert forms["problems"]["forms"] == {"malformed_xml": 1}
    text = prepare_mod.summary(forms)
    assert "NOT written: 2 line(s): malformed_xml 2" in text and "forms with problems: malformed_xml 1" in text
    assert forms["splits"]["train"]["lines"] == 2

    unknown = run_prepare(iam_root, str(tmp_path / "nolines"))  # no lines.txt: how many is unknown, and said so
    assert unknown["problems"]["counts"] == {} and unknown["problems"]["total"] == 0
    assert unknown["problems"]["forms"] == {"malformed_xml": 1, "malformed_xml_lines_unknown": 1}
    text = prepare_mod.summary(unknown)
    assert "NOT written either: the lines of 1 form(s) whose XML is malformed" in text and "no problems" not in text
    assert "n04-002x.xml: malformed XML" in unknown["problems"]["messages"][0]
    assert "how many is unknown: no lines.txt" in unknown["problems"]["messages"][0]

    write_line_images(iam_root)
    os.unlink(os.path.join(iam_root, "xml", "e03-010.xml"))  # lines.txt has its line; no XML gives its writer
    lines = run_prepare(iam_root, str(tmp_path / "lines"), source="lines", lines_txt=lines_txt)
    assert lines["problems"]["counts"] == {} and lines["problems"]["total"] == 0
    assert lines["problems"]["written"] == {"writer_id_unknown": 3, "text_from_lines_txt": 3}
    assert lines["problems"]["forms"] == {"malformed_xml": 1}
    text = prepare_mod.summary(lines)
    assert "NOT written" not in text and "no problems" not in text
    assert "written, but writer id unknown" in text and ": 3 line(s)" in text
    messages = "\n".join(lines["problems"]["messages"])
    assert "n04-002x.xml: malformed XML" in messages and "n04-002x-00, n04-002x-01" in messages
    assert "form e03-010: no XML file for it in" in messages and "e03-010-00" in messages
    metas = {k: json.loads(v["json"]) for s in ("train", "test") for k, v in read_shards(str(tmp_path / "lines"),
                                                                                       s).items()}
    assert {k for k, m in metas.items() if m["writer_id"] == ""} == {"n04-002x-00", "n04-002x-01", "e03-010-00"}


def test_split_forms_without_lines_are_reported(iam_root, tmp_path, capsys):
    """The reverse of a form in no split: a form of a split list with no XML, an XML without <line>, or (source=
    lines) no line in lines.txt, is named and counted."""
    with open(os.path.join(iam_root, "splits", "test.uttlist"), "a") as f:
        f.write("zz9-999\n")  # no XML: a typo, or a partial extraction of xml.tgz
    add_form(iam_root, "c03-000", "formsA-D", "validation", [])  # an XML without any <line>
    out = str(tmp_path / "shards")
    assert prepare_iam.main(["--iam", iam_root, "--out", out, "--workers", "1", "--no-progress"]) == 0
    stdout = capsys.readouterr().out
    manifest = load_manifest(out)
    assert manifest["problems"]["forms"] == {"split_form_without_lines": 2} and manifest["problems"]["total"] == 0
    assert "forms with problems: split_form_without_lines 2" in stdout and "no problems" not in stdout
    messages = "\n".join(manifest["problems"]["messages"])
    assert f"form zz9-999: in the test list under {iam_root}/splits, but {iam_root}/xml has no XML for it" in messages
    assert f"form c03-000: in the val list under {iam_root}/splits, but its XML {iam_root}/xml/c03-000.xml has no " \
           "<line>" in messages
    write_line_images(iam_root)
    lines = run_prepare(iam_root, str(tmp_path / "lines"), source="lines",
                        lines_txt=os.path.join(iam_root, "ascii", "lines.txt"))
    assert lines["problems"]["forms"] == {"split_form_without_lines": 2}
    assert "form c03-000: in the val list" in lines["problems"]["messages"][0]
    assert "ascii/lines.txt lists no line of it" in lines["problems"]["messages"][0]


def test_split_without_lines_is_an_error(iam_root, tmp_path, capsys):
    """A split left without lines (all its forms missing, or none of their lines written) is an error naming the
    split: the previous output stays as it was."""
    out = str(tmp_path / "shards")
    before = run_prepare(iam_root, out)
    os.unlink(os.path.join(iam_root, "formsA-D", "b02-001.png"))  # val's only form: its 2 lines cannot be written
    with pytest.raises(iam.IAMFormatError, match=r"split 'val': none of its 2 line\(s\) could be written "
                                                 r"\(missing_form_image 2"):
        run_prepare(iam_root, out)
    assert load_manifest(out)["splits"] == before["splits"] and not [p for p in os.listdir(out) if p[0] == "."]
    os.unlink(os.path.join(iam_root, "xml", "e03-010.xml"))  # test's only form: no XML at all
    assert prepare_iam.main(["--iam", iam_root, "--out", out, "--workers", "1", "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "error: split 'test': no line to write: none of its 1 form(s) listed under" in err and "e03-010" in err
    assert load_manifest(out)["splits"] == before["splits"]
    for name in ("validation", "test"):
        os.unlink(os.path.join(iam_root, "splits", name + ".uttlist"))
    with pytest.raises(iam.IAMFormatError, match=r"split 'val': no split list under .* names a form or line for it"):
        run_prepare(iam_root, out)


def test_duplicate_ids_are_errors(iam_root, tmp_path, capsys):
    """A line id twice would be two samples of one key (a test line scored twice): an error naming the files."""
    out = str(tmp_path / "shards")
    xml = os.path.join(iam_root, "xml")
    shutil.copy(os.path.join(xml, "e03-010.xml"), os.path.join(xml, "e03-010-copy.xml"))
    with pytest.raises(iam.IAMFormatError, match=f"{xml}/e03-010.xml: form id e03-010 is already the id of "
                                                 f"{xml}/e03-010-copy.xml"):
        run_prepare(iam_root, out)
    os.unlink(os.path.join(xml, "e03-010-copy.xml"))
    # another form's XML holding a line with e03-010's line id
    data = form_xml("p05-000", "9", [("stray line", [(10, 10, 50, 20), (70, 10, 40, 20)])])
    with open(os.path.join(xml, "p05-000.xml"), "wb") as f:
        f.write(data.replace(b'id="p05-000-00"', b'id="e03-010-00"'))
    with pytest.raises(iam.IAMFormatError, match=f"{xml}/p05-000.xml: line id e03-010-00 is already a line of "
                                                 f"{xml}/e03-010.xml"):
        run_prepare(iam_root, out)
    lines_txt = os.path.join(iam_root, "ascii", "lines.txt")
    write_line_images(iam_root)
    with pytest.raises(iam.IAMFormatError, match=f"{xml}/p05-000.xml: line id e03-010-00 is already a line of "
                                                 f"{xml}/e03-010.xml"):  # source=lines takes its text from the XML
        run_prepare(iam_root, out, source="lines", lines_txt=lines_txt)
    os.unlink(os.path.join(xml, "p05-000.xml"))
    rows = open(lines_txt, encoding="latin-1").read().splitlines()
    with open(lines_txt, "a", encoding="latin-1") as f:
        f.write(rows[3] + "\n")  # the first data line (a01-000u-00), listed again as line 11
    argv = ["--iam", iam_root, "--out", out, "--source", "lines", "--workers", "1", "--no-progress"]
    assert prepare_iam.main(argv) == 1
    assert f"error: {lines_txt}:11: line id a01-000u-00 is already listed on line 4" in capsys.readouterr().err
    assert not os.path.exists(out)


@pytest.mark.parametrize("remove, message", [
    ("", "IAM folder not found: {root}"),
    ("xml", "xml folder not found: {root}/xml"),
    ("splits", "splits folder not found: {root}/splits"),
    ("forms", "form image folder not found: {root} holds none of formsA-D"),
    ("lines", "line image folder not found: {root}/lines"),
])
def test_missing_input_folder_is_named(iam_root, tmp_path, capsys, remove, message):
    import shutil

    root = iam_root
    argv = ["--iam", root, "--out", str(tmp_path / "o"), "--workers", "1", "--no-progress"]
    if remove == "":
        root = str(tmp_path / "nope")
        argv[1] = root
    elif remove == "forms":
        for d in ("formsA-D", "formsE-H", "formsI-Z"):
            shutil.rmtree(os.path.join(root, d))
    elif remove == "lines":
        argv += ["--source", "lines"]
    else:
        shutil.rmtree(os.path.join(root, remove))
    assert prepare_iam.main(argv) == 1
    assert message.format(root=root) in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "o" / "manifest.json")


def test_load_manifest_errors(iam_root, tmp_path):
    out = str(tmp_path / "s")
    run_prepare(iam_root, out)
    path = os.path.join(out, "manifest.json")
    data = json.load(open(path))
    data["splits"]["train"]["lines"] += 1
    json.dump(data, open(path, "w"))
    with pytest.raises(ManifestError, match=r"manifest.json: split 'train' says 5 lines but its shards hold 4"):
        load_manifest(out)
    os.unlink(os.path.join(out, "val-000000.tar"))
    data["splits"]["train"]["lines"] -= 1
    json.dump(data, open(path, "w"))
    with pytest.raises(ManifestError, match=r"split 'val' lists val-000000.tar, which is not in"):
        load_manifest(out)
    open(path, "w").write("{")
    with pytest.raises(ManifestError, match=r"manifest.json: not valid JSON"):
        load_manifest(out)


# ------------------------------------------------------------------------------------------------------------------
# The command line, as a user runs it
# ------------------------------------------------------------------------------------------------------------------


def test_cli_help_and_positional_form(iam_root, tmp_path):
    script = os.path.join(ROOT, "launch", "prepare_iam.py")
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, script, "--help"], capture_output=True, text=True, env=env)
    assert proc.returncode == 0
    for option in ("--iam", "--out", "--source", "--scale", "--margin", "--shard-size", "--workers", "FORMS XML"):
        assert option in proc.stdout, option
    # FORMS is the folder holding formsA-D/ ... (the IAM root), not the folder of form images
    assert "FORMS is the folder that HOLDS formsA-D/ formsE-H/ formsI-Z/ (or forms/)" in proc.stdout
    assert "not the folder of form images" in proc.stdout
    out = str(tmp_path / "pos")
    proc = subprocess.run([sys.executable, script, iam_root, os.path.join(iam_root, "xml"),
                           os.path.join(iam_root, "splits"), out, "--workers", "2", "--scale", "0.5"],
                          capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "train: 4 lines in 1 shard(s)" in proc.stdout and "no problems" in proc.stdout
    assert "forms: 100%" in proc.stderr  # the tqdm progress bar
    assert {s: v["lines"] for s, v in load_manifest(out)["splits"].items()} == {"train": 4, "val": 2, "test": 1}
