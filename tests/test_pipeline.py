"""Streaming loader: round trip, batching, resume position, unknown characters, bad shards, 2-rank exactness."""

import io
import itertools
import os
import tarfile

import numpy as np
import pytest
import torch
import torch.distributed as tdist
import torch.multiprocessing as tmp
from PIL import Image, ImageFilter

from htr_dist.config import load_config
from htr_dist.data.alphabet import Alphabet
from htr_dist.data.pipeline import TooManySkipped, build_eval_loader, build_train_loader, \
    steps_per_epoch
from htr_dist.data.shards import ManifestError, load_manifest, png_bytes, write_manifest, write_split
from htr_dist.data.transforms import augment_preprocess, gray8, morph3, photometric_lut, preprocess

from conftest import free_port, reset_shard_sizes


def make_shards(folder, counts, split="train", texts=None, alphabet="abcdefghij "):
    """Shards with the given sample counts; sample i has key k{i:04d} and text made from i."""
    entries, i = [], 0
    os.makedirs(folder, exist_ok=True)
    for n in counts:
        samples = []
        for _ in range(n):
            img = np.full((20, 60), 255, np.uint8)
            img[5:15, 5 : 5 + (i % 50)] = 0
            text = texts[i] if texts else "".join("abcdefghij"[int(d)] for d in str(i))
            samples.append({"key": f"k{i:04d}", "png": png_bytes(img), "text": text, "meta": {}})
            i += 1
        sub = os.path.join(folder, f"part{len(entries)}")
        for e in write_split(samples, sub, split, max_count=n):
            os.replace(os.path.join(sub, e["file"]), os.path.join(folder, f"{split}-{len(entries):06d}.tar"))
            entries.append(dict(e, file=f"{split}-{len(entries):06d}.tar"))
    write_manifest(folder, "t", "test", {split: entries}, alphabet, {"total": 0})
    return folder


def cfg_for(path, **kw):
    over = [f"data.path={path}", "data.img_height=16", "data.img_width=64", "data.num_workers=0",
            "data.shuffle_buffer=8"] + [f"{k}={v}" for k, v in kw.items()]
    return load_config(None, over)


def test_gray8_keeps_ink_dark_on_light_paper_for_deep_and_transparent_images(tmp_path):
    """16-bit scans are rescaled, not clipped to a white page; transparent pixels are paper, not black."""
    ink = np.zeros((10, 20), bool)
    ink[3:7, 5:15] = True
    deep = np.where(ink, 1000, 60000).astype(np.uint16)
    Image.fromarray(deep).save(tmp_path / "deep.png")
    with Image.open(tmp_path / "deep.png") as im:
        assert im.mode.startswith("I")
        g = gray8(im)
    assert g.dtype == np.uint8 and g[0, 0] == 233 and g[5, 10] == 4  # 60000 / 257, 1000 / 257
    rgba = np.zeros((10, 20, 4), np.uint8)
    rgba[ink, 3] = 255  # opaque black ink on a transparent black background
    for mode, arr in (("RGBA", rgba), ("LA", rgba[:, :, [0, 3]])):
        g = gray8(Image.fromarray(arr, mode))
        assert g[0, 0] == 255 and g[5, 10] == 0, mode
    assert gray8(Image.fromarray(np.where(ink, 0.0, 1.0).astype(np.float32), "F"))[[0, 5], [0, 10]].tolist() == [255, 0]
    plain = np.where(ink, 17, 240).astype(np.uint8)
    assert np.array_equal(gray8(Image.fromarray(plain)), plain)
    assert np.array_equal(gray8(Image.fromarray(np.stack([plain] * 3, -1))), plain)


def test_preprocess_shape_range_aspect():
    img = np.full((50, 100), 255, np.uint8)
    img[10:40, 10:90] = 0
    x = preprocess(img, 32, 256)
    assert x.shape == (32, 256) and x.dtype == np.float32
    assert x.min() == 0.0 and x.max() == pytest.approx(1.0)
    cols = np.nonzero(x.max(0) > 0.5)[0]
    assert 0 < cols[0] and cols[-1] < 256  # 100x50 scaled by 32/50 -> 64 px wide, centred: ink within
    assert cols[-1] - cols[0] + 1 == pytest.approx(80 * 32 / 50, abs=2)


