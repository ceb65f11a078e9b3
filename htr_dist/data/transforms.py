"""Preprocessing and augmentation of line images: pure functions of a gray uint8 array (and a numpy Generator).

Lines arrive as IAM stores them: dark ink on light paper. The network sees a fixed H x W float image, inverted to
[0, 1] (ink = 1), the line scaled to fit keeping its aspect ratio, centred, and padded with 0.

Augmentation (training only) follows the HTR literature (Retsinas et al.'s rescale, affine, distortion, morphology and
photometry; elastic distortion as in Simard et al.; blur, noise and uneven shading of scans), in six parts that
:class:`AugmentParts` switches one by one. Each part keeps the output size, the polarity (ink high, paper low) and the
whole line inside the canvas, so the label still matches the image:

* ``affine``: rescale, slant (shear), slight rotation and placement (:func:`_affine_inverse`);
* ``elastic``: a smooth random displacement of the vertices of a mesh over the canvas (:func:`_elastic_quads`);
* ``morph``: 3 x 3 dilation or erosion of the strokes (:func:`morph3`);
* ``blur``: a light Gaussian blur (:func:`blur8`);
* ``noise``: additive Gaussian noise on the float output;
* ``contrast``: gamma, contrast and brightness (:func:`photometric_lut`) and a smooth shading field across the line.

Cost: the resize to H x W and every geometric change happen in ONE PIL transform (C code, bilinear; an affine
transform, or a mesh of quads where the elastic part runs): a single pass over the output pixels, like the plain
resize. Morphology and blur are separable integer passes on the uint8 result, the global photometry is one lookup in
a 256-entry table, the shading two in-place products with a row and a column profile, and the noise a window of a
fixed table of Gaussian numbers added in place. No per-pixel Python, no scipy.

Random draws: a call draws the same numbers in the same order whatever the parts (a vector of uniforms, then the
elastic field's normals), so switching a part off leaves every other part's parameters as they were, and the same
seed gives the same output.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from typing import Tuple

import numpy as np
from PIL import Image

PAPER = 255
_INVERT = 1.0 - np.arange(256, dtype=np.float32) / np.float32(255.0)  # gray level -> ink in [0, 1]

# Parameter ranges, uniform unless said otherwise. Probabilities are per line.
SHRINK = (0.7, 1.0)  # scale, relative to the largest that fits the slanted, rotated line into the canvas
SHEAR = (-0.35, 0.35)  # slant: x' = x + shear * (y - centre), in source pixels per pixel of height
ROTATION_DEG = (-1.5, 1.5)
ELASTIC_P = 0.5
ELASTIC_AMPLITUDE = (0.02, 0.05)  # longest vertex displacement / the line's height in the canvas
ELASTIC_MAX_CELL = 0.2  # and at most this fraction of a mesh cell's side (a quarter could fold the mesh)
ELASTIC_ROWS = 4  # mesh rows of cells; the cells are about square
ELASTIC_SMOOTH = 0.7  # Gaussian smoothing of the vertex displacements, sigma in mesh cells
MORPH_P = (0.25, 0.25)  # dilation (thicker ink), erosion (thinner ink)
BLUR_P = 0.3
BLUR_SIGMA = (0.3, 0.7)  # Gaussian sigma, output pixels per 64 pixels of canvas height
NOISE_P = 0.5
NOISE_SIGMA = (0.01, 0.04)  # standard deviation, in units of the [0, 1] output
LOG_GAMMA = (-0.4, 0.4)
CONTRAST = (0.7, 1.2)  # gain on the ink
BRIGHTNESS = (-0.05, 0.1)  # offset of the paper
SHADE_P = 0.5
SHADE_ALONG = (0.0, 0.3)  # depth of a cosine profile along the line: the factor falls to 1 - depth at its trough
SHADE_CYCLES = (0.5, 2.0)  # periods of that profile per canvas width
SHADE_ACROSS = (0.0, 0.2)  # depth of a linear ramp across the line (from the top or from the bottom)

# Where each parameter sits in the vector of uniforms drawn first (see the module docstring).
(_A0, _E_ON, _E_AMP, _MORPH, _B_ON, _B_SIGMA, _N_ON, _N_SIGMA, _N_OFFSET, _GAMMA, _CONTRAST, _BRIGHT, _S_ON,
 _S_ALONG, _S_CYCLES, _S_PHASE, _S_ACROSS, _S_DIR) = (0, *range(5, 22))
_N_UNIFORMS = 22


def _lerp(bounds: Tuple[float, float], u: float) -> float:
    return bounds[0] + (bounds[1] - bounds[0]) * float(u)


@dataclass(frozen=True)
class AugmentParts:
    """Which parts of the training augmentation run (all by default); the ranges are the module constants."""

    affine: bool = True
    """Rescale (``SHRINK`` of the largest fitting scale), slant (``SHEAR``), rotation (``ROTATION_DEG``), placement."""
    elastic: bool = True
    """On ``ELASTIC_P`` of the lines: smooth mesh displacement of ``ELASTIC_AMPLITUDE`` of the line's height."""
    morph: bool = True
    """Dilation or erosion 3 x 3, each on its share ``MORPH_P`` of the lines."""
    blur: bool = True
    """On ``BLUR_P`` of the lines: Gaussian blur of sigma ``BLUR_SIGMA`` pixels per 64 pixels of canvas height."""
    noise: bool = True
    """On ``NOISE_P`` of the lines: additive Gaussian noise of standard deviation ``NOISE_SIGMA``, clipped."""
    contrast: bool = True
    """Gamma (``LOG_GAMMA``), ``CONTRAST``, ``BRIGHTNESS``; on ``SHADE_P`` of the lines a shading (:func:`shade`)."""

    @classmethod
    def names(cls) -> Tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def only(cls, *names: str) -> "AugmentParts":
        """Just the named parts; no name at all is every part off (then augmentation is :func:`preprocess`)."""
        unknown = set(names) - set(cls.names())
        if unknown:
            raise ValueError(f"unknown augmentation part(s) {sorted(unknown)}; the parts are {', '.join(cls.names())}")
        return cls(**{n: n in names for n in cls.names()})


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


