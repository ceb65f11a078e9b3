"""Step-numbered checkpoints in ``run.dir/checkpoints/step_XXXXXXX``: written under a temporary name by every rank
(each strategy saves its own way), sealed by rank 0 with an integrity record (every file's size and SHA-256, written
last), flushed to disk, then renamed into place; the last k kept. Never the frozen LLM.

``train.resume=auto`` takes the newest checkpoint whose record matches its files and says which newer ones it
skipped and why, so a checkpoint damaged by a crash, a full disk or a bad copy never blocks a restart. Everything a
checkpoint holds loads with ``torch.load(weights_only=True)``: tensors and plain Python values, no pickled code.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import pickle
import random
import re
import shutil
from typing import List, Optional, Tuple
from unittest import mock

import numpy as np
import torch

from htr_dist.config import ConfigError, fill_legacy
from htr_dist.data.shards import sha256
from htr_dist.dist import env as dist_env
from htr_dist.errors import InputError, first_line
from htr_dist.io_utils import atomic_write_text

log = logging.getLogger(__name__)
STEP_DIR = re.compile(r"^step_(\d{7})$")
INTEGRITY = "integrity.json"
META = "meta.json"
TRAINER_FILE = "trainer.pt"  # ddp and fsdp: rank 0's one file (the trainable part is whole on every rank)
# deepspeed: the engine's module weights and client state, at ZeRO 0-2; at ZeRO-3 each rank writes its own
DEEPSPEED_MODEL_FILES = ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt")


def rng_state(generator: Optional[torch.Generator] = None) -> dict:
    """This rank's random states: CPU, this rank's CUDA device (dropout on the GPU), numpy, Python, LLM sampler; as
    tensors and plain values, so that a checkpoint loads with ``weights_only=True``."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "gauss": float(gauss)},
            "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() and torch.cuda.is_initialized() else None,
            "llm_sampler": generator.get_state() if generator is not None else None}


def set_rng_state(state: dict, generator: Optional[torch.Generator] = None) -> None:
    # the setters take CPU byte tensors only, wherever a checkpoint loader may have put them
    torch.set_rng_state(state["torch"].cpu())
    npy = state["numpy"]
    np.random.set_state((npy["name"], npy["keys"].cpu().numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                         npy["gauss"]))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"].cpu())
    if generator is not None and state.get("llm_sampler") is not None:
        generator.set_state(state["llm_sampler"].cpu())


def safe_load(path: str, map_location="cpu", allowed: tuple = ()):
    """``torch.load(path, weights_only=True)``: a file that would need to run code to load (a pickled object of any
    class but tensors, plain values and the classes ``allowed``) is refused with an error naming it and the class,
    and nothing in it runs."""
    try:
        with torch.serialization.safe_globals(list(allowed)):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"GLOBAL ([\w.]+)", str(err))  # "Unsupported global: GLOBAL x" / "unsupported GLOBAL x"
        what = found.group(1) if found else "code"
        raise InputError(f"{path}: refused to load: it asks to run {what} besides tensors and plain values "
                         "(weights_only loading); only resume from checkpoints htr-dist wrote") from None
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise InputError(f"{path}: cannot be read as a PyTorch file ({first_line(err)})") from None


def deepspeed_safe_globals() -> tuple:
    """The plain record classes in DeepSpeed's checkpoint files (loss scalers, ZeRO stage, fragment addresses), for
    :func:`safe_load`: DeepSpeed itself reads its files with ``weights_only=False``."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _files(folder: str) -> List[str]:
    out = []
    for root, _, names in os.walk(folder):
        out += [os.path.relpath(os.path.join(root, n), folder) for n in names if n != INTEGRITY]
    return sorted(out)


def seal(folder: str, step: int) -> None:
    """Write ``folder``'s integrity record (each file's size and SHA-256) after flushing every file to disk; the
    record is flushed too, then the folder, so that a crash leaves either no record or a true one."""
    files = {}
    for rel in _files(folder):
        path = os.path.join(folder, rel)
        _fsync(path)
        files[rel] = {"size": os.path.getsize(path), "sha256": sha256(path)}
    record = os.path.join(folder, INTEGRITY)
    with open(record, "w", encoding="utf-8") as f:
        json.dump({"step": step, "files": files}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    for root, dirs, _ in os.walk(folder):
        for d in dirs:
            _fsync(os.path.join(root, d))
    _fsync(folder)


def _differences(saved, now, prefix: str = "") -> List[str]:
    if isinstance(saved, dict) and isinstance(now, dict):
        out = []
        for key in sorted(set(saved) | set(now)):
            out += _differences(saved.get(key), now.get(key), f"{prefix}{key}.")
        return out
    return [] if saved == now else [f"{prefix[:-1]} {saved!r} there, {now!r} here"]


def check_same_model(folder: str, model_meta: dict) -> None:
    """Stop a resume whose model differs from the checkpoint's (another alphabet or architecture) with one line naming
    what differs, before any weight is read. A checkpoint without ``meta.json`` (an older htr-dist) is not checked."""
    path = os.path.join(folder, META)
    if not os.path.isfile(path):
        return
    with open(path, encoding="utf-8") as f:
        saved = json.load(f)
    fill_legacy(saved)  # a key added since it was written: the value it was trained with
    diff = _differences(saved, model_meta)
    if diff:
        more = f" (and {len(diff) - 3} more)" if len(diff) > 3 else ""
        raise InputError(f"train.resume: {folder} holds another model than this config builds: {'; '.join(diff[:3])}"
                         f"{more}. Resume with the settings it was trained with, or start a new run.dir")


def recorded_alphabet(folder: str) -> Optional[str]:
    """The alphabet a checkpoint's run trained with, from its ``meta.json`` (None when it has none)."""
    try:
        with open(os.path.join(folder, META), encoding="utf-8") as f:
            return json.load(f).get("alphabet")
    except (OSError, ValueError, AttributeError):
        return None


