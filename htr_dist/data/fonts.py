"""The library of handwriting-style fonts that synthetic data is rendered with: which families, where each comes
from, under which licence, and in which split (train / val / test) it plays a writer.

The list is ``htr_dist/data/fonts.tsv`` (:data:`FONT_LIST`), one TAB-separated row per family::

    family          split   source                              file                            license
    breip           train   debian:fonts-breip                  Breip.ttf                       OFL-1.0
    caveat          train   npm:@fontsource/caveat@5.3.0        caveat-latin-400-normal.woff    OFL-1.1

A family belongs to exactly one split, so the val and test figures measure handwriting styles never seen in training.
Two kinds of source:

``debian:<package>``
    a Debian package; as root, apt-get installs its files under ``/usr/share/fonts``; as any other user, the package
    is downloaded and unpacked under ``<font cache>/debian``, with no sudo. :func:`font_path` finds ``file`` in both.
``npm:<package>@<exact version>``
    an npm package (Google's families as ``@fontsource/<family>``); only ``package/files/<file>`` of its tarball is
    kept, in ``<font cache>/<family>/<version>/<file>`` (:func:`font_cache_dir`). PIL's FreeType reads its WOFF.

Only :func:`install_fonts` (``launch/fetch_fonts.py``, run by ``make``) downloads anything; synthesis and training
look the fonts up with :func:`resolve_fonts`, which fails with the command to run when one is missing. This module
imports nothing heavy, so that the installer runs before the rest of the package is usable.
"""

from __future__ import annotations

import getpass
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

from htr_dist.errors import InputError
from htr_dist.io_utils import atomic_path

FONT_LIST = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fonts.tsv")
COLUMNS = ("family", "split", "source", "file", "license")
SPLITS = ("train", "val", "test")
INSTALL_COMMAND = "python launch/fetch_fonts.py"
# Where Debian's font packages and a user's own fonts live; a Debian font is found there by its file name.
SYSTEM_FONT_DIRS = ("/usr/share/fonts", "/usr/local/share/fonts", "~/.local/share/fonts")
FONT_SUFFIXES = (".ttf", ".otf", ".woff", ".woff2")
NPM_BATCH = 8  # npm specs per `npm pack` call: one Node start-up per batch, not per font

_FAMILY = re.compile(r"^[a-z0-9]+(-[a-z0-9]+)*$")
_DEBIAN_PACKAGE = re.compile(r"^[a-z0-9][a-z0-9+.-]+$")
_NPM_SPEC = re.compile(r"^(?P<name>(@[a-z0-9][a-z0-9._-]*/)?[a-z0-9][a-z0-9._-]*)@(?P<version>[^@\s]+)$")
_EXACT_VERSION = re.compile(r"^\d+\.\d+\.\d+(-[0-9A-Za-z.-]+)?(\+[0-9A-Za-z.-]+)?$")
_LICENSE = re.compile(r"^[A-Za-z0-9.+-]+( (WITH|OR|AND) [A-Za-z0-9.+-]+)*$")


class FontListError(InputError, ValueError):
    """The font list (or a selection from it) is invalid; the message names the file, the line and the value."""


class FontsNotFound(InputError, RuntimeError):
    """A font that the data needs is not installed; the message names the families and the command installing them."""


class FontInstallError(InputError, RuntimeError):
    """Installing a font failed; the message names the font and the command that failed, with its last error line."""


@dataclass(frozen=True)
class FontEntry:
    """One row of the font list: a font family, its split, where it comes from, its file and its licence (SPDX)."""

    family: str
    split: str
    source: str
    file: str
    license: str

    @property
    def kind(self) -> str:
        """``debian`` or ``npm``."""
        return self.source.split(":", 1)[0]

    @property
    def package(self) -> str:
        """The Debian package (``fonts-breip``) or the pinned npm spec (``@fontsource/caveat@5.3.0``)."""
        return self.source.split(":", 1)[1]

    @property
    def npm_name(self) -> str:
        """The npm package name without its version (``@fontsource/caveat``); only for npm fonts."""
        return self.package.rsplit("@", 1)[0]

    @property
    def version(self) -> Optional[str]:
        """The pinned npm version (``5.3.0``); None for a Debian font, whose version is the distribution's."""
        return self.package.rsplit("@", 1)[1] if self.kind == "npm" else None


