"""Recognition: inputs by file, folder, glob and list; batches by width; confidences from the CTC alignment."""

import itertools
import json
import os
import subprocess

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import PY, ROOT
from htr_dist.inference import Recognizer, best_path_confidences, ctc_alignment, confidences, fitted_width


def best_alignment_brute_force(log_probs, labels):
    """The highest-scoring frame path that collapses to ``labels``, by enumerating every path (tiny cases)."""
    best, best_path = -np.inf, None
    for path in itertools.product(range(log_probs.shape[1]), repeat=log_probs.shape[0]):
        collapsed = [c for i, c in enumerate(path) if c != 0 and (i == 0 or path[i - 1] != c)]
        if collapsed == list(labels):
            score = sum(log_probs[t, c] for t, c in enumerate(path))
            if score > best:
                best, best_path = score, path
    return best_path


@pytest.mark.parametrize("seed", range(5))
def test_alignment_is_the_best_path_of_the_labels(seed):
    rng = np.random.default_rng(seed)
    lp = np.log(rng.dirichlet(np.ones(3), size=6))
    labels = [1, 1] if seed % 2 else [2, 1]
    frames = ctc_alignment(lp, labels)
    path = best_alignment_brute_force(lp, labels)
    expected = [[], []]
    k, prev = -1, 0
    for t, c in enumerate(path):
        if c != 0 and (t == 0 or c != prev):
            k += 1
        if c != 0:
            expected[k].append(t)
        prev = c
    assert [sorted(f) for f in frames] == expected
    assert ctc_alignment(lp[:1], [1, 1]) is None  # 'aa' needs at least three frames


def test_character_confidence_is_its_best_frame():
    probs = np.array([[0.1, 0.9, 0.0], [0.4, 0.6, 0.0], [0.9, 0.1, 0.0], [0.2, 0.0, 0.8]])
    assert confidences(probs, np.log(probs + 1e-12), [1, 2]) == pytest.approx([0.9, 0.8])


@pytest.mark.parametrize("seed", range(20))
def test_best_path_confidences_equal_the_viterbi_alignment(seed):
    """Where the best path reads the labels, the shortcut gives the alignment's confidences; elsewhere it declines."""
    rng = np.random.default_rng(seed)
    probs = rng.dirichlet(np.full(4, 0.3), size=12)
    path = probs.argmax(1)
    read = [int(c) for t, c in enumerate(path) if c != 0 and (t == 0 or path[t - 1] != c)]
    frames = ctc_alignment(np.log(probs), read)
    viterbi = [float(probs[f, c].max()) for f, c in zip(frames, read)]
    assert best_path_confidences(probs, read) == pytest.approx(viterbi)
    assert confidences(probs, np.log(probs), read) == pytest.approx(viterbi)
    other = read[:-1] if read else [1]
    assert best_path_confidences(probs, other) is None


def test_fitted_width_keeps_the_scale_and_rounds_up():
    assert fitted_width((32, 100), 64, 512) == 224  # 200 pixels at height 64, rounded up to 32
    assert fitted_width((32, 1000), 64, 512) == 512  # wider than the canvas: the training width, scaled down
    assert fitted_width((300, 10), 64, 512) == 32


@pytest.fixture(scope="module")
def model_and_lines(tmp_path_factory):
    from test_decode import export_tiny

    folder = tmp_path_factory.mktemp("rec")
    path, _ = export_tiny(folder, None, "model.pt")
    rng = np.random.default_rng(0)
    images = []
    for i, width in enumerate((40, 300, 120, 70, 200)):
        img = (rng.random((32, width)) * 255).astype(np.uint8)
        file = folder / f"line{i}.png"
        Image.fromarray(img).save(file)
        images.append(str(file))
    return path, images


def test_recognize_keeps_the_order_and_reads_every_kind_of_input(model_and_lines):
    path, images = model_and_lines
    rec = Recognizer.load(path)
    got = rec.recognize(images, batch_size=2)
    assert [r.source for r in got] == images
    arrays = rec.recognize([np.asarray(Image.open(p)) for p in images], batch_size=2)
    pil = rec.recognize([Image.open(p) for p in images], batch_size=5)
    assert [r.text for r in arrays] == [r.text for r in got] == [r.text for r in pil]
    for r in got:
        assert len(r.char_confidences) == len(r.text) and 0.0 <= r.confidence <= 1.0
        assert all(0.0 <= c <= 1.0 for c in r.char_confidences)


def test_bf16_recognition_runs_the_recurrence_in_bf16_where_native(model_and_lines):
    """At ``bf16_native`` the recurrent head gets bf16 weights where the CPU computes bf16 natively (fp32 elsewhere),
    reads the lines as the fp32 model does, and the fp32 model keeps fp32 weights."""
    from htr_dist.dist.env import has_native_bf16

    path, images = model_and_lines
    fp32 = Recognizer.load(path)
    bf16 = Recognizer.load(path, precision="bf16_native")
    native = has_native_bf16(torch.device("cpu"))
    assert fp32.model.head.rnn.lower.weight_ih_l0.dtype == torch.float32
    assert bf16.model.head.rnn.lower.weight_ih_l0.dtype == (torch.bfloat16 if native else torch.float32)
    a, b = fp32.recognize(images), bf16.recognize(images)
    assert [r.text for r in a] == [r.text for r in b]
    assert [r.confidence for r in b] == pytest.approx([r.confidence for r in a], abs=0.05)


def test_the_recognize_command_takes_folders_globs_and_lists(model_and_lines, tmp_path):
    path, images = model_and_lines
    folder = os.path.dirname(images[0])
    listing = tmp_path / "list.txt"
    listing.write_text(f"{images[2]}\n\n{images[0]}\n")
    missing = str(tmp_path / "gone.png")
    cmd = [PY, "launch/recognize.py", "--checkpoint", path, "--device", "cpu", "--batch-size", "2"]
    proc = subprocess.run(cmd + [folder, os.path.join(folder, "line[34].png"), missing, "--list", str(listing),
                                 "--json"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 1 and f"{missing}: no such image file" in proc.stderr
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["image"] for r in rows] == sorted(images) + [images[3], images[4], images[2], images[0]]
    for r in rows:
        assert "".join(c for c, _ in r["chars"]) == r["text"] and 0 <= r["confidence"] <= 1
    tsv = subprocess.run(cmd + images[:2], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert tsv.returncode == 0
    assert [line.split("\t")[0] for line in tsv.stdout.splitlines()] == images[:2]
    none = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert none.returncode == 2 and "give at least one IMAGE or --list FILE" in none.stderr


def test_the_reference_codes_demo_form_reads_its_images(model_and_lines, tmp_path):
    """`demo.py CONFIG resume=MODEL IMAGE`, as the reference code documents it, reads the image with MODEL."""
    path, images = model_and_lines
    config = tmp_path / "config.yaml"
    config.write_text("train:\n  lr: 0.001\n")
    proc = subprocess.run([PY, "launch/demo.py", str(config), f"resume={path}", images[1]], capture_output=True,
                          text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    expected = Recognizer.load(path).recognize([images[1]])[0].text
    assert proc.stdout.splitlines() == [f"{images[1]}\t{expected}"]
