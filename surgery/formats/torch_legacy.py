"""torch.save's legacy format (torch < 1.6, or ``_use_new_zipfile_serialization=False``).

A run of pickles: magic number, protocol version, system info, the object (storages as persistent
ids), the list of storage keys; then each storage as an int64 element count and its raw bytes.
Read with the restricted unpickler; storage bytes are located by seeking, never loaded.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import Any

from ..checkpoint import Checkpoint, itemsize
from ..errors import FormatError
from .torch_pickle import Unpickled, storage_ref, unpickle
from .torch_records import StorageRef
from .torch_zip import checkpoint_from_pickle

MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
PROTOCOL_VERSION = 1001
# The first bytes of every legacy file: PROTO 2, LONG1 of 10 bytes, then the magic number.
SIGNATURE = b"\x80\x02\x8a\x0a" + MAGIC_NUMBER.to_bytes(10, "little")


def open_legacy(path: Path, accept: frozenset[str] = frozenset(), select: str | None = None) -> Checkpoint:
    up, offsets = read_legacy(path, accept)
    return checkpoint_from_pickle(path, "torch-legacy", up, offsets, str(path), select)


def read_legacy(path: Path, accept: frozenset[str] = frozenset(),
                extra: dict | None = None) -> tuple[Unpickled, dict[str, tuple[int, int]]]:
    """Unpickle the object and locate every storage: (unpickled, storage offsets), as `read_zip`."""
    src = str(path)
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = [unpickle(f, src).obj for _ in range(3)]
        if head[0] != MAGIC_NUMBER or head[1] != PROTOCOL_VERSION or not isinstance(head[2], dict):
            raise FormatError(f"{src}: legacy torch header is corrupt (magic/protocol mismatch)")
        if not head[2].get("little_endian", True):
            raise FormatError(f"{src}: big-endian checkpoints are not supported")
        storages: dict[str, StorageRef] = {}
        up = unpickle(f, src, accept, extra, pid_handler=lambda pid: _persistent(pid, storages))
        up.storages = storages
        keys = unpickle(f, src).obj
        if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys) or set(keys) != set(up.storages):
            raise FormatError(f"{src}: storage key list does not match the storages the checkpoint uses")
        offsets: dict[str, tuple[int, int]] = {}
        pos = f.tell()
        for key in keys:
            f.seek(pos)
            hdr = f.read(8)
            if len(hdr) != 8:
                raise FormatError(f"{src}: file is truncated at storage {key!r} (offset {pos})")
            (numel,) = struct.unpack("<q", hdr)
            ref = up.storages[key]
            if numel != ref.numel:  # torch refuses it: "storage has wrong byte size"
                raise FormatError(f"{src}: storage {key!r} holds {numel} elements in the file but the pickle declares "
                                  f"{ref.numel}; torch refuses such a file")
            nbytes = numel * itemsize(ref.dtype)
            if numel < 0 or pos + 8 + nbytes > size:
                raise FormatError(f"{src}: storage {key!r} declares {nbytes} bytes past the end of the file; the file is truncated")
            offsets[key] = (pos + 8, nbytes)
            pos += 8 + nbytes
    return up, offsets


def _persistent(pid: Any, storages: dict[str, StorageRef]) -> Any:
    """The legacy writer's persistent ids: ``('storage', type, key, location, numel, view)``, and
    ``('module', class, source_file, source)`` naming each module class of a whole pickled model
    once; that class is whatever the restricted unpickler made of the global (an inert record)."""
    if isinstance(pid, tuple) and len(pid) == 4 and pid[0] == "module":
        return pid[1]
    return storage_ref(pid, storages)
