"""torch distributed checkpoint directories (``.metadata`` plus ``__R_N.distcp`` files).

``.metadata`` is a pickle of dataclasses; torch reads it with plain ``pickle.load``. We read it
with the restricted unpickler, letting only the DCP metadata records through as inert data. Each
tensor chunk in a ``.distcp`` file is itself a small torch zip, so its bytes are located the
same way as in a ``.pt`` file.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any

from ..checkpoint import Checkpoint, TensorInfo
from ..errors import FormatError, SelectError
from .torch_pickle import unpickle
from .torch_records import DType, Opaque, _opaque_class
from .safetensors_fmt import MAX_RANK
from .sharded import check_inside
from .locate import tensor_infos
from .torch_zip import read_zip
from .chunks import KIND, certify, chunked, cover_problem, refuse_gaps

_RANK_FILE = re.compile(r"__(\d+)_\d+\.distcp$")  # FileSystemWriter's __{rank}_{n}.distcp
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


def _has(obj: Any, name: str) -> bool:
    try:
        _field(obj, name, "")
    except FormatError:
        return False
    return True


def open_dcp(path: Path, accept=frozenset(), select: str | None = None) -> Checkpoint:
    src = str(path)
    meta_file = Path(path) / ".metadata"
    up = unpickle(meta_file.read_bytes(), str(meta_file), accept, extra=_RECORDS)
    try:
        tensors, extras, ranks = _tensors(path, up.obj, src)
    except (TypeError, ValueError, AttributeError, KeyError, OverflowError) as e:
        raise FormatError(f"{src}: DCP metadata has a field of the wrong type ({type(e).__name__}: {str(e)[:100]}); "
                          f"the .metadata file is corrupt or from an unsupported torch") from None
    if select is None:
        select = _default_select(up.obj, tensors)
    ckpt = _select(path, tensors, extras, select, src, meta_file)
    ckpt.containers = _tops(up.obj, tensors)
    # a certificate only where some tensor is in chunks: a plain DCP folder needs none
    ckpt.certificate = certify(ckpt.tensors, "DCP .metadata", ranks) if any(
        t.kind == KIND for t in ckpt.tensors.values()) else None
    return ckpt


def _tensors(path: Path, md: Any, src: str) -> tuple[dict[str, TensorInfo], dict[str, str], int]:
    """Every tensor of the metadata (a chunked one when ranks stored pieces of it), the other
    entries, and how many ranks wrote the files; refused when any tensor is not covered exactly
    once by its chunks."""
    sd_meta = _field(md, "state_dict_metadata", src)
    storage = _field(md, "storage_data", src)
    if not isinstance(sd_meta, dict) or not isinstance(storage, dict):
        raise FormatError(f"{src}: DCP metadata is malformed")
    where = _storage(storage, src)
    tensors: dict[str, TensorInfo] = {}
    extras: dict[str, str] = {}
    gaps: list[str] = []
    for fqn, m in sd_meta.items():
        if not isinstance(fqn, str):
            raise FormatError(f"{src}: DCP metadata names a tensor by {type(fqn).__name__} {str(fqn)[:40]!r}, not a string")
        if type(m).__name__ != "TensorStorageMetadata":
            extras[fqn] = "bytes (pickled object)"
            continue
        size = _ints(_field(m, "size", src), src, fqn)
        boxes = [(_ints(_field(c, "offsets", src), src, fqn), _ints(_field(c, "sizes", src), src, fqn))
                 for c in _field(m, "chunks", src)]
        problem = cover_problem(size, boxes) if boxes or not math.prod(size) else "no chunks"
        if problem:
            gaps.append(f"{fqn!r} {list(size)}: {problem}")
            continue
        dtype = _field(_field(m, "properties", src), "dtype", src)
        if not isinstance(dtype, DType):
            raise FormatError(f"{src}: tensor {fqn!r} has dtype {str(dtype)[:40]!r} in .metadata, not a torch dtype")
        parts = [(offsets, _chunk(path, where, fqn, offsets, sizes, dtype, src)) for offsets, sizes in boxes]
        whole = len(parts) == 1 and parts[0][1].shape == size
        tensors[fqn] = parts[0][1] if whole else chunked(fqn, dtype.dtype, size, parts)
    refuse_gaps(src, gaps)
    ranks = {m.group(1) for rel, _, _ in where.values() if (m := _RANK_FILE.match(Path(rel).name))}
    return tensors, extras, len(ranks) or len({rel for rel, _, _ in where.values()})


def _ints(value: Any, src: str, fqn: str) -> tuple[int, ...]:
    """A size or offsets of .metadata: a tuple of at most 64 non-negative ints, as torch.Size holds."""
    if (not isinstance(value, (tuple, list)) or len(value) > MAX_RANK
            or not all(type(n) is int and 0 <= n < 1 << 62 for n in value)):
        raise FormatError(f"{src}: tensor {fqn!r} has a size or offset of {str(value)[:60]} in .metadata, "
                          f"not a tuple of at most {MAX_RANK} sizes")
    return tuple(value)


def _storage(storage: dict, src: str) -> dict[tuple[str, tuple[int, ...]], tuple[str, int, int]]:
    """(fqn, chunk offsets) -> (file in the folder, byte offset, length) of that chunk."""
    where: dict[tuple[str, tuple[int, ...]], tuple[str, int, int]] = {}
    for idx, info in storage.items():
        fqn = _field(idx, "fqn", src)
        # a bytes entry's index has no offset (torch pickles only the fields that are set)
        offset = _field(idx, "offset", src) if _has(idx, "offset") else None
        rel = str(_field(info, "relative_path", src))
        if _has(info, "transform_descriptors") and _field(info, "transform_descriptors", src):
            raise FormatError(f"{src}: the chunks of {str(fqn)[:80]!r} are stored transformed "
                              f"({str(_field(info, 'transform_descriptors', src))[:60]}, e.g. compressed); not supported")
        if os.path.isabs(rel) or ".." in Path(rel).parts:
            raise FormatError(f"{src}: DCP metadata points outside the checkpoint folder ({rel!r})")
        key = (fqn, tuple(int(n) for n in offset) if offset is not None else ())
        where[key] = (rel, int(_field(info, "offset", src)), int(_field(info, "length", src)))
    return where


def _chunk(path: Path, where: dict, fqn: str, offsets: tuple[int, ...], sizes: tuple[int, ...], dtype: Any,
           src: str) -> TensorInfo:
    """The chunk of ``fqn`` at ``offsets``, located in its ``.distcp`` file and checked against the
    metadata's shape and dtype."""
    found = where.get((fqn, offsets)) or (where.get((fqn, ())) if not any(offsets) else None)
    if found is None:
        raise FormatError(f"{src}: tensor {fqn!r} has no storage entry for its chunk at {list(offsets)}")
    rel, off, length = found
    file = str(Path(path) / rel)
    if not os.path.isfile(file):
        raise FormatError(f"{src}: {rel} is missing from the checkpoint folder")
    check_inside(Path(file), Path(path) / ".metadata", src, rel)
    blob, located = read_zip(Path(file), base=off, length=length, display=f"{file}@{off}")
    if not hasattr(blob.obj, "storage") and type(blob.obj).__name__ != "TensorRef":
        raise FormatError(f"{src}: chunk of {fqn!r} is not a tensor")
    info = tensor_infos({fqn: blob.obj}, located, file, src)[fqn]
    if info.kind != "dense" or info.nbytes > info.storage_nbytes:
        what = f"a {info.kind} tensor" if info.kind != "dense" else "a view larger than its storage"
        raise FormatError(f"{src}: the chunk of {fqn!r} at {list(offsets)} is {what}; a chunk must be a plain tensor")
    if isinstance(dtype, DType) and dtype.dtype != info.dtype:
        raise FormatError(f"{src}: tensor {fqn!r} is {info.dtype} on disk but {dtype.dtype} in .metadata")
    if info.shape != sizes:
        raise FormatError(f"{src}: the chunk of {fqn!r} at {list(offsets)} is {list(info.shape)} on disk but "
                          f"{list(sizes)} in .metadata")
    return info


