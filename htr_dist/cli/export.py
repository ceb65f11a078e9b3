"""Export a trained recogniser for inference, in one CPU process, from a run, a checkpoint or an exported model.

SOURCE is a run folder (its newest intact checkpoint; --step N for step N's, --best for its best_model.pt), a
checkpoint folder (runs/x/checkpoints/step_0000600) of any strategy (ddp, fsdp, deepspeed at any ZeRO stage), or an
exported model.pt / best_model.pt. DIR receives:

  model.pt           as training exports it (launch/evaluate.py, launch/recognize.py, Recognizer.load read it)
  model.safetensors  the same weights (backbone, CTC heads, the connector of a run with a teacher; never the LLM)
  model.json         what rebuilds the model around them: config, alphabet, input size, teacher name, source
  model.onnx         with --onnx: images (B, 1, H, W) -> main CTC head logits (T, B, C), checked with onnxruntime

Every file is written under a temporary name and renamed into place once all of them are done; a damaged or unsealed
checkpoint is refused and nothing is written.

    htr-export runs/demo --out exported/demo --onnx
    htr-export runs/demo/checkpoints/step_0000600 --out exported/step600
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import torch
from tqdm import tqdm

from htr_dist.config import Config, ConfigError, from_dict, int_at_least
from htr_dist.data.alphabet import Alphabet
from htr_dist.decode import DecodeSettings
from htr_dist.errors import InputError, first_line
from htr_dist.inference import SAFETENSORS_FILE, read_export
from htr_dist.models.connector import llm_hidden_of
from htr_dist.models.htr import HTRModel
from htr_dist.train.checkpoint import (DEEPSPEED_MODEL_FILES, INTEGRITY, STEP_DIR, TRAINER_FILE, CheckpointManager,
                                       read_trainable, verify)
from htr_dist.train.export import BEST_FILE, export_blob, export_model, write_safetensors_pair

log = logging.getLogger("export")
MODEL_FILE, JSON_FILE, ONNX_FILE = "model.pt", "model.json", "model.onnx"


class ExportError(InputError):
    """The source cannot be exported; the message names it and why."""


@dataclass
class Source:
    """A trained model read back, with where it came from."""

    model: HTRModel
    cfg: Config
    alphabet: str
    describe: str
    record: dict
    validation: Optional[dict] = None
    beside: List[str] = field(default_factory=list)  # files to copy along (decoding settings of an export)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="htr-export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", metavar="SOURCE", help="run folder, checkpoint folder, or exported model.pt")
    p.add_argument("--out", required=True, metavar="DIR", help="folder to write the exports into (made if missing)")
    p.add_argument("--onnx", action="store_true",
                   help="also write model.onnx and check it with onnxruntime (needs pip install 'htr-dist[onnx]')")
    pick = p.add_mutually_exclusive_group()
    pick.add_argument("--step", type=int_at_least(0), default=None, metavar="N",
                      help="with a run folder: its checkpoint of step N (default: the newest intact one)")
    pick.add_argument("--best", action="store_true", help="with a run folder: its best_model.pt")
    p.add_argument("--check-images", nargs="+", default=[], metavar="IMAGE",
                   help="line images the ONNX check reads (default: seeded random canvases at three widths)")
    return p.parse_args(argv)


def resolve(source: str, step: Optional[int], best: bool) -> tuple:
    """("checkpoint", folder) or ("export", file) for SOURCE and the run-folder options."""
    if os.path.isfile(source):
        if step is not None or best:
            raise ExportError(f"{source}: --step and --best choose within a run folder, and this is a file")
        return "export", source
    if not os.path.isdir(source):
        raise ExportError(f"{source}: no such file or folder")
    if is_checkpoint(source):
        if step is not None or best:
            raise ExportError(f"{source}: --step and --best choose within a run folder, and this is a checkpoint")
        return "checkpoint", source
    if best:
        path = os.path.join(source, BEST_FILE)
        if not os.path.isfile(path):
            raise ExportError(f"{source}: no {BEST_FILE} in this run folder (train.keep_best was off, or the run never "
                              "validated)")
        return "export", path
    ckpts = CheckpointManager(source, keep_last=0)
    if step is not None:
        folder = os.path.join(ckpts.root, f"step_{step:07d}")
        if not os.path.isdir(folder):
            have = ", ".join(str(int(STEP_DIR.match(n).group(1))) for n in ckpts.list()) or "none"
            raise ExportError(f"{source}: no checkpoint of step {step} (steps kept: {have})")
        return "checkpoint", folder
    if not ckpts.list():
        raise ExportError(f"{source}: not a run folder with checkpoints, a checkpoint folder or an exported model "
                          f"(for the run's exports pass {os.path.join(source, MODEL_FILE)} or --best)")
    folder, skipped = ckpts.newest_intact()
    for bad, why in skipped:
        log.warning("skipping %s: %s", bad, why)
    if folder is None:
        raise ExportError(f"{ckpts.root}: no intact checkpoint ({len(skipped)} damaged, newest: {skipped[0][1]})")
    return "checkpoint", folder


def is_checkpoint(folder: str) -> bool:
    names = set(os.listdir(folder))
    return bool(names & {INTEGRITY, TRAINER_FILE, *DEEPSPEED_MODEL_FILES}) or bool(STEP_DIR.match(os.path.basename(
        os.path.normpath(folder))))


def rebuild(state_dict: dict, config: dict, alphabet: str, num_classes: Optional[int], where: str):
    """The model (contiguous, eval mode) and config that ``state_dict`` was trained as."""
    try:
        cfg = from_dict(config)
        model = HTRModel(cfg.arch, cfg.connector, num_classes or Alphabet(alphabet).num_classes, cfg.data.img_height,
                         cfg.data.img_width, llm_hidden_of(state_dict), channels_last=False)
        model.load_state_dict(state_dict)
    except (ConfigError, ValueError, RuntimeError, KeyError, TypeError) as err:
        raise ExportError(f"{where}: cannot rebuild the model from it ({first_line(err)})") from None
    bad = [k for k, v in state_dict.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise ExportError(f"{where}: {len(bad)} weight tensor(s) are not finite (e.g. {bad[0]}): the run diverged "
                          "there; export an earlier checkpoint")
    return model.eval(), cfg


def load_checkpoint(folder: str) -> Source:
    """A sealed, intact checkpoint's trainable weights, in this process whatever strategy wrote them."""
    if not os.path.isfile(os.path.join(folder, INTEGRITY)):
        raise ExportError(f"{folder}: not sealed (no {INTEGRITY}): a save that did not finish, or an older htr-dist; "
                          "refusing to export it")
    why = verify(folder)
    if why is not None:
        raise ExportError(f"{folder}: damaged checkpoint: {why}")
    state_dict, client, how = read_trainable(folder)
    for key in ("config", "alphabet"):
        if key not in client:
            raise ExportError(f"{folder}: the checkpoint holds no {key} (not written by htr-dist's training loop?)")
    model, cfg = rebuild(state_dict, client["config"], client["alphabet"], None, folder)
    step = client.get("position", {}).get("step")
    record = {"kind": "checkpoint", "path": os.path.abspath(folder), "step": step, "strategy": cfg.dist.strategy,
              "weights_from": how}
    return Source(model, cfg, client["alphabet"], f"{folder} (step {step}, {cfg.dist.strategy}; weights from {how})",
                  record)


