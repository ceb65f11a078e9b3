"""Preprocessing and augmentation of line images: pure functions of a gray uint8 array (and a numpy Generator).

Lines arrive as IAM stores them: dark ink on light paper. The network sees a fixed H x W float image, inverted to
[0, 1] (ink = 1), the line scaled to fit keeping its aspect ratio, centred, and padded with 0.

Augmentation (training only) follows Retsinas et al.: random rescale, affine with shear and a slight rotation, a
grid (elastic-like) distortion, dilation or erosion, brightness, contrast and gamma. The resize to H x W and every
geometric change happen in ONE PIL mesh transform (C code, bilinear), which is why augmentation costs about as much as
the plain resize; morphology is a separable numpy min/max on the uint8 result, and all the photometry is one lookup
in a 256-entry table.
"""

from __future__ import annotations

import math
from typing import Tuple

import numpy as np
from PIL import Image

PAPER = 255
_INVERT = 1.0 - np.arange(256, dtype=np.float32) / np.float32(255.0)  # gray level -> ink in [0, 1]


def gray8(im: Image.Image) -> np.ndarray:
    """A PIL image of any mode -> 8-bit gray (h, w) uint8, dark ink on light paper as it was drawn.

    Two cases PIL's ``convert("L")`` gets wrong for scans: 16- and 32-bit gray (``I;16``, ``I``, ``F``) it clips to
    255 instead of rescaling, which turns a 16-bit scan into a white page; and transparency it drops, which turns
    dark ink on a transparent (black) background into a black page. Here deep gray is rescaled by its bit depth
    (floats by 1.0 as white) and transparent pixels become paper.
    """
    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        a = np.asarray(im, dtype=np.float64)
        top = 65535.0 if im.mode.startswith("I;16") or a.max() <= 65535 else 4294967295.0
        return np.clip(np.rint(a * (255.0 / top)), 0, 255).astype(np.uint8)
    if im.mode == "F":
        return np.clip(np.rint(np.asarray(im, dtype=np.float64) * 255.0), 0, 255).astype(np.uint8)
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        paper = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        im = Image.alpha_composite(paper, rgba)
    return np.asarray(im.convert("L"), dtype=np.uint8)


def _fit(h: int, w: int, height: int, width: int) -> float:
    return min(height / h, width / w)


def preprocess(img: np.ndarray, height: int, width: int) -> np.ndarray:
    """Gray uint8 (h, w) -> float32 (height, width) in [0, 1], inverted, aspect kept, centred, zero-padded."""
    if img.ndim != 2 or img.dtype != np.uint8:
        raise ValueError(f"expected a 2-D uint8 gray image, got shape {img.shape} dtype {img.dtype}")
    h, w = img.shape
    s = _fit(h, w, height, width)
    nh, nw = max(1, min(height, round(h * s))), max(1, min(width, round(w * s)))
    small = np.asarray(Image.fromarray(img).resize((nw, nh), Image.BILINEAR), dtype=np.uint8)
    out = np.zeros((height, width), dtype=np.float32)
    top, left = (height - nh) // 2, (width - nw) // 2
    out[top : top + nh, left : left + nw] = _INVERT[small]
    return out


