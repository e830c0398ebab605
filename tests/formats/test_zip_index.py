"""The central-directory reader against Python's zipfile and torch.load, entry by entry, on real
torch files and on zips written in the other ways the format allows (zip64 records, extra fields,
bytes before the archive, deflated small entries); corrupt directories give one-line errors."""

from __future__ import annotations

import io
import os
import re
import struct
import tempfile
import zipfile
from pathlib import Path

import pytest
import torch

import surgery
from surgery.errors import FormatError
from surgery.formats.zip_index import ZipIndex

ZIP_FIXTURES = ["plain_pt", "tied_pt", "tied_view_pt", "nested_pt", "dataparallel_pt", "lightning_ckpt", "hf_bin",
                "zip_cuda_pt", "torchscript_pt", "torchscript_traced_pt", "timm_ema_pth"]


def index_of(path: Path) -> ZipIndex:
    with open(path, "rb") as f:
        return ZipIndex(f.fileno(), 0, os.path.getsize(path), str(path))


def assert_same_as_zipfile(path: Path) -> None:
    idx = index_of(path)
    with zipfile.ZipFile(path) as zf:
        infos = zf.infolist()
        assert idx.names == [i.filename for i in infos]
        for i in infos:
            e = idx.entries[i.filename]
            assert (e.header_offset, e.method, e.flags, e.crc, e.compress_size, e.file_size) == (
                i.header_offset, i.compress_type, i.flag_bits, i.CRC, i.compress_size, i.file_size), i.filename
            if i.file_size < 1 << 20:
                with open(path, "rb") as f:
                    assert ZipIndex(f.fileno(), 0, os.path.getsize(path), "x").read(i.filename) == zf.read(i)


def assert_reads_like_torch(path: Path) -> None:
    ref = torch.load(path, map_location="cpu", weights_only=True)
    ours = surgery.open(path).state_dict()
    assert list(ours) == list(ref)
    for k, v in ref.items():
        assert torch.equal(ours[k], v), k


@pytest.mark.parametrize("name", ZIP_FIXTURES)
def test_torch_files_read_like_zipfile(make, name):
    assert_same_as_zipfile(make(name))


def _small(tmp_path: Path) -> Path:
    path = tmp_path / "small.pt"
    torch.save({f"layers.{i}.weight": torch.full((3,), float(i)) for i in range(20)} | {"b": torch.arange(7)}, path)
    return path


def _rezip(src: Path, dst: Path, extra: bytes = b"", compress_small: bool = False) -> Path:
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            out = zipfile.ZipInfo(info.filename, date_time=info.date_time)
            out.extra = extra
            small = not info.filename.split("/")[-2:-1] == ["data"]
            out.compress_type = zipfile.ZIP_DEFLATED if compress_small and small else zipfile.ZIP_STORED
            zout.writestr(out, zin.read(info))
    return dst


def test_zip64_records_and_extra_fields(tmp_path, monkeypatch):
    """zip64 end records and zip64 sizes and offsets in every entry's extra field, as zipfile
    writes them past 4 GiB or 65,535 entries (lowered here so a tiny file has them)."""
    src = _small(tmp_path)
    monkeypatch.setattr(zipfile, "ZIP64_LIMIT", 8)
    monkeypatch.setattr(zipfile, "ZIP_FILECOUNT_LIMIT", 4)
    dst = _rezip(src, tmp_path / "zip64.pt")
    monkeypatch.undo()
    raw = dst.read_bytes()
    assert b"PK\x06\x06" in raw and b"PK\x06\x07" in raw
    assert_same_as_zipfile(dst)
    assert_reads_like_torch(dst)


def test_foreign_extra_fields_and_deflated_small_entries(tmp_path):
    dst = _rezip(_small(tmp_path), tmp_path / "extra.pt", extra=b"\xfe\xca\x04\x00abcd", compress_small=True)
    assert_same_as_zipfile(dst)
    assert_reads_like_torch(dst)


def test_bytes_before_the_archive(tmp_path):
    """A stub before the zip (a self-extractor's layout): offsets move by its length, as in zipfile."""
    dst = tmp_path / "stub.pt"
    dst.write_bytes(b"#!stub\n" * 100 + _small(tmp_path).read_bytes())
    assert_same_as_zipfile(dst)