def _check(img: np.ndarray) -> None:
    if img.ndim != 2 or img.dtype != np.uint8:
        raise ValueError(f"expected a 2-D uint8 gray image, got shape {img.shape} dtype {img.dtype}")


def _placement(h: int, w: int, height: int, width: int) -> Tuple[int, int, int, int]:
    """(rows, columns, top, left) of the line resized to fit the canvas, aspect kept, centred."""
    s = _fit(h, w, height, width)
    nh, nw = max(1, min(height, round(h * s))), max(1, min(width, round(w * s)))
    return nh, nw, (height - nh) // 2, (width - nw) // 2


def _fitted(img: np.ndarray, height: int, width: int) -> np.ndarray:
    """uint8 (height, width): the line resized to fit (aspect kept), centred on paper."""
    nh, nw, top, left = _placement(*img.shape, height, width)
    small = np.asarray(Image.fromarray(img).resize((nw, nh), Image.BILINEAR), dtype=np.uint8)
    canvas = np.full((height, width), PAPER, dtype=np.uint8)
    canvas[top : top + nh, left : left + nw] = small
    return canvas


def preprocess(img: np.ndarray, height: int, width: int) -> np.ndarray:
    """Gray uint8 (h, w) -> float32 (height, width) in [0, 1], inverted, aspect kept, centred, zero-padded."""
    _check(img)
    return np.take(_INVERT, _fitted(img, height, width))


