#!/usr/bin/env python
"""IAM -> WebDataset shards (the IAM options of htr-prepare, and the seed's positional form); see --help."""

import sys

from htr_dist.cli.prepare_iam import main

if __name__ == "__main__":
    sys.exit(main())
