"""The evaluation report (``htr-eval --report DIR``): alignment counts, escaping, the files and their sections on tiny
shards (one rank and two), every decode mode, and the page as a real headless browser renders it."""

import io
import itertools
import json
import os
import random
import shutil
import struct
import subprocess
import tempfile
from html.parser import HTMLParser

import pytest

from conftest import ROOT
from htr_dist.browser import find_browser
from htr_dist.dist.env import launcher_command
from htr_dist.report import SECTIONS, Line, align, confusions, error_counts, highlighted, render_html
from htr_dist.train.metrics import edit_distance

# -- alignment ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("truth, pred, counts, pairs", [
    ("kitten", "sitting", (2, 0, 1), {("k", "s"): 1, ("e", "i"): 1, ("", "g"): 1}),
    ("abc", "", (0, 3, 0), {("a", ""): 1, ("b", ""): 1, ("c", ""): 1}),
    ("", "xy", (0, 0, 2), {("", "x"): 1, ("", "y"): 1}),
    ("same", "same", (0, 0, 0), {}),
    ("the cat", "thecat", (0, 1, 0), {(" ", ""): 1}),
    ("aaa", "aaaa", (0, 0, 1), {("", "a"): 1}),
    ("form", "farms", (1, 0, 1), {("o", "a"): 1, ("", "s"): 1}),
])
def test_alignment_counts_and_confusions_of_hand_cases(truth, pred, counts, pairs):
    ops = align(truth, pred)
    assert tuple(error_counts(ops).values()) == counts
    assert dict(confusions(ops)) == pairs


def brute_distance(a: str, b: str) -> int:
    """Edit distance by trying every first step (exponential: tiny strings only)."""
    if not a or not b:
        return len(a) + len(b)
    return min(brute_distance(a[1:], b[1:]) + (a[0] != b[0]), brute_distance(a[1:], b) + 1,
               brute_distance(a, b[1:]) + 1)


def test_alignment_is_minimal_and_spells_both_sides():
    rng = random.Random(0)
    strings = ["".join(p) for n in range(5) for p in itertools.product("ab ", repeat=n)]
    pairs = [(rng.choice(strings), rng.choice(strings)) for _ in range(300)]
    pairs += [("".join(rng.choice("abcde ") for _ in range(rng.randrange(40))),
               "".join(rng.choice("abcde ") for _ in range(rng.randrange(40)))) for _ in range(100)]
    for truth, pred in pairs:
        ops = align(truth, pred)
        assert "".join(t for _, t, _ in ops) == truth and "".join(p for _, _, p in ops) == pred
        assert all((kind == "=") == (t == p) for kind, t, p in ops)
        expected = brute_distance(truth, pred) if len(truth) + len(pred) <= 8 else edit_distance(truth, pred)
        assert sum(error_counts(ops).values()) == expected, (truth, pred)


# -- HTML -----------------------------------------------------------------------------------------------------------


class Page(HTMLParser):
    """The parts of report.html the tests check: headings, table rows by table id, images, text of each class."""

    def __init__(self, text: str):
        super().__init__()
        self.h2, self.tables, self.images, self.classes = [], {}, [], {}
        self._stack, self._table, self._row, self._cell = [], None, None, None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self._stack.append((tag, attrs.get("class")))
        if tag == "table":
            self._table = self.tables.setdefault(attrs.get("id"), [])
        elif tag == "tr":
            self._row = []
            self._table.append(self._row)
        elif tag in ("td", "th"):
            self._cell = ""
        elif tag == "img":
            self._stack.pop()
            self.images.append(attrs)

    def handle_endtag(self, tag):
        while self._stack and self._stack.pop()[0] != tag:
            pass
        if tag in ("td", "th"):
            self._row.append(self._cell)
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data
        if self._stack and self._stack[-1][0] == "h2":
            self.h2.append(data)
        for _, cls in self._stack:
            if cls:
                self.classes[cls] = self.classes.get(cls, "") + data


