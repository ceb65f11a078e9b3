#!/usr/bin/env python
"""The script path of `htr-recognize` (htr_dist/cli/recognize.py), for launchers that take a file."""
import sys

from htr_dist.cli.recognize import main

if __name__ == "__main__":
    sys.exit(main())
