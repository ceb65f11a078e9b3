#!/usr/bin/env python
"""The script path of `htr-eval` (htr_dist/cli/evaluate.py), for launchers that take a file."""
from htr_dist.cli.evaluate import main
from htr_dist.dist.env import exit_process

if __name__ == "__main__":
    exit_process(main())
