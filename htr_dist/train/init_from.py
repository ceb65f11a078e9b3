"""Fine-tuning: a new run's recogniser starts from the weights of a trained one (``train.init_from``).

Only weights are taken; step, optimizer, schedule and data position start fresh (that is what tells it from a
resume). The source is an exported ``model.pt`` / ``best_model.pt``, a checkpoint folder of any strategy, or a run
folder (its newest intact checkpoint, else its ``model.pt``). The weights are loaded into the plain model before
any strategy wraps it, so DDP, FSDP and DeepSpeed only ever see initialised weights; the frozen LLM is in no source.

The alphabet may grow. The CTC output layers (:meth:`HTRModel.class_row_keys`) keep each old character's row at that
character's index in the new alphabet (the blank stays 0); a new character's row starts with zero weights and a bias
:data:`NEW_CLASS_BIAS_GAP` below the layer's lowest old bias, so its logit is that constant on every frame: the old
classes' logits do not change at all, greedy decoding reads as before, and training moves the new rows from there.
Every other recogniser weight must match in name and shape. The Q-Former connector is taken when both models have
one of the same shapes, and otherwise starts fresh (with a warning when the shapes differ).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch

from htr_dist.data.alphabet import Alphabet
from htr_dist.dist import env as dist_env
from htr_dist.errors import InputError
from htr_dist.train.checkpoint import CheckpointManager, read_trainable, verify

log = logging.getLogger(__name__)

NEW_CLASS_BIAS_GAP = 2.0
"""How far below the lowest old bias of an output layer a new character's bias starts. Low enough that a trained
model's best class on any frame stays above it (greedy text unchanged), not so low that the first fine-tuning steps,
whose CTC targets need the new characters, mostly pull the other weights towards the blank (the model then forgets
old characters while the new rows catch up)."""
CONNECTOR = "connector."


class InitFromError(InputError, ValueError):
    """``train.init_from`` cannot be used with this config and data; the message names the file and what differs."""


@dataclass
class InitSource:
    """The weights and alphabet read from ``train.init_from``."""

    path: str
    """The file or checkpoint folder actually read."""
    state_dict: Dict[str, torch.Tensor]
    alphabet: str
    config: Optional[dict] = None
    """The resolved config of the run that wrote it (if recorded), to name differing ``arch.*`` keys."""


def _read_export(path: str) -> InitSource:
    """An exported model, read as evaluation reads it (:func:`htr_dist.inference.read_export`)."""
    from htr_dist.inference import read_export

    try:
        blob = read_export(path)
    except InputError as err:
        raise InitFromError(f"train.init_from: {err}; nor is it a checkpoint folder") from None
    if "state_dict" not in blob or "alphabet" not in blob:
        raise InitFromError(f"train.init_from: {path}: the export lacks its weights or alphabet")
    return InitSource(path, blob["state_dict"], blob["alphabet"], blob.get("config"))


def _read_checkpoint(folder: str) -> InitSource:
    """The trainable weights of a checkpoint folder written by any strategy (:func:`checkpoint.read_trainable`)."""
    try:
        weights, client, _ = read_trainable(folder)
    except InputError as err:
        raise InitFromError(f"train.init_from: {err}") from None
    if "alphabet" not in client:
        raise InitFromError(f"train.init_from: {folder}: the checkpoint does not record its alphabet")
    return InitSource(folder, weights, client["alphabet"], client.get("config"))


def _pick_folder(path: str) -> Tuple[Optional[str], Optional[str]]:
    """(checkpoint folder or export file to read, why the path cannot be used). Rank 0 looks; the others are told."""
    if os.path.isfile(path):
        return path, None
    if not os.path.isdir(path):
        return None, "not found"
    if os.path.isdir(os.path.join(path, "checkpoints")) or os.path.isfile(os.path.join(path, "model.pt")):
        found, skipped = CheckpointManager(path, 1).newest_intact()
        for folder, why in skipped:
            log.warning("train.init_from: skipping %s: %s", folder, why)
        if found is not None:
            return found, None
        if os.path.isfile(os.path.join(path, "model.pt")):
            return os.path.join(path, "model.pt"), None
        return None, "a run folder without an intact checkpoint or model.pt"
    why = verify(path)
    return (None, f"a damaged checkpoint: {why}") if why else (path, None)


def read_init_source(path: str) -> InitSource:
    """Read ``train.init_from``: a model.pt/best_model.pt, a checkpoint folder, or a run folder (its newest intact
    checkpoint, else its model.pt). Every rank calls this; rank 0 chooses (and checks the checkpoint's integrity)."""
    picked = _pick_folder(path) if dist_env.is_main_process() else None
    found, why = dist_env.broadcast_object(picked)
    if found is None:
        raise InitFromError(f"train.init_from: {path}: {why}")
    source = _read_checkpoint(found) if os.path.isdir(found) else _read_export(found)
    log.info("train.init_from: weights from %s (alphabet of %d characters)", found, len(source.alphabet))
    return source


def finetune_alphabet(source: str, data: str, mode: str, path: str) -> Alphabet:
    """The alphabet a fine-tuning run trains with. ``strict``: the data's, which must hold every character of the
    source's. ``merge``: the source's characters in their order, then the data's new ones (the union)."""
    lost = [c for c in source if c not in data]
    if lost and mode != "merge":
        raise InitFromError(f"train.init_from: {path} knows {len(lost)} character(s) that the data's alphabet lacks: "
                            f"{''.join(lost)!r}; set train.init_alphabet=merge to keep them (the run then trains "
                            "with the union of both alphabets)")
    if mode == "merge":
        return Alphabet(source + "".join(c for c in data if c not in source))
    return Alphabet(data)


def _shape(t) -> str:
    return str(tuple(t.shape)).replace(",)", ")")


def _first_difference(target: Dict[str, torch.Tensor], source: Dict[str, torch.Tensor],
                      class_keys: List[str]) -> Optional[str]:
    """The first key whose presence or shape differs (class rows: all but dim 0), as a phrase; None if all fit."""
    for key, t in target.items():
        if key not in source:
            return f"{key} {_shape(t)} is not in it"
        s = source[key]
        same = s.shape[1:] == t.shape[1:] and s.dim() == t.dim() if key in class_keys else s.shape == t.shape
        if not same:
            return f"{key} is {_shape(s)} there and {_shape(t)} here"
    extra = [k for k in source if k not in target]
    return f"it has {extra[0]} {_shape(source[extra[0]])}, which this config does not build" if extra else None


def _arch_hint(source: InitSource, cfg) -> str:
    """' (arch.x is A there, B here)' for the first arch key that differs, when the source recorded its config."""
    from htr_dist.config import to_dict

    there = (source.config or {}).get("arch") or {}
    here = to_dict(cfg)["arch"]
    for key, value in here.items():
        if key in there and there[key] != value and key not in ("rnn_dropout", "shortcut_weight"):
            return f" (arch.{key} is {there[key]!r} there, {value!r} here)"
    return ""


def _grow(old: torch.Tensor, new_shape: torch.Size, rows: torch.Tensor, is_bias: bool) -> torch.Tensor:
    """An output layer's weight or bias for the new classes: row j is old row ``rows[j]``, or for ``rows[j] < 0`` (a
    new character) zero, and for a bias :data:`NEW_CLASS_BIAS_GAP` below the lowest old bias."""
    out = old.new_zeros(new_shape)
    keep = rows >= 0
    out[keep] = old[rows[keep]]
    if is_bias and (~keep).any():
        out[~keep] = old.min() - NEW_CLASS_BIAS_GAP
    return out


def init_weights(model, source: InitSource, alphabet: Alphabet, cfg) -> dict:
    """Load ``source`` into the unwrapped ``model`` (built for ``alphabet``), growing its CTC output rows; return what
    was done: ``new_chars`` and ``connector`` (``loaded``, or why not). Raises :class:`InitFromError` naming the
    first weight whose shape differs."""
    old = Alphabet(source.alphabet)
    target = model.state_dict()
    class_keys = model.class_row_keys()
    own = {k: v for k, v in target.items() if not k.startswith(CONNECTOR)}
    theirs = {k: v for k, v in source.state_dict.items() if not k.startswith(CONNECTOR)}
    diff = _first_difference(own, theirs, class_keys)
    if diff:
        raise InitFromError(f"train.init_from: {source.path} holds another architecture than this config builds: "
                            f"{diff}{_arch_hint(source, cfg)}; only the alphabet may differ")
    # row j of the new layers: the old row of the same character (-1: a new character); the blank stays 0
    rows = torch.tensor([0] + [old.index.get(c, -1) for c in alphabet.chars])
    loaded = {}
    for key, t in own.items():
        s = theirs[key]
        loaded[key] = _grow(s, t.shape, rows, key.endswith("bias")) if key in class_keys else s
    connector = _connector_weights(target, source, loaded)
    model.load_state_dict(loaded, strict=set(loaded) == set(target))  # a fresh connector keeps its own init
    new_chars = "".join(c for c in alphabet.chars if c not in old.index)
    log.info("train.init_from: recogniser loaded from %s; %d new character(s) %r added to the output layers; "
             "connector %s", source.path, len(new_chars), new_chars, connector)
    return {"new_chars": new_chars, "connector": connector}


def _connector_weights(target: dict, source: InitSource, loaded: dict) -> str:
    """Add the source's connector to ``loaded`` when both models have one of the same shapes; say what was done."""
    own = {k: v for k, v in target.items() if k.startswith(CONNECTOR)}
    theirs = {k: v for k, v in source.state_dict.items() if k.startswith(CONNECTOR)}
    if not own:
        return "not used (this run has no teacher)" if theirs else "none"
    if not theirs:
        return "fresh (the source has none)"
    diff = _first_difference(own, theirs, [])
    if diff:
        log.warning("train.init_from: %s: its connector does not fit this run's (%s): the connector starts fresh",
                    source.path, diff)
        return "fresh (its shapes differ)"
    loaded.update(theirs)
    return "loaded"
