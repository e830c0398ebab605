"""A restricted unpickler for torch checkpoints that never imports torch or runs foreign code.

``find_class`` hands out only stand-ins: tensor rebuild functions become `TensorRef` records,
storage classes become dtype markers, a few harmless containers are real. Any other global is
recorded and replaced by an inert `Opaque` class, so a `__reduce__` payload such as
``os.system`` is collected as a name and never called. After loading, any global that the
caller did not explicitly accept raises `UnsafeCheckpointError` listing all of them at once.
"""

from __future__ import annotations

import collections
import io
import os
import pickle
from dataclasses import dataclass, field
from typing import Any, Callable

from ..checkpoint import DTYPES, canonical_from_torch, itemsize
from ..errors import FormatError, UnsafeCheckpointError
from .pickle_scan import Truncated, scan

_STORAGE_DTYPES = {
    "DoubleStorage": "F64", "FloatStorage": "F32", "HalfStorage": "F16", "BFloat16Storage": "BF16",
    "LongStorage": "I64", "IntStorage": "I32", "ShortStorage": "I16", "CharStorage": "I8",
    "ByteStorage": "U8", "BoolStorage": "BOOL", "ComplexFloatStorage": "C64",
    "UntypedStorage": "U8",
}


class _Sealed:
    """A record the reader makes itself: pickle's BUILD opcode (which sets an object's state
    after it is made) may not rewrite it, so a record checked once stays as checked."""

    __slots__ = ()

    def __setstate__(self, state: Any) -> None:
        raise FormatError(f"pickle sets state (BUILD) on a {type(self).__name__} record; no checkpoint does that")


@dataclass(frozen=True)
class StorageType(_Sealed):
    dtype: str


@dataclass(frozen=True)
class DType(_Sealed):
    dtype: str


@dataclass
class StorageRef(_Sealed):
    key: str
    dtype: str
    location: str
    numel: int


@dataclass
class TensorRef(_Sealed):
    storage: StorageRef
    storage_offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: str
    requires_grad: bool = False


class Opaque:
    """Inert stand-in for an accepted or refused global: records what it was built from."""

    qualname = "?"
    # class-level defaults: NEWOBJ builds instances without calling __init__
    args: tuple = ()
    kwargs: dict = {}
    state: Any = None

    def __init__(self, *args: Any, **kwargs: Any):
        self.args = args
        self.kwargs = kwargs

    @property
    def items(self) -> list:
        if "_items" not in self.__dict__:
            self.__dict__["_items"] = []
        return self.__dict__["_items"]

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __setitem__(self, key: Any, value: Any) -> None:
        self.items.append((key, value))

    def append(self, value: Any) -> None:
        self.items.append(value)

    def extend(self, values: Any) -> None:
        self.items.extend(values)

    def __repr__(self) -> str:
        return f"<{self.qualname}>"


def _opaque_class(qualname: str) -> type:
    return type(qualname.rsplit(".", 1)[-1], (Opaque,), {"qualname": qualname})


def _rebuild_tensor(storage, storage_offset, size, stride):
    # torch 0.2-0.3 (before Variable and Tensor merged): no requires_grad, no hooks
    return _tensor(storage, storage_offset, size, stride, False, None)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, hooks=None, metadata=None):
    return _tensor(storage, storage_offset, size, stride, requires_grad, None)


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, hooks, dtype, metadata=None):
    return _tensor(storage, storage_offset, size, stride, requires_grad, dtype)


def _tensor(storage, storage_offset, size, stride, requires_grad, dtype) -> TensorRef:
    if not isinstance(storage, StorageRef):
        raise FormatError(f"tensor is not backed by a storage record (got {type(storage).__name__})")
    if isinstance(dtype, DType):
        dt = dtype.dtype
    elif dtype is None:
        dt = storage.dtype
    else:
        raise FormatError(f"unsupported tensor dtype record {dtype!r}")
    try:
        shape = tuple(int(s) for s in size)
        strides = tuple(int(s) for s in stride)
        offset = int(storage_offset)
    except (TypeError, ValueError):
        raise FormatError("tensor record has a malformed size or stride") from None
    if len(shape) != len(strides) or any(s < 0 for s in shape) or any(s < 0 for s in strides) or offset < 0:
        raise FormatError(f"tensor record has an invalid shape {shape} / stride {strides} / offset {offset}")
    return TensorRef(storage, offset, shape, strides, dt, bool(requires_grad))