def test_transcriptions_are_escaped():
    truth, pred = 'a <b>&"x', 'a <b>&"'
    ops = align(truth, pred)
    assert highlighted(ops, 1) == 'a &lt;b&gt;&amp;&quot;<del>x</del>'
    line = Line('k<1>&"', truth, pred, 1, '<w>&"', ops)
    record = {"model": "m<", "data": "d&", "split": "test", "decode": "greedy", "cer": 0.1, "wer": 0.2, "lines": 1,
              "lines_expected": 1, "lines_missing": 0, "chars": 8, "char_errors": 1, "words": 2, "word_errors": 1,
              "substitutions": 0, "deletions": 1, "insertions": 0,
              "confusions": [{"truth": "<", "prediction": "&", "count": 1}],
              "writers": [{"writer": '<w>&"', "lines": 1, "chars": 8, "errors": 1, "cer": 0.125}],
              "worst_lines": [{"image": "lines/01-k_1__.png"}], "writers_note": None}
    text = render_html(record, [line], "h.png")
    assert "<b>" not in text and "<w>" not in text
    page = Page(text)
    assert page.classes["tr"] == truth and page.classes["pr"] == pred  # the text a reader sees, unescaped once
    assert page.tables["confusions-table"][1][:2] == ["<", "&"]
    assert page.tables["writers-table"][1][0] == '<w>&"'
    assert [img for img in page.images if img.get("alt") == 'line k<1>&"']


# -- end to end -----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model(tmp_path_factory, tiny_llama, shard_dir):
    """A tiny exported model with a connector for the tiny Llama (every decode mode can run), and the character LM
    of beam+lm stored beside it."""
    from htr_dist.data.shards import split_texts
    from htr_dist.decode import DecodeSettings
    from test_decode import export_tiny

    path, _ = export_tiny(tmp_path_factory.mktemp("report_model"), 64, "model.pt")
    settings = DecodeSettings(lm_texts=split_texts(shard_dir, "train"))
    settings.save(path)
    return path


def evaluate(model, shard_dir, out, *extra):
    from htr_dist.cli.evaluate import main

    assert main(["--checkpoint", model, "--data", shard_dir, "--report", str(out), "--batch-size", "16"] +
                list(extra)) == 0
    return json.load(open(os.path.join(out, "report.json"))), Page(open(os.path.join(out, "report.html")).read())


def pct(x):
    return f"{100 * x:.2f}%"


def check_consistent(report, page, out, manifest_lines):
    assert report["lines"] == manifest_lines and report["lines_missing"] == 0
    assert report["substitutions"] + report["deletions"] + report["insertions"] == report["char_errors"]
    assert report["cer"] == pytest.approx(report["char_errors"] / report["chars"])
    assert [h.split()[0] for h in page.h2][:3] == ["Summary", "Error", "Top"]
    assert len(page.h2) == len(SECTIONS)
    summary = dict(row for row in page.tables["summary-table"][1:])
    assert summary["CER"] == pct(report["cer"]) and int(summary["lines"]) == report["lines"]
    errors = {row[0]: int(row[1]) for row in page.tables["errors-table"][1:]}
    assert errors["substitutions"] + errors["deletions"] + errors["insertions"] == report["char_errors"]
    assert sum(c["count"] for c in report["confusions"]) <= report["char_errors"]
    assert len(page.tables["confusions-table"]) - 1 == len(report["confusions"]) <= 20
    writers = page.tables["writers-table"][1:]
    assert sum(int(row[1]) for row in writers) == report["lines"]  # every line under one writer
    assert sum(int(row[3]) for row in writers) == report["char_errors"]
    cers = [float(row[4].rstrip("%")) for row in writers]
    assert cers == sorted(cers, reverse=True)
    assert sum(b["lines"] for b in report["cer_histogram"]) == report["lines"]
    worst = [img for img in page.images if img["src"].startswith("lines/")]
    assert len(worst) == len(report["worst_lines"]) == min(50, report["lines"])
    assert all(os.path.getsize(os.path.join(out, img["src"])) > 0 for img in worst)
    line_cers = [w["cer"] for w in report["worst_lines"]]
    assert line_cers == sorted(line_cers, reverse=True)
    assert os.path.getsize(os.path.join(out, "cer_histogram.png")) > 0


