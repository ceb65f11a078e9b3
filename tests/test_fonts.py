"""The handwriting-font library: the repository's list is valid and split by family, bad lists fail on one line
naming the file and line, lookups never download, and every listed font is installed and draws the IAM characters.
No test here reaches the network or apt."""

import os
import re
import subprocess
import sys

import pytest

from htr_dist.data import fonts
from htr_dist.data.fonts import FontEntry, FontListError, FontsNotFound, load_font_list, resolve_fonts
from htr_dist.errors import InputError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEADER = "family\tsplit\tsource\tfile\tlicense\n"
# Free licences a font of the library may have (SPDX identifiers; GPL and LGPL in any version, with an exception).
ALLOWED_LICENSE = re.compile(r"^(OFL-1\.[01]|Apache-2\.0|MIT|(L?GPL)-[23]\.0(-only|-or-later)?( WITH [\w.+-]+)?"
                             r"|CC-BY(-SA)?-[34]\.0|CC0-1\.0|Ubuntu-font-1\.0|Bitstream-Vera)$")


def _key(family):
    return re.sub(r"[\s_-]+", "", family).lower()


def _write(tmp_path, text, name="fonts.tsv"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def entries():
    return load_font_list()


def test_the_list_is_packaged_beside_the_module():
    assert fonts.FONT_LIST == os.path.join(ROOT, "htr_dist", "data", "fonts.tsv")
    with open(os.path.join(ROOT, "setup.py"), encoding="utf-8") as f:
        assert "data/fonts.tsv" in f.read(), "setup.py's package_data must ship htr_dist/data/fonts.tsv"


def test_the_repository_list_loads_with_at_least_40_families(entries):
    assert len(entries) >= 40
    assert all(isinstance(e, FontEntry) for e in entries)
    assert {e.kind for e in entries} == {"debian", "npm"}


def test_every_split_is_used_and_train_is_the_largest(entries):
    counts = {s: sum(e.split == s for e in entries) for s in fonts.SPLITS}
    assert all(counts.values()), counts
    assert counts["train"] >= 0.65 * len(entries), counts
    assert counts["test"] >= counts["val"], counts


def test_no_family_is_in_two_splits(entries):
    splits = {}
    for e in entries:
        splits.setdefault(_key(e.family), set()).add(e.split)
    assert {k: v for k, v in splits.items() if len(v) > 1} == {}
    assert len(splits) == len(entries), "a family is listed twice"


def test_npm_sources_are_pinned_and_debian_sources_name_a_package(entries):
    for e in entries:
        if e.kind == "npm":
            assert re.fullmatch(r"@fontsource/[a-z0-9-]+@\d+\.\d+\.\d+", e.package), e
            assert e.npm_name == f"@fontsource/{e.family}", e
            assert e.file == f"{e.family}-latin-400-normal.woff", e
            assert e.version and e.package == f"{e.npm_name}@{e.version}"
        else:
            assert re.fullmatch(r"fonts-[a-z0-9.+-]+", e.package), e
            assert e.version is None


def test_every_font_has_a_free_licence(entries):
    bad = [(e.family, e.license) for e in entries if not ALLOWED_LICENSE.match(e.license)]
    assert bad == []


@pytest.mark.parametrize("row, wanted", [
    ("caveat\ttrain\tnpm:@fontsource/caveat@5.3.0\tcaveat-latin-400-normal.woff\n", "5 TAB-separated columns"),
    ("caveat\ttraining\tnpm:@fontsource/caveat@5.3.0\tcaveat-latin-400-normal.woff\tOFL-1.1\n",
     "unknown split 'training'"),
    ("caveat\ttrain\tpypi:caveat\tcaveat-latin-400-normal.woff\tOFL-1.1\n", "unknown source kind 'pypi:caveat'"),
    ("caveat\ttrain\tnpm:@fontsource/caveat\tcaveat-latin-400-normal.woff\tOFL-1.1\n", "unpinned"),
    ("caveat\ttrain\tnpm:@fontsource/caveat@^5.3.0\tcaveat-latin-400-normal.woff\tOFL-1.1\n",
     "unpinned npm version '^5.3.0'"),
    ("caveat\ttrain\tnpm:@fontsource/caveat@latest\tcaveat-latin-400-normal.woff\tOFL-1.1\n",
     "unpinned npm version 'latest'"),
    ("caveat\ttrain\tnpm:@fontsource/caveat@5.3.0\tcaveat-latin-400-normal.woff\t\n", "missing license"),
    ("caveat\ttrain\tnpm:@fontsource/caveat@5.3.0\tfiles/caveat.woff\tOFL-1.1\n", "bad font file name"),
    ("Caveat Script\ttrain\tnpm:@fontsource/caveat@5.3.0\tcaveat-latin-400-normal.woff\tOFL-1.1\n",
     "family 'Caveat Script'"),
])
def test_a_bad_row_names_the_file_the_line_and_the_value(tmp_path, row, wanted):
    good = "breip\ttrain\tdebian:fonts-breip\tBreip.ttf\tOFL-1.0\n"
    path = _write(tmp_path, "# a comment\n\n" + HEADER + good + row)
    with pytest.raises(FontListError) as info:
        load_font_list(path)
    message = str(info.value)
    assert message.startswith(f"{path}:5: "), message
    assert wanted in message
    assert "\n" not in message
    assert isinstance(info.value, InputError) and isinstance(info.value, ValueError)


@pytest.mark.parametrize("second, wanted", [
    ("breip\ttrain\tdebian:fonts-breip\tBreip.ttf\tOFL-1.0\n", "duplicate family 'breip' (also on line 2)"),
    ("Breip\ttest\tnpm:@fontsource/breip@1.0.0\tbreip.woff\tOFL-1.0\n", "family 'Breip' is not a lowercase name"),
    ("b-reip\ttest\tnpm:@fontsource/b-reip@1.0.0\tb-reip.woff\tOFL-1.0\n",
     "family 'b-reip' is in split 'test' here and in 'train' on line 2"),
])
def test_a_family_is_listed_once_in_one_split(tmp_path, second, wanted):
    path = _write(tmp_path, HEADER + "breip\ttrain\tdebian:fonts-breip\tBreip.ttf\tOFL-1.0\n" + second)
    with pytest.raises(FontListError, match=re.escape(f"{path}:3: {wanted}")):
        load_font_list(path)


def test_a_bad_header_or_an_empty_list_is_refused(tmp_path):
    path = _write(tmp_path, "family\tsplit\tsource\tlicense\n")
    with pytest.raises(FontListError, match=re.escape(f"{path}:1: expected the header")):
        load_font_list(path)
    path = _write(tmp_path, "# nothing yet\n" + HEADER, name="empty.tsv")
    with pytest.raises(FontListError, match=re.escape(f"{path}: no font in the list")):
        load_font_list(path)
    with pytest.raises(FontListError, match="cannot read the font list"):
        load_font_list(str(tmp_path / "absent.tsv"))


def test_font_cache_dir_honours_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("HTR_DIST_FONT_DIR", str(tmp_path))
    assert fonts.font_cache_dir() == str(tmp_path)
    monkeypatch.delenv("HTR_DIST_FONT_DIR")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert fonts.font_cache_dir() == str(tmp_path / "home" / ".cache" / "htr_dist" / "fonts")


def test_npm_fonts_are_found_in_the_cache_only(monkeypatch, tmp_path):
    monkeypatch.setenv("HTR_DIST_FONT_DIR", str(tmp_path))
    entry = FontEntry("caveat", "val", "npm:@fontsource/caveat@5.3.0", "caveat-latin-400-normal.woff", "OFL-1.1")
    assert (entry.kind, entry.package, entry.npm_name, entry.version) == (
        "npm", "@fontsource/caveat@5.3.0", "@fontsource/caveat", "5.3.0")
    assert fonts.font_path(entry) is None
    where = tmp_path / "caveat" / "5.3.0" / "caveat-latin-400-normal.woff"
    where.parent.mkdir(parents=True)
    where.write_bytes(b"wOFF")
    assert fonts.font_path(entry) == str(where)
    assert resolve_fonts([entry], split="val") == [(entry, str(where))]


def test_resolve_fonts_names_the_missing_families_and_the_command(monkeypatch, tmp_path):
    monkeypatch.setenv("HTR_DIST_FONT_DIR", str(tmp_path / "cache"))
    path = _write(tmp_path, HEADER
                  + "no-such-hand\ttrain\tdebian:fonts-no-such-hand\tNoSuchHand-Regular.ttf\tOFL-1.1\n"
                  + "caveat\ttest\tnpm:@fontsource/caveat@5.3.0\tcaveat-latin-400-normal.woff\tOFL-1.1\n")
    listed = load_font_list(path)
    with pytest.raises(FontsNotFound) as info:
        resolve_fonts(listed)
    message = str(info.value)
    assert "no-such-hand" in message and "caveat" in message and "python launch/fetch_fonts.py" in message
    assert "\n" not in message
    with pytest.raises(FontsNotFound, match=r"1 of 1 handwriting fonts are not installed \(caveat;"):
        resolve_fonts(listed, split="test")
    assert [e.family for e in fonts.missing_fonts(listed)] == ["no-such-hand", "caveat"]
    with pytest.raises(FontListError, match="unknown split 'validation'"):
        resolve_fonts(listed, split="validation")
    with pytest.raises(FontListError, match="no font of split val"):
        resolve_fonts(listed, split=["val"])


def test_fetch_fonts_check_reports_missing_fonts_without_installing(monkeypatch, tmp_path):
    path = _write(tmp_path, HEADER + "caveat\ttest\tnpm:@fontsource/caveat@5.3.0\tcaveat-latin-400-normal.woff\t"
                                     "OFL-1.1\n")
    env = dict(os.environ, HTR_DIST_FONT_DIR=str(tmp_path / "cache"))
    out = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "fetch_fonts.py"), "--check", "--list", path],
                         capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    assert out.returncode == 1, out.stderr
    assert '"missing": ["caveat"]' in out.stdout
    assert not (tmp_path / "cache").exists()
    bad = _write(tmp_path, HEADER + "caveat\tsometimes\tnpm:@fontsource/caveat@5.3.0\tc.woff\tOFL-1.1\n", "bad.tsv")
    out = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "fetch_fonts.py"), "--list", bad],
                         capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    assert out.returncode == 2
    assert out.stderr.strip() == f"error: {bad}:2: unknown split 'sometimes' of caveat (expected train, val, test)"