def load_export_file(path: str) -> Source:
    blob = read_export(path)
    try:
        model, cfg = rebuild(blob["state_dict"], blob["config"], blob["alphabet"], blob.get("num_classes"), path)
    except KeyError as err:
        raise ExportError(f"{path}: exported model lacks its {err} entry") from None
    validation = blob.get("validation")
    settings = DecodeSettings.path_for(path)
    record = {"kind": "export", "path": os.path.abspath(path)}
    if isinstance(validation, dict) and "step" in validation:
        record["step"] = validation["step"]
    return Source(model, cfg, blob["alphabet"], path, record, validation,
                  [settings] if os.path.isfile(settings) else [])


def write_all(src: Source, out: str, onnx: bool, check_images: List[str]) -> Tuple[List[str], str]:
    """Write every output under a temporary name in ``out``, check the ONNX graph, then rename them all into place;
    the files written and the ONNX check's summary ('' without ``--onnx``)."""
    made_out = not os.path.isdir(out)
    os.makedirs(out, exist_ok=True)
    stage = tempfile.mkdtemp(prefix=".htr-export-", dir=out)
    staged = {name: os.path.join(stage, name) for name in (MODEL_FILE, SAFETENSORS_FILE, JSON_FILE)}
    steps = ["model.pt", "safetensors"] + (["onnx", "onnx check"] if onnx else [])
    bar = tqdm(steps, desc="export", unit="file", disable=not sys.stderr.isatty())
    try:
        bar.set_postfix_str(MODEL_FILE)
        export_model(src.model, src.cfg, src.alphabet, staged[MODEL_FILE], src.validation)
        bar.update(1)
        blob = export_blob(src.model, src.cfg, src.alphabet, src.validation)
        blob["source"] = src.record
        checked = ""
        if onnx:
            checked = write_onnx(src, blob, os.path.join(stage, ONNX_FILE), check_images, bar)
            staged[ONNX_FILE] = os.path.join(stage, ONNX_FILE)
        bar.set_postfix_str(SAFETENSORS_FILE)
        write_safetensors_pair(blob, staged[SAFETENSORS_FILE], staged[JSON_FILE])
        bar.update(1)
        for extra in src.beside:  # tuned decoding settings serve model.pt and model.safetensors alike
            name = DecodeSettings.path_for(MODEL_FILE)
            staged[name] = shutil.copy(extra, os.path.join(stage, name))
        for name, tmp in staged.items():
            os.replace(tmp, os.path.join(out, name))
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        if made_out and not os.listdir(out):
            os.rmdir(out)
        raise
    finally:
        bar.close()
    shutil.rmtree(stage, ignore_errors=True)
    if not onnx and os.path.isfile(os.path.join(out, ONNX_FILE)):
        log.warning("%s is from an earlier export: it is not of these weights (pass --onnx to replace it)",
                    os.path.join(out, ONNX_FILE))
    return [os.path.join(out, name) for name in staged], checked