def _rebuild_parameter(data, requires_grad=False, hooks=None, state=None):
    if isinstance(data, TensorRef):
        data.requires_grad = bool(requires_grad)
    return data


def _rebuild_from_type_v2(func, new_type, args, state):
    return func(*args)


def _ordered_dict(*args, **kwargs):
    return _Dict(*args, **kwargs)


def _torch_size(*args):
    return tuple(*args)


def _device(*args):
    return ":".join(str(a) for a in args)


# Protocol-2 pickles store bytes as text: CPython's ``save_bytes`` writes
# ``codecs.encode(str(obj, 'latin1'), 'latin1')``. Any other codec would import a codec module and
# run it on our input (punycode takes seconds per kilobyte), so only latin1 and its aliases pass.
_LATIN1 = frozenset({"latin1", "latin-1", "iso-8859-1", "iso8859-1", "l1"})


def _codecs_encode(obj, encoding):
    if not isinstance(obj, str) or not isinstance(encoding, str) or encoding.lower() not in _LATIN1:
        shown = repr(encoding)[:40] if isinstance(encoding, str) else type(encoding).__name__
        raise FormatError(f"pickle encodes bytes with codec {shown}; pickle itself only writes 'latin1'")
    return obj.encode("latin-1")


class _Dict(collections.OrderedDict):
    """An OrderedDict as unpickled. ``state_dict()`` attaches ``_metadata`` to it, which pickle
    restores with BUILD; the state is kept as data, never set as attributes (an attribute named
    ``items`` would shadow the method every reader calls)."""

    pickled_state: Any = None

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
            raise FormatError("pickle sets state (BUILD) on an OrderedDict that is not a dict of attributes")
        self.__dict__["pickled_state"] = state


_SAFE: dict[tuple[str, str], Any] = {
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
    ("torch.nn.parameter", "Parameter"): _opaque_class("torch.nn.parameter.Parameter"),
    ("torch", "Tensor"): _opaque_class("torch.Tensor"),
    ("collections", "OrderedDict"): _ordered_dict,
    ("torch", "Size"): _torch_size,
    ("torch", "device"): _device,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "slice"): slice,
    ("builtins", "complex"): complex,
    ("_codecs", "encode"): _codecs_encode,
    # plain dict subclasses seen in Lightning/fairseq checkpoints behave like dicts here
}


_PY2_MODULES = {"__builtin__": "builtins", "copy_reg": "copyreg"}


def _accepted(qualname: str, accept: set[str]) -> bool:
    """Exact names, or patterns with a trailing '*' such as 'torch.nn.*' or 'torchvision.*'."""
    if qualname in accept:
        return True
    return any(a.endswith("*") and qualname.startswith(a[:-1]) for a in accept)


@dataclass
class Unpickled:
    obj: Any
    storages: dict[str, StorageRef]
    opaque: list[str] = field(default_factory=list)


class _Unpickler(pickle.Unpickler):
    def __init__(self, f, accept: set[str], extra: dict[tuple[str, str], Any] | None, pid_handler: Callable | None):
        super().__init__(f, encoding="utf-8")
        self.accept = accept
        self.extra = extra or {}
        self.refused: list[str] = []
        self.accepted: list[str] = []
        self.storages: dict[str, StorageRef] = {}
        self.pid_handler = pid_handler

    def find_class(self, module: str, name: str) -> Any:
        module = _PY2_MODULES.get(module, module)  # protocol-2 pickles use Python 2 module names
        key = (module, name)
        if key in _SAFE:
            return _SAFE[key]
        if key in self.extra:
            return self.extra[key]
        if module in ("torch", "torch.cuda") and name in _STORAGE_DTYPES:
            return StorageType(_STORAGE_DTYPES[name])  # old GPU-saved files name torch.cuda.FloatStorage
        if module == "torch":
            if name in _STORAGE_DTYPES:
                return StorageType(_STORAGE_DTYPES[name])
            dt = canonical_from_torch(name)
            if dt is not None:
                return DType(dt)
        if module == "torch.storage" and name in ("UntypedStorage", "TypedStorage"):
            return StorageType("U8")
        qualname = f"{module}.{name}"
        (self.accepted if _accepted(qualname, self.accept) else self.refused).append(qualname)
        return _opaque_class(qualname)

    def persistent_load(self, pid: Any) -> Any:
        if self.pid_handler is not None:
            return self.pid_handler(pid)
        if not isinstance(pid, tuple) or len(pid) < 5 or pid[0] != "storage":
            raise FormatError(f"unknown persistent id {str(pid)[:80]!r}")
        stype, key, location, numel = pid[1], str(pid[2]), str(pid[3]), pid[4]
        if len(pid) > 5 and pid[5] is not None:
            raise FormatError("legacy storage views are not supported; re-save the checkpoint with a current torch")
        if not isinstance(stype, StorageType) or not isinstance(numel, int) or numel < 0:
            raise FormatError(f"malformed storage record for storage {key!r}")
        ref = self.storages.get(key)
        if ref is None:
            ref = self.storages[key] = StorageRef(key, stype.dtype, location, numel)
        return ref


