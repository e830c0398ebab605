"""Hostile pickles and zips: refused (SurgeryError) with nothing run and nothing large allocated."""

from __future__ import annotations

import io
import os
import pickle
import struct
import subprocess
import sys
import textwrap
import time
import zipfile
import zlib
from pathlib import Path

import pytest

import surgery
from surgery.errors import FormatError, SurgeryError, UnsafeCheckpointError
from tests import REPO



def _zip(entries: dict[str, bytes], compress: dict[str, int] | None = None) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, data in entries.items():
            z.writestr(name, data, compress_type=(compress or {}).get(name, zipfile.ZIP_STORED))
    return buf.getvalue()


def _torch_zip(pkl: bytes) -> bytes:
    return _zip({"archive/data.pkl": pkl, "archive/byteorder": b"little", "archive/version": b"3\n"})


def _legacy(pkl: bytes) -> bytes:
    from surgery.formats.torch_legacy import MAGIC_NUMBER, PROTOCOL_VERSION

    sys_info = {"protocol_version": PROTOCOL_VERSION, "little_endian": True, "type_sizes": {"int": 4}}
    return b"".join(pickle.dumps(x, protocol=2) for x in (MAGIC_NUMBER, PROTOCOL_VERSION, sys_info)) + pkl + pickle.dumps([], 2)


def _str(s: str) -> bytes:
    b = s.encode()
    return b"X" + struct.pack("<I", len(b)) + b


def payloads(marker: Path) -> dict[str, bytes]:
    """Pickles that, unpickled by pickle.load, would create ``marker``."""
    cmd = f"touch {marker}"

    class Reduce:
        def __reduce__(self):
            return (os.system, (cmd,))

    return {
        "GLOBAL os.system": b"\x80\x02cos\nsystem\n" + _str(cmd) + b"\x85R.",
        "GLOBAL posix.system": b"\x80\x02cposix\nsystem\n" + _str(cmd) + b"\x85R.",
        "builtins.eval": b"\x80\x02cbuiltins\neval\n" + _str(f"open({str(marker)!r}, 'w')") + b"\x85R.",
        "builtins.exec (py2 name)": b"\x80\x02c__builtin__\nexec\n" + _str(f"open({str(marker)!r}, 'w')") + b"\x85R.",
        "subprocess.Popen": b"\x80\x02csubprocess\nPopen\n(" + _str("touch") + _str(str(marker)) + b"l\x85R.",
        "STACK_GLOBAL os.system": b"\x80\x04\x8c\x02os\x8c\x06system\x93" + _str(cmd) + b"\x85R.",
        "__reduce__ payload": pickle.dumps(Reduce(), protocol=2),
        "torch.storage._load_from_bytes": b"\x80\x02ctorch.storage\n_load_from_bytes\nC\x03abc\x85R.",
        "nested in a state dict": b"\x80\x02}X\x01\x00\x00\x00wcos\nsystem\n" + _str(cmd) + b"\x85Rs.",
        "as a persistent id": b"\x80\x02(X\x07\x00\x00\x00storagecos\nsystem\n" + _str(cmd) + b"\x85RK\x00tQ.",
        "INST opcode": b"(S'" + cmd.encode() + b"'\nios\nsystem\n.",
        "OBJ opcode": b"\x80\x02(cos\nsystem\n" + _str(cmd) + b"o.",
    }


BOMBS = {
    "deep tuple nesting (hash would overflow the C stack)": b"\x80\x02}" + b")" + b"\x85" * 200_000 + b"K\x01s.",
    "deep list nesting": b"\x80\x02" + b"]" + b"\x85" * 200_000 + b".",
    "deep MARK nesting": b"\x80\x02" + b"(" * 100_000 + b"t" * 100_000 + b".",
    "memo bomb: tuple of 2**60 shared leaves as a dict key": b"\x80\x02}K\x01\x85q\x00" + b"h\x00h\x00\x86q\x00" * 60 + b"K\x01s.",
    "memo bomb via frozenset": b"\x80\x04K\x01\x85\x94" + b"h\x00h\x00\x86\x94" * 60 + b"\x8c\x08builtins\x8c\tfrozenset\x93\x94(h\x3c\x85\x85R.",
    "BINBYTES8 declaring 2**62 bytes": b"\x80\x04\x8e" + (2**62).to_bytes(8, "little") + b"ab.",
    "BINUNICODE8 declaring 2**61 bytes": b"\x80\x04\x8d" + (2**61).to_bytes(8, "little") + b"ab.",
    "BYTEARRAY8 declaring 2**60 bytes": b"\x80\x05\x96" + (2**60).to_bytes(8, "little") + b"ab.",
    "BINBYTES declaring 4 GiB": b"\x80\x03B\xff\xff\xff\xffab.",
    "LONG4 declaring 2 GiB": b"\x80\x02\x8b\xff\xff\xff\x7f\x00.",
    "LONG with 100k digits": b"\x80\x02L" + b"9" * 100_000 + b"L\n.",
    "memo index 2**32-1 (C memo table resize)": b"\x80\x02K\x01r\xff\xff\xff\xff.",
    "FRAME declaring 2**62 bytes": b"\x80\x04\x95" + (2**62).to_bytes(8, "little") + b"K\x01.",
}


