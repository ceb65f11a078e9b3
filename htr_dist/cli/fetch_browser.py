"""Install the headless browser that tests/test_report.py renders the evaluation report with: Debian's chromium.

As root: `apt-get install --no-install-recommends chromium` (apt-get update first only when apt does not know the
package yet). Any other user: nothing is installed (chromium needs dozens of system libraries that cannot be unpacked
without root); a note says so and the browser test is skipped. A browser already in place is left alone, so it is
safe to re-run; `make test` runs it (`make browser`).

Prints a JSON summary: {"browser": path or null, "installed": bool, "seconds"} and, when nothing could be installed,
"note". Errors (apt-get failed as root) are one line on stderr, exit 2.
"""

import argparse
import json
import sys
import time

from htr_dist.browser import install_browser
from htr_dist.errors import InputError


def main(argv=None) -> int:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args(argv)
    start = time.perf_counter()
    try:
        summary = install_browser()
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps({**summary, "seconds": round(time.perf_counter() - start, 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
