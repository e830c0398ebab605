"""The in-memory view of a checkpoint: what tensors it holds and where their bytes are.

Opening a checkpoint reads metadata only (names, dtypes, shapes, byte ranges). Tensor data is
read on demand, one tensor at a time, so a 20 GB file can be inspected or re-keyed in a few MB.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

from .errors import FormatError

if TYPE_CHECKING:  # pragma: no cover
    import torch

# Canonical dtype names are safetensors' own; each entry: (itemsize, torch dtype attribute).
DTYPES: dict[str, tuple[int, str]] = {
    "F64": (8, "float64"),
    "F32": (4, "float32"),
    "F16": (2, "float16"),
    "BF16": (2, "bfloat16"),
    "F8_E4M3": (1, "float8_e4m3fn"),
    "F8_E5M2": (1, "float8_e5m2"),
    "I64": (8, "int64"),
    "I32": (4, "int32"),
    "I16": (2, "int16"),
    "I8": (1, "int8"),
    "U64": (8, "uint64"),
    "U32": (4, "uint32"),
    "U16": (2, "uint16"),
    "U8": (1, "uint8"),
    "BOOL": (1, "bool"),
    "C64": (8, "complex64"),
}
FLOAT_DTYPES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}
# Names users type for --dtype, mapped to canonical names.
DTYPE_ALIASES = {
    "fp32": "F32", "float32": "F32", "f32": "F32",
    "fp16": "F16", "float16": "F16", "half": "F16", "f16": "F16",
    "bf16": "BF16", "bfloat16": "BF16",
    "fp64": "F64", "float64": "F64",
}
_TORCH_TO_CANONICAL = {v[1]: k for k, v in DTYPES.items()}


def itemsize(dtype: str) -> int:
    return DTYPES[dtype][0]


def canonical_from_torch(name: str) -> str | None:
    """'float32' or 'torch.float32' -> 'F32'."""
    return _TORCH_TO_CANONICAL.get(name.removeprefix("torch."))


def torch_dtype(dtype: str) -> "torch.dtype":
    import torch

    return getattr(torch, DTYPES[dtype][1])


def contiguous_stride(shape: tuple[int, ...]) -> tuple[int, ...]:
    stride, acc = [], 1
    for n in reversed(shape):
        stride.append(acc)
        acc *= max(n, 1)
    return tuple(reversed(stride))


@dataclass(frozen=True)
class TensorInfo:
    """One tensor's metadata and the location of its bytes.

    ``file``/``data_offset`` locate the storage the tensor views (absolute offset of the storage's
    first byte in the file); ``storage_offset`` and ``stride`` are in elements, as in torch.
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    file: str
    data_offset: int
    storage_nbytes: int
    storage_offset: int = 0
    stride: tuple[int, ...] | None = None
    storage_key: str | None = None
    device: str = "cpu"

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * itemsize(self.dtype)

    @property
    def is_contiguous(self) -> bool:
        if self.stride is None or self.numel <= 1:
            return True
        return all(
            st == cst for n, st, cst in zip(self.shape, self.stride, contiguous_stride(self.shape)) if n != 1
        )

    @property
    def byte_range(self) -> tuple[int, int] | None:
        """Absolute [start, end) of the tensor's bytes in ``file``, when they are one run."""
        if not self.is_contiguous:
            return None
        start = self.data_offset + self.storage_offset * itemsize(self.dtype)
        return start, start + self.nbytes

    @property
    def view_key(self) -> tuple:
        """Equal for two names that are the very same view of the same bytes (tied weights)."""
        return (self.file, self.data_offset, self.storage_offset, self.shape, self.stride, self.dtype)