@pytest.mark.parametrize("name", sorted(payloads(Path("/x"))))
@pytest.mark.parametrize("container", ["zip", "legacy"])
def test_hostile_globals_run_nothing(name, container, tmp_path):
    marker = tmp_path / "pwned"
    pkl = payloads(marker)[name]
    path = tmp_path / "evil.pt"
    path.write_bytes(_torch_zip(pkl) if container == "zip" else _legacy(pkl))
    with pytest.raises(SurgeryError) as info:
        surgery.open(path)
    assert "\n" not in info.value.one_line()
    # even when the user accepts the globals, they load as inert records and are never called
    try:
        surgery.open(path, allow_globals=["os.*", "posix.*", "builtins.*", "subprocess.*", "torch.*"])
    except SurgeryError:
        pass
    time.sleep(0.05)
    assert not marker.exists(), f"{name}: the payload ran"


def test_refusal_names_the_globals(tmp_path):
    path = tmp_path / "evil.pt"
    path.write_bytes(_torch_zip(payloads(tmp_path / "m")["GLOBAL os.system"]))
    with pytest.raises(UnsafeCheckpointError, match=r"os\.system.*Nothing was executed"):
        surgery.open(path)


@pytest.mark.parametrize("name", sorted(BOMBS))
def test_bombs_are_refused_quickly(name, tmp_path):
    path = tmp_path / "bomb.pt"
    path.write_bytes(_torch_zip(BOMBS[name]))
    t0 = time.process_time()
    with pytest.raises(SurgeryError):
        surgery.open(path)
    assert time.process_time() - t0 < 5


def _zip_bombs(tmp_path: Path) -> dict[str, Path]:
    """Zips whose entries declare (or inflate to) far more than the file holds."""
    out = {}
    small_pkl = b"\x80\x02}."
    # data.pkl deflated: ~200 MB of zeros in ~200 KB (a valid pickle would need it all read first)
    comp = zlib.compressobj(9, zlib.DEFLATED, -15)
    chunks = [comp.compress(b"\x80\x02}" + b"N0" * 10)] + [comp.compress(b"\0" * (1 << 20)) for _ in range(200)]
    deflated = b"".join(chunks) + comp.flush()
    raw = _zip({"archive/data.pkl": small_pkl, "archive/byteorder": b"little"})
    out["deflate bomb data.pkl"] = _patch_entry(raw, "archive/data.pkl", deflated, 200 * (1 << 20) + 23)
    # byteorder: a 4 GiB claim
    raw = _zip({"archive/data.pkl": small_pkl, "archive/byteorder": b"little"},
               {"archive/byteorder": zipfile.ZIP_DEFLATED})
    out["byteorder declaring 4 GiB"] = _set_sizes(raw, "archive/byteorder", file_size=0xFFFFFFFF)
    # stored data.pkl claiming 400 MB inside a tiny file
    raw = _zip({"archive/data.pkl": small_pkl})
    out["stored data.pkl declaring 400 MB"] = _set_sizes(raw, "archive/data.pkl", file_size=400 << 20, compress_size=400 << 20)
    # a storage entry declaring 4 GiB
    import torch

    buf = io.BytesIO()
    torch.save({"w": torch.zeros(4)}, buf)
    raw = buf.getvalue()
    name = next(n for n in zipfile.ZipFile(io.BytesIO(raw)).namelist() if "/data/" in n)
    out["storage declaring 4 GiB"] = _set_sizes(raw, name, file_size=0xFFFFFFF0, compress_size=0xFFFFFFF0)
    paths = {}
    for k, data in out.items():
        p = tmp_path / (k.replace(" ", "_") + ".pt")
        p.write_bytes(data)
        paths[k] = p
    return paths