def test_augment_deterministic_and_shaped():
    img = np.full((40, 200), 255, np.uint8)
    img[10:30, 20:180] = 30
    a = augment_preprocess(img, 32, 128, np.random.default_rng(1))
    b = augment_preprocess(img, 32, 128, np.random.default_rng(1))
    c = augment_preprocess(img, 32, 128, np.random.default_rng(2))
    assert a.shape == (32, 128) and np.array_equal(a, b) and not np.array_equal(a, c)
    assert 0.0 <= a.min() and a.max() <= 1.0 and a.max() > 0.5


@pytest.mark.parametrize("h, w", [(16, 128), (105, 1677), (60, 200), (128, 128)])
def test_augmentation_keeps_the_corners_of_the_line_inside_the_canvas(h, w):
    """Scale, shear and rotation together must fit: a corner pushed off the canvas cuts ink the label still has."""
    from htr_dist.data.transforms import _inverse_map

    corners = np.array([[0.0, 0.0, w, w], [0.0, h, 0.0, h]])
    for seed in range(300):
        inv = _inverse_map(h, w, 128, 1024, np.random.default_rng(seed))  # output (u, v, 1) -> source (x, y)
        fwd = np.linalg.inv(inv[:, :2])
        uv = fwd @ (corners - inv[:, 2:])
        assert uv[0].min() > -1e-6 and uv[0].max() < 1024 + 1e-6 and uv[1].min() > -1e-6 and uv[1].max() < 128 + 1e-6


@pytest.mark.parametrize("shape", [(1, 1), (2, 3), (17, 40)])
def test_morph3_matches_pil_rank_filters(shape):
    img = np.random.default_rng(3).integers(0, 256, shape, dtype=np.uint8)
    for op, pil_filter in ((np.minimum, ImageFilter.MinFilter(3)), (np.maximum, ImageFilter.MaxFilter(3))):
        want = np.asarray(Image.fromarray(img).filter(pil_filter))
        assert np.array_equal(morph3(img, op), want), op.__name__


def test_photometric_lut_matches_float_formula():
    gray = np.arange(256, dtype=np.uint8).reshape(16, 16)
    gamma, contrast, brightness = 1.3, 0.8, 0.07
    x = 1.0 - gray.astype(np.float64) / 255.0
    want = np.clip(x**gamma * contrast + brightness, 0.0, 1.0)
    got = photometric_lut(gamma, contrast, brightness)[gray]
    assert got.dtype == np.float32 and np.allclose(got, want, atol=1e-6)
    assert got[0, 0] == pytest.approx(min(1.0, contrast + brightness)) and got[-1, -1] == pytest.approx(brightness)


def test_round_trip_keys_texts_targets(shard_dir):
    cfg = load_config(None, [f"data.path={shard_dir}", "data.num_workers=0", "train.batch_size=5"])
    manifest = load_manifest(shard_dir)
    alphabet = Alphabet(manifest["alphabet"])
    batches = list(build_eval_loader(cfg, "train", alphabet, 0, 1))
    keys = [k for b in batches for k in b["keys"]]
    assert len(keys) == len(set(keys)) == manifest["splits"]["train"]["lines"]
    b = batches[0]
    assert b["images"].shape == (5, 1, 128, 1024) and b["images"].dtype == torch.float32
    assert b["target_lengths"].tolist() == [len(t) for t in b["texts"]]
    assert alphabet.decode(b["targets"][: b["target_lengths"][0]].tolist()) == b["texts"][0]


def test_train_stream_is_infinite_and_resumable(tmp_path):
    folder = make_shards(str(tmp_path / "s"), [7, 5])
    cfg = cfg_for(folder, **{"train.batch_size": 3})
    alphabet = Alphabet("abcdefghij ")
    full = [b["keys"] for b in itertools.islice(build_train_loader(cfg, alphabet, 0, 1, epoch=2), 9)]
    assert len(full) == 9  # 12 lines, but the stream cycles: the loop decides how many batches make an epoch
    resumed = [b["keys"] for b in itertools.islice(build_train_loader(cfg, alphabet, 0, 1, epoch=2, skip_batches=4), 5)]
    assert resumed == full[4:]
    other_epoch = [b["keys"] for b in itertools.islice(build_train_loader(cfg, alphabet, 0, 1, epoch=3), 9)]
    assert other_epoch != full


