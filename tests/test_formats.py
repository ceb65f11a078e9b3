"""The import formats of htr-prepare on tiny folders drawn here with PIL: each importer's shards read back through the
manifest checks and the trainer's own loader; counts, texts, skip reasons, splits by group, masked crops."""

import io
import json
import os
import shutil
import subprocess
import tarfile

import numpy as np
import pytest
from PIL import Image, ImageDraw

from htr_dist.cli import prepare as cli
from htr_dist.data.formats import FORMATS
from htr_dist.data.formats.base import ImportOptions
from htr_dist.data.prepare import prepare_format, summary
from htr_dist.data.shards import SPLITS, load_manifest, verify_shards

from conftest import PY, ROOT

PAGE_2019 = "http://schema.primaresearch.org/PAGE/gts/pagecontent/2019-07-15"
PAGE_2013 = "http://schema.primaresearch.org/PAGE/gts/pagecontent/2013-07-15"


def render(path, text, size=(160, 32)):
    """A line image: dark text on white paper."""
    im = Image.new("L", size, 255)
    ImageDraw.Draw(im).text((4, 8), text, fill=20)
    im.save(path)


def write(path, text):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def run(fmt, source, out, **kw):
    kw.setdefault("workers", 1)
    return prepare_format(FORMATS[fmt], ImportOptions(str(source), str(out), **kw), progress=False)


def read_back(out):
    """Check the shards as training does (manifest, SHA-256s, the eval loader); return split -> {key: (text, meta,
    gray image)}."""
    from htr_dist.config import load_config
    from htr_dist.data.alphabet import Alphabet
    from htr_dist.data.pipeline import build_eval_loader

    manifest = load_manifest(str(out))
    assert verify_shards(str(out)) == []
    cfg = load_config(None, [f"data.path={out}", "data.num_workers=0", "train.batch_size=4", "data.img_height=32",
                             "data.img_width=128"])
    alphabet = Alphabet(manifest["alphabet"])
    found = {}
    for split, info in manifest["splits"].items():
        loaded = {k: t for b in build_eval_loader(cfg, split, alphabet, 0, 1) for k, t in zip(b["keys"], b["texts"])}
        raw = {}
        for entry in info["shards"]:
            with tarfile.open(os.path.join(out, entry["file"])) as tar:
                for m in tar.getmembers():
                    key, ext = m.name.split(".", 1)
                    raw.setdefault(key, {})[ext] = tar.extractfile(m).read()
        assert len(loaded) == len(raw) == info["lines"]
        found[split] = {k: (loaded[k], json.loads(v["json"]), np.asarray(Image.open(io.BytesIO(v["png"]))))
                        for k, v in raw.items()}
        assert all(v[0] == raw[k]["txt"].decode("utf-8") for k, v in found[split].items())
    return manifest, found


def split_of_groups(found):
    """group -> the set of splits its lines are in."""
    out = {}
    for split, lines in found.items():
        for _, meta, _ in lines.values():
            out.setdefault(meta["group"], set()).add(split)
    return out


# ------------------------------------------------------------------------------------------------------------------
# lines: a folder of line images with .gt.txt / .txt
# ------------------------------------------------------------------------------------------------------------------


@pytest.fixture
def lines_dir(tmp_path):
    root = tmp_path / "lines"
    for w in range(1, 6):
        for i in range(2):
            folder = root / f"w{w:02d}"
            os.makedirs(folder, exist_ok=True)
            text = f"writer {w} line {i}"
            render(folder / f"l{i}.png", text)
            write(str(folder / (f"l{i}.gt.txt" if i == 0 else f"l{i}.txt")), text + "\n")
    render(root / "w01" / "nolabel.png", "x")  # no transcription
    render(root / "w02" / "empty.png", "x")
    write(str(root / "w02" / "empty.gt.txt"), "  \n")
    write(str(root / "w03" / "orphan.gt.txt"), "no image")
    render(root / "w04" / "both.png", "gt wins")
    write(str(root / "w04" / "both.gt.txt"), "gt wins")
    write(str(root / "w04" / "both.txt"), "txt loses")
    (root / "w05" / "bad.png").write_bytes(b"not a png")
    write(str(root / "w05" / "bad.txt"), "broken")
    return root


