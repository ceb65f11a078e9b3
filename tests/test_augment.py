"""Training augmentation (htr_dist.data.transforms): each part alone and all together keep the output format, the ink
polarity and the whole line inside the canvas; a seed reproduces a line; every part off is plain preprocessing; the
config's aug_* keys reach the training dataset."""

import dataclasses
import itertools

import numpy as np
import pytest
from PIL import Image

from htr_dist.config import describe_keys, load_config
from htr_dist.data import transforms as T
from htr_dist.data.alphabet import Alphabet
from htr_dist.data.pipeline import augment_parts, build_train_loader
from htr_dist.data.shards import png_bytes, write_manifest, write_split
from htr_dist.data.transforms import AugmentParts, augment_preprocess, preprocess

NAMES = AugmentParts.names()
PART_SETS = {name: AugmentParts.only(name) for name in NAMES} | {"all": AugmentParts()}
LINES = [(16, 128), (40, 400), (60, 200), (105, 1677), (128, 128)]  # (h, w) of the source line
CANVASES = [(32, 256), (64, 512)]
SEEDS = range(6)


def bar_line(h: int, w: int, ink: int = 20, paper: int = 245) -> np.ndarray:
    """A thick dark bar (the middle half of the rows, the middle 3/4 of the columns) on light paper."""
    img = np.full((h, w), paper, np.uint8)
    img[h // 4 : h - h // 4, w // 8 : w - w // 8] = ink
    return img


def shrink(mask: np.ndarray, r: int) -> np.ndarray:
    """``mask`` eroded by ``r`` pixels (a square neighbourhood), so that edge effects stay out of it."""
    m = mask.astype(np.uint8)
    for _ in range(r):
        m = T.morph3(m, np.minimum)
    return m.astype(bool)


@pytest.mark.parametrize("parts", PART_SETS.values(), ids=PART_SETS.keys())
def test_output_has_the_requested_shape_dtype_and_range(parts):
    rng = np.random.default_rng(7)
    for (h, w), (height, width), seed in itertools.product(LINES, CANVASES, SEEDS):
        img = rng.integers(0, 256, (h, w), dtype=np.uint8)
        out = augment_preprocess(img, height, width, np.random.default_rng(seed), parts)
        assert out.shape == (height, width) and out.dtype == np.float32
        assert np.isfinite(out).all() and out.min() >= 0.0 and out.max() <= 1.0


@pytest.mark.parametrize("parts", PART_SETS.values(), ids=PART_SETS.keys())
def test_ink_stays_brighter_than_the_paper(parts):
    """Where the bar lands (found from the same seed's geometry alone: the parts draw their numbers independently),
    the output is well above the paper and the padding around it."""
    geometry_only = AugmentParts.only(*[n for n in ("affine", "elastic") if getattr(parts, n)])
    for (h, w), (height, width), seed in itertools.product(LINES[1:], CANVASES, SEEDS):
        img = bar_line(h, w)
        out = augment_preprocess(img, height, width, np.random.default_rng(seed), parts)
        geo = augment_preprocess(img, height, width, np.random.default_rng(seed), geometry_only)
        bar, paper = shrink(geo > 0.8, 2), shrink(geo < 0.1, 3)
        assert 20 < bar.sum() < paper.sum()  # the bar is 3/8 of the line: the geometry alone kept the polarity too
        assert out[bar].mean() > out[paper].mean() + 0.15, (h, w, height, width, seed)


def corner_ramps(h: int, w: int) -> list:
    """Four lines, each darkest (gray 1) at one corner and lighter (to gray 254) with the distance from it, measured
    as max(dx / (w - 1), dy / (h - 1)): the output reaches that darkest ink only if the corner is still in the canvas.
    Bilinear sampling reproduces a linear ramp exactly, so the darkest output tells how close to the corner the
    samples came."""
    fx, fy = np.arange(w) / max(1, w - 1), np.arange(h) / max(1, h - 1)
    return [np.rint(1 + 253 * np.maximum(gx[None, :], gy[:, None])).astype(np.uint8)
            for gx in (fx, fx[::-1]) for gy in (fy, fy[::-1])]


@pytest.mark.parametrize("parts", [AugmentParts.only("affine"), AugmentParts.only("elastic"),
                                   AugmentParts.only("affine", "elastic")], ids=["affine", "elastic", "both"])
@pytest.mark.parametrize("h, w", [(16, 128), (60, 200), (128, 128), (200, 1000), (120, 1200)])
def test_every_corner_of_the_line_stays_in_the_canvas(parts, h, w):
    """Each corner of the source shows up in the output, up to what sampling may step over: the output pixel nearest
    to the corner lands up to one output pixel inside it, and within half a source pixel of the border bilinear
    sampling sees the border pixel itself. The displacing parts are the geometric ones; the others act per pixel or
    within a few pixels. (An elastic mesh whose border moved fails here for the downscaled lines.)"""
    height, width = 64, 512
    fit = min(height / h, width / w) * (T.SHRINK[0] if parts.affine else 1.0)  # least output pixels per source pixel
    lost = (1.0 / fit + 0.5) / (min(h, w) - 1)  # as a fraction of the shorter side (the ramp's max-norm)
    reachable = (254 - 253 * lost) / 255
    for seed in range(12):
        for img in corner_ramps(h, w):
            out = augment_preprocess(img, height, width, np.random.default_rng(seed), parts)
            assert out.max() >= reachable - 1e-6, (seed, out.max(), reachable)


@pytest.mark.parametrize("height, width", [(64, 512), (128, 1024), (16, 64), (33, 47), (128, 128), (3, 7)])
def test_elastic_mesh_pins_the_canvas_border_and_never_folds(height, width):
    """The proof behind the elastic part: the border vertices map where the affine map sends them (so the canvas
    covers the same source quadrilateral) and every cell keeps its orientation at its four corners (its bilinear
    Jacobian is affine over the cell, so it is positive everywhere): the mesh is one-to-one."""
    us, vs, _, _, boxes, cell = T._mesh_layout(height, width)
    assert len(boxes) == (len(us) - 1) * (len(vs) - 1) and all(b[2] > b[0] and b[3] > b[1] for b in boxes)
    identity = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    for seed in range(50):
        normals = np.random.default_rng(seed).standard_normal((2, len(vs), len(us)))
        amplitude = T.ELASTIC_MAX_CELL * cell  # the largest the augmentation uses
        _, quads = T._elastic_quads(identity, height, width, normals, amplitude)
        q = quads.reshape(len(vs) - 1, len(us) - 1, 4, 2)  # NW, SW, SE, NE
        nw, sw, se, ne = q[..., 0, :], q[..., 1, :], q[..., 2, :], q[..., 3, :]
        # the border vertices do not move
        assert np.array_equal(nw[0, :, 1], np.zeros(len(us) - 1)) and np.array_equal(nw[0, :, 0], us[:-1])
        assert np.array_equal(sw[-1, :, 1], np.full(len(us) - 1, height)) and np.array_equal(se[-1, :, 0], us[1:])
        assert np.array_equal(nw[:, 0, 0], np.zeros(len(vs) - 1)) and np.array_equal(nw[:, 0, 1], vs[:-1])
        assert np.array_equal(ne[:, -1, 0], np.full(len(vs) - 1, width)) and np.array_equal(se[:, -1, 1], vs[1:])
        moved = np.hypot(nw[..., 0] - us[None, :-1], nw[..., 1] - vs[:-1, None])
        assert moved.max() <= amplitude + 1e-9

        def cross(a, b):
            return a[..., 0] * b[..., 1] - a[..., 1] * b[..., 0]

        for du, dv in ((ne - nw, sw - nw), (ne - nw, se - ne), (se - sw, sw - nw), (se - sw, se - ne)):
            assert cross(du, dv).min() > 0.0


def test_mesh_transform_matches_pils_mesh():
    img = np.random.default_rng(0).integers(0, 256, (90, 700), dtype=np.uint8)
    src = Image.fromarray(img)
    for height, width in ((64, 512), (16, 64), (3, 7)):
        inv = T._affine_inverse(90, 700, height, width, np.random.default_rng(1).random(5))
        us, vs = T._mesh_layout(height, width)[:2]
        normals = np.random.default_rng(2).standard_normal((2, len(vs), len(us)))
        boxes, quads = T._elastic_quads(inv, height, width, normals, 0.2 * T._mesh_layout(height, width)[5])
        want = src.transform((width, height), Image.MESH, list(zip(boxes, quads.tolist())), Image.BILINEAR,
                             fillcolor=T.PAPER)
        assert np.array_equal(np.asarray(T.mesh_transform(src, (width, height), boxes, quads)), np.asarray(want))


@pytest.mark.parametrize("parts", PART_SETS.values(), ids=PART_SETS.keys())
def test_a_seed_reproduces_a_line_and_seeds_differ(parts):
    img = bar_line(60, 500)
    outs = [augment_preprocess(img, 32, 256, np.random.default_rng(seed), parts) for seed in range(8)]
    again = [augment_preprocess(img, 32, 256, np.random.default_rng(seed), parts) for seed in range(8)]
    assert all(np.array_equal(a, b) for a, b in zip(outs, again))
    distinct = {a.tobytes() for a in outs}
    # parts applied to every line change every line; the others (morph, blur, noise, elastic) to some of them
    assert len(distinct) == 8 if parts.affine or parts.contrast else len(distinct) >= 2


def test_every_part_off_is_exactly_preprocess():
    rng = np.random.default_rng(3)
    for (h, w), (height, width), seed in itertools.product(LINES, CANVASES + [(128, 1024)], SEEDS):
        img = rng.integers(0, 256, (h, w), dtype=np.uint8)
        want = preprocess(img, height, width)
        assert np.array_equal(augment_preprocess(img, height, width, np.random.default_rng(seed),
                                                 AugmentParts.only()), want)


def test_switching_a_part_off_leaves_the_other_parts_as_they_were():
    """All parts, and all but the noise, differ by the noise alone: small everywhere. Had turning the noise off
    shifted the other parts' random numbers, strokes would have moved (differences near 1)."""
    img = bar_line(60, 500)
    no_noise = dataclasses.replace(AugmentParts(), noise=False)
    changed = 0
    for seed in range(12):
        a = augment_preprocess(img, 64, 512, np.random.default_rng(seed), AugmentParts())
        b = augment_preprocess(img, 64, 512, np.random.default_rng(seed), no_noise)
        assert np.abs(a - b).max() <= 6 * T.NOISE_SIGMA[1]
        changed += not np.array_equal(a, b)
    assert 0 < changed < 12  # the noise is on for some lines only


def test_noise_is_small_and_centred():
    img = np.full((40, 400), 128, np.uint8)  # mid gray: the noise is not clipped
    base = preprocess(img, 32, 256)
    sigmas = []
    for seed in range(10):
        out = augment_preprocess(img, 32, 256, np.random.default_rng(seed), AugmentParts.only("noise"))
        if not np.array_equal(out, base):
            diff = (out - base)[4:-4, 4:-4]
            assert abs(diff.mean()) < 0.01
            sigmas.append(diff.std())
    assert sigmas and T.NOISE_SIGMA[0] * 0.8 < min(sigmas) and max(sigmas) < T.NOISE_SIGMA[1] * 1.2


def test_blur8_is_a_normalised_gaussian():
    flat = np.full((9, 30), 77, np.uint8)
    assert np.array_equal(T.blur8(flat, 1.3), flat)
    img = np.random.default_rng(4).integers(0, 256, (20, 50), dtype=np.uint8)
    for sigma in (0.4, 0.8, 1.5):
        taps = np.array(T._blur_taps(sigma), dtype=np.float64) / 256
        r = len(taps) // 2
        p = np.pad(img.astype(np.float64), r, mode="edge")
        rows = sum(t * p[:, i : i + img.shape[1]] for i, t in enumerate(taps))
        want = sum(t * rows[i : i + img.shape[0]] for i, t in enumerate(taps))
        got = T.blur8(img, sigma)
        assert got.dtype == np.uint8 and np.abs(got.astype(np.float64) - want).max() <= 1.0  # rounding per pass
        assert got.std() < img.std()


def test_shading_is_a_smooth_factor_between_its_bounds():
    out = np.ones((32, 256), np.float32)
    T.shade(out, along=0.3, cycles=2.0, phase=0.25, across=0.2, from_top=True)
    assert out.min() >= 0.7 * 0.8 - 1e-6 and out.max() <= 1.0
    assert out.max() - out.min() > 0.3  # both profiles reach deep into their range
    assert np.abs(np.diff(out, axis=1)).max() < 0.01 and np.abs(np.diff(out, axis=0)).max() < 0.01
    assert out[0].mean() < out[-1].mean()  # darker at the top


def test_unknown_part_is_refused():
    with pytest.raises(ValueError, match="unknown augmentation part"):
        AugmentParts.only("rotate")


def test_every_part_has_a_documented_config_key():
    docs = {key: doc for key, _, doc in describe_keys()}
    for name in NAMES:
        assert docs.get(f"data.aug_{name}"), name
    cfg = load_config(None, [f"data.aug_{name}={str(i % 2 == 0).lower()}" for i, name in enumerate(NAMES)])
    assert augment_parts(cfg.data) == AugmentParts(**{name: i % 2 == 0 for i, name in enumerate(NAMES)})


def _tiny_shards(folder, images):
    samples = [{"key": f"k{i:02d}", "png": png_bytes(img), "text": "ab", "meta": {}} for i, img in enumerate(images)]
    write_manifest(str(folder), "t", "test", {"train": write_split(samples, str(folder), "train")}, "ab ", {})
    return str(folder)


def test_config_keys_reach_the_training_dataset(tmp_path):
    rng = np.random.default_rng(5)
    images = [rng.integers(0, 256, (12, 40 + 3 * i), dtype=np.uint8) for i in range(4)]
    folder = _tiny_shards(tmp_path, images)
    over = [f"data.path={folder}", "data.img_height=16", "data.img_width=64", "data.num_workers=0",
            "data.shuffle_buffer=4", "train.batch_size=4"]
    loader = build_train_loader(load_config(None, over + ["data.aug_blur=false"]), Alphabet("ab "), 0, 1)
    assert loader.dataset.parts == AugmentParts(blur=False) and loader.dataset.augment
    # every part off (augmentation still on): training lines are exactly the evaluation preprocessing
    off = [f"data.aug_{name}=false" for name in NAMES]
    loader = build_train_loader(load_config(None, over + off), Alphabet("ab "), 0, 1)
    assert loader.dataset.parts == AugmentParts.only()
    batch = next(iter(loader))
    for key, x in zip(batch["keys"], batch["images"]):
        assert np.array_equal(x[0].numpy(), preprocess(images[int(key[1:])], 16, 64))
    # ...and with the parts on, they are not
    batch = next(iter(build_train_loader(load_config(None, over), Alphabet("ab "), 0, 1)))
    assert not all(np.array_equal(x[0].numpy(), preprocess(images[int(k[1:])], 16, 64))
                   for k, x in zip(batch["keys"], batch["images"]))