def _set_sizes(raw: bytes, name: str, file_size: int | None = None, compress_size: int | None = None) -> bytes:
    """Rewrite the size fields of ``name`` in both its local header and the central directory."""
    buf = bytearray(raw)
    enc = name.encode()
    for sig, off_c, off_u, name_at in ((b"PK\x03\x04", 18, 22, 30), (b"PK\x01\x02", 20, 24, 46)):
        i = buf.find(sig)
        while i != -1:
            if buf[i + name_at:i + name_at + len(enc)] == enc:
                if compress_size is not None:
                    buf[i + off_c:i + off_c + 4] = struct.pack("<I", compress_size)
                if file_size is not None:
                    buf[i + off_u:i + off_u + 4] = struct.pack("<I", file_size)
            i = buf.find(sig, i + 4)
    return bytes(buf)


def _patch_entry(raw: bytes, name: str, deflated: bytes, file_size: int) -> bytes:
    """A zip with ``name`` holding a raw deflate stream (sizes and CRC set to match)."""
    src = zipfile.ZipFile(io.BytesIO(raw))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as z:
        for info in src.infolist():
            if info.filename != name:
                z.writestr(info, src.read(info))
    # append by hand: local header + data, then rebuild the central directory with zipfile
    body = out.getvalue()
    z2 = zipfile.ZipFile(io.BytesIO(body))
    infos = z2.infolist()
    cd_start = min(struct.unpack("<I", body[body.rfind(b"PK\x05\x06") + 16:][:4]))
    head = bytearray(body[:cd_start])
    local_off = len(head)
    enc = name.encode()
    head += struct.pack("<4sHHHHHIIIHH", b"PK\x03\x04", 20, 0, 8, 0, 0, 0, len(deflated), file_size, len(enc), 0) + enc + deflated
    cd = bytearray()
    for info in infos:
        e = info.filename.encode()
        cd += struct.pack("<4sHHHHHHIIIHHHHHII", b"PK\x01\x02", 20, 20, 0, info.compress_type, 0, 0, info.CRC,
                          info.compress_size, info.file_size, len(e), 0, 0, 0, 0, 0, info.header_offset) + e
    cd += struct.pack("<4sHHHHHHIIIHHHHHII", b"PK\x01\x02", 20, 20, 0, 8, 0, 0, 0, len(deflated), file_size,
                      len(enc), 0, 0, 0, 0, 0, local_off) + enc
    n = len(infos) + 1
    end = struct.pack("<4sHHHHIIH", b"PK\x05\x06", 0, 0, n, n, len(cd), len(head), 0)
    return bytes(head + cd + end)


_PROBE = textwrap.dedent("""
    import resource, sys
    import surgery
    from surgery.errors import SurgeryError
    for p in sys.argv[1:]:
        try:
            surgery.open(p)
            print("OPENED", p)
        except SurgeryError as e:
            print("REFUSED", e.one_line()[:160])
    print("RSS", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
""")


def _peak_rss_kb(paths: list[Path]) -> tuple[int, str]:
    r = subprocess.run([sys.executable, "-c", _PROBE, *map(str, paths)], capture_output=True, text=True,
                       cwd=REPO, timeout=120)
    assert r.returncode == 0, r.stderr
    return int(r.stdout.split("RSS")[-1]), r.stdout


def test_bombs_allocate_little(tmp_path):
    """Peak memory while refusing every bomb stays close to that of a bare import of surgery."""
    files = []
    for name, pkl in BOMBS.items():
        p = tmp_path / f"zip_{len(files)}.pt"
        p.write_bytes(_torch_zip(pkl))
        q = tmp_path / f"legacy_{len(files)}.pt"
        q.write_bytes(_legacy(pkl))
        files += [p, q]
    files += list(_zip_bombs(tmp_path).values())
    base, _ = _peak_rss_kb([])
    peak, out = _peak_rss_kb(files)
    assert "OPENED" not in out, out
    assert out.count("REFUSED") == len(files), out
    assert peak - base < 150 * 1024, f"peak RSS grew by {(peak - base) // 1024} MB:\n{out}"


def test_zip_bombs_are_refused_by_declared_size(tmp_path):
    for name, p in _zip_bombs(tmp_path).items():
        with pytest.raises(FormatError):
            surgery.open(p)