def test_lines_format(lines_dir, tmp_path):
    out = tmp_path / "out"
    manifest = run("lines", lines_dir, out, val_fraction=0.2, test_fraction=0.2)
    assert manifest["problems"]["counts"] == {"missing_transcription": 1, "empty_transcription": 1,
                                              "missing_line_image": 1, "unreadable_image": 1}
    messages = "\n".join(manifest["problems"]["messages"])
    for needle in ("nolabel.png: no nolabel.gt.txt or .txt", "empty.gt.txt: empty transcription",
                   "orphan.gt.txt: no image orphan.png", "line w05_bad"):
        assert needle in messages, needle
    _, found = read_back(out)
    texts = {k: v[0] for lines in found.values() for k, v in lines.items()}
    assert len(texts) == 11 and texts["w04_both"] == "gt wins" and texts["w03_l1"] == "writer 3 line 1"
    assert all(found[s] for s in SPLITS)
    groups = split_of_groups(found)
    assert sorted(groups) == [f"w{w:02d}" for w in range(1, 6)] and all(len(s) == 1 for s in groups.values())
    again = run("lines", lines_dir, tmp_path / "again", val_fraction=0.2, test_fraction=0.2)
    assert again["splits"] == manifest["splits"]  # deterministic: the same bytes
    assert "NOT written: 4 line(s)" in summary(manifest)


def test_lines_split_lists(lines_dir, tmp_path):
    splits = tmp_path / "splits"
    write(str(splits / "train.txt"), "w01\nw02\nw03\n")
    write(str(splits / "validation.lst"), "w04\n")
    write(str(splits / "test.txt"), "w05_l0\nw05_l1\nnobody\n")  # line ids; one that is no line, page or group
    manifest = run("lines", lines_dir, tmp_path / "out", splits_dir=str(splits))
    _, found = read_back(tmp_path / "out")
    assert {s: sorted({m["group"] for _, m, _ in v.values()}) for s, v in found.items()} == {
        "train": ["w01", "w02", "w03"], "val": ["w04"], "test": ["w05"]}
    assert manifest["problems"]["forms"] == {"split_id_not_found": 1}
    assert "name 1 id(s) that no line, page or group has: nobody" in "\n".join(manifest["problems"]["messages"])


def test_group_split_needs_three_groups(tmp_path):
    root = tmp_path / "two"
    os.makedirs(root)
    for w in ("a", "b"):
        render(root / f"{w}_0.png", w)
        write(str(root / f"{w}_0.txt"), w)
    with pytest.raises(ValueError, match=r"only 2 group\(s\) \(a, b\): splitting by group needs at least 3"):
        run("lines", root, tmp_path / "out")
    assert not os.path.exists(tmp_path / "out")


# ------------------------------------------------------------------------------------------------------------------
# reference: {train,val,test}/gt.txt + PNGs, as the reference's prepare_iam.py writes them
# ------------------------------------------------------------------------------------------------------------------


def test_reference_format(tmp_path):
    root = tmp_path / "ref"
    rows = {"train": [("a01-000u-00", "A MOVE to stop"), ("a01-000u-01", "Mr.  Gaitskell")],
            "val": [("b01-000-00", "from nominating")], "test": [("c01-000-00", "any more")]}
    for split, items in rows.items():
        os.makedirs(root / split)
        for name, text in items:
            render(root / split / f"{name}.png", text)
        gt = [f"{name} {text}" for name, text in items]
        if split == "train":
            gt += ["a01-000u-02 missing image", "a01-000u-03", ""]  # no PNG; no transcription; a blank line
        write(str(root / split / "gt.txt"), "\n".join(gt) + "\n")
    manifest = run("reference", root, tmp_path / "out")
    assert manifest["problems"]["counts"] == {"missing_line_image": 1, "empty_transcription": 1}
    messages = "\n".join(manifest["problems"]["messages"])
    assert "a01-000u-02.png: not found; line a01-000u-02 not written" in messages
    assert "gt.txt:4: a01-000u-03: empty transcription" in messages
    _, found = read_back(tmp_path / "out")
    assert {s: {k: v[0] for k, v in lines.items()} for s, lines in found.items()} == {
        "train": {"a01-000u-00": "A MOVE to stop", "a01-000u-01": "Mr.  Gaitskell"},  # inner spaces kept
        "val": {"b01-000-00": "from nominating"}, "test": {"c01-000-00": "any more"}}


