"""Synthetic IAM-format data and IAM -> shards: round trip, manifest, problems reported, atomic re-runs."""

import glob
import hashlib
import io
import json
import logging
import os
import shutil
import subprocess
import tarfile
import xml.etree.ElementTree as ET

import numpy as np
import pytest
from PIL import Image

import htr_dist.data.prepare as prepare_mod
from htr_dist.data import iam
from htr_dist.data.prepare import PrepareOptions, prepare
from htr_dist.data.shards import ManifestError, load_manifest
from htr_dist.data.synth import FontsNotFound, find_fonts, synthesize

from conftest import PY, ROOT


def read_shards(folder, split):
    out = {}
    for path in sorted(glob.glob(os.path.join(folder, f"{split}-*.tar"))):
        with tarfile.open(path) as tar:
            for m in tar.getmembers():
                key, ext = m.name.split(".", 1)
                out.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return out


def test_synth_layout_and_boxes(synth_dir):
    for sub in ("forms", "xml", "ascii/lines.txt", "splits/train.uttlist", "splits/validation.uttlist",
                "splits/test.uttlist"):
        assert os.path.exists(os.path.join(synth_dir, sub)), sub
    xmls = sorted(glob.glob(os.path.join(synth_dir, "xml", "*.xml")))
    assert len(xmls) == 16
    with open(xmls[0], "rb") as f:
        assert f.readline().strip() == b"<?xml version='1.0' encoding='ISO-8859-1'?>"
    form = iam.parse_form_xml(xmls[0])
    page = np.asarray(Image.open(os.path.join(synth_dir, "forms", form.id + ".png")).convert("L"))
    assert form.lines and not form.problems
    ink = np.median(page) - 50  # darker than the paper by a clear margin (paper is grey and noisy)
    covered = np.zeros(page.shape, bool)
    for word in ET.parse(xmls[0]).getroot().iter("word"):
        c = word.find("cmp").attrib
        x, y, w, h = (int(c[k]) for k in ("x", "y", "width", "height"))
        assert 0 <= x and 0 <= y and x + w <= page.shape[1] and y + h <= page.shape[0]
        assert page[y : y + h, x : x + w].min() < ink, f"no ink inside the box of word {word.attrib['id']}"
        covered[y : y + h, x : x + w] = True
    top = min(l.bbox[1] for l in form.lines)
    outside = page[top:][~covered[top:]]
    assert (outside < ink).mean() < 0.002  # the handwritten part has (almost) no ink outside the word boxes
    listed = [l.split(" ", 1)[0] for l in open(os.path.join(synth_dir, "ascii", "lines.txt")) if not l.startswith("#")]
    assert [l.id for l in form.lines] == [i for i in listed if i.startswith(form.id + "-")]


def test_synth_splits_partition_and_unseen_text(synth_dir):
    splits = iam.read_split_lists(os.path.join(synth_dir, "splits"))
    forms = {os.path.basename(p)[:-4] for p in glob.glob(os.path.join(synth_dir, "xml", "*.xml"))}
    assert set(splits) == forms and set(splits.values()) == {"train", "val", "test", "val_seen", "test_seen"}
    text_of = {}
    for p in glob.glob(os.path.join(synth_dir, "xml", "*.xml")):
        f = iam.parse_form_xml(p)
        text_of[f.id] = {l.text for l in f.lines}
    train = set().union(*(t for f, t in text_of.items() if splits[f] == "train"))
    for held_out in ("val", "test", "val_seen", "test_seen"):
        test = set().union(*(t for f, t in text_of.items() if splits[f] == held_out))
        assert train and test and not (train & test), held_out


def test_synth_deterministic(tmp_path):
    a, b, c = (str(tmp_path / n) for n in "abc")
    synthesize(a, forms=3, seed=7, workers=1, progress=False)
    synthesize(b, forms=3, seed=7, workers=2, progress=False)
    synthesize(c, forms=3, seed=8, workers=1, progress=False)

    def digest(folder):
        h = hashlib.sha256()
        for p in sorted(glob.glob(os.path.join(folder, "**", "*"), recursive=True)):
            if os.path.isfile(p):
                h.update(os.path.relpath(p, folder).encode() + open(p, "rb").read())
        return h.hexdigest()

    assert digest(a) == digest(b)
    assert digest(a) != digest(c)
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]  # no temporary folder left


def test_missing_fonts_names_the_fix(monkeypatch, tmp_path):
    monkeypatch.setenv("HTR_DIST_FONT_DIR", str(tmp_path))  # no npm font is installed there
    with pytest.raises(FontsNotFound, match="fetch_fonts.py"):
        find_fonts()