def test_augmentation_warm_up_grows_the_share_of_augmented_lines_and_resumes_exactly(tmp_path):
    """``data.aug_warmup_steps``: the first batches are mostly clean (as evaluation preprocesses them), every line is
    augmented from the warm-up's last step on, a resumed stream sees the same images, and with no warm-up (and in
    later epochs) the images are those of a run without the option."""
    folder = make_shards(str(tmp_path / "s"), [60, 60])
    alphabet = Alphabet("abcdefghij ")
    clean = {k: img for b in build_eval_loader(cfg_for(folder), "train", alphabet, 0, 1)
             for k, img in zip(b["keys"], b["images"])}

    def augmented(batch):
        return sum(not torch.equal(img, clean[k]) for k, img in zip(batch["keys"], batch["images"]))

    warm = cfg_for(folder, **{"train.batch_size": 10, "data.aug_warmup_steps": 8})
    stream = list(itertools.islice(build_train_loader(warm, alphabet, 0, 1), 10))
    counts = [augmented(b) for b in stream]
    assert counts[0] <= 4 and sum(counts[:4]) < sum(counts[4:8]) and counts[7:] == [10, 10, 10]
    resumed = list(itertools.islice(build_train_loader(warm, alphabet, 0, 1, skip_batches=5), 5))
    assert all(torch.equal(a["images"], b["images"]) for a, b in zip(resumed, stream[5:]))
    plain = cfg_for(folder, **{"train.batch_size": 10})
    for epoch in (0, 1):  # 12 batches an epoch: the warm-up is over in epoch 1
        want = list(itertools.islice(build_train_loader(plain, alphabet, 0, 1, epoch=epoch), 3))
        got = list(itertools.islice(build_train_loader(warm if epoch else plain, alphabet, 0, 1, epoch=epoch), 3))
        assert all(torch.equal(a["images"], b["images"]) for a, b in zip(got, want))


@pytest.mark.parametrize("counts,world,workers", [([20, 20, 3], 2, 1), ([30, 5], 1, 2), ([50], 2, 2),
                                                    ([2, 40, 2, 2], 3, 1)])
def test_an_epoch_trains_on_distinct_lines_whatever_the_shard_sizes(tmp_path, counts, world, workers):
    """Each epoch, the batches the loop takes over all ranks and workers hold distinct lines, all but fewer than
    world * batch of the split: no reader cycles a small shard while another never reaches the end of a big one."""
    folder = make_shards(str(tmp_path / "s"), counts)
    cfg = cfg_for(folder, **{"train.batch_size": 4, "data.num_workers": workers, "data.augment": False})
    steps = steps_per_epoch(load_manifest(folder), world, 4)
    seen_over_epochs = set()
    for epoch in range(3):
        keys = []
        for rank in range(world):
            loader = build_train_loader(cfg, Alphabet("abcdefghij "), rank, world, epoch=epoch)
            keys += [k for b in itertools.islice(loader, steps) for k in b["keys"]]
        assert len(keys) == len(set(keys)) == world * steps * 4 > sum(counts) - world * 4
        seen_over_epochs |= set(keys)
    assert len(seen_over_epochs) > world * steps * 4  # the lines left out change from epoch to epoch


def test_training_stops_when_no_shard_can_be_read(tmp_path):
    folder = make_shards(str(tmp_path / "s"), [6, 6])
    for name in ("train-000000.tar", "train-000001.tar"):
        with open(os.path.join(folder, name), "r+b") as f:
            f.seek(148)
            f.write(b"0000000\0")  # a wrong checksum in the first header: nothing in the shard can be read
    cfg = cfg_for(folder, **{"train.batch_size": 2})
    with pytest.raises(TooManySkipped, match=r"no sample could be read in a whole pass over the 2 training shard"):
        next(iter(build_train_loader(cfg, Alphabet("abcdefghij "), 0, 1)))


@pytest.mark.parametrize("skip", [1, 3, 4])
def test_resume_with_two_loader_workers_goes_on_in_the_same_order(tmp_path, skip):
    """The DataLoader asks worker 0 first: a resume at an odd batch must still continue with batch ``skip``."""
    folder = make_shards(str(tmp_path / "s"), [20, 13])
    cfg = cfg_for(folder, **{"train.batch_size": 3, "data.num_workers": 2, "data.augment": False})
    alphabet = Alphabet("abcdefghij ")
    full = [b["keys"] for b in itertools.islice(build_train_loader(cfg, alphabet, 0, 1, epoch=1), 10)]
    resumed = [b["keys"] for b in itertools.islice(build_train_loader(cfg, alphabet, 0, 1, epoch=1,
                                                                      skip_batches=skip), 10 - skip)]
    assert resumed == full[skip:]


