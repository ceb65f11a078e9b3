#!/usr/bin/env python
"""The script path of `htr-train` (htr_dist/cli/train.py), for launchers that take a file."""
from htr_dist.cli.train import main
from htr_dist.dist.env import exit_process

if __name__ == "__main__":
    exit_process(main())
