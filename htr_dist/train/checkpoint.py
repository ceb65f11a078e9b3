"""Step-numbered checkpoints in ``run.dir/checkpoints/step_XXXXXXX``: written under a temporary name by every rank
(each strategy saves its own way), renamed by rank 0 when complete, the last k kept. Never the frozen LLM."""

from __future__ import annotations

import logging
import os
import random
import re
import shutil
from typing import Optional

import numpy as np
import torch

from htr_dist.config import ConfigError
from htr_dist.dist import env as dist_env
from htr_dist.io_utils import atomic_write_text

log = logging.getLogger(__name__)
STEP_DIR = re.compile(r"^step_(\d{7})$")


def rng_state(generator: Optional[torch.Generator] = None) -> dict:
    """This rank's random states: CPU, this rank's CUDA device (dropout on the GPU), numpy, Python, LLM sampler."""
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() and torch.cuda.is_initialized() else None,
            "llm_sampler": generator.get_state() if generator is not None else None}


def set_rng_state(state: dict, generator: Optional[torch.Generator] = None) -> None:
    # the setters take CPU byte tensors only, wherever a checkpoint loader may have put them
    torch.set_rng_state(state["torch"].cpu())
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"].cpu())
    if generator is not None and state.get("llm_sampler") is not None:
        generator.set_state(state["llm_sampler"].cpu())


class CheckpointManager:
    def __init__(self, run_dir: str, keep_last: int):
        self.root = os.path.join(run_dir, "checkpoints")
        self.keep_last = keep_last

    def list(self) -> list:
        if not os.path.isdir(self.root):
            return []
        return sorted(d for d in os.listdir(self.root) if STEP_DIR.match(d))

    def latest(self) -> Optional[str]:
        steps = self.list()
        return os.path.join(self.root, steps[-1]) if steps else None

    def resolve(self, resume: str) -> Optional[str]:
        """``auto`` -> newest checkpoint or None; a path -> that checkpoint (an error if missing); '' -> None."""
        if not resume:
            return None
        if resume == "auto":
            return self.latest()
        if not os.path.isdir(resume):
            raise ConfigError(f"train.resume: checkpoint folder not found: {resume}")
        return resume

    def save(self, strategy, step: int, client_state: dict) -> str:
        """Every rank calls this. Returns the final folder."""
        final = os.path.join(self.root, f"step_{step:07d}")
        tmp = os.path.join(self.root, f".tmp_step_{step:07d}")
        if dist_env.is_main_process():
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp, exist_ok=True)
        dist_env.barrier()
        strategy.save(tmp, client_state)
        dist_env.barrier()
        if dist_env.is_main_process():
            if os.path.isdir(final):
                shutil.rmtree(final)
            os.replace(tmp, final)
            atomic_write_text(os.path.join(self.root, "latest"), os.path.basename(final) + "\n")
            for old in self.list()[: -self.keep_last]:
                shutil.rmtree(os.path.join(self.root, old), ignore_errors=True)
            log.info("checkpoint written: %s", final)
        dist_env.barrier()
        return final
