"""safetensors: an 8-byte header length, a JSON header, then raw little-endian tensor bytes.

Reading parses and validates the header only. Writing streams: the header is built from the plan,
then each tensor's bytes are copied from their source range (kernel-side where possible), so a
re-keyed copy of a 20 GB file needs a few MB of memory.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Iterable

from ..checkpoint import SAFETENSORS_DTYPES, Checkpoint, TensorInfo, dense_nbytes
from ..errors import FormatError
from ..io import Writeback, atomic_file
from .writing import Entry, Payload

MAX_HEADER = 100 * 1024 * 1024
ALIASES_KEY = "surgery.aliases"  # JSON {alias: name}: tied tensors stored once


def read_header(path: Path, display: str | None = None) -> tuple[dict, int]:
    """The parsed, validated header and the absolute offset where tensor data starts."""
    src = display or str(path)
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise FormatError(f"{src}: file is {size} bytes, too short to be safetensors (needs an 8-byte header length)")
        n = int.from_bytes(head, "little")
        if n > MAX_HEADER:
            raise FormatError(f"{src}: safetensors header claims {n} bytes (limit {MAX_HEADER}); the file is corrupt or not safetensors")
        if 8 + n > size:
            raise FormatError(f"{src}: safetensors header claims {n} bytes but the file has {size - 8} after it; the file is truncated")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as e:  # bad UTF-8/JSON, a 5000-digit number, [[[[... nested
        raise FormatError(f"{src}: safetensors header is not valid JSON ({type(e).__name__}: {str(e)[:120]})") from None
    if not isinstance(header, dict):
        raise FormatError(f"{src}: safetensors header must be a JSON object")
    return header, 8 + n


def open_safetensors(path: Path, accept=frozenset(), select: str | None = None, display: str | None = None) -> Checkpoint:
    src = display or str(path)
    header, start = read_header(path, src)
    size = os.path.getsize(path)
    data_len = size - start
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise FormatError(f"{src}: __metadata__ must map strings to strings")
    tensors: dict[str, TensorInfo] = {}
    spans = []
    for name, e in header.items():
        if not isinstance(e, dict):
            raise FormatError(f"{src}: header entry {name!r} is not an object")
        dtype, shape, offs = e.get("dtype"), e.get("shape"), e.get("data_offsets")
        if dtype not in SAFETENSORS_DTYPES:
            raise FormatError(f"{src}: tensor {name!r} has unknown dtype {_short(dtype)} (known: {', '.join(sorted(SAFETENSORS_DTYPES))})")
        if not _valid_shape(shape):
            raise FormatError(f"{src}: tensor {name!r} has an invalid shape {_short(shape)}")
        if (not isinstance(offs, list) or len(offs) != 2 or not all(isinstance(o, int) and not isinstance(o, bool) for o in offs)
                or not 0 <= offs[0] <= offs[1] <= data_len):
            raise FormatError(f"{src}: tensor {name!r} has data_offsets {_short(offs)} outside the {data_len}-byte data section")
        nbytes = dense_nbytes(dtype, shape)
        if nbytes != offs[1] - offs[0]:
            raise FormatError(f"{src}: tensor {name!r} {dtype}{shape} needs {nbytes} bytes but its offsets span {offs[1] - offs[0]}")
        spans.append((offs[0], offs[1], name))
        tensors[name] = TensorInfo(name=name, dtype=dtype, shape=tuple(shape), file=str(path),
                                   data_offset=start + offs[0], storage_nbytes=nbytes)
    spans.sort()
    for (b0, e0, n0), (b1, e1, n1) in zip(spans, spans[1:]):
        if b1 < e0 and b1 != e1:
            raise FormatError(f"{src}: tensors {n0!r} and {n1!r} overlap in the data section; the file is corrupt")
    aliases = _read_aliases(meta, tensors, src)
    for alias, target in aliases.items():
        t = tensors[target]
        tensors[alias] = TensorInfo(**{**t.__dict__, "name": alias})
    return Checkpoint(path=Path(path), format="safetensors", file_size=size, tensors=tensors,
                      metadata=meta, files=[str(path)], aliases=aliases)


def _read_aliases(meta: dict, tensors: dict, src: str) -> dict[str, str]:
    if ALIASES_KEY not in meta:
        return {}
    try:
        aliases = json.loads(meta[ALIASES_KEY])
    except (ValueError, RecursionError):
        raise FormatError(f"{src}: metadata {ALIASES_KEY!r} is not valid JSON") from None
    if not isinstance(aliases, dict) or not all(isinstance(v, str) and v in tensors and k not in tensors for k, v in aliases.items()):
        raise FormatError(f"{src}: metadata {ALIASES_KEY!r} names tensors the file does not hold")
    return aliases


# Bounds checked before any arithmetic on a header's numbers: safetensors stores sizes as u64
# and torch as int64; numpy's NPY_MAXDIMS is 64. A JSON number may hold 4000 digits.
MAX_RANK = 64
MAX_DIM = (1 << 63) - 1


def _valid_shape(shape: object) -> bool:
    if not isinstance(shape, list) or len(shape) > MAX_RANK:
        return False
    if not all(type(s) is int and 0 <= s <= MAX_DIM for s in shape):
        return False
    return math.prod(shape) <= MAX_DIM


def _short(value: object) -> str:
    """A header value in an error message: never the text of a 4000-digit number or a huge list."""
    import reprlib

    return reprlib.repr(value)


# ---------------------------------------------------------------------------- writing

def write(dst: Path, payload: Payload) -> list[str]:
    """Write ``payload`` as one safetensors file at ``dst`` (through a temp file beside it)."""
    with atomic_file(dst) as tmp:
        write_file(tmp, payload.entries, payload.metadata, payload.aliases)
        patch_header(tmp, payload.finish())
    return [str(dst)]


def write_file(path: Path, entries: list[Entry], metadata: dict[str, str], aliases: dict[str, str]) -> None:
    """One safetensors file at ``path``; tied names are recorded under ``ALIASES_KEY``."""
    if aliases:
        metadata = {**metadata, ALIASES_KEY: json.dumps(aliases, separators=(",", ":"))}
    with open(path, "wb") as f:
        f.write(build_header(entries, metadata))
        copy_ranges(f, entries)


def build_header(entries: list[Entry], metadata: dict[str, str]) -> bytes:
    header: dict = {}
    if metadata:
        header["__metadata__"] = metadata
    off = 0
    for e in entries:
        header[e.name] = {"dtype": e.dtype, "shape": list(e.shape), "data_offsets": [off, off + e.nbytes]}
        off += e.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # tensor data starts 8-byte aligned, as safetensors does
    return len(raw).to_bytes(8, "little") + raw


def patch_header(path: Path, replacements: dict[str, str]) -> None:
    """Replace each ``old`` by its ``new``, of the same length, in a written file's header, in
    place and in one read: metadata values known only once the tensors are written (see
    `Payload.finish`)."""
    if any(len(old.encode()) != len(new.encode()) for old, new in replacements.items()):
        raise ValueError("patch_header keeps the header's length: old and new must be as long")
    if not replacements:
        return
    with open(path, "r+b") as f:
        n = int.from_bytes(f.read(8), "little")
        header = bytearray(f.read(min(n, MAX_HEADER)))
        for old, new in replacements.items():
            pos = header.find(old.encode())
            if pos >= 0:
                header[pos:pos + len(new.encode())] = new.encode()
        f.seek(8)
        f.write(header)


def copy_ranges(f, entries: Iterable[Entry]) -> None:
    """Write each entry's bytes in order; adjacent source ranges of one file go in one copy."""
    run: list = []  # [path, start, end]
    writeback = Writeback(f)

    def flush_run():
        if run:
            _copy_file_range(run[0], run[1], run[2], f)
            run.clear()
            writeback()

    for e in entries:
        if callable(e.source):
            flush_run()
            data = e.source()
            if len(data) != e.nbytes:
                raise FormatError(f"tensor {e.name!r}: produced {len(data)} bytes, expected {e.nbytes}")
            f.write(data)
            f.flush()
            writeback()
            continue
        path, start, end = e.source
        if run and run[0] == path and run[2] == start:
            run[2] = end
        else:
            flush_run()
            run.extend([path, start, end])
    flush_run()


def _copy_file_range(path: str, start: int, end: int, out) -> None:
    out.flush()
    fd_out = out.fileno()
    with open(path, "rb") as src:
        fd_in = src.fileno()
        pos, remaining = start, end - start
        use_cfr = hasattr(os, "copy_file_range")
        while remaining > 0:
            n = 0
            if use_cfr:
                try:
                    n = os.copy_file_range(fd_in, fd_out, min(remaining, 1 << 30), pos)
                except OSError:
                    use_cfr = False  # cross-filesystem on old kernels, or unsupported: fall back
            if not use_cfr:
                chunk = os.pread(fd_in, min(remaining, 8 << 20), pos)
                n = len(chunk)
                if n:
                    out.write(chunk)
                    out.flush()
            if n == 0:
                raise FormatError(f"{path}: file ended early while copying bytes {pos}..{end}")
            pos += n
            remaining -= n
