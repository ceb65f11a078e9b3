"""Small file helpers: every output is written to a temporary name in the same folder, then renamed."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from typing import Iterator


def plain_mode(path: str, directory: bool = False) -> None:
    """Give a file made by ``mkstemp`` (mode 0600) or a folder made by ``mkdtemp`` (0700) the mode that ``open`` or
    ``os.makedirs`` would have given it, 0666 or 0777 less the umask: outputs renamed into place from a temporary
    name stay readable by the group and others on a shared cluster, as the user's umask says."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, (0o777 if directory else 0o666) & ~mask)


@contextlib.contextmanager
def atomic_path(path: str, suffix: str = ".tmp") -> Iterator[str]:
    """A temporary name in ``path``'s folder to write to; renamed to ``path`` (with :func:`plain_mode`) when the block
    ends, removed if it raises: a reader sees either the old file or the whole new one."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(path) + ".", suffix=suffix)
    os.close(fd)
    try:
        yield tmp
        plain_mode(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str, text: str) -> None:
    """Write ``text`` to ``path`` so that a reader sees either the old file or the whole new one."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(text)


def atomic_write_json(path: str, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")
