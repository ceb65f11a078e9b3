#!/usr/bin/env python
"""Line images + transcriptions in any supported format -> WebDataset shards (htr-prepare); see --help."""

import sys

from htr_dist.cli.prepare import main

if __name__ == "__main__":
    sys.exit(main())