def test_fetch_fonts_help():
    out = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "fetch_fonts.py"), "--help"],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    for option in ("usage:", "--list", "--split", "--check", "--no-progress"):
        assert option in out.stdout


def test_every_listed_font_is_installed_and_draws_the_iam_characters(entries):
    from htr_dist.data.synth import check_glyphs

    missing = fonts.missing_fonts(entries)
    if missing:
        pytest.skip(f"{len(missing)} fonts of the list are not installed ({', '.join(e.family for e in missing)}); "
                    "install them with: python launch/fetch_fonts.py")
    for entry, path in resolve_fonts(entries):
        check_glyphs(path)  # raises naming the font and the characters it lacks


def test_a_user_without_root_installs_debian_fonts_without_sudo(monkeypatch, tmp_path):
    """Not root: the packages are downloaded and unpacked into the font cache, with package lists of the user's own
    (updated when they do not know the package yet). A stand-in apt-get on PATH plays the registry; sudo is a trap."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "calls.log"
    (bin_dir / "apt-get").write_text(f"""#!/bin/sh
echo "$@" >> {log}
lists=$(echo "$@" | sed -n 's/.*Dir::State::Lists=\\([^ ]*\\).*/\\1/p')
case "$*" in
  *update*) touch "$lists/debian_bookworm_Packages"; exit 0;;
  *download*)
    [ -f "$lists/debian_bookworm_Packages" ] || {{ echo "E: Unable to locate package fonts-breip" >&2; exit 100; }}
    mkdir -p pkg/usr/share/fonts/truetype/breip pkg/DEBIAN
    printf 'Package: fonts-breip\\nVersion: 1\\nArchitecture: all\\nMaintainer: x <x@y>\\nDescription: x\\n' \\
      > pkg/DEBIAN/control
    echo font > pkg/usr/share/fonts/truetype/breip/Breip.ttf
    dpkg-deb -b pkg fonts-breip_1_all.deb >/dev/null && rm -r pkg;;
esac
""")
    (bin_dir / "sudo").write_text(f"#!/bin/sh\necho sudo >> {log}\nexit 1\n")
    for name in ("apt-get", "sudo"):
        (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setenv("HTR_DIST_FONT_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(fonts.os, "geteuid", lambda: 1000)
    monkeypatch.setattr(fonts, "SYSTEM_FONT_DIRS", (str(tmp_path / "none"),))
    entry = FontEntry("breip", "train", "debian:fonts-breip", "Breip.ttf", "OFL-1.0")
    counts = fonts.install_fonts([entry], progress=False)
    assert counts["debian_installed"] == 1
    assert fonts.font_path(entry) == str(tmp_path / "cache" / "debian" / "usr" / "share" / "fonts" / "truetype"
                                         / "breip" / "Breip.ttf")
    calls = log.read_text().splitlines()
    assert "sudo" not in calls and [c.split()[-2 if "download" in c else -1] for c in calls] == \
        ["download", "update", "download"]
    assert fonts.install_fonts([entry], progress=False)["already_present"] == 1  # idempotent: no more calls
    assert len(log.read_text().splitlines()) == 3
