"""The in-memory view of a checkpoint: what tensors it holds and where their bytes are.

Opening a checkpoint reads metadata only (names, dtypes, shapes, byte ranges). Tensor data is
read on demand, one tensor at a time, so a 20 GB file can be inspected or re-keyed in a few MB.
"""

from __future__ import annotations

import contextlib
import gc
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

from .errors import FormatError

if TYPE_CHECKING:  # pragma: no cover
    import torch

# Canonical dtype names are safetensors' own where safetensors has the dtype; the others are
# named in the same style (C128, QI8, ...). Each entry: (itemsize in bytes as torch stores one
# element, torch dtype attribute). Packed and sub-byte dtypes take one byte per element in torch
# (``float4_e2m1fn_x2`` holds two 4-bit values per element, ``uint4`` one value per byte), which
# is why F4_E2M1FN_X2 is not safetensors' F4: F4 counts 4-bit values, not bytes.
DTYPES: dict[str, tuple[int, str]] = {
    "F64": (8, "float64"),
    "F32": (4, "float32"),
    "F16": (2, "float16"),
    "BF16": (2, "bfloat16"),
    "F8_E4M3": (1, "float8_e4m3fn"),
    "F8_E5M2": (1, "float8_e5m2"),
    "F8_E4M3FNUZ": (1, "float8_e4m3fnuz"),
    "F8_E5M2FNUZ": (1, "float8_e5m2fnuz"),
    "F8_E8M0": (1, "float8_e8m0fnu"),
    "F4_E2M1FN_X2": (1, "float4_e2m1fn_x2"),
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
    "C128": (16, "complex128"),
    "C32": (4, "complex32"),
    "BC32": (4, "bcomplex32"),
    "BITS8": (1, "bits8"),
    "BITS16": (2, "bits16"),
    "BITS1X8": (1, "bits1x8"),
    "BITS2X4": (1, "bits2x4"),
    "BITS4X2": (1, "bits4x2"),
    **{f"U{n}": (1, f"uint{n}") for n in range(1, 8)},
    **{f"I{n}": (1, f"int{n}") for n in range(1, 8)},
    # quantized: the integer representation; scale and zero point travel beside the tensor
    "QI8": (1, "qint8"),
    "QU8": (1, "quint8"),
    "QI32": (4, "qint32"),
    "QU4X2": (1, "quint4x2"),
    "QU2X4": (1, "quint2x4"),
}
# The dtypes a safetensors file can hold (safetensors' Dtype enum, minus its F6 kinds).
SAFETENSORS_DTYPES = frozenset({"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2", "F8_E4M3FNUZ", "F8_E5M2FNUZ",
                                "F8_E8M0", "F4", "I64", "I32", "I16", "I8", "U64", "U32", "U16", "U8", "BOOL", "C64"})
PACKED_DTYPES = {"QU4X2": 2, "QU2X4": 4}  # values per byte: torch counts their storages in bytes
# safetensors' F4: e2m1 values two to a byte, the first in the low nibble. Its shapes count values,
# so it reads as torch's float4_e2m1fn_x2 with the last dimension halved: values per byte, and the
# dtype torch holds them in (DTYPES names each torch dtype once).
SUB_BYTE_DTYPES = {"F4": 2}
SUB_BYTE_TORCH = {"F4": "F4_E2M1FN_X2"}
QUANTIZED_DTYPES = {"QI8": "I8", "QU8": "U8", "QI32": "I32", "QU4X2": "U8", "QU2X4": "U8"}  # -> integer repr
FLOAT_DTYPES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2", "F8_E4M3FNUZ", "F8_E5M2FNUZ", "F8_E8M0"}
# Names users type for --dtype, mapped to canonical names.
DTYPE_ALIASES = {
    "fp32": "F32", "float32": "F32", "f32": "F32",
    "fp16": "F16", "float16": "F16", "half": "F16", "f16": "F16",
    "bf16": "BF16", "bfloat16": "BF16",
    "fp64": "F64", "float64": "F64",
}
_TORCH_TO_CANONICAL = {v[1]: k for k, v in DTYPES.items()}