def _inverse_map(h: int, w: int, height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """2x3 matrix mapping output (u, v, 1) to source (x, y): random rescale, shear, rotation, placement."""
    shrink = rng.uniform(0.7, 1.0)
    shear = rng.uniform(-0.35, 0.35)  # slant: x' = x + shear * (y - centre)
    angle = math.radians(rng.uniform(-1.5, 1.5))
    c, si = math.cos(angle), math.sin(angle)
    # forward: source centred -> shear -> rotate -> scale -> placed in the output
    unit = np.array([[c, -si], [si, c]]) @ np.array([[1.0, shear], [0.0, 1.0]])
    # the scale that fits the sheared, rotated box (not just the line) into the canvas, then a random shrink: the
    # corners of the line stay inside, so the label still matches the image
    box_w = abs(unit[0, 0]) * w + abs(unit[0, 1]) * h
    box_h = abs(unit[1, 0]) * w + abs(unit[1, 1]) * h
    fwd = _fit(box_h, box_w, height, width) * shrink * unit
    out_w = abs(fwd[0, 0]) * w + abs(fwd[0, 1]) * h
    out_h = abs(fwd[1, 0]) * w + abs(fwd[1, 1]) * h
    cu = width / 2 + rng.uniform(-0.5, 0.5) * max(0.0, width - out_w)
    cv = height / 2 + rng.uniform(-0.5, 0.5) * max(0.0, height - out_h)
    inv = np.linalg.inv(fwd)
    offset = np.array([w / 2, h / 2]) - inv @ np.array([cu, cv])
    return np.hstack([inv, offset[:, None]])


def _mesh(inv: np.ndarray, height: int, width: int, rng: np.random.Generator, cols: int = 12, rows: int = 3,
          jitter: float = 0.0) -> list:
    """PIL MESH spec: output cells and the (jittered) source quads they sample from."""
    us = np.linspace(0, width, cols + 1)
    vs = np.linspace(0, height, rows + 1)
    uu, vv = np.meshgrid(us, vs)  # (rows+1, cols+1)
    pts = np.stack([uu, vv, np.ones_like(uu)], -1) @ inv.T  # (rows+1, cols+1, 2) source points
    if jitter:
        pts = pts + rng.normal(0.0, jitter, pts.shape)
    mesh = []
    for j in range(rows):
        for i in range(cols):
            box = (int(us[i]), int(vs[j]), int(us[i + 1]), int(vs[j + 1]))
            nw, sw, se, ne = pts[j, i], pts[j + 1, i], pts[j + 1, i + 1], pts[j, i + 1]
            mesh.append((box, (*nw, *sw, *se, *ne)))
    return mesh


def augment_preprocess(img: np.ndarray, height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """Training version of :func:`preprocess`: the same output format, with the reference augmentations."""
    h, w = img.shape
    inv = _inverse_map(h, w, height, width, rng)
    # grid distortion: move each mesh vertex by a few source pixels (relative to the line's height)
    jitter = rng.uniform(0.0, 0.03) * h if rng.random() < 0.5 else 0.0
    pil = Image.fromarray(img).transform((width, height), Image.MESH, _mesh(inv, height, width, rng, jitter=jitter),
                                         Image.BILINEAR, fillcolor=PAPER)
    gray = np.asarray(pil, dtype=np.uint8)
    r = rng.random()
    if r < 0.25:
        gray = morph3(gray, np.minimum)  # thicker (dark) ink: dilation of the strokes
    elif r < 0.5:
        gray = morph3(gray, np.maximum)  # thinner ink: erosion
    gamma = math.exp(rng.uniform(-0.4, 0.4))
    contrast = rng.uniform(0.7, 1.2)  # of the ink
    brightness = rng.uniform(-0.05, 0.1)  # of the paper
    return photometric_lut(gamma, contrast, brightness)[gray]


def morph3(img: np.ndarray, op) -> np.ndarray:
    """3 x 3 minimum (``op=np.minimum``) or maximum filter with edge replication, as two separable passes.

    The same pixels as PIL's ``MinFilter(3)`` / ``MaxFilter(3)`` (tests compare them), ten times faster at 128 x 1024.
    """
    p = np.pad(img, 1, mode="edge")
    rows = op(op(p[:, :-2], p[:, 1:-1]), p[:, 2:])  # (h + 2, w)
    return op(op(rows[:-2], rows[1:-1]), rows[2:])  # (h, w)


def photometric_lut(gamma: float, contrast: float, brightness: float) -> np.ndarray:
    """float32 table over the 256 gray levels: invert to ink = 1, gamma, contrast, brightness, clip to [0, 1].

    Every photometric change is a function of the pixel's gray level alone, so one table lookup replaces five
    passes over the float image.
    """
    x = np.power(_INVERT, np.float32(gamma))
    x *= np.float32(contrast)
    x += np.float32(brightness)
    return np.clip(x, 0.0, 1.0, out=x)


def batch_shape(height: int, width: int) -> Tuple[int, int, int]:
    return 1, height, width