def test_both_sources_give_the_same_lines(tmp_path):
    """The synthetic set with IAM's lines/ folder: --source forms and --source lines write the same keys and texts
    (the XML's, spaced as written, though lines.txt spaces its tokens), and line images of the same size."""
    data = str(tmp_path / "iam")
    synthesize(data, forms=4, seed=3, workers=1, progress=False, line_images=True)
    rows = {l.id: l for l in iam.parse_lines_txt(os.path.join(data, "ascii", "lines.txt"))}
    got = {}
    for source in ("forms", "lines"):
        out = str(tmp_path / source)
        manifest = prepare(PrepareOptions(data, os.path.join(data, "xml"), os.path.join(data, "splits"), out,
                                          source=source, lines_txt=os.path.join(data, "ascii", "lines.txt"),
                                          margin=0, workers=1), progress=False)
        assert manifest["problems"]["total"] == 0 and not manifest["problems"]["written"]
        got[source] = {k: v for split in ("train", "val", "test") for k, v in read_shards(out, split).items()}
    assert got["forms"].keys() == got["lines"].keys() == rows.keys()
    for key, sample in got["lines"].items():
        assert sample["txt"] == got["forms"][key]["txt"]
        x0, y0, x1, y1 = rows[key].bbox
        pixels = np.asarray(Image.open(io.BytesIO(sample["png"])))
        assert pixels.shape == (y1 - y0, x1 - x0)
        assert np.array_equal(pixels, np.asarray(Image.open(io.BytesIO(got["forms"][key]["png"]))))  # margin 0
    assert any(rows[k].text != s["txt"].decode() for k, s in got["lines"].items())  # lines.txt's tokens differ


def test_prepare_round_trip(synth_dir, shard_dir):
    manifest = load_manifest(shard_dir)
    truth = {l.id: l.text for p in glob.glob(os.path.join(synth_dir, "xml", "*.xml")) for l in
             iam.parse_form_xml(p).lines}  # spaced as written
    tokens = {l.id: l.text for l in iam.parse_lines_txt(os.path.join(synth_dir, "ascii", "lines.txt"))}
    assert tokens.keys() == truth.keys() and all(iam.same_text(tokens[k], t) for k, t in truth.items())
    assert sum(tokens[k] != t for k, t in truth.items()) > len(truth) // 4  # punctuation: spaced apart in lines.txt
    splits = iam.read_split_lists(os.path.join(synth_dir, "splits"))
    seen = {}
    assert set(manifest["splits"]) == {"train", "val", "test", "val_seen", "test_seen"}
    for split in manifest["splits"]:
        samples = read_shards(shard_dir, split)
        assert manifest["splits"][split]["lines"] == len(samples)
        for entry in manifest["splits"][split]["shards"]:
            path = os.path.join(shard_dir, entry["file"])
            assert hashlib.sha256(open(path, "rb").read()).hexdigest() == entry["sha256"]
        for key, s in samples.items():
            assert s["txt"].decode("utf-8") == truth[key]
            meta = json.loads(s["json"])
            assert splits[meta["form_id"]] == split and meta["segmentation"] == "ok" and len(meta["bbox"]) == 4
            img = Image.open(__import__("io").BytesIO(s["png"]))
            assert img.mode == "L"
            seen[key] = split
    assert sorted(seen) == sorted(truth)  # every line written exactly once
    assert manifest["problems"]["total"] == 0
    train_chars = set("".join(truth[k] for k, s in seen.items() if s == "train"))
    assert manifest["alphabet"] == "".join(sorted(train_chars))


def _copy_iam(src, dst):
    shutil.copytree(src, dst)
    return str(dst)


