"""torch.save's first format (torch <= 0.1.10): a tar of ``sys_info``, ``pickle``, ``tensors`` and
``storages``; torch.load still reads it.

``storages`` holds a count, then per storage a pickled ``(key, location, storage_type)``, an int64
element count and the raw bytes, then the list of storage views; ``tensors`` holds a count, then
per tensor a pickled ``(key, storage_key, tensor_type)`` and its int64 ndim, sizes, strides and
storage offset; ``pickle`` is the object, each tensor (or storage) a persistent id naming its key.
Only the metadata is read: each storage is located as a byte range of the tar.
"""

from __future__ import annotations

import struct
import tarfile
from pathlib import Path
from typing import Any

from ..checkpoint import Checkpoint, itemsize
from ..errors import FormatError
from .torch_pickle import unpickle
from .torch_records import StorageRef, StorageType, TensorRef
from .torch_zip import MAX_PICKLE_BYTES, checkpoint_from_pickle

MEMBERS = ("sys_info", "pickle", "tensors", "storages")
MAX_TENSOR_TABLE = 64 * 1024 * 1024
_TENSOR_TYPES = ("Double", "Float", "Half", "Long", "Int", "Short", "Char", "Byte")
# the tensor class each tensor record names (torch.FloatTensor, torch.cuda.HalfTensor, ...): a marker
_EXTRA = {(m, t + "Tensor"): f"{m}.{t}Tensor" for m in ("torch", "torch.cuda") for t in _TENSOR_TYPES}


class _Slice:
    """A read-only file view of [start, start+length): a member inside the tar."""

    def __init__(self, f, start: int, length: int):
        self.f, self.start, self.length, self.pos = f, start, length, 0

    def seek(self, off: int, whence: int = 0) -> int:
        base = {0: 0, 1: self.pos, 2: self.length}[whence]
        self.pos = max(0, min(self.length, base + off))
        return self.pos

    def tell(self) -> int:
        return self.pos

    def read(self, n: int = -1) -> bytes:
        n = self.length - self.pos if n is None or n < 0 else min(n, self.length - self.pos)
        self.f.seek(self.start + self.pos)
        data = self.f.read(n)
        self.pos += len(data)
        return data

    def seekable(self) -> bool:
        return True


class _Member(_Slice):
    """A tar member as a file the unpickler can read (it needs readline)."""

    def readline(self, limit: int = -1) -> bytes:
        start = self.pos
        chunk = self.read(4096 if limit is None or limit < 0 else limit)
        cut = chunk.find(b"\n")
        if cut >= 0:
            self.pos = start + cut + 1
            return chunk[: cut + 1]
        return chunk

    def readinto(self, b: Any) -> int:
        data = self.read(len(b))
        b[: len(data)] = data
        return len(data)


def open_tar(path: Path, accept: frozenset[str] = frozenset(), select: str | None = None) -> Checkpoint:
    src = str(path)
    with open(path, "rb") as raw:
        members = _members(raw, src)
        _check_sys_info(raw, members["sys_info"], src)
        storages, offsets = _storages(raw, members["storages"], src)
        tensors = _tensors(raw, members["tensors"], storages, src)
        pkl = members["pickle"]
        if pkl.size > MAX_PICKLE_BYTES:
            raise FormatError(f"{src}: the pickle member declares {pkl.size} bytes, far more than a checkpoint's")
        up = unpickle(_read(raw, pkl), src, accept, pid_handler=_pid_handler(tensors, storages, src))
    return checkpoint_from_pickle(path, "torch-tar", up, offsets, src, select)


def _members(raw, src: str) -> dict[str, tarfile.TarInfo]:
    try:
        with tarfile.open(fileobj=raw, mode="r:") as tar:
            found = {m.name: m for m in tar.getmembers()}
    except (tarfile.TarError, OSError, ValueError, EOFError) as e:
        raise FormatError(f"{src}: a tar archive that cannot be read ({str(e)[:120]}); the file is truncated or corrupt") from None
    missing = [n for n in MEMBERS if n not in found]
    if missing:
        names = ", ".join(list(found)[:6]) or "none"
        raise FormatError(f"{src}: a tar archive, but not a torch checkpoint (no {', '.join(missing)} member; "
                          f"members: {names}); extract it first")
    for name in MEMBERS:
        if not found[name].isfile():
            raise FormatError(f"{src}: tar member {name!r} is not a regular file")
    return {n: found[n] for n in MEMBERS}


def _view(raw, m: tarfile.TarInfo) -> _Member:
    return _Member(raw, m.offset_data, m.size)


def _read(raw, m: tarfile.TarInfo) -> bytes:
    data = _view(raw, m).read()
    if len(data) != m.size:
        raise FormatError(f"tar member {m.name!r} is truncated")
    return data


def _check_sys_info(raw, m: tarfile.TarInfo, src: str) -> None:
    info = unpickle(_read(raw, m) if m.size < 65536 else b"", src).obj
    if not isinstance(info, dict):
        raise FormatError(f"{src}: the sys_info member is malformed")
    if not info.get("little_endian", True):
        raise FormatError(f"{src}: big-endian checkpoints are not supported")


