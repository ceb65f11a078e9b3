"""The named choices that the config, the command line and the code share, each defined once.

A name here is what a user writes (``dist.strategy=fsdp``, ``--decode beam+lm``, ``dist.precision=bf16_native``);
the value says where it is implemented. :data:`htr_dist.config.CHOICES` and the command-line choices are derived from
these, and the code that resolves a name reads it here, so adding a strategy, a decode mode or a precision touches
this file and the one that implements it. This module imports nothing heavy: the config reads it before torch loads.
"""

from __future__ import annotations

import importlib

STRATEGIES = {
    "ddp": "htr_dist.dist.strategy:Strategy",
    "fsdp": "htr_dist.dist.strategy:FSDPStrategy",
    "deepspeed": "htr_dist.dist.strategy:DeepSpeedStrategy",
}
"""``dist.strategy`` -> the class that wraps the trainable part and the teacher (``module:Class``)."""

PRECISIONS = {
    "auto": "bf16 autocast on CUDA, fp32 on the CPU",
    "fp32": "fp32 everywhere",
    "bf16": "bf16 (autocast for the trainable part, bf16 weights for the frozen LLM)",
    "bf16_native": "bf16 where the device computes it natively (CUDA from Ampere, a CPU with avx512_bf16 or AMX), "
                   "else fp32",
}
"""``dist.precision`` and ``dist.llm_precision`` -> what each means; resolved by ``htr_dist.dist.env.pick_dtype``."""

DECODE_MODES = {
    "greedy": "the best class of each frame",
    "beam": "CTC prefix beam search (compiled), exact sums over alignments",
    "beam+lm": "beam search with a character n-gram LM of the training text",
    "beam+llm": "the beam's n best hypotheses rescored by the trained connector and the teacher LLM",
}
"""``--decode`` -> what it does; implemented in ``htr_dist.decode`` (searches, LM, rescoring) and dispatched by
``htr_dist.inference.Recognizer.decode_outputs``."""


def describe(choices: dict) -> str:
    """``name: meaning; ...``, for a command's --help."""
    return "; ".join(f"{name}: {meaning}" for name, meaning in choices.items())


def resolve(spec: str):
    """The object a ``module:attribute`` value names."""
    module, _, attribute = spec.partition(":")
    return getattr(importlib.import_module(module), attribute)