class _Capped(io.RawIOBase):
    """A file view that never reads past the end of the file: a length field in the pickle
    claiming 2**60 bytes makes ``read`` ask for what is there, not allocate the claim."""

    def __init__(self, f: Any):
        self.f = f
        self.size = os.fstat(f.fileno()).st_size

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        left = max(0, self.size - self.f.tell())
        return self.f.read(left if n is None or n < 0 else min(n, left))

    def readinto(self, b: Any) -> int:
        data = self.read(len(b))
        b[: len(data)] = data
        return len(data)

    def readline(self, limit: int = -1) -> bytes:
        return self.f.readline(limit)

    def tell(self) -> int:
        return self.f.tell()

    def seek(self, pos: int, whence: int = 0) -> int:
        return self.f.seek(pos, whence)


class _Call:
    """A function or builtin type that `find_class` hands out, as the pickle sees it: callable
    (REDUCE), but BUILD and setattr cannot reach the real function (its ``__defaults__`` would
    change inside this process). Tensor records it returns are kept for `check_records`."""

    __slots__ = ("fn", "made")

    def __init__(self, fn: Callable, made: list):
        object.__setattr__(self, "fn", fn)
        object.__setattr__(self, "made", made)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        out = self.fn(*args, **kwargs)
        if isinstance(out, TensorRef):
            self.made.append(out)
        return out

    def __setstate__(self, state: Any) -> None:
        raise FormatError(f"pickle sets state (BUILD) on the function {self!r}; no checkpoint does that")

    def __setattr__(self, name: str, value: Any) -> None:
        raise FormatError(f"pickle sets attribute {name[:40]!r} on the function {self!r}")

    def __repr__(self) -> str:
        return f"<{getattr(self.fn, '__qualname__', type(self.fn).__name__)}>"


