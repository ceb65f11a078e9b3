"""The process pool that preparing and synthesising data share."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal


def _default_sigterm() -> None:
    """A pool worker ends on SIGTERM, whatever handler the parent had when it forked (``Pool.terminate`` sends it)."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def worker_pool(workers: int):
    """A pool of ``workers`` processes, forked where the platform can (the workers share the parent's loaded state
    without pickling it), each with SIGTERM's default action so that ``Pool.terminate`` always ends them."""
    ctx = mp.get_context("fork") if hasattr(os, "fork") else mp.get_context()
    return ctx.Pool(workers, initializer=_default_sigterm)