def test_archive_comment(tmp_path):
    dst = _rezip(_small(tmp_path), tmp_path / "comment.pt")
    with zipfile.ZipFile(dst, "a") as z:
        z.comment = b"PK a comment" * 10
    assert_same_as_zipfile(dst)
    assert_reads_like_torch(dst)


def _eocd_at(raw: bytes) -> int:
    return raw.rfind(b"PK\x05\x06")


@pytest.mark.parametrize("how, match", [
    ("directory offset", "corrupt local header|before the archive starts"),
    ("directory size", "bad offset for central directory|truncated central directory|bad magic"),
    ("no end record", "no end of central directory record"),
    ("local header offset", "corrupt local header|before the archive starts|outside the archive|reaches past the end"),
    ("extra field", "corrupt extra field"),
    ("central magic", "bad magic number for central directory"),
    ("encrypted", "data.pkl' is encrypted"),  # the record itself, before the entry is read
    ("patched data", "compressed patched data"),
    ("local name", "another name in its local header"),
])
def test_corrupt_directory_is_one_line(tmp_path, how, match):
    src = _small(tmp_path)
    if how == "extra field":  # a field declaring 16 bytes where 2 follow
        src = _rezip(src, tmp_path / "extra.pt", extra=b"\xfe\xca\x10\x00ab")
    raw = bytearray(src.read_bytes())
    end = _eocd_at(raw)
    cd = struct.unpack_from("<L", raw, end + 16)[0]
    z64 = raw.rfind(b"PK\x06\x06", 0, end)  # torch writes zip64 end records too: they win
    if how == "directory offset":
        struct.pack_into("<L", raw, end + 16, cd + 3)
        struct.pack_into("<Q", raw, z64 + 48, cd + 3)
    elif how == "directory size":
        struct.pack_into("<L", raw, end + 12, 0xFFFFFF)
        struct.pack_into("<Q", raw, z64 + 40, 0xFFFFFF)
    elif how == "no end record":
        raw[end:end + 4] = b"XX\x05\x06"
    elif how == "local header offset":
        rec = next(i for i in range(cd, end) if raw[i:i + 4] == b"PK\x01\x02" and raw[i + 46:i + 58] == b"small/data/0")
        struct.pack_into("<L", raw, rec + 42, 0x7FFFFFF0)
    elif how == "extra field":
        pass
    elif how in ("encrypted", "patched data"):
        rec = next(i for i in range(cd, end) if raw[i:i + 4] == b"PK\x01\x02" and raw[i + 46:i + 60] == b"small/data.pkl")
        raw[rec + 8] |= 0x01 if how == "encrypted" else 0x20
    elif how == "local name":
        assert raw[30:44] == b"small/data.pkl"
        raw[30:35] = b"SMALL"
    else:
        raw[cd:cd + 4] = b"PK\x09\x09"
    bad = tmp_path / "bad.pt"
    bad.write_bytes(bytes(raw))
    with pytest.raises(FormatError, match=match) as e:
        surgery.open(bad)
    assert "\n" not in str(e.value)


def test_compressed_storage_is_refused(tmp_path):
    src = _small(tmp_path)
    dst = tmp_path / "deflated.pt"
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED) as zout:
        for info in zin.infolist():
            zout.writestr(info.filename, zin.read(info))
    with pytest.raises(FormatError, match="is compressed; torch never writes that"):
        surgery.open(dst)


def test_other_compression_methods_are_refused(tmp_path):
    dst = _rezip(_small(tmp_path), tmp_path / "bz.pt")
    with zipfile.ZipFile(dst) as zin:
        entries = [(i, zin.read(i)) for i in zin.infolist()]
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as zout:
        for info, data in entries:
            zout.writestr(info.filename, data, compress_type=zipfile.ZIP_BZIP2 if info.filename.endswith("data.pkl") else 0)
    dst.write_bytes(out.getvalue())
    with pytest.raises(FormatError, match="compression method 12"):
        surgery.open(dst)