# ------------------------------------------------------------------------------------------------------------------
# page: PAGE-XML polygons cut out as masked crops
# ------------------------------------------------------------------------------------------------------------------


def page_xml(ns, image_name, lines, width=400, height=200):
    """A PAGE-XML document; lines: [(id, points, [(index, text)], word text or None)]."""
    out = ['<?xml version="1.0" encoding="UTF-8"?>', f'<PcGts xmlns="{ns}">', "<Metadata><Creator>t</Creator>"
           "</Metadata>", f'<Page imageFilename="{image_name}" imageWidth="{width}" imageHeight="{height}">',
           '<TextRegion id="r1"><Coords points="0,0 399,0 399,199 0,199"/>']
    for lid, points, equivs, word in lines:
        out.append(f'<TextLine id="{lid}"><Coords points="{" ".join(f"{x},{y}" for x, y in points)}"/>')
        if word is not None:
            out.append(f'<Word id="{lid}w1"><Coords points="0,0 1,0 1,1"/><TextEquiv><Unicode>{word}</Unicode>'
                       "</TextEquiv></Word>")
        for index, text in equivs:
            attr = "" if index is None else f' index="{index}"'
            out.append(f"<TextEquiv{attr}><Unicode>{text}</Unicode></TextEquiv>")
        out.append("</TextLine>")
    out += ["</TextRegion>", "</Page>", "</PcGts>"]
    return "\n".join(out)


TRIANGLE = [(10, 10), (110, 10), (110, 40)]  # inside: above the diagonal from (10, 10) to (110, 40)


@pytest.fixture
def page_dir(tmp_path):
    root = tmp_path / "pages"
    os.makedirs(root / "images")
    os.makedirs(root / "page")
    for name in ("p1", "p3"):
        Image.new("L", (400, 200), 50).save(root / "images" / f"{name}.png")  # dark everywhere: the mask shows
    Image.new("L", (400, 200), 50).save(root / "p2.png")
    lines = [("l1", TRIANGLE, [("1", "wrong one"), ("0", "first line")], "word"),
             ("l2", [(10, 60), (200, 60), (200, 90), (10, 90)], [(None, "")], None),  # empty transcription
             ("l3", [(500, 10), (600, 10), (600, 40), (500, 40)], [(None, "far away")], None)]  # outside the image
    write(str(root / "page" / "p1.xml"), page_xml(PAGE_2019, "../images/p1.png", lines))
    write(str(root / "page" / "p2.xml"), page_xml(PAGE_2013, "p2.png", [  # found in the XML folder's parent
        ("l1", [(20, 20), (120, 20), (120, 50), (20, 50)], [(None, "second  page")], None)]))
    shutil.copy(root / "images" / "p3.png", root / "page" / "p3.png")  # a same-stem image beside the XML
    write(str(root / "page" / "p3.xml"), page_xml(PAGE_2019, "elsewhere.png", [
        ("l1", [(380, 150), (420, 150), (420, 180), (380, 180)], [(None, "clipped")], None)]))
    return root


def test_page_format_masked_crops(page_dir, tmp_path):
    out = tmp_path / "out"
    manifest = run("page", page_dir, out)
    assert manifest["problems"]["counts"] == {"empty_transcription": 1, "polygon_outside_image": 1}
    assert manifest["problems"]["written"] == {"polygon_clipped": 1}
    messages = "\n".join(manifest["problems"]["messages"])
    assert "p1.xml: TextLine l2: empty transcription" in messages
    assert "line page_p1_l3: polygon x 500..600, y 10..40 lies outside the 400x200 image" in messages
    _, found = read_back(out)
    lines = {k: v for split in found.values() for k, v in split.items()}
    assert {k: v[0] for k, v in lines.items()} == {"page_p1_l1": "first line", "page_p2_l1": "second page",
                                                   "page_p3_l1": "clipped"}
    assert sorted(len(v) for v in found.values()) == [1, 1, 1]  # 3 pages (groups), one per split
    _, meta, crop = lines["page_p1_l1"]
    assert meta["bbox"] == [10, 10, 111, 41] and crop.shape == (31, 101)
    assert crop[25, 5] == 255 and crop[30, 0] == 255  # below the diagonal: outside the polygon, white
    assert crop[2, 95] == 50 and crop[0, 0] == 50  # inside: the page's pixels
    assert 0.4 < (crop == 255).mean() < 0.6
    assert lines["page_p3_l1"][2].shape == (31, 20)  # the part inside the 400-pixel-wide page
    assert "written, but the polygon reaches outside the page image" in summary(manifest)


