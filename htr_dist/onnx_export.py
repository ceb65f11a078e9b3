"""The recogniser's inference path as an ONNX graph, checked against PyTorch with onnxruntime right after export.

The graph is what greedy decoding reads: ``images`` (B, 1, H, W) float32 in [0, 1], ink = 1, preprocessed as
:func:`htr_dist.data.transforms.preprocess` does, -> ``logits`` (T, B, C), the main CTC head's per-frame scores (class
0 is CTC's blank; ``log_softmax`` over C gives log-probabilities). B and W are dynamic, H is the training height.

W must be a multiple of :func:`width_multiple`: at such widths every pooling halves the map exactly and every
MobileViT block sees whole patches, the one case the graph holds (PyTorch pads a partial patch and masks it out, a
branch on the shape that a traced graph cannot keep). The exporter is TorchScript's (``dynamo=False``): it keeps the
LSTMs as ONNX LSTM nodes with dynamic batch and width, and traces far faster than torch.export's exporter, which gives
the same graph numerically.

onnx and onnxruntime are the optional extra ``htr-dist[onnx]``.
"""

from __future__ import annotations

import math
import warnings
from typing import List, Sequence

import numpy as np
import torch
import torch.nn as nn

from htr_dist.data.transforms import preprocess
from htr_dist.errors import InputError, first_line
from htr_dist.inference import read_gray
from htr_dist.models.backbone import MobileViTBlock
from htr_dist.train.metrics import greedy_decode

OPSET = 17  # LayerNormalization (the MobileViT and connector norms) is an ONNX operator from opset 17
MAX_LOGIT_DIFF = 1e-4
"""Largest absolute difference between onnxruntime's and PyTorch's logits that the check after export accepts."""
INPUT, OUTPUT = "images", "logits"


class ONNXError(InputError):
    """The ONNX export cannot be made or does not reproduce the model; the message says what and by how much."""


def require_onnx() -> None:
    """Fail with one line naming the extra when onnx or onnxruntime is not installed."""
    missing = []
    for name in ("onnx", "onnxruntime"):
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise ONNXError(f"--onnx needs {' and '.join(missing)}: pip install 'htr-dist[onnx]'")


class CTCLogits(nn.Module):
    """(B, 1, H, W) images -> (T, B, C) logits of the main CTC head: the model's forward without the connector."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)["ctc_logits"]


def width_multiple(backbone: nn.Module) -> int:
    """The width step at which the backbone divides evenly: the stem's and each 2x2 pooling's strides, and for each
    MobileViT block its patch size times the stride before it."""
    stride = backbone.stem[0].stride[1]
    step = stride
    for layer in backbone.features:
        if isinstance(layer, nn.MaxPool2d):
            stride *= 2
            step = math.lcm(step, stride)
        elif isinstance(layer, MobileViTBlock):
            step = math.lcm(step, stride * layer.patch)
    return step


def onnx_width(width: int, multiple: int) -> int:
    """``width`` rounded up to a multiple of ``multiple``."""
    return max(multiple, -(-width // multiple) * multiple)


def export_onnx(model: nn.Module, path: str, height: int, width: int, metadata: dict) -> None:
    """Write ``model``'s greedy-decoding path to ``path`` (dynamic batch and width), traced at (2, 1, height, width),
    with ``metadata`` (e.g. the alphabet) as the graph's metadata properties. ``width`` must be a multiple of
    :func:`width_multiple`; the model's backbone must not be channels_last."""
    import onnx

    sample = torch.zeros(2, 1, height, width)
    with warnings.catch_warnings():
        # the tracer's notes on shape branches (fixed by the width multiple) and the exporter's deprecation notice
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(CTCLogits(model).eval(), (sample,), path, dynamo=False, opset_version=OPSET,
                              input_names=[INPUT], output_names=[OUTPUT],
                              dynamic_axes={INPUT: {0: "batch", 3: "width"}, OUTPUT: {0: "frames", 1: "batch"}})
        except (RuntimeError, ValueError, TypeError) as err:
            raise ONNXError(f"{path}: the ONNX export failed ({first_line(err)})") from None
    graph = onnx.load(path)
    onnx.helper.set_model_props(graph, {k: str(v) for k, v in metadata.items()})
    onnx.save(graph, path)


