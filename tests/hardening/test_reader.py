"""The checkpoint reader against crafted pickles: BUILD, codecs, huge integers, amplification,
deep nesting in --resume. Each one is refused with one line on stderr and exit code 2, or read
correctly; none reaches a traceback, a crash, or code inside surgery's process."""

from __future__ import annotations

import io
import json
import pickle
import struct
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

import surgery
from surgery.errors import FormatError
from surgery.formats import torch_records
from tests import REPO



def _s(text: str | bytes) -> bytes:
    b = text.encode() if isinstance(text, str) else text
    return b"X" + struct.pack("<I", len(b)) + b


def _long(n: int) -> bytes:
    """LONG1/LONG4 for ``n``, as pickle writes big integers."""
    raw = n.to_bytes((n.bit_length() + 8) // 8, "little", signed=True)
    return (b"\x8a" + bytes([len(raw)]) if len(raw) < 256 else b"\x8b" + struct.pack("<i", len(raw))) + raw


def _tensor(size: bytes = b"K\x04\x85", stride: bytes = b"K\x01\x85", offset: bytes = b"K\x00") -> bytes:
    """A protocol-2 tensor record over storage '0' (4 float32), as torch.save writes one."""
    pid = b"(" + _s("storage") + b"ctorch\nFloatStorage\n" + _s("0") + _s("cpu") + b"K\x04tQ"
    return (b"ctorch._utils\n_rebuild_tensor_v2\n(" + pid + offset + size + stride
            + b"\x89ccollections\nOrderedDict\n)RtR")


def _ckpt(*entries: tuple[str, bytes]) -> bytes:
    return b"\x80\x02}" + b"".join(_s(k) + v + b"s" for k, v in entries) + b"."


def _pt(tmp_path: Path, pkl: bytes, name: str = "x.pt") -> Path:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("archive/data.pkl", pkl)
        z.writestr("archive/byteorder", b"little")
        z.writestr("archive/data/0", bytes(16))
        z.writestr("archive/version", b"3\n")
    path = tmp_path / name
    path.write_bytes(buf.getvalue())
    return path


def _refused(cli, *args, match: str) -> str:
    r = cli(*args)
    lines = r.stderr.splitlines()
    assert r.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (r.exit_code, r.stderr[-2000:])
    assert match in lines[0], lines[0]
    return lines[0]


def test_a_crafted_record_reads_like_torch_writes_it(tmp_path):
    ck = surgery.open(_pt(tmp_path, _ckpt(("w", _tensor()))))
    assert ck.tensors["w"].shape == (4,) and ck.tensors["w"].dtype == "F32"


# ----------------------------------------------------------------------------- BUILD

def test_build_cannot_rewrite_a_function_the_reader_hands_out(cli, tmp_path):
    before = torch_records._rebuild_tensor_v2.__defaults__
    slotstate = b"N}" + _s("__defaults__") + b"(K\x07K\x07K\x07ts\x86b"
    pkl = _ckpt(("w", _tensor()), ("f", b"ctorch._utils\n_rebuild_tensor_v2\n" + slotstate))
    _refused(cli, "inspect", _pt(tmp_path, pkl), match="BUILD")
    assert torch_records._rebuild_tensor_v2.__defaults__ == before
    # a dict state would land in the function's __dict__
    pkl = _ckpt(("w", _tensor()), ("f", b"ccollections\nOrderedDict\n}" + _s("x") + b"K\x01sb"))
    _refused(cli, "inspect", _pt(tmp_path, pkl), match="BUILD")


@pytest.mark.parametrize("cls, match", [(b"ctorch\nTensor\n", "__setstate__"),
                                        (b"ctorch.nn.parameter\nParameter\n", "__setstate__")])
def test_build_cannot_set_attributes_on_a_record_class(cli, tmp_path, cls, match):
    before = dict(vars(torch_records._LegacyTensor)), dict(vars(torch_records._Parameter))
    slotstate = b"N}" + _s("__new__") + b"K\x07s\x86b"
    _refused(cli, "inspect", _pt(tmp_path, _ckpt(("w", _tensor()), ("c", cls + slotstate))), match=match)
    assert (dict(vars(torch_records._LegacyTensor)), dict(vars(torch_records._Parameter))) == before


def test_a_legacy_tensor_filled_by_build_is_checked_like_any_record(cli, tmp_path):
    # torch.Tensor made by NEWOBJ, then BUILD with (storage, offset, size, stride): 100 floats of a 4-float storage
    storage = b"(X\x07\x00\x00\x00storagectorch\nFloatStorage\nX\x01\x00\x00\x000X\x03\x00\x00\x00cpuK\x04tQ"
    legacy = b"ctorch\nTensor\n)\x81(" + storage + b"K\x00Kd\x85K\x01\x85tb"
    _refused(cli, "inspect", _pt(tmp_path, _ckpt(("w", legacy))), match="reaches past the end")


def test_build_cannot_change_a_tensor_record_after_it_is_made(cli, tmp_path):
    negative = b"}" + _s("shape") + b"J\xfb\xff\xff\xff\x85sb"
    path = _pt(tmp_path, _ckpt(("w", _tensor() + negative)))
    _refused(cli, "inspect", path, match="BUILD")
    _refused(cli, "remap", path, tmp_path / "out.safetensors", match="BUILD")
    assert not (tmp_path / "out.safetensors").exists()


def test_build_on_an_ordered_dict_keeps_state_as_data(tmp_path):
    """state_dict() attaches _metadata to its OrderedDict; pickle restores it with BUILD."""
    import torch

    sd = torch.nn.Linear(2, 2).state_dict()
    assert hasattr(sd, "_metadata")
    torch.save(sd, tmp_path / "sd.pt")
    assert sorted(surgery.open(tmp_path / "sd.pt").tensors) == ["bias", "weight"]
    # an attribute named like a method must not shadow it
    shadow = b"ccollections\nOrderedDict\n)R" + _s("w") + _tensor() + b"s}" + _s("items") + b"K\x01sb"
    path = _pt(tmp_path, b"\x80\x02" + shadow + b".")
    assert list(surgery.open(path).tensors) == ["w"]


# ----------------------------------------------------------------------------- codecs

@pytest.mark.parametrize("codec", ["punycode", "utf-16", "rot13", "idna", "utf-8"])
def test_codecs_other_than_latin1_are_refused(cli, tmp_path, codec):
    enc = b"c_codecs\nencode\n" + _s("a" * 1000) + _s(codec) + b"\x86R"
    _refused(cli, "inspect", _pt(tmp_path, _ckpt(("w", _tensor()), ("b", enc))), match="codec")


def test_protocol_2_bytes_read_as_pickle_writes_them(cli, tmp_path):
    import torch

    torch.save({"w": torch.zeros(2), "blob": b"\x00\xff" * 4}, tmp_path / "b.pt", pickle_protocol=2)
    assert b"_codecs\nencode" in zipfile.ZipFile(tmp_path / "b.pt").read("b/data.pkl")
    r = cli("inspect", tmp_path / "b.pt", "--json")
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["extras"]["blob"].startswith("b'\\x00\\xff")


# ----------------------------------------------------------------------------- integers and sizes

HUGE = {
    "3 MB integer": (_tensor(size=_long(1 << (8 * 3_000_000 - 9)) + b"\x85"), "integer"),
    "integer past the int-to-str limit": (_tensor(size=_long(10 ** 5000) + b"\x85"), "integer"),
    "60,000 dimensions": (_tensor(size=b"(" + b"K\x02" * 60_000 + b"t", stride=b"(" + b"K\x00" * 60_000 + b"t"), "rank"),
    "dimension past int64": (_tensor(size=_long(1 << 70) + b"\x85", stride=b"K\x00\x85"), "2**63"),
    "elements past int64 (stride 0)": (_tensor(size=b"(" + _long(1 << 62) * 20 + b"t", stride=b"(" + b"K\x00" * 20 + b"t"), "2**63"),
    "negative size": (_tensor(size=b"J\xff\xff\xff\xff\x85"), "invalid shape"),
    "view past its storage": (_tensor(offset=b"K\x64"), "past the end"),
    "rank mismatch": (_tensor(stride=b"K\x01K\x01\x86"), "invalid shape"),
}


@pytest.mark.parametrize("name", sorted(HUGE))
@pytest.mark.parametrize("flag", [None, "--keys", "--json"])
def test_huge_or_impossible_sizes_are_one_line(cli, tmp_path, name, flag):
    record, match = HUGE[name]
    path = _pt(tmp_path, _ckpt(("w", record)))
    _refused(cli, "inspect", path, *([flag] if flag else []), match=match)


@pytest.mark.parametrize("offsets, bad", [((0, 2, 3), "offset 3"), ((3, 0, 2), "offset 3"), ((0, 2, 0, 1), None)])
def test_each_tensor_of_one_layout_is_held_to_its_storage(tmp_path, offsets, bad):
    """Tensors of one shape and stride are checked once per layout, and each one's offset still
    against its storage: a view two elements long at offset 3 of four elements is refused."""
    entries = [(f"w{i}", _tensor(size=b"K\x02\x85", offset=b"K" + bytes([o]))) for i, o in enumerate(offsets)]
    path = _pt(tmp_path, _ckpt(*entries))
    if bad is None:
        assert [t.storage_offset for t in surgery.open(path).tensors.values()] == list(offsets)
        return
    with pytest.raises(FormatError, match=f"reaches past the end of its storage.*{bad}|{bad}.*past the end"):
        surgery.open(path)


@pytest.mark.parametrize("offsets", [(0, 2, 3), (3, 0)])
def test_each_tensor_is_held_to_the_bytes_its_storage_has_in_the_zip(tmp_path, offsets):
    """The pickle declares 8 elements for storage '0', the zip holds 16 bytes (4 of them): a
    view two elements long at offset 3 is refused, whatever tensors of its layout came before."""
    entries = [(f"w{i}", _tensor(size=b"K\x02\x85", offset=b"K" + bytes([o])))
               for i, o in enumerate(offsets)]
    pkl = _ckpt(*entries).replace(_s("cpu") + b"K\x04", _s("cpu") + b"K\x08")
    with pytest.raises(FormatError, match=r"'w\d' \[2\] reaches past the end of its storage \(16 bytes\)"):
        surgery.open(_pt(tmp_path, pkl))


def test_a_key_of_a_thousand_dots_is_inspected(cli, tmp_path):
    from safetensors.numpy import save_file
    import numpy as np

    key = "a." * 1000 + "weight"
    save_file({key: np.zeros(2, np.float32)}, tmp_path / "dots.safetensors")
    for flags in ([], ["--keys"], ["--json"], ["--depth", "2000"]):
        r = cli("inspect", tmp_path / "dots.safetensors", *flags)
        assert r.exit_code == 0, r.stderr[-500:]
    pt = _pt(tmp_path, _ckpt((key, _tensor())))
    assert cli("inspect", pt, "--depth", "2000").exit_code == 0


@pytest.mark.parametrize("header", [
    {"w": {"dtype": "F32", "shape": [10 ** 4000, 0], "data_offsets": [0, 0]}},
    {"w": {"dtype": "F32", "shape": [1] * 60_000 + [0], "data_offsets": [0, 0]}},
    {"w": {"dtype": "F32", "shape": [1 << 62] * 20, "data_offsets": [0, 0]}},
])
def test_safetensors_header_numbers_are_bounded(cli, tmp_path, header):
    raw = json.dumps(header).encode()
    path = tmp_path / "h.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw)
    line = _refused(cli, "inspect", path, "--json", match="invalid shape")
    assert len(line) < 300


# ----------------------------------------------------------------------------- amplification

def test_shared_strings_count_by_their_bytes(cli, tmp_path):
    """A 16 KB file whose string is referenced 2**15 times through the memo: str() of it (here
    by torch.device) would be 256 MB. Objects are counted with the bytes of their strings."""
    amplified = _s("x" * 8192) + b"\x85q\x00" + b"h\x00h\x00\x86q\x00" * 15
    pkl = _ckpt(("w", _tensor()), ("d", b"ctorch\ndevice\n" + amplified + b"\x85R"))
    assert len(pkl) < 16_384
    _refused(cli, "inspect", _pt(tmp_path, pkl), match="pickle bomb")


def test_summaries_never_repr_whole_strings(cli, tmp_path):
    big = "y" * 5_000_000
    pkl = _ckpt(*[(f"w{i}", _tensor()) for i in range(3)], ("note", _s(big)), (big, b"K\x01"))
    r = cli("inspect", _pt(tmp_path, pkl), "--json")
    assert r.exit_code == 0, r.stderr[-500:]
    extras = json.loads(r.stdout)["extras"]
    assert all(len(k) <= 200 and len(v) <= 60 for k, v in extras.items()), [(k[:80], v[:80]) for k, v in extras.items()]


# ----------------------------------------------------------------------------- the scanner itself

def _objects():
    shared = ("s", 1.5, b"\x00\xff")
    rec: list = []
    rec.append(rec)
    return {"d": {1: [1, 2**70, -3], (1, 2): frozenset({1, 2})}, "set": {3, 4}, "t": (shared, shared),
            "b": bytearray(b"ab"), "big": 10 ** 600, "n": None, "f": float("nan"), "u": "é" * 300,
            "rec": rec, "long": "z" * 70_000, "nested": [[[[1]]]]}


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_scan_reads_what_pickle_writes(protocol):
    from surgery.formats.pickle_scan import scan

    data = pickle.dumps(_objects(), protocol=protocol)
    assert scan(data, "x") == len(data)


def test_scan_refuses_extension_codes_and_buffers():
    from surgery.formats.pickle_scan import scan

    for pkl in (b"\x80\x02\x82\x01.", b"\x80\x05\x97.", b"\x80\x05K\x01\x98."):
        with pytest.raises(FormatError, match="opcode"):
            scan(pkl, "x")


def test_legacy_stream_scan_reads_past_the_first_chunk(tmp_path):
    """Legacy files are pickles followed by storage bytes: the scan reads only what it needs,
    and a pickle longer than its first read still opens."""
    import torch

    sd = {f"layer.{i}.weight": torch.zeros(1) for i in range(20_000)}
    torch.save(sd, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    ck = surgery.open(tmp_path / "legacy.pt")
    assert len(ck.tensors) == 20_000


# ----------------------------------------------------------------------------- --resume

_RESUME = textwrap.dedent("""
    import sys
    import typer
    from cli.common import handles_errors
    from surgery.trainer.state import load_checkpoint

    @handles_errors
    def main():
        load_checkpoint(sys.argv[1])

    try:
        main()
    except typer.Exit as e:
        sys.exit(e.exit_code)
""")


def test_resume_of_a_deep_tuple_is_one_line_not_a_crash(tmp_path):
    """torch.load(weights_only=True) dies with SIGSEGV hashing a 1M-deep tuple used as a key."""
    deep = b")" + b"\x85" * 1_000_000
    pkl = b"\x80\x02}(" + _s("format") + _s("surgery.train/1") + deep + b"K\x01u."
    path = _pt(tmp_path, pkl, "last.pt")
    r = subprocess.run([sys.executable, "-c", _RESUME, str(path)], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert r.returncode == 2, (r.returncode, r.stderr[-1000:])
    assert len(r.stderr.splitlines()) == 1 and "levels deep" in r.stderr, r.stderr