def verify(folder: str) -> Optional[str]:
    """Why ``folder`` is not an intact checkpoint, or None if it is (or predates integrity records: then a warning)."""
    record = os.path.join(folder, INTEGRITY)
    if not os.path.isfile(record):
        if os.path.isdir(folder) and _files(folder):
            log.warning("%s has no integrity record (written by an older htr-dist): resuming from it unchecked",
                        folder)
            return None
        return "empty folder"
    try:
        with open(record, encoding="utf-8") as f:
            files = json.load(f)["files"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"unreadable {INTEGRITY} ({err})"
    for rel, want in sorted(files.items()):
        path = os.path.join(folder, rel)
        if not os.path.isfile(path):
            return f"{rel} is missing"
        size = os.path.getsize(path)
        if size != want["size"]:
            return f"{rel} has {size} bytes, {want['size']} were written"
        if sha256(path) != want["sha256"]:
            return f"{rel} does not match its SHA-256"
    return None
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

    def newest_intact(self) -> Tuple[Optional[str], List[Tuple[str, str]]]:
        """The newest checkpoint that passes :func:`verify`, and the newer ones skipped with the reason."""
        skipped = []
        for name in reversed(self.list()):
            folder = os.path.join(self.root, name)
            why = verify(folder)
            if why is None:
                return folder, skipped
            skipped.append((folder, why))
        return None, skipped

    def resolve(self, resume: str) -> Optional[str]:
        """``auto`` -> newest intact checkpoint or None; a path -> that checkpoint (an error if it is missing or
        damaged); '' -> None. Rank 0 reads the files and tells the others, so all resume from the same one."""
        if not resume:
            return None
        if resume == "auto":
            found = self.newest_intact() if dist_env.is_main_process() else None
            found, skipped = dist_env.broadcast_object(found)
            for folder, why in skipped:
                log.warning("resume: skipping %s: %s", folder, why)
            if found is None and skipped:
                raise InputError(f"train.resume=auto: no intact checkpoint in {self.root} "
                                 f"({len(skipped)} damaged, newest: {skipped[0][1]})")
            return found
        if not os.path.isdir(resume):
            raise ConfigError(f"train.resume: checkpoint folder not found: {resume}")
        why = verify(resume) if dist_env.is_main_process() else None
        why = dist_env.broadcast_object(why)
        if why is not None:
            raise InputError(f"train.resume: {resume} is damaged: {why} (train.resume=auto takes the newest intact "
                             "one)")
        return resume

    def save(self, strategy, step: int, client_state: dict, model_meta: Optional[dict] = None) -> str:
        """Every rank calls this. Returns the final folder. ``model_meta`` (what the weights' shapes depend on) goes
        to ``meta.json`` beside them, for :func:`check_same_model` on resume."""
        final = os.path.join(self.root, f"step_{step:07d}")
        tmp = os.path.join(self.root, f".tmp_step_{step:07d}")
        if dist_env.is_main_process():
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp, exist_ok=True)
        dist_env.barrier()
        why = ""
        try:  # a full disk, a quota, a lost mount: every rank learns of it, none waits in a collective
            strategy.save(tmp, client_state)
            if dist_env.is_main_process():
                if model_meta is not None:
                    with open(os.path.join(tmp, META), "w", encoding="utf-8") as f:
                        json.dump(model_meta, f, indent=1)
                seal(tmp, step)
        except (OSError, RuntimeError) as err:
            why = first_line(err)
        failed = dist_env.all_reduce_max(torch.tensor([float(bool(why))])).item() > 0
        if failed:
            if dist_env.is_main_process():
                shutil.rmtree(tmp, ignore_errors=True)
            raise InputError(f"{tmp}: the checkpoint of step {step} could not be written ({why or 'on another rank'}); "
                             "is the disk full? The checkpoints written before it are kept")
        if dist_env.is_main_process():
            if os.path.isdir(final):
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync(self.root)
            atomic_write_text(os.path.join(self.root, "latest"), os.path.basename(final) + "\n")
            for old in self.list()[: -self.keep_last]:
                shutil.rmtree(os.path.join(self.root, old), ignore_errors=True)
            log.info("checkpoint written: %s", final)
        dist_env.barrier()
        return final