def _fit_inverse(h: int, w: int, height: int, width: int) -> np.ndarray:
    """2x3 matrix mapping output (u, v, 1) to source (x, y) with :func:`preprocess`'s scale and placement."""
    nh, nw, top, left = _placement(h, w, height, width)
    return np.array([[w / nw, 0.0, -left * w / nw], [0.0, h / nh, -top * h / nh]])


def _affine_inverse(h: int, w: int, height: int, width: int, u: np.ndarray) -> np.ndarray:
    """2x3 matrix mapping output (u, v, 1) to source (x, y): rescale, shear, rotation, placement from five uniforms.

    The scale is the largest that fits the sheared, rotated box of the line (not just the line) into the canvas,
    times a random shrink, so the corners of the line stay inside and the label still matches the image.
    """
    shrink, shear = _lerp(SHRINK, u[0]), _lerp(SHEAR, u[1])
    angle = math.radians(_lerp(ROTATION_DEG, u[2]))
    c, si = math.cos(angle), math.sin(angle)
    # forward: source centred -> shear -> rotate -> scale -> placed in the output
    unit = np.array([[c, -si], [si, c]]) @ np.array([[1.0, shear], [0.0, 1.0]])
    box_w = abs(unit[0, 0]) * w + abs(unit[0, 1]) * h
    box_h = abs(unit[1, 0]) * w + abs(unit[1, 1]) * h
    fwd = _fit(box_h, box_w, height, width) * shrink * unit
    out_w = abs(fwd[0, 0]) * w + abs(fwd[0, 1]) * h
    out_h = abs(fwd[1, 0]) * w + abs(fwd[1, 1]) * h
    cu = width / 2 + (float(u[3]) - 0.5) * max(0.0, width - out_w)
    cv = height / 2 + (float(u[4]) - 0.5) * max(0.0, height - out_h)
    inv = np.linalg.inv(fwd)
    offset = np.array([w / 2, h / 2]) - inv @ np.array([cu, cv])
    return np.hstack([inv, offset[:, None]])