def check_batches(height: int, width: int, multiple: int, images: Sequence[str] = ()) -> List[torch.Tensor]:
    """The batches that :func:`check_onnx` compares, (B, 1, height, W) each: ``images`` (line image files),
    preprocessed as inference does at their fitted width rounded to ``multiple``, one batch per width; without
    images, seeded random canvases at three widths and batch sizes 1-3."""
    cap = max(multiple, width // multiple * multiple)
    if not images:
        gen = torch.Generator().manual_seed(0)
        widths = sorted({cap, onnx_width(cap // 2, multiple), min(cap, onnx_width(64, multiple))})
        return [torch.rand(n, 1, height, w, generator=gen) for n, w in zip((1, 3, 2), widths)]
    by_width: dict = {}
    for path in images:
        img = read_gray(path)
        need = math.ceil(img.shape[1] * height / max(1, img.shape[0]))
        w = min(cap, onnx_width(need, multiple))
        by_width.setdefault(w, []).append(preprocess(img, height, w))
    return [torch.from_numpy(np.stack(arrs)).unsqueeze(1) for _, arrs in sorted(by_width.items())]


@torch.inference_mode()
def check_onnx(path: str, model: nn.Module, batches: Sequence[torch.Tensor]) -> dict:
    """Run ``path`` with onnxruntime (CPU) and ``model`` on every batch: the largest absolute logit difference and on
    how many lines the greedy paths agree. Raises :class:`ONNXError` past :data:`MAX_LOGIT_DIFF` or on any other
    greedy path."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # its warnings about shapes that the dynamic axes make differ from the traced ones
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    diff, same, lines = 0.0, 0, 0
    for images in batches:
        want = model(images)["ctc_logits"]  # (T, B, C)
        got = torch.from_numpy(session.run([OUTPUT], {INPUT: images.numpy()})[0])
        if got.shape != want.shape:
            raise ONNXError(f"{path}: onnxruntime gives logits of shape {tuple(got.shape)} for images "
                            f"{tuple(images.shape)}, PyTorch {tuple(want.shape)}")
        diff = max(diff, float((got - want).abs().max()))
        same += sum(a == b for a, b in zip(greedy_decode(got), greedy_decode(want)))
        lines += images.shape[0]
    widths = sorted({int(b.shape[3]) for b in batches})
    result = {"lines": lines, "widths": widths, "max_abs_diff": diff, "same_text": same}
    if diff > MAX_LOGIT_DIFF or same != lines:
        raise ONNXError(f"{path}: onnxruntime does not reproduce the model: max |logit difference| {diff:.2e} "
                        f"(limit {MAX_LOGIT_DIFF:.0e}), greedy text equal on {same}/{lines} lines")
    return result


def describe_check(result: dict) -> str:
    widths = "/".join(str(w) for w in result["widths"])
    return (f"onnx check: {result['lines']} lines at widths {widths}: max |logit difference| "
            f"{result['max_abs_diff']:.2e} (limit {MAX_LOGIT_DIFF:.0e}), greedy text equal on "
            f"{result['same_text']}/{result['lines']} lines")


def onnx_record(height: int, multiple: int) -> dict:
    """What ``model.json`` says of ``model.onnx``: its input and output and the shapes they take."""
    return {"file": "model.onnx", "input": INPUT, "input_shape": ["batch", 1, height, "width"],
            "width_multiple": multiple, "output": OUTPUT, "output_shape": ["frames", "batch", "classes"],
            "opset": OPSET}