CLIENT_KEYS = ("position", "config", "alphabet", "llm")
"""What the training loop puts in every checkpoint besides the weights (``loop._save``) that an export needs."""


def read_trainable(folder: str) -> Tuple[dict, dict, str]:
    """The trainable part's weights (backbone, heads, connector; never the LLM) and the checkpoint's client state
    (config, alphabet, position, LLM name), read in this one CPU process whatever strategy and number of ranks wrote
    it, and how the weights were found. Checks nothing: :func:`verify` the folder first.

    ``ddp`` and ``fsdp`` keep the trainable part data-parallel (FSDP shards only the LLM), so rank 0's
    ``trainer.pt`` holds it whole. ``deepspeed`` writes the engine's module whole into its model states file: at ZeRO
    0/1/2 with fp32 weights (the strategy refuses half-precision engines) those are the trained weights themselves.
    Where that file holds less (ZeRO-3 placeholders, a half-precision engine's rounded copies), the fp32 master
    weights are gathered from every rank's optimizer partitions with DeepSpeed's ``zero_to_fp32``."""
    trainer = os.path.join(folder, TRAINER_FILE)
    if os.path.isfile(trainer):
        state = safe_load(trainer)
        if "model" not in state:
            raise InputError(f"{trainer}: holds no model weights (not written by htr-dist?)")
        return state["model"], {k: state[k] for k in CLIENT_KEYS if k in state}, TRAINER_FILE
    found = [os.path.join(folder, n) for n in DEEPSPEED_MODEL_FILES if os.path.isfile(os.path.join(folder, n))]
    if not found:
        raise InputError(f"{folder}: not an htr-dist checkpoint (neither {TRAINER_FILE} nor {DEEPSPEED_MODEL_FILES[0]})")
    ds_file = found[0]
    state = safe_load(ds_file, allowed=deepspeed_safe_globals())
    client = {k: state[k] for k in CLIENT_KEYS if k in state}
    module = state.get("module") or {}
    stage = (state.get("ds_config") or {}).get("zero_optimization", {}).get("stage", 0)
    shapes = {name: tuple(shape) for group in state.get("param_shapes") or [] for name, shape in group.items()}
    whole = stage < 3 and bool(shapes) and all(
        name in module and tuple(module[name].shape) == shape and module[name].dtype == torch.float32
        for name, shape in shapes.items())
    if whole:
        return dict(module), client, f"{os.path.basename(ds_file)} (ZeRO stage {stage}, fp32 module weights)"
    return gather_zero_fp32(folder), client, f"fp32 partitions of the optimizer states (ZeRO stage {stage})"


def gather_zero_fp32(folder: str) -> dict:
    """A DeepSpeed checkpoint's fp32 master weights (and buffers), gathered from every rank's optimizer partition
    with DeepSpeed's ``zero_to_fp32``, in this process, with every file read by :func:`safe_load`."""
    from deepspeed.utils import zero_to_fp32

    allowed = list(deepspeed_safe_globals())
    torch_load = torch.load

    def load(path, map_location=None, **_):  # zero_to_fp32 asks for weights_only=False: nothing in the files runs
        with torch.serialization.safe_globals(allowed):
            return torch_load(path, map_location=map_location or "cpu", weights_only=True)

    parent, tag = os.path.split(os.path.abspath(folder))
    try:
        with mock.patch.object(torch, "load", load), contextlib.redirect_stdout(io.StringIO()):
            return zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint(parent, tag)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError, KeyError, IndexError) as err:
        raise InputError(f"{folder}: cannot gather the ZeRO partitions ({first_line(err)})") from None
