"""The headless browser the report test renders ``report.html`` with: Debian's ``chromium`` at ``/usr/bin/chromium``.

Only :func:`install_browser` (``launch/fetch_browser.py``, run by ``make browser``, which ``make test`` needs)
installs anything. As root it is one ``apt-get install chromium`` (apt brings the libraries chromium needs). Any other
user gets nothing: unpacking the package without its dozens of shared-library dependencies would give a browser
that does not start, so the browser test is skipped instead, with the command that would install it.
"""

from __future__ import annotations

import os
import shutil
from typing import Optional

from htr_dist.data.fonts import apt_get
from htr_dist.errors import InputError

PACKAGE = "chromium"
"""The Debian package of the browser."""
CHROMIUM = "/usr/bin/chromium"
"""Where the Debian package puts the browser's launcher."""


class BrowserInstallError(InputError, RuntimeError):
    """Installing the browser failed; the message names the command."""


def find_browser() -> Optional[str]:
    """The chromium launcher: ``$HTR_DIST_CHROMIUM`` if set, else :data:`CHROMIUM` or ``chromium`` on the PATH;
    None if there is none."""
    wanted = os.environ.get("HTR_DIST_CHROMIUM")
    if wanted:
        return wanted if os.access(wanted, os.X_OK) else None
    if os.access(CHROMIUM, os.X_OK):
        return CHROMIUM
    return shutil.which("chromium")


def install_browser() -> dict:
    """Install :data:`PACKAGE` unless a browser is found; returns what happened. As root, a failing apt-get raises
    an InputError naming the command (:class:`~htr_dist.data.fonts.FontInstallError`, the font installer's)."""
    found = find_browser()
    if found:
        return {"browser": found, "installed": False}
    if hasattr(os, "geteuid") and os.geteuid() != 0:
        return {"browser": None, "installed": False,
                "note": f"not root: chromium is not installed and the browser test of the report will be skipped; "
                        f"install it with: sudo apt-get install --no-install-recommends {PACKAGE}"}
    command = apt_get(["install", "-y", "--no-install-recommends", PACKAGE], f"the Debian package {PACKAGE}")
    found = find_browser()
    if found is None:
        raise BrowserInstallError(f"`{' '.join(command)}` succeeded but there is no {CHROMIUM}")
    return {"browser": found, "installed": True}