def _inverse_map(h: int, w: int, height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """:func:`_affine_inverse` with its five uniforms drawn from ``rng``."""
    return _affine_inverse(h, w, height, width, rng.random(5))


@functools.lru_cache(maxsize=16)
def _mesh_layout(height: int, width: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, list, int]:
    """Vertex columns ``us`` and rows ``vs`` (integer output pixels) of the elastic mesh, the smoothing matrices
    along its columns and rows, the PIL boxes of its cells (row-major) and the shortest side of a cell (pixels).
    ``ELASTIC_ROWS`` rows of about square cells; fewer where the canvas has fewer pixels, so that no cell is empty."""
    rows = max(1, min(ELASTIC_ROWS, height))
    cols = max(1, min(width, round(rows * width / height)))
    us, vs = np.arange(cols + 1) * width // cols, np.arange(rows + 1) * height // rows

    def smoother(n: int) -> np.ndarray:
        d = np.arange(n)[:, None] - np.arange(n)[None, :]
        k = np.exp(-0.5 * (d / ELASTIC_SMOOTH) ** 2)
        return k / k.sum(1, keepdims=True)

    boxes = [(int(us[i]), int(vs[j]), int(us[i + 1]), int(vs[j + 1])) for j in range(rows) for i in range(cols)]
    return us, vs, smoother(rows + 1), smoother(cols + 1), boxes, int(min(np.diff(us).min(), np.diff(vs).min()))


def _elastic_quads(inv: np.ndarray, height: int, width: int, normals: np.ndarray,
                   amplitude: float) -> Tuple[list, np.ndarray]:
    """The cells of a regular mesh over the canvas (PIL boxes) and the source quads (n, 8) they sample from, corners
    in PIL's MESH order (NW, SW, SE, NE): the mesh's vertices moved by a smooth random field, then mapped by ``inv``.

    ``normals`` (2, rows + 1, cols + 1) standard normals are smoothed by a Gaussian over the vertices
    (``ELASTIC_SMOOTH`` cells), zeroed on the canvas border and scaled so that the longest displacement is
    ``amplitude`` output pixels. The border vertices do not move, so the canvas still maps onto the same source
    quadrilateral as without the field, which holds the whole line (see :func:`_affine_inverse`). With every vertex
    moved by less than a quarter of the shortest cell side no cell folds (the Jacobian of a bilinear cell is affine
    in the cell, and positive at its four corners), so the mapping stays one-to-one and all of that quadrilateral is
    still drawn.
    """
    us, vs, smooth_v, smooth_u, boxes, _ = _mesh_layout(height, width)
    d = smooth_v @ normals @ smooth_u.T  # (2, rows + 1, cols + 1), smooth along both axes
    d[:, [0, -1], :] = 0.0
    d[:, :, [0, -1]] = 0.0
    longest = float(np.sqrt((d * d).sum(0)).max())
    if longest > 0.0:
        d *= amplitude / longest
    uu = us[None, :] + d[0]
    vv = vs[:, None] + d[1]
    src = np.stack([inv[0, 0] * uu + inv[0, 1] * vv + inv[0, 2], inv[1, 0] * uu + inv[1, 1] * vv + inv[1, 2]], -1)
    quads = np.concatenate([src[:-1, :-1], src[1:, :-1], src[1:, 1:], src[:-1, 1:]], -1).reshape(-1, 8)
    return boxes, quads


def mesh_transform(src: Image.Image, size: Tuple[int, int], boxes: list, quads: np.ndarray) -> Image.Image:
    """``src.transform(size, Image.MESH, list(zip(boxes, quads)), Image.BILINEAR, fillcolor=PAPER)``: the same
    pixels, faster.

    PIL's MESH runs a Python wrapper per cell (argument checks, loads, the quad's coefficients) before its C code;
    for the elastic mesh's hundred-odd cells that wrapper costs more than the pixels. Here the bilinear coefficients
    of every cell (source x = a0 + a1 u + a2 v + a3 u v and y likewise, (u, v) from the box's corner, as PIL derives
    them) come from one numpy computation, and each cell is one call of PIL's C transform. Where that C interface is
    missing (another PIL), the public MESH transform runs instead.
    """
    out = Image.new("L", size, PAPER)
    try:
        core, source = out.im.transform, src.im
    except AttributeError:  # a PIL without the core object
        return src.transform(size, Image.MESH, list(zip(boxes, quads.tolist())), Image.BILINEAR, fillcolor=PAPER)
    b = np.asarray(boxes, dtype=np.float64)
    q = quads
    su, sv = 1.0 / (b[:, 2] - b[:, 0]), 1.0 / (b[:, 3] - b[:, 1])
    coef = np.stack([q[:, 0], (q[:, 6] - q[:, 0]) * su, (q[:, 2] - q[:, 0]) * sv,
                     (q[:, 4] - q[:, 2] - q[:, 6] + q[:, 0]) * su * sv,
                     q[:, 1], (q[:, 7] - q[:, 1]) * su, (q[:, 3] - q[:, 1]) * sv,
                     (q[:, 5] - q[:, 3] - q[:, 7] + q[:, 1]) * su * sv], 1)
    quad, bilinear = int(Image.Transform.QUAD), int(Image.Resampling.BILINEAR)
    for box, c in zip(boxes, coef.tolist()):
        core(box, source, quad, c, bilinear, 0)  # 0: pixels with no source keep the paper of Image.new
    return out


def _geometry(img: np.ndarray, height: int, width: int, u: np.ndarray, normals: np.ndarray,
              parts: AugmentParts) -> np.ndarray:
    """The affine and elastic parts: uint8 (height, width), paper where no source pixel lands."""
    if not (parts.affine or parts.elastic):
        return _fitted(img, height, width)
    h, w = img.shape
    inv = _affine_inverse(h, w, height, width, u[_A0 : _A0 + 5]) if parts.affine else _fit_inverse(h, w, height, width)
    src = Image.fromarray(img)
    if parts.elastic and u[_E_ON] < ELASTIC_P:
        scale = 1.0 / math.sqrt(abs(np.linalg.det(inv[:, :2])))  # output pixels per source pixel
        amplitude = min(_lerp(ELASTIC_AMPLITUDE, u[_E_AMP]) * min(height, h * scale),
                        ELASTIC_MAX_CELL * _mesh_layout(height, width)[5])
        out = mesh_transform(src, (width, height), *_elastic_quads(inv, height, width, normals, amplitude))
    else:
        out = src.transform((width, height), Image.AFFINE, tuple(inv.ravel()), Image.BILINEAR, fillcolor=PAPER)
    return np.asarray(out, dtype=np.uint8)


@functools.lru_cache(maxsize=4)
def _gauss_table(n: int) -> np.ndarray:
    """A fixed float32 table of standard normal numbers (the same in every process), at least 8 x ``n`` long: the
    noise of a line is a window of ``n`` of them at a random offset, which costs an add instead of a draw."""
    return np.random.default_rng(0x6E6F697365).standard_normal(max(1 << 20, 8 * n), dtype=np.float32)


def augment_preprocess(img: np.ndarray, height: int, width: int, rng: np.random.Generator,
                       parts: AugmentParts = AugmentParts()) -> np.ndarray:
    """Training version of :func:`preprocess`: the same output format, with the ``parts`` of the augmentation.

    With every part off this is :func:`preprocess` exactly; see the module docstring for what each part does and the
    module constants for its parameter ranges.
    """
    _check(img)
    u = rng.random(_N_UNIFORMS)
    us, vs = _mesh_layout(height, width)[:2]
    normals = rng.standard_normal((2, len(vs), len(us)))
    gray = _geometry(img, height, width, u, normals, parts)
    if parts.morph:
        if u[_MORPH] < MORPH_P[0]:
            gray = morph3(gray, np.minimum)  # thicker (dark) ink: dilation of the strokes
        elif u[_MORPH] < MORPH_P[0] + MORPH_P[1]:
            gray = morph3(gray, np.maximum)  # thinner ink: erosion
    if parts.blur and u[_B_ON] < BLUR_P:
        gray = blur8(gray, _lerp(BLUR_SIGMA, u[_B_SIGMA]) * height / 64)
    if parts.contrast:
        lut = photometric_lut(math.exp(_lerp(LOG_GAMMA, u[_GAMMA])), _lerp(CONTRAST, u[_CONTRAST]),
                              _lerp(BRIGHTNESS, u[_BRIGHT]))
    else:
        lut = _INVERT
    out = np.take(lut, gray)
    if parts.contrast and u[_S_ON] < SHADE_P:
        shade(out, _lerp(SHADE_ALONG, u[_S_ALONG]), _lerp(SHADE_CYCLES, u[_S_CYCLES]), float(u[_S_PHASE]),
              _lerp(SHADE_ACROSS, u[_S_ACROSS]), bool(u[_S_DIR] < 0.5))
    if parts.noise and u[_N_ON] < NOISE_P:
        n = height * width
        table = _gauss_table(n)
        start = int(u[_N_OFFSET] * (len(table) - n))
        sigma = np.float32(_lerp(NOISE_SIGMA, u[_N_SIGMA]))
        out += table[start : start + n].reshape(height, width) * sigma
        np.clip(out, 0.0, 1.0, out=out)
    return out


def morph3(img: np.ndarray, op) -> np.ndarray:
    """3 x 3 minimum (``op=np.minimum``) or maximum filter with edge replication, as two separable passes.

    The same pixels as PIL's ``MinFilter(3)`` / ``MaxFilter(3)`` (tests compare them), ten times faster at 128 x 1024.
    """
    p = np.pad(img, 1, mode="edge")
    rows = op(op(p[:, :-2], p[:, 1:-1]), p[:, 2:])  # (h + 2, w)
    return op(op(rows[:-2], rows[1:-1]), rows[2:])  # (h, w)


@functools.lru_cache(maxsize=512)
def _blur_taps(sigma: float) -> Tuple[int, ...]:
    """Integer Gaussian taps summing to 256, radius ``max(1, ceil(2 sigma))``, symmetric."""
    r = max(1, math.ceil(2.0 * sigma))
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / max(sigma, 1e-3)) ** 2)
    taps = np.round(k / k.sum() * 256).astype(int)
    taps[r] += 256 - taps.sum()  # exact sum: a flat region keeps its gray level
    return tuple(int(t) for t in taps)