def _tops(md: Any, tensors: dict[str, TensorInfo]) -> list[str]:
    """The top-level entries of the state dict that was saved, when it was nested (``dcp.save({"model":
    ..., "optim": ...})``), from the planner's record of each name's path; else none."""
    planner = _field(md, "planner_data", "") if _has(md, "planner_data") else None
    if not isinstance(planner, dict):
        return []
    paths = [planner.get(n) for n in tensors]
    if not paths or not all(isinstance(p, tuple) and len(p) > 1 and isinstance(p[0], str) for p in paths):
        return []
    return list(dict.fromkeys(p[0] for p in paths))


def _default_select(md: Any, tensors: dict[str, TensorInfo]) -> str | None:
    """A model's weights saved beside its optimizer state (``{"model": ..., "optim": ...}``): the model
    unless ``--select`` names another entry."""
    has = "model" in _tops(md, tensors) and any(n.startswith("model.") for n in tensors)
    return "model" if has else None


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
        extras.update({k: f"tensor (not selected; --select {k.split('.')[0]})" for k in tensors if not k.startswith(pre)})
        tensors = picked
    files = sorted({p.file for t in tensors.values() for p in (t.parts.values() if t.kind == KIND else (t,))})
    return Checkpoint(path=Path(path), format="torch-dcp", file_size=sum(os.path.getsize(f) for f in files) + meta_file.stat().st_size,
                      tensors=tensors, extras=extras, files=files, container=container)
