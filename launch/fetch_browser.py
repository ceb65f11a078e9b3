#!/usr/bin/env python
"""The script path of htr_dist/cli/fetch_browser.py: installs chromium for the report's browser test (`make browser`)."""
import sys

from htr_dist.cli.fetch_browser import main

if __name__ == "__main__":
    sys.exit(main())