def write_onnx(src: Source, blob: dict, path: str, check_images: List[str], bar) -> str:
    """model.onnx at ``path``, checked against the model (the check's summary is returned); its record goes into
    ``blob``, for model.json."""
    from htr_dist.onnx_export import (check_batches, check_onnx, describe_check, export_onnx, onnx_record, onnx_width,
                                      width_multiple)

    height, width = src.cfg.data.img_height, src.cfg.data.img_width
    multiple = width_multiple(src.model.backbone)
    bar.set_postfix_str(ONNX_FILE)
    export_onnx(src.model, path, height, onnx_width(width, multiple),
                {"alphabet": src.alphabet, "img_height": height, "width_multiple": multiple, "blank": 0})
    bar.update(1)
    bar.set_postfix_str("onnxruntime check")
    result = check_onnx(path, src.model, check_batches(height, width, multiple, check_images))
    bar.update(1)
    blob["onnx"] = dict(onnx_record(height, multiple), check=result)
    return describe_check(result)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.onnx:
            from htr_dist.onnx_export import require_onnx

            require_onnx()
        kind, path = resolve(args.source, args.step, args.best)
        src = load_checkpoint(path) if kind == "checkpoint" else load_export_file(path)
        print(f"source: {src.describe}")
        files, checked = write_all(src, args.out, args.onnx, args.check_images)
        if checked:
            print(checked)
        print("wrote " + ", ".join(files))
    except InputError as err:  # a missing, damaged or foreign source; the message names it
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0
