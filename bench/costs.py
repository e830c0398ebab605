"""What tiny hostile inputs cost `surgery inspect`: one file (or folder) per class, each under 1 MB,
and a larger one of each to check that the cost grows linearly with the input.

    .venv/bin/python bench/costs.py                 # every class, small and large
    .venv/bin/python bench/costs.py --only size-str,queue --timeout 60

Each input runs `surgery inspect` in its own child process; wall time is spawn to reap, peak RSS is
the child's own ``ru_maxrss`` (from ``os.wait4``). The goal: an input under 1 MB costs at most 2 s
and 300 MB, and the large one costs at most twice its share (size ratio) of the time above the
floor (the same command on a clean checkpoint). A class's builders are used by the tests too
(tests/hardening/test_costs.py), at smaller scales.
"""

from __future__ import annotations

import argparse
import io
import os
import struct
import subprocess
import sys
import tempfile
import time
import zipfile
import zlib
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parent.parent
GOAL_S, GOAL_MB, SMALL_BYTES = 2.0, 300, 1 << 20


# ----------------------------------------------------------------------------- pickle pieces

def s(text: str | bytes) -> bytes:
    """BINUNICODE: a str in the pickle."""
    b = text.encode() if isinstance(text, str) else text
    return b"X" + struct.pack("<I", len(b)) + b


def tensor() -> bytes:
    """A protocol-2 tensor record over storage '0' (4 float32), as torch.save writes one."""
    pid = b"(" + s("storage") + b"ctorch\nFloatStorage\n" + s("0") + s("cpu") + b"K\x04tQ"
    return b"ctorch._utils\n_rebuild_tensor_v2\n(" + pid + b"K\x00K\x04\x85K\x01\x85\x89ccollections\nOrderedDict\n)RtR"


def ckpt(*entries: tuple[str, bytes]) -> bytes:
    """A state dict pickle: a tensor 'w' and small entries (so no dict is mostly tensors), then ``entries``."""
    base = (("w", tensor()), ("a", b"K\x01"), ("b", b"K\x02"))
    return b"\x80\x02}" + b"".join(s(k) + v + b"s" for k, v in (*base, *entries)) + b"."


def torch_zip(pkl: bytes, deflate: bool = False) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("archive/data.pkl", pkl, compress_type=zipfile.ZIP_DEFLATED if deflate else zipfile.ZIP_STORED)
        z.writestr("archive/byteorder", b"little")
        z.writestr("archive/data/0", bytes(16))
        z.writestr("archive/version", b"3\n")
    return buf.getvalue()


def put(i: int) -> bytes:
    """BINPUT / LONG_BINPUT: store the top of the stack in memo slot i."""
    return b"q" + bytes([i]) if i < 256 else b"r" + struct.pack("<I", i)


def get(i: int) -> bytes:
    """BINGET / LONG_BINGET: push memo slot i (two bytes for the first 256)."""
    return b"h" + bytes([i]) if i < 256 else b"j" + struct.pack("<I", i)


# ----------------------------------------------------------------------------- this section's classes

def size_of_str(n: int, calls: int = 30) -> bytes:
    """torch.Size(str) again and again: a tuple of n one-character strings per call."""
    first = b"ctorch\nSize\n" + s("x" * n) + put(200) + b"\x85R"
    return ckpt(*[(f"s{i}", first if i == 0 else b"ctorch\nSize\n" + get(200) + b"\x85R") for i in range(calls)])


def size_repeated(n: int, calls: int = 60) -> bytes:
    """torch.Size(list) of one n-int list, called again and again (torch accepts each call)."""
    ints = b"]" + put(200) + b"(" + b"K\x01" * n + b"e"
    first = b"ctorch\nSize\n" + ints + b"\x85R"
    return ckpt(*[(f"s{i}", first if i == 0 else b"ctorch\nSize\n" + get(200) + b"\x85R") for i in range(calls)])


def device_join(n: int, refs: int = 30) -> bytes:
    """torch.device(S, S, ...): one n-character string, joined ``refs`` times."""
    return ckpt(("d", b"ctorch\ndevice\n(" + s("y" * n) + put(200) + get(200) * (refs - 1) + b"tR"))


def queue(n: int) -> bytes:
    """A list of n references to one dict: the container search queues each."""
    return ckpt(("l", b"}" + put(200) + b"0](" + get(200) * n + b"e"))


def module_comb(n: int, depth: int = 15) -> bytes:
    """Pickled modules (``mylib.Net``, accepted as records) ``depth`` deep, each holding one shared
    module of n children: walking the modules from each module in turn costs depth * n."""
    net = b"cmylib\nNet\n" + put(201) + b"0"
    wide = get(201) + b")\x81}" + s("_modules") + b"}(" + b"".join(b"J" + struct.pack("<i", i) + b"N" for i in range(n))
    wide += b"usb" + put(203) + b"0"
    chain = get(203)  # the innermost module is the shared one; each level wraps the one below
    for _ in range(depth):
        chain = get(201) + b")\x81}" + s("_modules") + b"}(" + s("a") + get(203) + s("n") + chain + b"usb"
    return b"\x80\x02" + net + wide + ckpt(("model", chain))[2:]


def summaries(n: int, entries: int = 30) -> bytes:
    """``entries`` entries, each a list around one shared list of n items: each summary counts it."""
    shared = b"]" + put(200) + b"(" + b"N" * n + b"e0"
    return b"\x80\x02" + shared + ckpt(*[(f"e{i}", b"]" + get(200) + b"a") for i in range(entries)])[2:]


def memoize_zip(n: int) -> bytes:
    """A deflated data.pkl of n MEMOIZE opcodes: a few KB that inflate to n bytes."""
    return torch_zip(b"\x80\x04N" + b"\x94" * n + b"0" + ckpt()[2:], deflate=True)