@contextlib.contextmanager
def gc_paused():
    """No cyclic garbage collection inside: reading metadata makes a few objects per tensor and
    frees none of them, so every collection pass over them (tens of them for 50,000 tensors)
    is wasted work. Nested uses are fine; the collector runs again after the outermost.

    The objects made meanwhile (most of them the records just read, still in use) are handed to
    the oldest generation as the pause ends, in two list splices (`gc.freeze`, `gc.unfreeze`):
    else the first young collection after it would walk every one of them at once. They stay
    collectable; a process that froze objects itself is left as it is."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            if gc.get_freeze_count() == 0:
                gc.freeze()
                gc.unfreeze()
            gc.enable()


def itemsize(dtype: str) -> int:
    """Bytes of one element as torch stores it."""
    entry = DTYPES.get(dtype)
    return entry[0] if entry is not None else DTYPES[SUB_BYTE_TORCH[dtype]][0]


def dense_nbytes(dtype: str, shape: Iterable[int]) -> int:
    """Bytes of a dense tensor of ``dtype`` and ``shape``; a sub-byte dtype's last byte may be half used."""
    numel = math.prod(shape)
    per = SUB_BYTE_DTYPES.get(dtype)
    return -(-numel // per) if per else numel * itemsize(dtype)


def torch_shape(dtype: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape torch gives a tensor of ``dtype``: an F4 tensor's last dimension counts bytes."""
    per = SUB_BYTE_DTYPES.get(dtype)
    return (*shape[:-1], shape[-1] // per) if per and shape else tuple(shape)


def canonical_from_torch(name: str) -> str | None:
    """'float32' or 'torch.float32' -> 'F32'."""
    return _TORCH_TO_CANONICAL.get(name.removeprefix("torch."))


def torch_dtype(dtype: str) -> "torch.dtype":
    import torch

    return getattr(torch, DTYPES[SUB_BYTE_TORCH.get(dtype, dtype)][1])


def contiguous_stride(shape: tuple[int, ...]) -> tuple[int, ...]:
    stride, acc = [], 1
    for n in reversed(shape):
        stride.append(acc)
        acc *= max(n, 1)
    return tuple(reversed(stride))


# Kinds of tensor a torch checkpoint can hold. Only "dense" fits safetensors; the others are
# rebuilt by torch from component tensors (``parts``) and scalars (``params``).
KINDS = ("dense", "quantized", "sparse_coo", "sparse_csr", "sparse_csc", "sparse_bsr", "sparse_bsc", "nested", "meta")
SPARSE_KINDS = ("sparse_coo", "sparse_csr", "sparse_csc", "sparse_bsr", "sparse_bsc")


@dataclass(frozen=True)
class TensorInfo:
    """One tensor's metadata and the location of its bytes.

    ``file``/``data_offset`` locate the storage the tensor views (absolute offset of the storage's
    first byte in the file); ``storage_offset`` and ``stride`` are in elements, as in torch.

    ``kind`` is "dense" for an ordinary tensor. A quantized tensor views its integer storage like a
    dense one and keeps its quantizer in ``params`` (per-channel scales and zero points in
    ``parts``); a sparse or nested tensor has no storage of its own, only ``parts`` (indices,
    values, buffer, ...); a meta tensor has a shape and a dtype and no data at all.
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
    kind: str = "dense"
    parts: dict[str, "TensorInfo"] = field(default_factory=dict, compare=False)
    params: dict[str, Any] = field(default_factory=dict, compare=False)

    @classmethod
    def dense(cls, name: str, dtype: str, shape: tuple[int, ...], file: str, data_offset: int, storage_nbytes: int,
              storage_offset: int, stride: tuple[int, ...], storage_key: str, device: str) -> "TensorInfo":
        """A plain tensor's record, made without the frozen ``__init__``'s per-field setattr: a
        reader makes one per tensor, 50,000 for a large model. Equal to ``TensorInfo(...)``."""
        info = object.__new__(cls)
        info.__dict__.update(name=name, dtype=dtype, shape=shape, file=file, data_offset=data_offset,
                             storage_nbytes=storage_nbytes, storage_offset=storage_offset, stride=stride,
                             storage_key=storage_key, device=device, kind="dense", parts={}, params={})
        return info

    @property
    def has_storage(self) -> bool:
        return self.kind in ("dense", "quantized")

    @property
    def numel(self) -> int:
        if self.kind == "nested":  # the elements of every component, all in one buffer
            return self.parts["buffer"].numel
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        if self.dtype in PACKED_DTYPES:
            return -(-self.numel // PACKED_DTYPES[self.dtype])
        if self.has_storage:
            return dense_nbytes(self.dtype, self.shape)
        return sum(p.nbytes for p in self.parts.values())

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
        if not self.has_storage or not self.is_contiguous or self.dtype in PACKED_DTYPES:
            return None
        start = self.data_offset + self.storage_offset * itemsize(self.dtype)
        return start, start + self.nbytes

    @property
    def view_key(self) -> tuple:
        """Equal for two names that are the very same view of the same bytes (tied weights)."""
        if self.kind == "meta":  # torch.save keeps no sharing between meta tensors
            return ("meta", self.name)
        if self.kind != "dense":
            parts = tuple((k, p.view_key) for k, p in sorted(self.parts.items()))
            params = tuple(sorted((k, repr(v)) for k, v in self.params.items()))
            return (self.kind, self.file, self.data_offset, self.storage_offset, self.shape, self.stride,
                    self.dtype, parts, params)
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
    # what the file is: "state_dict", "tensor" (torch.save(t)), "tensor_list", "state_dict_list",
    # "optimizer" (torch.save(opt.state_dict())) or "model" (torch.save(model)); and in words
    file_kind: str = "state_dict"
    description: str = ""
    # for a checkpoint whose tensors are stored in ranks' chunks: what the cover check proved
    # (formats/chunks.py's Certificate)
    certificate: Any = None

    @property
    def kinds(self) -> dict[str, int]:
        """How many tensors of each kind other than "dense" (sparse, quantized, nested, meta)."""
        out: dict[str, int] = {}
        for t in self.tensors.values():
            if t.kind != "dense":
                out[t.kind] = out.get(t.kind, 0) + 1
        return out

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
        if info.kind != "dense":
            raise FormatError(f"{self.path}: tensor {name!r} is {info.kind.replace('_', ' ')}, not one run of bytes; "
                              f"use tensor({name!r})")
        rng = info.byte_range
        if rng is not None:
            return read_range(info.file, *rng)
        return bytes(tensor_bytes(self.tensor(name)))  # a strided view: torch gathers it

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


def tensor_bytes(t: "torch.Tensor") -> memoryview:
    """A tensor's bytes in C order: a view of its memory where it is contiguous, else of a
    contiguous copy (viewed as bytes, so bf16, which numpy lacks, works too)."""
    import torch

    return memoryview(t.contiguous().reshape(-1).view(torch.uint8).numpy())


def read_range(path: str, start: int, end: int) -> bytearray:
    """Bytes ``start..end`` of ``path`` in a fresh buffer; a short file is a FormatError. Read in
    steps: one ``pread`` returns at most about 2 GiB on Linux, and a tensor can be larger."""
    buf = bytearray(end - start)
    read_into(path, start, buf)
    return buf


def read_into(path: str, start: int, buf: Any) -> None:
    """Fill ``buf`` (a writable buffer) with the bytes of ``path`` from ``start``."""
    view = memoryview(buf).cast("B")
    fd = os.open(path, os.O_RDONLY)
    try:
        done = 0
        while done < len(view):
            n = _pread_into(fd, view[done: done + (1 << 30)], start + done)
            if n == 0:
                raise FormatError(f"{path}: file is truncated: expected {len(view)} bytes at offset {start}, got {done}")
            done += n
    finally:
        os.close(fd)


def _pread_into(fd: int, view: memoryview, pos: int) -> int:
    if hasattr(os, "preadv"):
        return os.preadv(fd, [view], pos)
    data = os.pread(fd, len(view), pos)  # platforms without preadv: one copy more
    view[: len(data)] = data
    return len(data)


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
    """The tensor torch.load would give, on the CPU (a fresh, writable copy where torch has one)."""
    if info.kind == "dense":
        return _dense(info)
    with warnings.catch_warnings():  # torch's "beta"/"deprecated" notes on these kinds are not the user's concern
        warnings.simplefilter("ignore")
        return _other_kind(info)


def _other_kind(info: TensorInfo) -> "torch.Tensor":
    if info.kind == "quantized":
        return _quantized(info)
    if info.kind in SPARSE_KINDS:
        return _sparse(info)
    if info.kind == "nested":
        return _nested(info)
    if info.kind == "chunked":
        return _chunked(info)
    if info.kind == "meta":
        import torch

        return _torch_call(info, "meta tensor", torch.empty_strided, info.shape, info.stride or contiguous_stride(info.shape),
                           dtype=torch_dtype(info.dtype), device="meta")
    raise FormatError(f"{info.file}: tensor {info.name!r} is of an unknown kind {info.kind!r}")


def _chunked(info: TensorInfo) -> "torch.Tensor":
    """A tensor ranks stored in chunks (formats/chunks.py), each chunk read and copied into its
    place (cast, where stored in another dtype): memory is the tensor and one chunk. With
    ``params["flat"]``, the chunks are runs of the flattened tensor."""
    import torch

    flat = bool(info.params.get("flat"))
    out = torch.empty((math.prod(info.shape),) if flat else info.shape, dtype=torch_dtype(info.dtype))
    for key, offsets in zip(info.parts, info.params["offsets"]):
        part = info.parts[key]
        region = out[tuple(slice(o, o + s) for o, s in zip(offsets, part.shape))]
        if not _read_in_place(part, region):
            region.copy_(materialize(part))
    return out.reshape(info.shape) if flat else out


def _read_in_place(part: TensorInfo, region: "torch.Tensor") -> bool:
    """Read a chunk stored as one run of bytes straight into its place in the output, when that
    place is one run too (a whole-row block): no intermediate copies."""
    import torch

    rng = part.byte_range
    if (part.kind != "dense" or rng is None or torch_dtype(part.dtype) != region.dtype
            or tuple(part.shape) != tuple(region.shape) or not region.is_contiguous()
            or rng[1] - rng[0] != region.numel() * region.element_size()):
        return False
    if region.numel():
        read_into(part.file, rng[0], region.reshape(-1).view(torch.uint8).numpy())
    return True


def _dense(info: TensorInfo) -> "torch.Tensor":
    import torch

    _check_materializable(info)
    if info.dtype in SUB_BYTE_DTYPES:
        return _sub_byte(info)
    dt = torch_dtype(info.dtype)
    size = itemsize(info.dtype)
    rng = info.byte_range
    if rng is not None:
        raw = read_range(info.file, *rng)
        if info.numel == 0:
            return torch.empty(info.shape, dtype=dt)
        return torch.frombuffer(raw, dtype=dt).reshape(info.shape)
    if info.storage_nbytes % size:  # checked first: torch.frombuffer raises a bare ValueError
        raise FormatError(f"{info.file}: storage of {info.name!r} has {info.storage_nbytes} bytes, not a multiple of {size}")
    raw = read_range(info.file, info.data_offset, info.data_offset + info.storage_nbytes)
    if info.storage_nbytes == 0:
        return torch.empty(info.shape, dtype=dt)
    flat = torch.frombuffer(raw, dtype=dt)
    return flat.as_strided(info.shape, info.stride, info.storage_offset).clone()


def _sub_byte(info: TensorInfo) -> "torch.Tensor":
    """An F4 tensor as torch holds it: one float4_e2m1fn_x2 element per byte, two values each."""
    import torch

    per, shape = SUB_BYTE_DTYPES[info.dtype], info.shape
    if not shape or shape[-1] % per or info.byte_range is None:
        raise FormatError(f"{info.file}: tensor {info.name!r} {info.dtype}{list(shape)[:8]}: torch holds {info.dtype} "
                          f"{per} values to a byte along the last dimension, so that dimension must be a multiple of {per}")
    raw = read_range(info.file, *info.byte_range)
    if not raw:
        return torch.empty(torch_shape(info.dtype, shape), dtype=torch_dtype(info.dtype))
    return torch.frombuffer(raw, dtype=torch.uint8).view(torch_dtype(info.dtype)).reshape(torch_shape(info.dtype, shape))


def _torch_call(info: TensorInfo, what: str, fn: Any, *args: Any, **kwargs: Any) -> "torch.Tensor":
    """Run torch's own constructor on components read from the file; torch's checks on them
    (index bounds, quantizer shapes) become a FormatError naming the tensor."""
    try:
        return fn(*args, **kwargs)
    except (RuntimeError, ValueError, TypeError, IndexError) as e:
        first = (str(e).strip().splitlines() or [""])[0][:160]
        raise FormatError(f"{info.file}: {what} {info.name!r} is inconsistent ({first}); the file is corrupt") from None


def _quantized(info: TensorInfo) -> "torch.Tensor":
    import collections

    import torch

    _check_materializable(info)
    raw = read_range(info.file, info.data_offset, info.data_offset + info.storage_nbytes)
    # a storage over the bytes read, never resizable: a view reaching past it is refused, not grown
    untyped = torch.frombuffer(raw or bytearray(1), dtype=torch.uint8)[: len(raw)].untyped_storage()
    storage = torch.storage.TypedStorage(wrap_storage=untyped, dtype=torch_dtype(info.dtype), _internal=True)
    p = info.params
    scheme = getattr(torch, p["qscheme"])
    if p["qscheme"] == "per_tensor_affine":
        qparams: tuple = (scheme, p["scale"], p["zero_point"])
    else:
        scales = info.parts["scales"] if "scales" in info.parts else None
        zeros = info.parts["zero_points"] if "zero_points" in info.parts else None
        qparams = (scheme, materialize(scales) if scales else p["scales"],
                   materialize(zeros) if zeros else p["zero_points"], p["axis"])
    return _torch_call(info, "quantized tensor", torch._utils._rebuild_qtensor, storage, info.storage_offset,
                       info.shape, info.stride, qparams, False, collections.OrderedDict())


def _sparse(info: TensorInfo) -> "torch.Tensor":
    import torch

    parts = {k: materialize(v) for k, v in info.parts.items()}
    if info.kind == "sparse_coo":
        return _torch_call(info, "sparse tensor", torch.sparse_coo_tensor, parts["indices"], parts["values"], info.shape,
                           check_invariants=True, is_coalesced=info.params.get("coalesced"))
    layout = getattr(torch, info.kind)
    return _torch_call(info, "sparse tensor", torch.sparse_compressed_tensor, parts["compressed_indices"],
                       parts["plain_indices"], parts["values"], info.shape, layout=layout, check_invariants=True)


def _nested(info: TensorInfo) -> "torch.Tensor":
    import torch

    buf, sizes, strides, offsets = (materialize(info.parts[k]) for k in ("buffer", "sizes", "strides", "offsets"))
    ok = (buf.dim() == 1 and sizes.dtype == strides.dtype == offsets.dtype == torch.int64 and sizes.dim() == 2
          and sizes.shape == strides.shape and offsets.shape == sizes.shape[:1]
          and bool((sizes >= 0).all()) and bool((strides >= 0).all()) and bool((offsets >= 0).all()))
    if ok and sizes.numel():  # every component must lie inside the buffer: torch does not check
        last = offsets + ((sizes - 1).clamp(min=0) * strides).sum(dim=1)
        ok = bool((last[(sizes > 0).all(dim=1)] < buf.numel()).all())
    if not ok:
        raise FormatError(f"{info.file}: nested tensor {info.name!r} has components outside its buffer; the file is corrupt")
    return _torch_call(info, "nested tensor", torch._nested_view_from_buffer, buf, sizes, strides, offsets)
