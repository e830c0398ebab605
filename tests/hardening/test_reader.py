"""The checkpoint reader against crafted pickles: BUILD, codecs, huge integers, amplification,
deep nesting in --resume. Each one is refused with one line on stderr and exit code 2, or read
correctly; none reaches a traceback, a crash, or code inside surgery's process."""

from __future__ import annotations

import functools
import io
import json
import pickle
import pickletools
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


@functools.lru_cache(maxsize=1)
def _state_dict_pickle() -> bytes:
    """data.pkl of a torch.save state dict past 256 memo slots: tensors of several ranks (0-d and
    5-d among them), dtypes, strides and offsets, some requiring grad, some keys over 255 bytes."""
    import torch

    makers = (lambda: torch.zeros(3), lambda: torch.zeros(2, 3, dtype=torch.bfloat16), lambda: torch.tensor(1.5),
              lambda: torch.zeros(1, 2, 1, 2, 1, dtype=torch.int64), lambda: torch.zeros(4, 4)[:, 1],
              lambda: torch.zeros(300)[257:260], lambda: torch.zeros(3, dtype=torch.bool),
              lambda: torch.zeros(2, 2, requires_grad=True))
    sd = {("k" * 300 if i % 50 == 7 else "") + f"layers.{i}.w": makers[i % len(makers)]() for i in range(400)}
    buf = io.BytesIO()
    torch.save(sd, buf)
    with zipfile.ZipFile(buf) as z:
        return z.read(next(n for n in z.namelist() if n.endswith("/data.pkl")))


def _ops(data: bytes) -> list[tuple[str, object, int]]:
    return [(op.name, arg, pos) for op, arg, pos in pickletools.genops(data)]


def _entries(data: bytes) -> list[list[int]]:
    """Positions of the LONG_BINPUTs of each state-dict entry whose name is stored by one (past slot 255)."""
    ops, out = _ops(data), []
    for i, (name, arg, pos) in enumerate(ops):
        if name == "LONG_BINPUT" and ops[i - 1][0] == "BINUNICODE" and ops[i + 1][:2] == ("BINGET", 2):
            out.append([])  # the name's PUT, before GET(_rebuild_tensor_v2)
        if name == "LONG_BINPUT" and out:
            out[-1].append(pos)
    return out


def _put(data: bytes, pos: int, slot: int) -> bytes:
    """``data`` with the LONG_BINPUT at ``pos`` storing ``slot``."""
    return data[:pos + 1] + struct.pack("<I", slot) + data[pos + 5:]


def _renumbered(data: bytes, entries: list[list[int]], first: int) -> bytes:
    """``data`` with each of ``entries`` storing slots ``first``, ``first`` + 1, ..."""
    for puts in entries:
        for j, pos in enumerate(puts):
            data = _put(data, pos, first + j)
    return data


def _lettered(data: bytes, every: int = 1) -> bytes:
    """``data`` with every ``every``-th storage key's digits written as letters."""
    keys = [pos for name, arg, pos in _ops(data) if name == "BINUNICODE" and arg.isdigit()]
    out = bytearray(data)
    for pos in keys[::every]:
        n = struct.unpack_from("<I", data, pos + 1)[0]
        out[pos + 5:pos + 5 + n] = data[pos + 5:pos + 5 + n].translate(bytes.maketrans(b"0123456789", b"abcdefghij"))
    return bytes(out)


def _probed(data: bytes) -> bytes:
    """``data`` with its result dropped for a list of every memo slot its LONG_BINPUTs store, the
    i-th wrapped in i % 5 one-tuples: the limits of that pickle depend on all those objects."""
    slots = sorted({arg for name, arg, _ in _ops(data) if name == "LONG_BINPUT"})
    gets = b"".join(b"j" + struct.pack("<I", s) + b"\x85" * (i % 5) for i, s in enumerate(slots))
    assert data.endswith(b".")
    return data[:-1] + b"0(" + gets + b"l."