def _family_key(family: str) -> str:
    """The family name compared case-insensitively and without spaces, dashes or underscores."""
    return re.sub(r"[\s_-]+", "", family).lower()


def _row_problem(values: Sequence[str]) -> Optional[str]:
    """What is wrong with one row's five values (naming the value), or None."""
    family, split, source, file, license_ = values
    if not _FAMILY.match(family):
        return f"family {family!r} is not a lowercase name like indie-flower (letters, digits and single dashes)"
    if split not in SPLITS:
        return f"unknown split {split!r} of {family} (expected {', '.join(SPLITS)})"
    kind, sep, package = source.partition(":")
    if kind == "debian" and sep:
        if not _DEBIAN_PACKAGE.match(package):
            return f"bad Debian package name {package!r} in source {source!r} of {family}"
    elif kind == "npm" and sep:
        spec = _NPM_SPEC.match(package)
        if not spec:
            return (f"unpinned or malformed npm source {source!r} of {family} (expected npm:<package>@<exact version>, "
                    f"e.g. npm:@fontsource/{family}@5.3.0)")
        if not _EXACT_VERSION.match(spec.group("version")):
            return (f"unpinned npm version {spec.group('version')!r} in source {source!r} of {family} (expected an "
                    f"exact version such as 5.3.0)")
    else:
        return f"unknown source kind {source!r} of {family} (expected debian:<package> or npm:<package>@<version>)"
    if "/" in file or "\\" in file or file in ("", ".", "..") or not file.lower().endswith(FONT_SUFFIXES):
        return f"bad font file name {file!r} of {family} (expected a file name ending in {', '.join(FONT_SUFFIXES)})"
    if not _LICENSE.match(license_):
        return f"bad licence {license_!r} of {family} (expected an SPDX identifier such as OFL-1.1)"
    return None


