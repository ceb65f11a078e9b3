"""Every benchmark prints one JSON object on stdout and nothing else, so ``script | jq`` and ``json.load`` just work.

Libraries do not all agree: DeepSpeed's logger (imported by transformers when it saves a converted GGUF model), C
extensions and child processes may write to file descriptor 1. ``reserve_stdout()`` keeps a private copy of stdout
for the report and points descriptor 1 (and so ``print``, loggers and children) at stderr from then on.
"""

import json
import os
import statistics
import sys


def spread(values) -> dict:
    """Min / median / max of repeated measurements, the form every benchmark reports them in."""
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def reserve_stdout():
    """Send everything written to stdout from now on to stderr; return ``emit(report)``, which prints the JSON."""
    sys.stdout.flush()
    report_fd = os.dup(1)
    os.dup2(2, 1)

    def emit(report) -> None:
        with os.fdopen(report_fd, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=1)
            f.write("\n")

    return emit
