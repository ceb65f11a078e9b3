#!/usr/bin/env python
"""The script path of `htr-plan` (htr_dist/cli/plan.py), for launchers that take a file."""
import sys

from htr_dist.cli.plan import main

if __name__ == "__main__":
    sys.exit(main())
