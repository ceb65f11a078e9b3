"""The shard reader (htr_dist.data.shards.tar_samples): webdataset's tar iterator wrapped with the manifest's checks,
grouping samples as webdataset's own pipeline does, and reporting every damaged shard to the handler."""

import io
import tarfile

import pytest
import webdataset as wds

from htr_dist.data.shards import ShardReadError, tar_samples


def _write_tar(path, members, fmt):
    with tarfile.open(path, "w", format=fmt) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 1700000000.5  # a float mtime: PAX writes a header for it
            tar.addfile(info, io.BytesIO(data))
        d = tarfile.TarInfo("adir")
        d.type = tarfile.DIRTYPE
        tar.addfile(d)  # not a regular file: skipped by both readers


def _members():
    long_dir = "d" * 120  # > 100 bytes: ustar prefix, GNU long name or PAX path by format
    out = []
    for i in range(5):
        key = f"{long_dir}/line-{i:03d}" if i % 2 else f"k{i}"
        out += [(f"{key}.png", bytes([i]) * (100 + 700 * i)), (f"{key}.txt", f"text {i} é".encode()),
                (f"{key}.seg.json", b"{}")]
    return out


def _raise(exn):
    raise exn


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_same_samples_as_webdataset(tmp_path, fmt):
    path = str(tmp_path / "s.tar")
    _write_tar(path, _members(), fmt)
    ours = list(tar_samples([{"url": path}], handler=_raise))
    theirs = [{k: v for k, v in s.items() if not k.startswith("__local")}
              for s in wds.tarfile_to_samples()([{"url": path}])]
    assert len(ours) == 5 and ours == theirs
    assert ours[1]["__key__"] == "d" * 120 + "/line-001" and set(ours[1]) == {"__key__", "__url__", "png", "txt",
                                                                                "seg.json"}


def _tar_bytes(members):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _read_all(path, count=None):
    problems = []
    source = {"url": str(path)} if count is None else {"url": str(path), "count": count}
    samples = list(tar_samples([source, {"url": str(path) + ".missing"}], handler=lambda e: problems.append(e) or True))
    return samples, problems


def test_truncated_corrupt_and_missing_shards_reach_the_handler(tmp_path):
    data = _tar_bytes([("a.txt", b"1"), ("a.png", b"x" * 600), ("b.txt", b"2"), ("b.png", b"y" * 600)])
    cut = tmp_path / "cut.tar"
    # blocks: a.txt header, data | a.png header, 2 data | b.txt header (byte 2560), data | b.png header, data (4096)
    cut.write_bytes(data[: 4096 + 100])  # inside b.png's data: b comes without png
    samples, problems = _read_all(cut)
    assert [s["__key__"] for s in samples] == ["a", "b"] and set(samples[1]) == {"__key__", "__url__", "txt"}
    assert f"{cut}: unexpected end of data (truncated or corrupt shard?)" == str(problems[0])
    assert isinstance(problems[1], FileNotFoundError) and len(problems) == 2

    bad = bytearray(data)
    bad[2560 + 3] ^= 0xFF  # a byte of b.txt's name, in its header: tarfile takes the bad header for the end
    (tmp_path / "bad.tar").write_bytes(bytes(bad))
    samples, problems = _read_all(tmp_path / "bad.tar", count=2)
    assert [s["__key__"] for s in samples] == ["a"]
    assert str(problems[0]) == f"{tmp_path / 'bad.tar'}: 1 samples, but the manifest counts 2 (changed after it was " \
                               "written?)"

    (tmp_path / "dup.tar").write_bytes(_tar_bytes([("a.txt", b"1"), ("a.txt", b"2")]))
    samples, problems = _read_all(tmp_path / "dup.tar")
    assert [s["txt"] for s in samples] == [b"1"] and "a.txt appears twice in sample a" in str(problems[0])


def test_a_handler_that_declines_reraises(tmp_path):
    (tmp_path / "cut.tar").write_bytes(_tar_bytes([("a.txt", b"1" * 2000)])[:1000])
    with pytest.raises(ShardReadError, match="cut.tar: unexpected end of data"):
        list(tar_samples([{"url": str(tmp_path / "cut.tar")}], handler=lambda e: False))


def test_a_tar_cut_at_a_member_boundary_is_reported_and_keeps_its_samples(tmp_path):
    """tarfile reads a shard cut between members as complete: the manifest's count tells it was cut short."""
    data = _tar_bytes([("k.txt", b"t"), ("k.png", b"p"), ("m.txt", b"u"), ("m.png", b"q")])
    (tmp_path / "noend.tar").write_bytes(data[: 512 * 4])  # sample k, without m and the end-of-archive blocks
    samples, problems = _read_all(tmp_path / "noend.tar", count=2)
    assert samples == [{"__key__": "k", "__url__": str(tmp_path / "noend.tar"), "txt": b"t", "png": b"p"}]
    assert len(problems) == 2 and "noend.tar: 1 samples, but the manifest counts 2" in str(problems[0])


def test_a_shard_that_holds_other_than_its_manifest_count_is_reported(tmp_path):
    data = _tar_bytes([("a.txt", b"1"), ("a.png", b"p"), ("b.txt", b"2"), ("b.png", b"p")])
    (tmp_path / "two.tar").write_bytes(data)
    url = str(tmp_path / "two.tar")
    for source, kept in (({"count": 3}, 2), ({"count": 1}, 2), ({"first": 1, "stop": 3, "count": 3}, 1)):
        problems = []
        samples = list(tar_samples([dict(source, url=url)], handler=lambda e: problems.append(e) or True))
        assert len(samples) == kept
        assert [str(p) for p in problems] == [f"{url}: 2 samples, but the manifest counts {source['count']} "
                                              "(changed after it was written?)"], source
    ok = list(tar_samples([{"url": url, "count": 2}, {"url": url, "first": 0, "stop": 1, "count": 5}],
                          handler=lambda e: False))
    assert [s["__key__"] for s in ok] == ["a", "b", "a"]  # a piece that stops before the end does not see it
    # a training piece that ends where the manifest says the shard ends meets the extra sample, and says so
    problems = []
    samples = list(tar_samples([{"url": url, "first": 0, "stop": 1, "count": 1}],
                               handler=lambda e: problems.append(e) or True))
    assert [s["__key__"] for s in samples] == ["a"]
    assert [str(p) for p in problems] == [f"{url}: more than the 1 samples the manifest counts (changed after it was "
                                          "written?)"]


def test_signed_header_checksum_is_accepted(tmp_path):
    data = bytearray(_tar_bytes([("é.txt", b"1")]))  # a name byte above 127: signed and unsigned sums differ
    header = bytes(data[:512])
    signed = sum(b - 256 if b > 127 else b for b in header[:148] + header[156:]) + 256
    data[148:156] = b"%06o\0 " % signed  # as an old tar program that sums signed bytes writes it
    (tmp_path / "signed.tar").write_bytes(bytes(data))
    assert tarfile.open(tmp_path / "signed.tar").getnames() == ["é.txt"]  # Python's reader agrees
    samples, problems = _read_all(tmp_path / "signed.tar")
    assert [s["__key__"] for s in samples] == ["é"] and len(problems) == 1  # only the .missing shard
