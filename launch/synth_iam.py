#!/usr/bin/env python
"""The script path of `htr-synth` (htr_dist/cli/synth.py), for launchers that take a file."""
import sys

from htr_dist.cli.synth import main

if __name__ == "__main__":
    sys.exit(main())