def test_page_split_lists_margin_and_missing_image(page_dir, tmp_path):
    os.unlink(page_dir / "page" / "p3.png")
    os.unlink(page_dir / "images" / "p3.png")
    shutil.copy(page_dir / "page" / "p2.xml", page_dir / "page" / "p4.xml")  # its image is p2.png as well
    splits = tmp_path / "splits"
    write(str(splits / "train.txt"), "page/p2\npage/p3\n")
    write(str(splits / "val.txt"), "page/p4\n")
    write(str(splits / "test.txt"), "page_p1_l1\n")  # one line of p1; its l3 is in no list
    manifest = run("page", page_dir, tmp_path / "out", splits_dir=str(splits), margin=3)
    assert manifest["problems"]["counts"] == {"missing_page_image": 1, "line_in_no_split": 1,
                                              "empty_transcription": 1}
    messages = "\n".join(manifest["problems"]["messages"])
    assert "p3.xml: page image elsewhere.png not found beside it, nor p3.png/.jpg/.tif: line page_p3_l1 not " \
           "written" in messages
    assert "line page_p1_l3 (page page/p1, group page/p1): in no split list" in messages
    _, found = read_back(tmp_path / "out")
    assert {s: sorted(v) for s, v in found.items()} == {"train": ["page_p2_l1"], "val": ["page_p4_l1"],
                                                        "test": ["page_p1_l1"]}
    crop = found["train"]["page_p2_l1"][2]
    assert crop.shape == (31 + 6, 101 + 6)  # the margin: white paper around the polygon
    assert (crop[:3] == 255).all() and (crop[:, -3:] == 255).all() and (crop[3:-3, 3:-3] == 50).all()


def alto_xml(image_name, lines):
    """An ALTO v4 document; lines: [(id, (x, y, w, h), [words], polygon points or None)]."""
    out = ['<?xml version="1.0" encoding="UTF-8"?>', '<alto xmlns="http://www.loc.gov/standards/alto/ns-v4#">',
           "<Description><MeasurementUnit>pixel</MeasurementUnit><sourceImageInformation>"
           f"<fileName>{image_name}</fileName></sourceImageInformation></Description>",
           '<Layout><Page ID="p" WIDTH="400" HEIGHT="200"><PrintSpace><TextBlock ID="b">']
    for lid, (x, y, w, h), words, polygon in lines:
        out.append(f'<TextLine ID="{lid}" HPOS="{x}" VPOS="{y}" WIDTH="{w}" HEIGHT="{h}">')
        if polygon:
            out.append(f'<Shape><Polygon POINTS="{" ".join(f"{a},{b}" for a, b in polygon)}"/></Shape>')
        for i, word in enumerate(words):
            out.append(("<SP/>" if i else "") + f'<String CONTENT="{word}"/>')
        out.append("</TextLine>")
    out += ["</TextBlock></PrintSpace></Page></Layout>", "</alto>"]
    return "\n".join(out)


