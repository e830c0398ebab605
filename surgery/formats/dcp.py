"""torch distributed checkpoint directories (``.metadata`` plus ``__R_N.distcp`` files).

``.metadata`` is a pickle of dataclasses; torch reads it with plain ``pickle.load``. We read it
with the restricted unpickler, letting only the DCP metadata records through as inert data. Each
tensor chunk in a ``.distcp`` file is itself a small torch zip, so its bytes are located the
same way as in a ``.pt`` file.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..checkpoint import Checkpoint, TensorInfo
from ..errors import FormatError, SelectError
from .torch_pickle import unpickle
from .torch_records import DType, Opaque, _opaque_class
from .sharded import check_inside
from .locate import tensor_infos
from .torch_zip import read_zip

_MD = "torch.distributed.checkpoint.metadata"
_RECORDS = {
    (_MD, n): _opaque_class(f"{_MD}.{n}")
    for n in ("Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
              "TensorProperties", "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING")
}
_RECORDS.update({
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"): _opaque_class("_StorageInfo"),
    ("torch.serialization", "_get_layout"): _opaque_class("torch.layout"),
    ("torch", "strided"): "strided",
    ("pathlib", "PosixPath"): _opaque_class("pathlib.PosixPath"),
    ("pathlib", "WindowsPath"): _opaque_class("pathlib.WindowsPath"),
})


def _field(obj: Any, name: str, src: str) -> Any:
    if isinstance(obj, Opaque):
        state = obj.state
        if isinstance(state, tuple) and len(state) == 2 and all(isinstance(x, (dict, type(None))) for x in state):  # (dict state, slots state)
            merged = {**(state[0] or {}), **(state[1] or {})}
            state = merged
        if isinstance(state, dict) and name in state:
            return state[name]
        if name == "dtype" and isinstance(state, tuple) and state:  # TensorProperties pickles a tuple
            return state[0]
    raise FormatError(f"{src}: DCP metadata record {obj!r} has no field {name!r}; unsupported DCP version")


def open_dcp(path: Path, accept=frozenset(), select: str | None = None) -> Checkpoint:
    src = str(path)
    meta_file = Path(path) / ".metadata"
    up = unpickle(meta_file.read_bytes(), str(meta_file), accept, extra=_RECORDS)
    try:
        tensors, extras = _tensors(path, up.obj, src)
    except (TypeError, ValueError, AttributeError, KeyError, OverflowError) as e:
        raise FormatError(f"{src}: DCP metadata has a field of the wrong type ({type(e).__name__}: {str(e)[:100]}); "
                          f"the .metadata file is corrupt or from an unsupported torch") from None
    return _select(path, tensors, extras, select, src, meta_file)


def _tensors(path: Path, md: Any, src: str) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    sd_meta = _field(md, "state_dict_metadata", src)
    storage = _field(md, "storage_data", src)
    if not isinstance(sd_meta, dict) or not isinstance(storage, dict):
        raise FormatError(f"{src}: DCP metadata is malformed")
    where: dict[str, tuple[str, int, int]] = {}
    for idx, info in storage.items():
        fqn = _field(idx, "fqn", src)
        rel = str(_field(info, "relative_path", src))
        if os.path.isabs(rel) or ".." in Path(rel).parts:
            raise FormatError(f"{src}: DCP metadata points outside the checkpoint folder ({rel!r})")
        where[fqn] = (rel, int(_field(info, "offset", src)), int(_field(info, "length", src)))
    tensors: dict[str, TensorInfo] = {}
    extras: dict[str, str] = {}
    for fqn, m in sd_meta.items():
        kind = type(m).__name__
        if kind != "TensorStorageMetadata":
            extras[fqn] = "bytes (pickled object)"
            continue
        chunks = _field(m, "chunks", src)
        dtype = _field(_field(m, "properties", src), "dtype", src)
        if len(chunks) != 1:
            raise FormatError(f"{src}: tensor {fqn!r} is split into {len(chunks)} chunks across ranks; "
                              f"merge it first with torch.distributed.checkpoint.format_utils.dcp_to_torch_save")
        if fqn not in where:
            raise FormatError(f"{src}: tensor {fqn!r} has no storage entry")
        rel, off, length = where[fqn]
        file = str(Path(path) / rel)
        if not os.path.isfile(file):
            raise FormatError(f"{src}: {rel} is missing from the checkpoint folder")
        check_inside(Path(file), Path(path) / ".metadata", src, rel)
        blob, offsets = read_zip(Path(file), base=off, length=length, display=f"{file}@{off}")
        if not hasattr(blob.obj, "storage") and type(blob.obj).__name__ != "TensorRef":
            raise FormatError(f"{src}: chunk of {fqn!r} is not a tensor")
        info = tensor_infos({fqn: blob.obj}, offsets, file, src)[fqn]
        if isinstance(dtype, DType) and dtype.dtype != info.dtype:
            raise FormatError(f"{src}: tensor {fqn!r} is {info.dtype} on disk but {dtype.dtype} in .metadata")
        tensors[fqn] = info
    return tensors, extras


def _select(path: Path, tensors: dict[str, TensorInfo], extras: dict[str, str], select: str | None, src: str,
            meta_file: Path) -> Checkpoint:
    container = ""
    if select not in (None, ""):
        # DCP flattens nested dicts into dotted names: selecting 'model' keeps 'model.*', unprefixed
        container = select.strip(".")
        pre = container + "."
        picked = {k[len(pre):]: TensorInfo(**{**t.__dict__, "name": k[len(pre):]}) for k, t in tensors.items() if k.startswith(pre)}
        if not picked:
            tops = sorted({k.split(".")[0] for k in tensors})
            raise SelectError(f"{src}: --select {select!r} matches no tensor; top-level names: {', '.join(tops)}")
        extras.update({k: "tensor (not selected)" for k in tensors if not k.startswith(pre)})
        tensors = picked
    files = sorted({t.file for t in tensors.values()})
    return Checkpoint(path=Path(path), format="torch-dcp", file_size=sum(os.path.getsize(f) for f in files) + meta_file.stat().st_size,
                      tensors=tensors, extras=extras, files=files, container=container)