class _Guarded(_Unpickler):
    """The restricted unpickler with every callable it hands out wrapped in `_Call`. Classes of
    inert records stay classes (NEWOBJ needs a type); their instances take state by BUILD."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.made: list[TensorRef] = []

    def find_class(self, module: str, name: str) -> Any:
        obj = super().find_class(module, name)
        if isinstance(obj, type) and issubclass(obj, Opaque):
            return obj
        return _Call(obj, self.made) if callable(obj) else obj


# Bounds on tensor records, checked once the pickle is done. torch keeps sizes, strides, offsets
# and byte counts in int64 (``computeStorageNbytes`` refuses overflow); numpy's NPY_MAXDIMS is 64.
MAX_RANK = 64
MAX_INT64 = (1 << 63) - 1
MAX_NAME = 4096


def _int64(x: Any) -> bool:
    return type(x) is int and 0 <= x <= MAX_INT64


def _storage_problem(s: StorageRef) -> str | None:
    if s.dtype not in DTYPES:
        return f"storage {str(s.key)[:60]!r} has unknown dtype {str(s.dtype)[:30]!r}"
    if not (isinstance(s.key, str) and len(s.key) <= MAX_NAME and isinstance(s.location, str) and len(s.location) <= MAX_NAME):
        return "storage record has a malformed key or location"
    if not _int64(s.numel) or s.numel * itemsize(s.dtype) > MAX_INT64:
        return f"storage {s.key[:60]!r} declares an impossible size"
    return None


def _tensor_problem(t: TensorRef, storages: dict[str, StorageRef]) -> str | None:
    s = t.storage
    if not isinstance(s, StorageRef) or storages.get(s.key) is not s:
        return "tensor record points at a storage the checkpoint does not declare"
    if t.dtype not in DTYPES:
        return f"tensor has unknown dtype {str(t.dtype)[:30]!r}"
    shape, stride = t.shape, t.stride
    if not (type(shape) is tuple and type(stride) is tuple and len(shape) == len(stride) <= MAX_RANK):
        return "tensor record's size and stride are not two tuples of one rank (at most 64)"
    if not (all(map(_int64, shape)) and all(map(_int64, stride)) and _int64(t.storage_offset)):
        return "tensor record has a size, stride or offset outside 0..2**63-1"
    numel = 1
    for n in shape:
        numel *= n
        if numel > MAX_INT64:
            return f"tensor's {len(shape)} dimensions hold more than 2**63 elements"
    if numel == 0:
        return None
    size = itemsize(t.dtype)
    if numel * size > MAX_INT64:
        return "tensor holds more than 2**63 bytes"
    last = t.storage_offset + sum((n - 1) * st for n, st in zip(shape, stride))
    if (last + 1) * size > s.numel * itemsize(s.dtype):
        return (f"tensor {list(shape)} (offset {t.storage_offset}, stride {list(stride)}) reaches past the end of "
                f"storage {s.key[:60]!r} ({s.numel} elements)")
    return None


def check_records(tensors: list[TensorRef], storages: dict[str, StorageRef], source: str) -> None:
    """Validate the final tensor and storage records in one pass, after the pickle is done (so
    nothing a later opcode changed escapes): dtypes known, sizes, strides and offsets in int64,
    rank at most MAX_RANK, every view inside its storage. Raises one FormatError for all."""
    problems = [p for p in map(_storage_problem, storages.values()) if p]
    if not problems:
        seen: set[int] = set()
        for t in tensors:
            if id(t) not in seen:
                seen.add(id(t))
                p = _tensor_problem(t, storages)
                if p:
                    problems.append(p)
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise FormatError(f"{source}: {'; '.join(problems[:3])}{more}; the file is corrupt or crafted")


def _scan_stream(f: Any, source: str) -> None:
    """`scan` the pickle that starts at ``f``'s position, reading only as much as it needs: a
    legacy checkpoint is a few pickles followed by gigabytes of storage bytes."""
    start = f.tell()
    want = 1 << 20
    while True:
        f.seek(start)
        buf = f.read(want)
        try:
            scan(buf, source)
            return
        except Truncated:
            if len(buf) < want:
                raise FormatError(f"{source}: pickle is truncated; the file is incomplete") from None
            want *= 4


def unpickle(data: bytes | io.BufferedIOBase, source: str, accept: frozenset[str] | set[str] = frozenset(),
             extra: dict[tuple[str, str], Any] | None = None, pid_handler: Callable | None = None) -> Unpickled:
    """Unpickle without importing or calling anything outside the allowlist.

    ``accept`` names globals (``module.Name``) the user allowed: they load as inert `Opaque`
    records. Any other unknown global raises `UnsafeCheckpointError` naming all of them.
    """
    if isinstance(data, (bytes, bytearray, memoryview)):
        buf = bytes(data)
        try:
            scan(buf, source)
        except Truncated:
            raise FormatError(f"{source}: pickle is truncated; the file is incomplete") from None
        f: Any = io.BytesIO(buf)
    else:
        f = _Capped(data) if hasattr(data, "fileno") else data
        start = f.tell()
        _scan_stream(f, source)
        f.seek(start)
    up = _Guarded(f, set(accept), extra, pid_handler)
    try:
        obj = up.load()
    except (FormatError, UnsafeCheckpointError) as e:
        if up.refused:
            raise UnsafeCheckpointError(source, up.refused) from None
        raise FormatError(f"{source}: {e}") from None
    except RecursionError:
        raise FormatError(f"{source}: pickle is nested too deeply to be a checkpoint") from None
    except MemoryError:
        raise FormatError(f"{source}: pickle asks for more memory than a checkpoint's metadata needs") from None
    except Exception as e:  # pickle raises many types on corrupt input; all mean the same to a user
        if up.refused:
            raise UnsafeCheckpointError(source, up.refused) from None
        raise FormatError(f"{source}: corrupt or truncated pickle ({type(e).__name__}: {str(e)[:120]})") from None
    if up.refused:
        raise UnsafeCheckpointError(source, up.refused)
    check_records(up.made, up.storages, source)
    return Unpickled(obj, up.storages, sorted(set(up.accepted)))