def _int(value: Any, what: str, src: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise FormatError(f"{src}: {what} is not a count ({str(value)[:40]!r}); the file is corrupt")
    return value


def _storages(raw, m: tarfile.TarInfo, src: str) -> tuple[dict[str, StorageRef], dict[str, tuple[int, int]]]:
    f = _view(raw, m)
    count = _int(unpickle(f, src).obj, "the storage count", src)
    storages: dict[str, StorageRef] = {}
    offsets: dict[str, tuple[int, int]] = {}
    for _ in range(count):
        rec = unpickle(f, src).obj
        if not (isinstance(rec, tuple) and len(rec) == 3 and isinstance(rec[2], StorageType)):
            raise FormatError(f"{src}: storage record {str(rec)[:60]!r} is malformed")
        key, location, stype = str(rec[0]), str(rec[1]), rec[2]
        hdr = f.read(8)
        numel = struct.unpack("<q", hdr)[0] if len(hdr) == 8 else -1
        nbytes = numel * itemsize(stype.dtype)
        if numel < 0 or f.pos + nbytes > m.size:
            raise FormatError(f"{src}: storage {key!r} runs past the end of its tar member; the file is truncated")
        storages[key] = StorageRef(key, stype.dtype, location, numel)
        offsets[key] = (m.offset_data + f.pos, nbytes)
        f.seek(f.pos + nbytes)
    views = unpickle(f, src).obj
    if not isinstance(views, list):
        raise FormatError(f"{src}: the storage view list is malformed")
    for view in views:
        _add_view(view, storages, offsets, src)
    return storages, offsets


def _add_view(view: Any, storages: dict[str, StorageRef], offsets: dict, src: str) -> None:
    """A storage view (key, root key, element offset, element count) becomes a storage of its own."""
    if not (isinstance(view, (tuple, list)) and len(view) == 4 and str(view[1]) in storages):
        raise FormatError(f"{src}: storage view {str(view)[:60]!r} is malformed")
    key, root = str(view[0]), storages[str(view[1])]
    offset, numel = _int(view[2], "a view offset", src), _int(view[3], "a view size", src)
    if offset + numel > root.numel:
        raise FormatError(f"{src}: storage view {key!r} reaches past its storage")
    start = offsets[root.key][0] + offset * itemsize(root.dtype)
    storages[key] = StorageRef(key, root.dtype, root.location, numel)
    offsets[key] = (start, numel * itemsize(root.dtype))


def _tensors(raw, m: tarfile.TarInfo, storages: dict[str, StorageRef], src: str) -> dict[str, TensorRef]:
    if m.size > MAX_TENSOR_TABLE:
        raise FormatError(f"{src}: the tensors member declares {m.size} bytes, far more than tensor metadata needs")
    f = _view(raw, m)
    count = _int(unpickle(f, src, extra=_EXTRA).obj, "the tensor count", src)
    out: dict[str, TensorRef] = {}
    for _ in range(count):
        rec = unpickle(f, src, extra=_EXTRA).obj
        if not (isinstance(rec, tuple) and len(rec) == 3 and str(rec[1]) in storages):
            raise FormatError(f"{src}: tensor record {str(rec)[:60]!r} is malformed or names a missing storage")
        storage = storages[str(rec[1])]
        try:
            (ndim,) = struct.unpack("<i", f.read(4))
            f.read(4)  # ndim was written as 8 bytes
            if not 0 <= ndim <= 64:
                raise ValueError
            dims = struct.unpack(f"<{2 * ndim + 1}q", f.read(8 * (2 * ndim + 1)))
        except (struct.error, ValueError):
            raise FormatError(f"{src}: metadata of tensor {rec[0]!r} is truncated or corrupt") from None
        shape, stride, offset = dims[:ndim], dims[ndim:2 * ndim], dims[-1]
        if any(d < 0 for d in dims):
            raise FormatError(f"{src}: tensor {rec[0]!r} has a negative size, stride or offset")
        out[str(rec[0])] = TensorRef(storage, offset, tuple(shape), tuple(stride), storage.dtype)
    return out


def _pid_handler(tensors: dict[str, TensorRef], storages: dict[str, StorageRef], src: str):
    def load(pid: Any) -> Any:
        if isinstance(pid, tuple) and len(pid) == 3:  # a module class with its source: (class, file, source)
            return pid[0]
        key = str(pid)
        if key in tensors:
            return tensors[key]
        if key in storages:
            return storages[key]
        raise FormatError(f"persistent id {key[:40]!r} names no tensor or storage in the archive")

    return load


def is_tar(head: bytes) -> bool:
    return len(head) >= 262 and head[257:262] == b"ustar"


def tarfile_takes(head: bytes) -> bool:
    """Whether Python's tarfile, which torch.load tries before the legacy pickle format, takes the
    first 512 bytes of a file for a tar header (no "ustar" magic is needed: a checksum that
    matches and numeric fields that parse are enough)."""
    try:
        tarfile.TarInfo.frombuf(head[:512], tarfile.ENCODING, "surrogateescape")
    except tarfile.HeaderError:
        return False
    return True


__all__ = ["open_tar", "is_tar", "tarfile_takes", "MEMBERS"]