def test_report_of_one_rank_then_of_two(model, shard_dir, tmp_path):
    manifest = json.load(open(os.path.join(shard_dir, "manifest.json")))
    out = tmp_path / "report"
    report, page = evaluate(model, shard_dir, out)
    check_consistent(report, page, out, manifest["splits"]["test"]["lines"])
    assert report["decode"] == "greedy" and report["model"] == model and report["writers_note"] is None
    assert all(w["writer"] is not None for w in report["writers"])  # the synthetic set names every line's writer
    (out / "lines" / "stale.png").write_bytes(b"")
    assert evaluate(model, shard_dir, out)[0] == report and not (out / "lines" / "stale.png").exists()  # replaced
    two = tmp_path / "report2"
    proc = subprocess.run(launcher_command("torchrun", 2) + [
        "launch/evaluate.py", "--checkpoint", model, "--data", shard_dir, "--report", str(two), "--batch-size", "16"],
        capture_output=True, text=True, timeout=180, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("report written to") == 1  # rank 0 only
    again = json.load(open(os.path.join(two, "report.json")))
    same = ("lines", "chars", "char_errors", "substitutions", "deletions", "insertions", "confusions", "writers",
            "worst_lines")
    assert {k: again[k] for k in same} == {k: report[k] for k in same}
    assert sorted(os.listdir(two / "lines")) == sorted(os.listdir(out / "lines"))
    assert [p for p in os.listdir(tmp_path) if p.startswith(".")] == []  # no temporary folder left


@pytest.mark.parametrize("mode", ["beam", "beam+lm", "beam+llm"])
def test_report_in_every_decode_mode(mode, model, shard_dir, tiny_llama, tmp_path):
    manifest = json.load(open(os.path.join(shard_dir, "manifest.json")))
    out = tmp_path / mode
    report, page = evaluate(model, shard_dir, out, "--decode", mode, "--teacher", tiny_llama, "--split", "val")
    check_consistent(report, page, out, manifest["splits"]["val"]["lines"])
    assert report["decode"] == mode and report["split"] == "val"


def test_a_split_without_writer_ids_says_so_and_a_foreign_folder_is_refused(model, shard_dir, tmp_path):
    from htr_dist.cli.evaluate import main

    bare = tmp_path / "bare"
    shutil.copytree(shard_dir, bare)
    strip_writers(bare, "test")
    report, page = evaluate(model, str(bare), tmp_path / "r")
    assert report["writers"] is None and report["writers_note"] == "split 'test' has no writer ids"
    assert "writers-table" not in page.tables and "has no writer ids" in page.classes["note"]
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    assert main(["--checkpoint", model, "--data", str(bare), "--report", str(foreign)]) == 1
    assert (foreign / "notes.txt").read_text() == "keep me"


def test_a_partial_split_is_reported_as_such(model, shard_dir, tmp_path):
    from conftest import reset_shard_sizes

    cut = tmp_path / "cut"
    shutil.copytree(shard_dir, cut)
    manifest = json.load(open(cut / "manifest.json"))
    shard = cut / manifest["splits"]["test"]["shards"][0]["file"]
    with open(shard, "r+b") as f:
        f.truncate(os.path.getsize(shard) // 2)
    reset_shard_sizes(str(cut))
    out = tmp_path / "r"
    report, page = evaluate(model, str(cut), out, "--allow-partial")
    assert 0 < report["lines"] < report["lines_expected"] == manifest["splits"]["test"]["lines"]
    assert report["lines_missing"] == report["lines_expected"] - report["lines"]
    assert f"{report['lines_missing']} of the {report['lines_expected']} lines" in page.classes["note"]
    assert sum(int(row[1]) for row in page.tables["writers-table"][1:]) == report["lines"]
    assert len(report["worst_lines"]) == report["lines"] and all(w["image"] for w in report["worst_lines"])


def strip_writers(folder, split):
    """Rewrite ``split``'s shards of a copied shard folder with an empty writer id in every json member."""
    import tarfile

    manifest_path = os.path.join(folder, "manifest.json")
    manifest = json.load(open(manifest_path))
    for entry in manifest["splits"][split]["shards"]:
        path = os.path.join(folder, entry["file"])
        with tarfile.open(path) as tar:
            members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
        with tarfile.open(path, "w") as tar:
            for m, data in members:
                if m.name.endswith(".json"):
                    data = json.dumps({**json.loads(data), "writer_id": ""}).encode()
                    m.size = len(data)
                tar.addfile(m, io.BytesIO(data))
        entry.pop("bytes", None)
        entry.pop("sha256", None)
    json.dump(manifest, open(manifest_path, "w"))


# -- in a real browser ----------------------------------------------------------------------------------------------


def test_the_browser_installer_leaves_a_browser_alone_and_needs_root(monkeypatch):
    from htr_dist import browser

    monkeypatch.setattr(browser, "find_browser", lambda: "/opt/chromium")
    assert browser.install_browser() == {"browser": "/opt/chromium", "installed": False}
    monkeypatch.setattr(browser, "find_browser", lambda: None)
    monkeypatch.setattr(browser.os, "geteuid", lambda: 1000)
    monkeypatch.setattr(browser, "apt_get", lambda *a, **k: pytest.fail("apt-get run without root"))
    summary = browser.install_browser()
    assert summary["browser"] is None and "sudo apt-get install --no-install-recommends chromium" in summary["note"]


def png_size(path):
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", head[16:24])


def test_the_report_renders_in_headless_chromium(model, shard_dir, tmp_path, capsys):
    browser = find_browser()
    if browser is None:
        pytest.skip("no chromium (/usr/bin/chromium): `make browser` installs it as root (apt-get install chromium); "
                    "as another user: sudo apt-get install --no-install-recommends chromium")
    out = tmp_path / "report"
    report, _ = evaluate(model, shard_dir, out)
    page = "file://" + os.path.join(out, "report.html")
    flags = [browser, "--headless", "--disable-gpu", "--no-sandbox", "--hide-scrollbars"]
    shot = tmp_path / "report.png"
    proc = subprocess.run(flags + [f"--screenshot={shot}", "--window-size=1200,2000", page], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0 and shot.exists(), proc.stderr[-2000:]
    assert png_size(shot) == (1200, 2000) and os.path.getsize(shot) > 10_000  # a page, not an empty canvas
    kept = os.environ.get("HTR_DIST_TEST_ARTIFACTS", os.path.join(tempfile.gettempdir(), "htr_dist_test_artifacts"))
    os.makedirs(kept, exist_ok=True)
    shutil.copy(shot, os.path.join(kept, "report_screenshot.png"))
    with capsys.disabled():
        print(f"\nscreenshot of the rendered report: {os.path.join(kept, 'report_screenshot.png')} (and {shot})")
    dom = subprocess.run(flags + ["--dump-dom", page], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    rendered = Page(dom.stdout)
    headings = ["Summary", "Error types", "Top 20 confusions", "CER per writer", "CER histogram",
                f"The {len(report['worst_lines'])} worst lines"]
    assert rendered.h2 == headings
    sources = [img["src"] for img in rendered.images]
    assert "cer_histogram.png" in sources
    assert sorted(s for s in sources if s.startswith("lines/")) == sorted(w["image"] for w in report["worst_lines"])