def _blur_axis(a: np.ndarray, taps: Tuple[int, ...], axis: int) -> np.ndarray:
    """One separable pass over uint16 ``a`` (values <= 255) with edge replication; the result is rounded back to
    <= 255. The largest sum, 255 * 256 + 128, fits uint16."""
    r = len(taps) // 2
    n = a.shape[axis]
    pad = [(0, 0), (0, 0)]
    pad[axis] = (r, r)
    p = np.pad(a, pad, mode="edge")

    def window(i: int) -> np.ndarray:
        return p[i : i + n] if axis == 0 else p[:, i : i + n]

    acc = window(r) * np.uint16(taps[r])
    tmp = np.empty_like(acc)
    for i in range(r):
        if taps[i]:
            np.add(window(i), window(2 * r - i), out=tmp)
            tmp *= np.uint16(taps[i])
            acc += tmp
    acc += np.uint16(128)
    acc >>= np.uint16(8)
    return acc


def blur8(img: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur of a uint8 image, ``sigma`` in pixels, edges replicated: two separable integer passes with taps
    of 1/256 resolution (a sigma under about 0.3 pixel rounds to no blur). Much cheaper than PIL's GaussianBlur at
    the small radii of augmentation."""
    taps = _blur_taps(round(float(sigma), 2))
    a = _blur_axis(img.astype(np.uint16), taps, 1)
    return _blur_axis(a, taps, 0).astype(np.uint8)


def photometric_lut(gamma: float, contrast: float, brightness: float) -> np.ndarray:
    """float32 table over the 256 gray levels: invert to ink = 1, gamma, contrast, brightness, clip to [0, 1].

    Every photometric change is a function of the pixel's gray level alone, so one table lookup replaces five
    passes over the float image.
    """
    x = np.power(_INVERT, np.float32(gamma))
    x *= np.float32(contrast)
    x += np.float32(brightness)
    return np.clip(x, 0.0, 1.0, out=x)


def shade(out: np.ndarray, along: float, cycles: float, phase: float, across: float, from_top: bool) -> None:
    """Multiply float (H, W) ``out`` in place by a smooth shading field in [(1 - along) (1 - across), 1]: the product
    of a cosine profile along the line (depth ``along``, ``cycles`` periods per canvas width, ``phase`` in periods)
    and a linear ramp across it (depth ``across``, darkest at the top or at the bottom). Uneven ink and uneven light
    on the page: the ink fades in places, the paper (if brightened) alike, and the polarity stays."""
    height, width = out.shape
    x = (np.arange(width, dtype=np.float32) + np.float32(0.5)) / np.float32(width)
    profile = np.cos(np.float32(2 * math.pi) * (np.float32(cycles) * x + np.float32(phase)))
    profile = np.float32(1.0 - along / 2) - np.float32(along / 2) * profile  # in [1 - along, 1]
    ramp = (np.arange(height, dtype=np.float32) + np.float32(0.5)) / np.float32(height)
    ramp = np.float32(1.0) - np.float32(across) * (np.float32(1.0) - ramp if from_top else ramp)
    out *= profile[None, :]
    out *= ramp[:, None]


def batch_shape(height: int, width: int) -> Tuple[int, int, int]:
    return 1, height, width