@dataclass
class Checkpoint:
    """A checkpoint opened for reading. Tensor data stays on disk until asked for."""

    path: Path
    format: str
    file_size: int
    tensors: dict[str, TensorInfo]
    container: str = ""
    containers: list[str] = field(default_factory=list)
    extras: dict[str, str] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)
    # alias name -> name whose bytes it shares, for formats that store a tied tensor once.
    aliases: dict[str, str] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.tensors)

    def __contains__(self, name: object) -> bool:
        return name in self.tensors

    @property
    def num_params(self) -> int:
        return sum(t.numel for t in self.unique_tensors())

    def unique_tensors(self) -> list[TensorInfo]:
        """Each distinct view once: tied names count one time."""
        seen: set[tuple] = set()
        out = []
        for t in self.tensors.values():
            if t.view_key not in seen:
                seen.add(t.view_key)
                out.append(t)
        return out

    def tied_groups(self) -> list[list[str]]:
        """Names that share the same bytes, in checkpoint order."""
        groups: dict[tuple, list[str]] = {}
        for name, t in self.tensors.items():
            groups.setdefault(t.view_key, []).append(name)
        return [g for g in groups.values() if len(g) > 1]

    def read_bytes(self, name: str) -> bytes:
        """The tensor's bytes in C order. Contiguous tensors are read with one pread."""
        info = self.tensors[name]
        rng = info.byte_range
        if rng is not None:
            return read_range(info.file, *rng)
        import torch

        # a strided view: let torch gather it; viewed as bytes so bf16 (which numpy lacks) works too
        return self.tensor(name).contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()

    def tensor(self, name: str) -> "torch.Tensor":
        """Materialise one tensor on the CPU (a fresh, writable copy)."""
        return materialize(self.tensors[name])

    def state_dict(self, names: Iterable[str] | None = None) -> dict[str, "torch.Tensor"]:
        """A plain ``dict[str, Tensor]``; tied names share one tensor, as torch.load would give."""
        out: dict[str, Any] = {}
        by_view: dict[tuple, Any] = {}
        for name in names if names is not None else self.tensors:
            key = self.tensors[name].view_key
            if key not in by_view:
                by_view[key] = self.tensor(name)
            out[name] = by_view[key]
        return out


def read_range(path: str, start: int, end: int) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        data = os.pread(fd, end - start, start)
    finally:
        os.close(fd)
    if len(data) != end - start:
        raise FormatError(f"{path}: file is truncated: expected {end - start} bytes at offset {start}, got {len(data)}")
    return data


MAX_EXPANSION = 1 << 30  # bytes a strided view may add beyond its storage (stride-0 "expand" views)


def _check_materializable(info: TensorInfo) -> None:
    """Refuse, before torch allocates anything, shapes torch cannot represent and views that
    would expand a small storage into gigabytes (shape [2**40] with stride [0])."""
    extent = math.prod(max(n, 1) for n in info.shape)
    if extent >= 1 << 62 or any(s >= 1 << 62 for s in info.stride or ()) or info.storage_offset >= 1 << 62:
        raise FormatError(f"{info.file}: tensor {info.name!r} has shape {list(info.shape)[:8]}, too large for any "
                          f"machine; the file is corrupt")
    if info.nbytes > info.storage_nbytes + MAX_EXPANSION:
        raise FormatError(f"{info.file}: tensor {info.name!r} {list(info.shape)[:8]} views {info.storage_nbytes} bytes "
                          f"of storage as {info.nbytes} bytes; refusing to materialise that expansion")


def materialize(info: TensorInfo) -> "torch.Tensor":
    import torch

    _check_materializable(info)
    dt = torch_dtype(info.dtype)
    size = itemsize(info.dtype)
    rng = info.byte_range
    if rng is not None:
        raw = read_range(info.file, *rng)
        if info.numel == 0:
            return torch.empty(info.shape, dtype=dt)
        return torch.frombuffer(bytearray(raw), dtype=dt).reshape(info.shape)
    if info.storage_nbytes % size:  # checked first: torch.frombuffer raises a bare ValueError
        raise FormatError(f"{info.file}: storage of {info.name!r} has {info.storage_nbytes} bytes, not a multiple of {size}")
    raw = read_range(info.file, info.data_offset, info.data_offset + info.storage_nbytes)
    if info.storage_nbytes == 0:
        return torch.empty(info.shape, dtype=dt)
    flat = torch.frombuffer(bytearray(raw), dtype=dt)
    return flat.as_strided(info.shape, info.stride, info.storage_offset).clone()
