"""The named choices that the config, the command line and the code share, each defined once.

A name here is what a user writes in a config (``dist.strategy=fsdp``, ``dist.precision=bf16_native``); the value
says where it is implemented. :data:`htr_dist.config.CHOICES` is derived from these, and the code that resolves a
name reads it here, so adding a strategy, a precision or a logger touches this file and the one that implements it.
This module imports nothing heavy: the config reads it before torch loads. (Decoding modes are not config keys: their
registry is ``htr_dist.decode.DECODE_MODES``, beside their code.)
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

LOGGERS = {
    "tensorboard": "htr_dist.train.logger:TensorBoardLogger",
    "mlflow": "htr_dist.train.logger:MLflowLogger",
}
"""``run.loggers`` -> the class that writes rank 0's metrics there (``module:Class``)."""


def resolve(spec: str):
    """The object a ``module:attribute`` value names."""
    module, _, attribute = spec.partition(":")
    return getattr(importlib.import_module(module), attribute)