def load_font_list(path: str = FONT_LIST) -> List[FontEntry]:
    """The font list's rows, in file order, after checking every one; a bad row raises :class:`FontListError` naming
    the file, the line number and the bad value. Blank lines and lines starting with ``#`` are skipped; the first
    other line is the header ``family split source file license``."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError as err:
        raise FontListError(f"cannot read the font list {path}: {err.strerror or err}") from None
    except UnicodeDecodeError as err:
        raise FontListError(f"the font list {path} is not UTF-8 text: {err.reason} at byte {err.start}") from None
    entries: List[FontEntry] = []
    seen: Dict[str, Tuple[int, FontEntry]] = {}
    header = False
    for number, line in enumerate(lines, 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        values = [v.strip() for v in line.split("\t")]
        where = f"{path}:{number}"
        if not header:
            if tuple(values) != COLUMNS:
                raise FontListError(f"{where}: expected the header {' '.join(COLUMNS)!r} (TAB-separated), got {line!r}")
            header = True
            continue
        if len(values) != len(COLUMNS):
            raise FontListError(f"{where}: expected {len(COLUMNS)} TAB-separated columns ({', '.join(COLUMNS)}), "
                                f"got {len(values)}: {line!r}")
        empty = [c for c, v in zip(COLUMNS, values) if not v]
        if empty:
            raise FontListError(f"{where}: missing {empty[0]} in {line!r}")
        problem = _row_problem(values)
        if problem:
            raise FontListError(f"{where}: {problem}")
        entry = FontEntry(*values)
        key = _family_key(entry.family)
        if key in seen:
            first_line, first = seen[key]
            if first.split != entry.split:
                raise FontListError(f"{where}: family {entry.family!r} is in split {entry.split!r} here and in "
                                    f"{first.split!r} on line {first_line}; a family belongs to one split")
            raise FontListError(f"{where}: duplicate family {entry.family!r} (also on line {first_line})")
        seen[key] = (number, entry)
        entries.append(entry)
    if not entries:
        raise FontListError(f"{path}: no font in the list (expected the header {' '.join(COLUMNS)!r}, then one row "
                            "per family)")
    return entries


def select(entries: Optional[Iterable[FontEntry]] = None,
           split: Union[None, str, Sequence[str]] = None) -> List[FontEntry]:
    """The entries (default: the repository's list) of the given split or splits (default: all)."""
    entries = load_font_list() if entries is None else list(entries)
    if split is None:
        return entries
    wanted = [split] if isinstance(split, str) else list(split)
    unknown = [s for s in wanted if s not in SPLITS]
    if unknown:
        raise FontListError(f"unknown split {unknown[0]!r} (expected {', '.join(SPLITS)})")
    chosen = [e for e in entries if e.split in wanted]
    if not chosen:
        raise FontListError(f"no font of split {' '.join(wanted)} in the font list")
    return chosen


def font_cache_dir() -> str:
    """Where npm fonts are kept: ``$HTR_DIST_FONT_DIR`` if set, else ``~/.cache/htr_dist/fonts``."""
    return os.environ.get("HTR_DIST_FONT_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "htr_dist", "fonts")


def _user_debian_dir() -> str:
    """Where a user without root unpacks Debian font packages (:func:`_install_debian_user`)."""
    return os.path.join(font_cache_dir(), "debian")


def _system_font_index() -> Dict[str, str]:
    """File name -> path of every font file under :data:`SYSTEM_FONT_DIRS`, then the user's unpacked Debian
    packages (the first one found, in sorted order)."""
    index: Dict[str, str] = {}
    for root in SYSTEM_FONT_DIRS + (_user_debian_dir(),):
        for folder, dirs, files in os.walk(os.path.expanduser(root)):
            dirs.sort()
            for name in sorted(files):
                index.setdefault(name, os.path.join(folder, name))
    return index


def font_path(entry: FontEntry, *, index: Optional[Dict[str, str]] = None) -> Optional[str]:
    """Where the entry's installed font file is, or None. A Debian font is looked up by its file name under
    :data:`SYSTEM_FONT_DIRS` (``index``: a :func:`_system_font_index` to reuse over many entries); an npm font is
    ``<font cache>/<family>/<version>/<file>``."""
    if entry.kind == "npm":
        path = os.path.join(font_cache_dir(), entry.family, entry.version, entry.file)
        return path if os.path.isfile(path) else None
    if index is None:
        index = _system_font_index()
    return index.get(entry.file)


def missing_fonts(entries: Sequence[FontEntry]) -> List[FontEntry]:
    """The entries whose font file is not installed, in list order."""
    index = _system_font_index()
    return [e for e in entries if font_path(e, index=index) is None]


def resolve_fonts(entries: Optional[Iterable[FontEntry]] = None,
                  split: Union[None, str, Sequence[str]] = None) -> List[Tuple[FontEntry, str]]:
    """(entry, installed path) of the entries (default: the repository's list) of the given split(s) (default: all),
    in list order. Raises :class:`FontsNotFound` naming the missing families and the command that installs them:
    nothing is downloaded here."""
    chosen = select(entries, split)
    index = _system_font_index()
    found = [(e, font_path(e, index=index)) for e in chosen]
    missing = [e.family for e, path in found if path is None]
    if missing:
        shown = ", ".join(missing[:12]) + (f" and {len(missing) - 12} more" if len(missing) > 12 else "")
        raise FontsNotFound(f"{len(missing)} of {len(chosen)} handwriting fonts are not installed ({shown}; npm fonts "
                            f"are looked for under {font_cache_dir()}); install them with: {INSTALL_COMMAND}")
    return found


# --------------------------------------------------------------------------------------------------------------------
# Installing
# --------------------------------------------------------------------------------------------------------------------


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in (text or "").splitlines() if ln.strip()]
    return lines[-1] if lines else "no error output"


def _run(cmd: List[str], what: str, cwd: Optional[str] = None, env: Optional[Dict[str, str]] = None):
    """Run ``cmd``; a missing program raises :class:`FontInstallError` naming ``what`` and the command."""
    try:
        return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    except OSError as err:
        raise FontInstallError(f"cannot install {what}: `{' '.join(cmd)}` did not start ({err.strerror or err}); "
                               f"is {cmd[0]} installed?") from None


def apt_get(args: List[str], what: str, options: Sequence[str] = (), cwd: Optional[str] = None) -> List[str]:
    """Run ``apt-get args`` (no sudo: the caller is root, or ``options`` point apt at the user's own folders); when
    apt does not know a package yet (a fresh machine's empty package lists), ``apt-get update`` and run it again.
    Returns the command; raises :class:`FontInstallError` naming the command that failed."""
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    cmd = ["apt-get", "-q"] + list(options) + args
    done = _run(cmd, what, env=env, cwd=cwd)
    if done.returncode != 0 and re.search(r"Unable to locate package|has no installation candidate|Can't find a source",
                                             done.stderr):
        update = ["apt-get", "-q"] + list(options) + ["update"]
        updated = _run(update, what, env=env)
        if updated.returncode != 0:
            raise FontInstallError(f"cannot install {what}: `{' '.join(update)}` failed with exit code "
                                   f"{updated.returncode}: {_last_line(updated.stderr)}")
        done = _run(cmd, what, env=env, cwd=cwd)
    if done.returncode != 0:
        raise FontInstallError(f"cannot install {what}: `{' '.join(cmd)}` failed with exit code {done.returncode}: "
                               f"{_last_line(done.stderr)}")
    return cmd


def _install_debian_user(packages: List[str], what: str) -> str:
    """Without root: ``apt-get download`` the packages (with package lists of the user's own, in the font cache) and
    unpack them with ``dpkg-deb -x`` under :func:`_user_debian_dir`; nothing asks for a password."""
    state = os.path.join(font_cache_dir(), "apt")
    for sub in ("lists/partial", "cache/archives/partial"):
        os.makedirs(os.path.join(state, sub), exist_ok=True)
    options = ["-o", f"Dir::State::Lists={state}/lists", "-o", f"Dir::Cache={state}/cache",
               "-o", "Debug::NoLocking=1", "-o", f"APT::Sandbox::User={getpass.getuser()}"]
    with tempfile.TemporaryDirectory() as folder:
        cmd = apt_get(["download"] + packages, what, options, cwd=folder)
        for deb in sorted(glob.glob(os.path.join(folder, "*.deb"))):
            done = _run(["dpkg-deb", "-x", deb, _user_debian_dir()], what)
            if done.returncode != 0:
                raise FontInstallError(f"cannot install {what}: `dpkg-deb -x {deb}` failed: {_last_line(done.stderr)}")
    return " ".join(cmd)


def _install_debian(entries: List[FontEntry]) -> None:
    """Install the entries' Debian packages: as root, one ``apt-get install``; as any other user, the packages
    unpacked into the user's font cache (:func:`_install_debian_user`), so no step needs sudo."""
    packages = list(dict.fromkeys(e.package for e in entries))
    what = "the Debian fonts " + ", ".join(e.family for e in entries)
    if not hasattr(os, "geteuid") or os.geteuid() == 0:
        command = " ".join(apt_get(["install", "-y", "--no-install-recommends"] + packages, what))
    else:
        command = _install_debian_user(packages, what)
    index = _system_font_index()
    for e in entries:
        if font_path(e, index=index) is None:
            raise FontInstallError(f"font {e.family}: `{command}` succeeded but no file {e.file} appeared under "
                                   f"{', '.join(SYSTEM_FONT_DIRS + (_user_debian_dir(),))}; fix the file name in the "
                                   f"font list")


def _npm_error(done: subprocess.CompletedProcess) -> str:
    """What a failed ``npm --json`` command said: its JSON error's code and summary, else its last stderr line."""
    try:
        error = json.loads(done.stdout)["error"]
        return f"{error.get('code', 'error')}: {error['summary']}"
    except (ValueError, KeyError, TypeError):
        return _last_line(done.stderr or done.stdout)


def _npm_pack(entries: List[FontEntry], folder: str) -> Dict[str, str]:
    """``npm pack`` the entries' specs into ``folder``: spec -> tarball path. Raises :class:`FontInstallError`."""
    cmd = ["npm", "pack", "--json", "--silent", "--pack-destination", folder] + [e.package for e in entries]
    what = "the npm font " + entries[0].family if len(entries) == 1 else "the npm fonts"
    done = _run(cmd, what, cwd=folder)
    if done.returncode != 0:
        raise FontInstallError(f"cannot install {what}: `{' '.join(cmd)}` failed with exit code {done.returncode}: "
                               f"{_npm_error(done)}")
    try:
        packed = {f"{p['name']}@{p['version']}": os.path.join(folder, p["filename"]) for p in json.loads(done.stdout)}
    except (ValueError, KeyError, TypeError):
        raise FontInstallError(f"cannot install {what}: `{' '.join(cmd)}` printed no JSON list of tarballs: "
                               f"{_last_line(done.stdout)}") from None
    absent = [e for e in entries if not os.path.isfile(packed.get(e.package, ""))]
    if absent:
        raise FontInstallError(f"cannot install the npm font {absent[0].family}: `{' '.join(cmd)}` made no tarball "
                               f"of {absent[0].package}")
    return {e.package: packed[e.package] for e in entries}


def _extract_font(entry: FontEntry, tarball: str) -> str:
    """Copy ``package/files/<file>`` of the tarball into the font cache (atomically); check the licence recorded in
    the list against the package's own ``license`` field. Returns the font's path."""
    dest = os.path.join(font_cache_dir(), entry.family, entry.version, entry.file)
    member = f"package/files/{entry.file}"
    try:
        with tarfile.open(tarball, "r:gz") as tar:
            names = set(tar.getnames())
            for needed in ("package/package.json", member):
                if needed not in names:
                    raise FontInstallError(f"font {entry.family}: the npm package {entry.package} has no {needed}; "
                                           "fix the file name in the font list")
            meta = json.load(tar.extractfile("package/package.json"))
            data = tar.extractfile(member)
            if data is None:
                raise FontInstallError(f"font {entry.family}: {member} of {entry.package} is not a regular file")
            stated = meta.get("license")
            if stated != entry.license:
                raise FontInstallError(f"font {entry.family}: the font list says licence {entry.license!r} but "
                                       f"{entry.package}'s package.json says {stated!r}; fix the list")
            with atomic_path(dest) as tmp, open(tmp, "wb") as out:
                shutil.copyfileobj(data, out)
    except (tarfile.TarError, OSError, ValueError) as err:
        raise FontInstallError(f"font {entry.family}: cannot extract {member} from {tarball} of `npm pack "
                               f"{entry.package}`: {err}") from None
    return dest


def _install_npm(entries: List[FontEntry], progress: bool) -> None:
    """npm pack the entries, a batch of :data:`NPM_BATCH` per call, into a temporary folder, keeping only the font
    file of each. A failing batch is retried one font at a time, so that the error names the font at fault."""
    from tqdm import tqdm

    with tempfile.TemporaryDirectory(prefix="htr_dist_fonts_") as tmp, \
            tqdm(total=len(entries), desc="npm fonts", unit="font", disable=not progress) as bar:
        for start in range(0, len(entries), NPM_BATCH):
            batch = entries[start:start + NPM_BATCH]
            try:
                tarballs = _npm_pack(batch, tmp)
            except FontInstallError:
                if len(batch) == 1:
                    raise
                tarballs = {}
                for e in batch:
                    tarballs.update(_npm_pack([e], tmp))
            for e in batch:
                _extract_font(e, tarballs[e.package])
                os.unlink(tarballs[e.package])
                bar.update(1)


def install_fonts(entries: Optional[Iterable[FontEntry]] = None, progress: bool = True) -> Dict[str, int]:
    """Install the entries' fonts (default: the whole repository list) that are not installed yet: the Debian ones
    with one ``apt-get install``, the npm ones with ``npm pack`` and extraction of the one font file into
    :func:`font_cache_dir`. Idempotent: a font already in place is left alone. This is the only function that
    downloads. Returns ``{"fonts", "already_present", "installed", "debian_installed", "npm_installed"}`` counts;
    a failure raises :class:`FontInstallError` naming the font and the command that failed."""
    entries = load_font_list() if entries is None else list(entries)
    missing = missing_fonts(entries)
    debian = [e for e in missing if e.kind == "debian"]
    npm = [e for e in missing if e.kind == "npm"]
    if debian:
        _install_debian(debian)
    if npm:
        _install_npm(npm, progress and sys.stderr.isatty())
    return {"fonts": len(entries), "already_present": len(entries) - len(missing), "installed": len(missing),
            "debian_installed": len(debian), "npm_installed": len(npm)}