def test_unknown_characters_counted(tmp_path):
    folder = make_shards(str(tmp_path / "s"), [4], split="test", texts=["abc", "aXb", "YZ", "a"])
    cfg = cfg_for(folder, **{"train.batch_size": 4})
    (batch,) = list(build_eval_loader(cfg, "test", Alphabet("abc"), 0, 1))
    assert batch["unknown_chars"] == 3
    assert batch["texts"] == ["abc", "aXb", "YZ", "a"]  # raw text kept for CER
    assert batch["target_lengths"].tolist() == [3, 2, 0, 1]


def _corrupt_png(folder):
    path = os.path.join(folder, "train-000000.tar")
    with tarfile.open(path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(path, "w") as tar:
        for m, data in members:
            if m.name == "k0001.png":
                data = b"not a png"
            if m.name == "k0002.txt":
                continue
            m.size = len(data)
            tar.addfile(m, io.BytesIO(data))
    reset_shard_sizes(folder)


def test_bad_samples_skipped_counted_and_named(tmp_path, caplog):
    folder = make_shards(str(tmp_path / "s"), [6, 6])
    _corrupt_png(folder)
    with open(os.path.join(folder, "train-000001.tar"), "r+b") as f:
        f.truncate(1500)  # a truncated shard: k0006's json survives, its png header is cut, the rest is lost
    cfg = cfg_for(folder, **{"train.batch_size": 1, "data.max_skip_fraction": 0.9})
    # the manifest's sizes catch the cut shard before any reading
    with pytest.raises(ManifestError, match=r"train-000001.tar: 1500 bytes, but the manifest says \d+"):
        build_eval_loader(cfg, "train", Alphabet("abcdefghij "), 0, 1)
    reset_shard_sizes(folder, forget=True)  # as a manifest of an older version, or a shard cut after start-up
    batches = list(build_eval_loader(cfg, "train", Alphabet("abcdefghij "), 0, 1))
    keys = [b["keys"][0] for b in batches]
    assert "k0001" not in keys and "k0002" not in keys and "k0000" in keys
    # corrupt png, missing txt, the 5 lines of the truncated shard after k0006, and k0006 without its txt
    assert batches[-1]["skipped"] == 1 + 1 + 5 + 1
    text = caplog.text
    assert "train-000000.tar:k0001 cannot be decoded" in text
    assert "train-000000.tar:k0002 has no txt" in text
    assert "unreadable shard data (ShardReadError: " in text
    assert "train-000001.tar: 1 samples, but the manifest counts 6 (changed after it was written?)" in text
    assert "train-000001.tar:k0006 has no txt" in text


def test_resume_after_undecodable_samples_sees_the_same_batches(tmp_path):
    """Skipped batches are counted without decoding, but they must drop the samples decoding drops."""
    folder = make_shards(str(tmp_path / "s"), [12, 12])
    _corrupt_png(folder)  # k0001 is no image, k0002 has no txt
    cfg = cfg_for(folder, **{"train.batch_size": 3, "data.max_skip_fraction": 0.5})
    alphabet = Alphabet("abcdefghij ")
    full = list(itertools.islice(build_train_loader(cfg, alphabet, 0, 1, epoch=0), 6))
    for skip in (1, 2, 4):
        resumed = list(itertools.islice(build_train_loader(cfg, alphabet, 0, 1, epoch=0, skip_batches=skip), 6 - skip))
        assert [b["keys"] for b in resumed] == [b["keys"] for b in full[skip:]]
        assert all(torch.equal(a["images"], b["images"]) for a, b in zip(resumed, full[skip:]))


def test_abort_when_too_many_skipped(tmp_path):
    folder = make_shards(str(tmp_path / "s"), [120])
    path = os.path.join(folder, "train-000000.tar")
    with tarfile.open(path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(path, "w") as tar:
        for m, data in members:
            if m.name.endswith(".png") and int(m.name[1:5]) % 10 == 0:
                data = b"broken"
            m.size = len(data)
            tar.addfile(m, io.BytesIO(data))
    reset_shard_sizes(folder)
    cfg = cfg_for(folder, **{"train.batch_size": 4, "data.max_skip_fraction": 0.05})
    with pytest.raises(TooManySkipped, match=r"more than data.max_skip_fraction=0.05"):
        list(build_eval_loader(cfg, "train", Alphabet("abcdefghij "), 0, 1))


def test_loaders_page_lock_batches_only_when_asked(tmp_path):
    cfg = cfg_for(make_shards(str(tmp_path / "s"), [4]), **{"train.batch_size": 2})
    alphabet = Alphabet("abcdefghij ")
    assert not build_train_loader(cfg, alphabet, 0, 1).pin_memory
    assert build_train_loader(cfg, alphabet, 0, 1, pin_memory=True).pin_memory
    assert build_eval_loader(cfg, "train", alphabet, 0, 1, pin_memory=True).pin_memory


class _Aborts(torch.utils.data.IterableDataset):
    def __iter__(self):
        raise TooManySkipped("7 of 100 samples skipped: shard a.tar")


def test_an_abort_in_a_worker_keeps_its_message():
    """torch re-raises a worker's error with the worker's traceback as the message; ours come back as they were."""
    with pytest.raises(TooManySkipped) as caught:
        next(iter(torch.utils.data.DataLoader(_Aborts(), batch_size=None, num_workers=1)))
    assert str(caught.value) == "7 of 100 samples skipped: shard a.tar (in DataLoader worker process 0)"
    with pytest.raises(TooManySkipped) as caught:
        next(iter(torch.utils.data.DataLoader(_Aborts(), batch_size=None, num_workers=0)))
    assert str(caught.value) == "7 of 100 samples skipped: shard a.tar"
    other = "Caught ValueError in DataLoader worker process 0.\nOriginal Traceback ...\nValueError: x"
    assert str(TooManySkipped(other)) == other  # not this class's own text: left as it is


@pytest.mark.parametrize("counts", [[25], [9, 9, 7], [1, 1, 1, 1, 1, 20], [13, 2]])
@pytest.mark.parametrize("world", [1, 2, 3])
def test_eval_sees_every_line_once(tmp_path, counts, world):
    folder = make_shards(str(tmp_path / "s"), counts, split="val")
    cfg = cfg_for(folder, **{"train.batch_size": 4})
    keys = []
    for rank in range(world):
        keys += [k for b in build_eval_loader(cfg, "val", Alphabet("abcdefghij "), rank, world) for k in b["keys"]]
    assert sorted(keys) == [f"k{i:04d}" for i in range(sum(counts))]


def _dist_worker(rank, world, port, folder, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    tdist.init_process_group("gloo", rank=rank, world_size=world, timeout=__import__("datetime").timedelta(seconds=30))
    cfg = cfg_for(folder, **{"train.batch_size": 4, "data.num_workers": 1})
    manifest = load_manifest(folder)
    n = steps_per_epoch(manifest, world, 4)
    seen = []
    for epoch in range(2):
        for batch in itertools.islice(build_train_loader(cfg, Alphabet("abcdefghij "), rank, world, epoch), n):
            t = torch.ones(1)
            tdist.all_reduce(t)  # what DDP does every step: a rank with fewer batches would hang here
            seen.append(len(batch["keys"]))
    eval_keys = [k for b in build_eval_loader(cfg, "train", Alphabet("abcdefghij "), rank, world) for k in b["keys"]]
    gathered = [None] * world
    tdist.all_gather_object(gathered, eval_keys)
    if rank == 0:
        torch.save({"n": n, "seen": seen, "eval": gathered}, out)
    tdist.destroy_process_group()


def test_two_ranks_uneven_shards(tmp_path):
    """25 lines in 3 uneven shards at 2 ranks: equal batch counts (no hang), eval covers every line once."""
    folder = make_shards(str(tmp_path / "s"), [12, 9, 4])
    out = str(tmp_path / "out.pt")
    tmp.spawn(_dist_worker, args=(2, free_port(), folder, out), nprocs=2, join=True)
    res = torch.load(out)
    assert res["n"] == 3 and res["seen"] == [4] * 6
    keys = [k for part in res["eval"] for k in part]
    assert sorted(keys) == [f"k{i:04d}" for i in range(25)]


def test_characters_outside_the_alphabet_are_counted_and_named_once(tmp_path, caplog):
    folder = make_shards(str(tmp_path / "s"), [4], texts=["abc", "aéb", "éé", "xa"], alphabet="abc")
    cfg = cfg_for(folder, **{"train.batch_size": 4})
    batches = list(build_eval_loader(cfg, "train", Alphabet("abc"), 0, 1))
    assert batches[-1]["unknown_chars"] == 4  # é, é, é, x
    warned = [r.getMessage() for r in caplog.records if "is not in the manifest's alphabet" in r.getMessage()]
    assert len(warned) == 2 and "'é'" in warned[0] and "train-000000.tar:k0001" in warned[0] and "'x'" in warned[1]