def _deepened(data: bytes) -> bytes:
    """``data`` with the memoized OrderedDict class replaced, halfway through the entries, by a
    30-deep tuple, and with the entries dropped (POP_MARK) instead of set into the dict: the
    tensors after that point are the deepest and largest objects there are."""
    ops = _ops(data)
    slot = next(ops[i + 1][1] for i, (name, arg, _) in enumerate(ops)
                if (name, arg) == ("GLOBAL", "collections OrderedDict"))
    first_put = _entries(data)[len(_entries(data)) // 2][0]
    at = next(ops[i - 1][2] for i, (_, _, pos) in enumerate(ops) if pos == first_put)  # the entry's name
    assert data[at:at + 1] == b"X" and data.endswith(b"u.")
    return data[:at] + b")" + b"\x85" * 30 + b"r" + struct.pack("<I", slot) + b"0" + data[at:-2] + b"1."


def _outcome(pkl: bytes) -> str:
    from surgery.formats.pickle_scan import scan

    try:
        return f"read to {scan(pkl, 'x')}"
    except FormatError as e:
        return str(e)


def test_scan_reads_a_state_dict_torch_writes():
    data = _state_dict_pickle()
    assert _outcome(data) == _outcome(_lettered(data)) == f"read to {len(data)}"
    probed = _probed(data)
    assert _outcome(probed) == f"read to {len(probed)}"


@pytest.mark.parametrize("bound, work_factor", [("MAX_DEPTH", 4), ("MAX_EXPANDED", 1), ("MAX_EXPANDED", 10 ** 9)])
@pytest.mark.parametrize("variant", [_probed, _deepened])
def test_a_state_dict_is_held_to_the_same_limits_whatever_its_storage_keys_read(monkeypatch, variant, bound,
                                                                                 work_factor):
    """The limits depend on the objects a pickle builds, never on a string's characters: a
    torch.save state dict whose storage keys are numbers, as torch writes them, and the same
    with letters (all of them, or every other one) pass from the same limit on, and below it are
    refused with the same error. The variants make objects in the memo count (a list of them all,
    ends the pickle) and the entries after some point the deepest and largest of all. (A work
    factor of 1 makes the limit the work of all objects together; a huge one, the largest's size.)"""
    from surgery.formats import pickle_scan

    data = variant(_state_dict_pickle())
    monkeypatch.setattr(pickle_scan, "EXPANSION_PER_BYTE", 0)  # the budget apart from the pickle's length
    monkeypatch.setattr(pickle_scan, "WORK_FACTOR", work_factor)

    def outcome(pkl: bytes, value: int) -> str:
        monkeypatch.setattr(pickle_scan, bound, value)
        return _outcome(pkl)

    lo, hi = 0, 1 << 24  # the lowest limit the pickle passes
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if outcome(data, mid).startswith("read") else (mid + 1, hi)
    assert 5 < lo < 1 << 24
    for other in (_lettered(data), _lettered(data, 2)):
        assert outcome(other, lo) == outcome(data, lo) == f"read to {len(data)}"
        assert outcome(other, lo - 1) == outcome(data, lo - 1) != f"read to {len(data)}"


def test_a_memo_slot_far_past_those_filled_is_refused_inside_a_run_of_tensors():
    from surgery.formats.pickle_scan import MEMO_SLACK

    data = _state_dict_pickle()
    entries = _entries(data)
    puts = entries[len(entries) // 2]
    filled = struct.unpack_from("<I", data, puts[0] + 1)[0]  # torch.save fills slots in order
    assert _outcome(_put(data, puts[0], filled + MEMO_SLACK)) == f"read to {len(data)}"
    for slot in (filled + MEMO_SLACK + 1, 2 ** 32 - 1):
        refusal = f"x: pickle stores into memo slot {slot} after filling {filled};"
        assert _outcome(_put(data, puts[0], slot)).startswith(refusal)
    # the whole entry's slots far out, in order: the first is refused
    far = _renumbered(data, [puts], filled + MEMO_SLACK + 1)
    slot = filled + MEMO_SLACK + 1
    assert _outcome(far).startswith(f"x: pickle stores into memo slot {slot} after filling {filled};")
    assert _outcome(_renumbered(data, [puts], 2 ** 32 - len(puts))).startswith("x: pickle stores into memo slot ")


def test_memo_slots_stored_twice_inside_a_run_of_tensors_count_as_the_pickle_reads_them(monkeypatch):
    """A PUT may store into a slot filled before: the unpickler replaces what it held, and so
    must the count. An entry stored where an earlier one was changes nothing read after it. Float
    tensors that store the slots from 2 on, where the rebuild function, the 'storage' tag and
    FloatStorage were, make each next one's storage tuple hold the one before: with the 0-d ones,
    whose slot 6 (read as the location) then holds their arguments, twice (a bomb); without, once
    (each nests one level deeper)."""
    from surgery.formats import pickle_scan

    data = _state_dict_pickle()
    entries = _entries(data)
    assert len(entries) > 300
    middle = entries[len(entries) // 2]
    earlier = struct.unpack_from("<I", data, entries[len(entries) // 3][0] + 1)[0]
    again = _renumbered(data, [middle], earlier)  # where an earlier entry was: nothing reads those slots
    assert _outcome(again) == _outcome(_lettered(again)) == f"read to {len(data)}"
    assert _outcome(_probed(again)) == _outcome(_lettered(_probed(again))) == f"read to {len(_probed(again))}"
    doubled = _renumbered(data, [puts for puts in entries[len(entries) // 2:]
                                 if data[puts[0] + 5:puts[0] + 13] == b"h\x02((h\x03h\x04"], 2)
    assert "(a pickle bomb)" in _outcome(doubled) == _outcome(_lettered(doubled))
    floats = [puts for puts in entries[len(entries) // 2:]  # with a shape and a stride: 8 PUTs
              if data[puts[0] + 5:puts[0] + 13] == b"h\x02((h\x03h\x04" and len(puts) == 8]
    assert len(floats) > 60
    chained = _renumbered(data, floats, 2)
    monkeypatch.setattr(pickle_scan, "MAX_DEPTH", 50)
    assert _outcome(data) == f"read to {len(data)}"
    assert "nests objects more than 50 levels deep" in _outcome(chained) == _outcome(_lettered(chained))


def test_refusals_inside_a_run_of_tensors_are_those_of_any_pickle():
    from surgery.formats.pickle_scan import Truncated, scan

    data = _state_dict_pickle()
    pos = data.index(b"QK\x00", len(data) // 2) + 1  # an offset of 0, as BININT1
    wide = data[:pos] + b"\x8b" + struct.pack("<i", 2000) + bytes(2000) + data[pos + 2:]
    assert "holds a 2000-byte integer" in _outcome(wide)
    persids = [pos for name, _, pos in _ops(data) if name == "BINPERSID"]
    pos = persids[len(persids) // 2]
    assert f"uses opcode 0x82 at offset {pos};" in _outcome(data[:pos] + b"\x82" + data[pos + 1:])
    locations = [pos for name, arg, pos in _ops(data) if (name, arg) == ("BINGET", 6)]  # 'cpu'
    pos = locations[len(locations) // 2]
    assert "corrupt pickle" in _outcome(data[:pos] + b"j" + struct.pack("<I", 10 ** 6) + data[pos + 2:])
    start = _entries(data)[len(_entries(data)) // 2][0]
    for end in range(start, start + 160):  # every cut through two entries
        with pytest.raises(Truncated):
            scan(data[:end], "x")


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