def test_a_central_directory_the_size_of_a_huge_file_is_refused_before_it_is_read(tmp_path, cli):
    # a torch zip, a hole of 1.1 GB (sparse: no disk used) and an end record whose directory spans
    # everything before it: the reader must refuse it rather than allocate the file's size
    src = tmp_path / "small.pt"
    torch.save({"w": torch.zeros(2)}, src)
    path = tmp_path / "lying.pt"
    eocd_at = 1_100_000_000
    with open(path, "wb") as f:
        f.write(src.read_bytes())
        f.truncate(eocd_at)
        f.seek(eocd_at)
        f.write(struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, 1, 1, eocd_at, 0, 0))
    with pytest.raises(FormatError, match="central directory claims 1100000000 bytes"):
        surgery.open(path)
    r = cli("inspect", path)
    assert r.exit_code == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr



@pytest.mark.parametrize("name, match", [
    (b"small/data/\xff", r"entry name b'small/data/\\xff' is not UTF-8"),
    (b"small/data\xc3\xa9", "not UTF-8"),  # valid UTF-8: read, then refused for what it names
    (b"small/data/\xc3", r"entry name b'small/data/\\xc3' is not UTF-8"),  # a sequence cut short by the name's end
    (b"small/DATA/8", "holds 1 entry twice .*'small/data/8'"),  # torch's lookup ignores ASCII case
])
def test_names_are_decoded_and_compared_as_torch_looks_them_up(tmp_path, name, match):
    """The names are decoded all at once: a bad one is still named, wherever it lies."""
    src = _small(tmp_path)
    raw = bytearray(src.read_bytes())
    end = _eocd_at(raw)
    cd = struct.unpack_from("<L", raw, end + 16)[0]
    target = b"small/data/7"  # an entry in the middle of the directory, renamed in place
    assert len(name) == len(target)
    rec = next(i for i in range(cd, end) if raw[i:i + 4] == b"PK\x01\x02"
               and raw[i + 46:i + 46 + struct.unpack_from("<H", raw, i + 28)[0]] == target)
    raw[rec + 46:rec + 46 + len(target)] = name
    bad = tmp_path / "bad.pt"
    bad.write_bytes(bytes(raw))
    if match == "not UTF-8":  # the renamed entry reads; storage 7 is then missing
        match = "storage '7' is referenced but 'small/data/7' is missing"
    with pytest.raises(FormatError, match=match) as e:
        surgery.open(bad)
    assert "\n" not in str(e.value)


def _raw_zip(names: list[bytes], count: int | None = None, methods: list[int] | None = None) -> bytes:
    out, cd = bytearray(), bytearray()
    for i, raw in enumerate(names):
        method = methods[i] if methods else 0
        off = len(out)
        out += struct.pack("<4s5H3L2H", b"PK\x03\x04", 20, 0, method, 0, 0, 0, 0, 0, len(raw), 0) + raw
        cd += struct.pack("<4s6H3L5H2L", b"PK\x01\x02", 20, 20, 0, method, 0, 0, 0, 0, 0, len(raw), 0, 0, 0, 0, 0,
                          off) + raw
    n = len(names) if count is None else count
    return bytes(out + cd + struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, n, n, len(cd), len(out), 0))


def _refusal(data: bytes) -> str:
    fd, path = tempfile.mkstemp()
    try:
        os.write(fd, data)
        with pytest.raises(FormatError) as e:
            ZipIndex(fd, 0, len(data), "x.pt")
        return str(e.value)
    finally:
        os.close(fd)
        os.unlink(path)


@pytest.mark.parametrize("names, kw, match", [
    ([b"a/\xff", b"a/b\0"], {}, r"b'a/\\xff' is not UTF-8"),               # a bad name before a NUL one
    ([b"a/\xff", b"x" * 600], {}, r"b'a/\\xff' is not UTF-8"),             # before a long one
    ([b"a/b\0", b"a/c"], {"count": 3}, "holds a NUL byte"),                 # before a wrong count
    ([b"a/b\0", b"a/c"], {"methods": [12, 0]}, "holds a NUL byte"),         # on a record refused for its method
])
def test_the_first_bad_record_is_the_one_named(names, kw, match):
    """Names are decoded all at once, after the walk; a corrupt directory is still refused for
    its first fault, as torch's reader meets them."""
    msg = _refusal(_raw_zip(names, **kw))
    assert re.search(match, msg) and "\n" not in msg, msg
