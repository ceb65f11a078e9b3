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


def machine() -> dict:
    """What decides a figure's meaning: the CPU model and cores, the SIMD level PyTorch dispatches to, and whether
    bf16 is native there (figures from different machines of the same kind differ 2x, see docs/benchmarks.md)."""
    import torch

    from htr_dist.dist.env import has_native_bf16

    model = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:  # not Linux
        pass
    return {"cpu": model, "cores": os.cpu_count(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "native_bf16": has_native_bf16(torch.device("cpu")), "torch": torch.__version__}


def reserve_stdout():
    """Send everything written to stdout from now on to stderr; return ``emit(report)``, which prints the JSON
    object ``report`` with a ``machine`` entry (:func:`machine`) added."""
    sys.stdout.flush()
    report_fd = os.dup(1)
    os.dup2(2, 1)

    def emit(report: dict) -> None:
        with os.fdopen(report_fd, "w", encoding="utf-8") as f:
            json.dump({**report, "machine": machine()}, f, indent=1)
            f.write("\n")

    return emit