def test_alto_format(tmp_path):
    root = tmp_path / "alto"
    os.makedirs(root)
    for n in range(3):
        page = np.full((200, 400), 50, np.uint8)
        page[20:50, 30:130] = 100 + n  # the line's box, in a grey of its own
        Image.fromarray(page).save(root / f"s{n}.png")
        lines = [("L1", (30, 20, 100, 30), ["line", str(n)], TRIANGLE if n == 0 else None)]
        if n == 1:
            lines.append(("L2", (30, 80, 100, 30), [], None))  # no String: empty transcription
        write(str(root / f"s{n}.xml"), alto_xml(f"s{n}.png", lines))
    manifest = run("alto", root, tmp_path / "out")
    assert manifest["problems"]["counts"] == {"empty_transcription": 1}
    _, found = read_back(tmp_path / "out")
    lines = {k: v for split in found.values() for k, v in split.items()}
    assert {k: v[0] for k, v in lines.items()} == {"s0_L1": "line 0", "s1_L1": "line 1", "s2_L1": "line 2"}
    assert (lines["s1_L1"][2] == 101).all() and lines["s1_L1"][2].shape == (30, 100)  # the box, no margin
    assert lines["s0_L1"][2].shape == (31, 101) and lines["s0_L1"][2][25, 5] == 255  # the polygon, masked


# ------------------------------------------------------------------------------------------------------------------
# iam: the seed's positional form with forms/ holding the PNGs; a split by writer without split lists
# ------------------------------------------------------------------------------------------------------------------


def flat_iam(tmp_path):
    from test_prepare import make_iam

    root = make_iam(tmp_path / "iam")
    os.makedirs(os.path.join(root, "forms"))
    for folder in ("formsA-D", "formsE-H", "formsI-Z"):
        for name in os.listdir(os.path.join(root, folder)):
            shutil.move(os.path.join(root, folder, name), os.path.join(root, "forms", name))
        os.rmdir(os.path.join(root, folder))
    return root


def test_seed_positional_form_with_form_images_folder(tmp_path, capsys):
    from test_prepare import SPLIT_OF, expected_lines
    import prepare_iam

    root = flat_iam(tmp_path)
    out = str(tmp_path / "out")
    argv = [os.path.join(root, "forms"), os.path.join(root, "xml"), os.path.join(root, "splits"), out,
            "--workers", "1", "--no-progress"]
    assert prepare_iam.main(argv) == 0, capsys.readouterr().err
    assert "no problems" in capsys.readouterr().out
    _, found = read_back(out)
    truth = expected_lines()
    assert {k: v[0] for lines in found.values() for k, v in lines.items()} == {k: v[0] for k, v in truth.items()}
    assert all(SPLIT_OF[truth[k][1]] == s for s, lines in found.items() for k in lines)


def test_iam_without_split_lists_splits_by_writer(tmp_path, capsys):
    root = flat_iam(tmp_path)
    shutil.rmtree(os.path.join(root, "splits"))
    out = str(tmp_path / "out")
    assert cli.main(["iam", root, "--out", out, "--workers", "1", "--no-progress", "--val-fraction", "0.2",
                     "--test-fraction", "0.2"]) == 0, capsys.readouterr().err
    _, found = read_back(out)
    writers = {}
    for split, lines in found.items():
        for _, meta, _ in lines.values():
            writers.setdefault(meta["writer_id"], set()).add(split)
    assert sorted(writers) == ["000", "017", "102", "551"] and all(len(s) == 1 for s in writers.values())
    assert all(found[s] for s in SPLITS)


# ------------------------------------------------------------------------------------------------------------------
# The command
# ------------------------------------------------------------------------------------------------------------------


def test_cli_help_lists_formats_and_errors_are_one_line(page_dir, tmp_path, capsys):
    proc = subprocess.run([PY, os.path.join(ROOT, "launch", "prepare.py"), "--help"], capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=ROOT), timeout=60)
    assert proc.returncode == 0
    for name in FORMATS:
        assert f"\n  {name} " in proc.stdout, name
    assert cli.main(["page", str(page_dir), "--out", str(tmp_path / "o"), "--no-progress", "--workers", "1"]) == 0
    stdout = capsys.readouterr().out
    assert "NOT written: 2 line(s): empty_transcription 1, polygon_outside_image 1" in stdout
    assert cli.main(["lines", str(tmp_path / "nope"), "--out", str(tmp_path / "o2")]) == 1
    err = capsys.readouterr().err
    assert err.strip() == f"error: line image folder not found: {tmp_path / 'nope'}"
    with pytest.raises(SystemExit):
        cli.main(["tiff", str(page_dir), "--out", str(tmp_path / "o3")])
    known = ", ".join(FORMATS)
    assert f"unknown format 'tiff'; choose one of: {known}" in capsys.readouterr().err