def test_prepare_reports_problems_and_reruns_atomically(synth_dir, tmp_path):
    root = _copy_iam(synth_dir, tmp_path / "iam")
    forms = sorted(glob.glob(os.path.join(root, "forms", "*.png")))
    missing_id = os.path.basename(forms[0])[:-4]
    n_missing = len(iam.parse_form_xml(os.path.join(root, "xml", missing_id + ".xml")).lines)
    os.unlink(forms[0])
    bad_xml = os.path.join(root, "xml", os.path.basename(forms[1])[:-4] + ".xml")
    n_bad = len(iam.parse_form_xml(bad_xml).lines)
    with open(bad_xml, "a") as f:
        f.write("<oops>")
    xml3 = os.path.join(root, "xml", os.path.basename(forms[2])[:-4] + ".xml")
    first_line = iam.parse_form_xml(xml3).lines[0]
    tree = ET.parse(xml3)
    next(tree.getroot().iter("line")).set("text", "")
    tree.write(xml3, encoding="ISO-8859-1", xml_declaration=True)
    out = str(tmp_path / "shards")
    proc = subprocess.run([PY, os.path.join(ROOT, "launch/prepare_iam.py"), "--iam", root, "--out", out,
                           "--workers", "2"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    manifest = load_manifest(out)
    counts = manifest["problems"]["counts"]
    # the lines of the malformed XML are counted (named from ascii/lines.txt), not the file
    assert counts == {"missing_form_image": n_missing, "malformed_xml": n_bad, "empty_transcription": 1}
    assert manifest["problems"]["forms"] == {"malformed_xml": 1}
    assert f"NOT written: {n_missing + n_bad + 1} line(s)" in proc.stdout
    assert missing_id in proc.stderr and os.path.basename(bad_xml) in proc.stderr
    assert first_line.id in proc.stderr
    total = sum(v["lines"] for v in manifest["splits"].values())
    all_lines = len(iam.parse_lines_txt(os.path.join(root, "ascii", "lines.txt")))
    assert total == all_lines - n_missing - n_bad - 1
    before = {e["file"]: e["sha256"] for s in manifest["splits"].values() for e in s["shards"]}
    prepare(PrepareOptions(root, os.path.join(root, "xml"), os.path.join(root, "splits"), out, workers=1),
            progress=False)
    after = {e["file"]: e["sha256"] for s in load_manifest(out)["splits"].values() for e in s["shards"]}
    assert before == after  # deterministic re-run
    assert not [p for p in os.listdir(out) if p.startswith(".")]  # no temporary shard left


def test_prepare_missing_folder_and_positional_form(synth_dir, tmp_path):
    proc = subprocess.run([PY, os.path.join(ROOT, "launch/prepare_iam.py"), "--iam", str(tmp_path / "nope"), "--out",
                           str(tmp_path / "o")], capture_output=True, text=True)
    assert proc.returncode == 1 and f"IAM folder not found: {tmp_path / 'nope'}" in proc.stderr
    out = str(tmp_path / "pos")
    proc = subprocess.run([PY, os.path.join(ROOT, "launch/prepare_iam.py"), os.path.join(synth_dir), os.path.join(
        synth_dir, "xml"), str(tmp_path / "nosplits"), out], capture_output=True, text=True)
    assert proc.returncode == 1 and f"splits folder not found: {tmp_path / 'nosplits'}" in proc.stderr
    proc = subprocess.run([PY, os.path.join(ROOT, "launch/prepare_iam.py"), synth_dir, os.path.join(synth_dir, "xml"),
                           os.path.join(synth_dir, "splits"), out, "--workers", "1"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert load_manifest(out)["splits"]["train"]["lines"] > 0


def test_lines_source(synth_dir, tmp_path):
    """IAM's lines/ + ascii/lines.txt source: write line images where IAM keeps them and prepare from them."""
    root = _copy_iam(synth_dir, tmp_path / "iam")
    lines = iam.parse_lines_txt(os.path.join(root, "ascii", "lines.txt"))
    for l in lines:
        path = iam.line_image_path(root, l.id)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        page = np.asarray(Image.open(os.path.join(root, "forms", l.form_id + ".png")))
        Image.fromarray(iam.crop_line(page, l.bbox, 4)).save(path)
    out = str(tmp_path / "shards")
    prepare(PrepareOptions(root, os.path.join(root, "xml"), os.path.join(root, "splits"), out, source="lines",
                           lines_txt=os.path.join(root, "ascii", "lines.txt"), workers=1), progress=False)
    manifest = load_manifest(out)
    assert sum(s["lines"] for s in manifest["splits"].values()) == len(lines)
    sample = next(iter(read_shards(out, "train").values()))
    assert json.loads(sample["json"])["writer_id"] != ""


def test_load_manifest_errors(tmp_path):
    with pytest.raises(ManifestError, match=f"shard folder not found: {tmp_path / 'x'}"):
        load_manifest(str(tmp_path / "x"))
    with pytest.raises(ManifestError, match="manifest.json: missing"):
        load_manifest(str(tmp_path))


# ------------------------------------------------------------------------------------------------------------------
# A run replaces the previous output as a whole, or leaves it untouched
# ------------------------------------------------------------------------------------------------------------------


def _prepare_synth(synth_dir, out, **kw):
    kw.setdefault("workers", 2)
    return prepare(PrepareOptions(synth_dir, os.path.join(synth_dir, "xml"), os.path.join(synth_dir, "splits"), out,
                                  **kw), progress=False)


def _files(folder):
    """name -> bytes of every entry directly in ``folder`` (a sub-folder is listed as None)."""
    return {n: None if os.path.isdir(os.path.join(folder, n)) else open(os.path.join(folder, n), "rb").read()
            for n in sorted(os.listdir(folder))}


def check_consistent(folder):
    """``folder`` holds exactly the manifest and the shards it names, each with its sha256 and line count."""
    manifest = load_manifest(folder)
    named = {e["file"]: e for info in manifest["splits"].values() for e in info["shards"]}
    assert sorted(os.listdir(folder)) == sorted(["manifest.json", *named])  # no stale shard, no staging leftover
    for name, entry in named.items():
        path = os.path.join(folder, name)
        assert hashlib.sha256(open(path, "rb").read()).hexdigest() == entry["sha256"], name
        with tarfile.open(path) as tar:
            assert len({m.name.split(".", 1)[0] for m in tar.getmembers()}) == entry["count"], name
    for split, info in manifest["splits"].items():
        assert len(read_shards(folder, split)) == info["lines"]
    return manifest


def fail_in_split(monkeypatch, split, after, exc):
    """Make prepare's ``split`` raise ``exc`` after ``after`` samples have gone to the shard writer."""
    real = prepare_mod.write_split

    def write_split(samples, out_dir, name, max_count):
        def failing():
            for i, s in enumerate(samples):
                if i == after:
                    raise exc
                yield s

        return real(failing() if name == split else samples, out_dir, name, max_count)

    monkeypatch.setattr(prepare_mod, "write_split", write_split)


def test_failed_rerun_leaves_previous_output_untouched(synth_dir, tmp_path, monkeypatch, caplog):
    out = str(tmp_path / "shards")
    first = _prepare_synth(synth_dir, out, shard_size=40, scale=0.5)
    check_consistent(out)
    before = _files(out)
    # the second run differs in every shard (other scale and shard size) and fails in the middle of val, the second
    # split: train is complete in the staging folder by then and val has 2 full temporary shards
    fail_in_split(monkeypatch, "val", 7, RuntimeError("injected failure"))
    with pytest.raises(RuntimeError, match="injected failure"):
        _prepare_synth(synth_dir, out, shard_size=3, scale=0.4)
    assert _files(out) == before  # same names, same bytes: manifest and every old shard; no staging folder
    assert check_consistent(out)["splits"] == first["splits"]
    # the same failure, as if the process had been killed (no clean-up): the staging folder stays behind ...
    monkeypatch.setattr(prepare_mod, "_discard", lambda path: None)
    with pytest.raises(KeyboardInterrupt):
        fail_in_split(monkeypatch, "val", 7, KeyboardInterrupt())
        _prepare_synth(synth_dir, out, shard_size=3, scale=0.4)
    staging = [n for n in os.listdir(out) if n.startswith(".staging-")]
    assert len(staging) == 1 and glob.glob(os.path.join(out, staging[0], "train-*.tar"))
    assert not os.path.exists(os.path.join(out, staging[0], "manifest.json"))  # incomplete: never moved in
    assert {n: b for n, b in _files(out).items() if n not in staging} == before  # ... and the output is untouched
    assert load_manifest(out)["splits"] == first["splits"]  # the staging is no data
    # ... until the next successful run, which removes it and replaces everything
    monkeypatch.undo()
    caplog.set_level(logging.WARNING, logger="htr_dist.data.prepare")
    again = _prepare_synth(synth_dir, out, shard_size=3, scale=0.4)
    assert f"{staging[0]}: removing the staging folder left by an interrupted run" in caplog.text
    assert check_consistent(out)["splits"] == again["splits"]
    assert len(again["splits"]["train"]["shards"]) == -(-again["splits"]["train"]["lines"] // 3) > 1
    fresh = _prepare_synth(synth_dir, str(tmp_path / "fresh"), shard_size=3, scale=0.4)
    assert fresh["splits"] == again["splits"]  # the same bytes as a run into an empty folder


def test_rerun_replaces_everything_consistently(synth_dir, tmp_path):
    out = str(tmp_path / "shards")
    many = _prepare_synth(synth_dir, out, shard_size=4, scale=0.5)
    n_many = {k: len(v["shards"]) for k, v in many["splits"].items()}
    assert n_many["train"] == -(-many["splits"]["train"]["lines"] // 4) > 5
    check_consistent(out)
    open(os.path.join(out, ".train-000099.tar.tmp"), "wb").close()  # left by a killed run of older code
    few = _prepare_synth(synth_dir, out, shard_size=20, scale=0.4)
    assert {k: len(v["shards"]) for k, v in few["splits"].items()} == {
        k: -(-v["lines"] // 20) for k, v in few["splits"].items()}
    assert len(few["splits"]["train"]["shards"]) < n_many["train"]
    assert check_consistent(out)["splits"] == few["splits"]  # no shard of the first run left over
    assert few["splits"]["train"]["shards"][0]["sha256"] != many["splits"]["train"]["shards"][0]["sha256"]
