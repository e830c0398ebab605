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
import pickletools
from dataclasses import dataclass, field
from typing import Any, Callable

from ..checkpoint import canonical_from_torch
from ..errors import FormatError, UnsafeCheckpointError

_STORAGE_DTYPES = {
    "DoubleStorage": "F64", "FloatStorage": "F32", "HalfStorage": "F16", "BFloat16Storage": "BF16",
    "LongStorage": "I64", "IntStorage": "I32", "ShortStorage": "I16", "CharStorage": "I8",
    "ByteStorage": "U8", "BoolStorage": "BOOL", "ComplexFloatStorage": "C64",
    "UntypedStorage": "U8",
}


@dataclass(frozen=True)
class StorageType:
    dtype: str


@dataclass(frozen=True)
class DType:
    dtype: str


@dataclass
class StorageRef:
    key: str
    dtype: str
    location: str
    numel: int


@dataclass
class TensorRef:
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
    return collections.OrderedDict(*args, **kwargs)


def _torch_size(*args):
    return tuple(*args)


def _device(*args):
    return ":".join(str(a) for a in args)


def _codecs_encode(obj, encoding="utf-8"):
    # protocol-2 pickles store bytes as latin1 text through _codecs.encode
    if not isinstance(obj, str) or not isinstance(encoding, str):
        raise FormatError("malformed bytes record")
    return obj.encode(encoding)


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


# Bounds on the object graph a pickle may build, checked by `_check_graph` before anything is
# unpickled. Hashing a tuple walks every element recursively with no depth guard (a deep tuple
# used as a dict key crashes the interpreter) and no caching (a tuple of tuples that share one
# memo entry, billion-laughs style, takes exponential time), so both are bounded up front.
# The C unpickler also sizes its memo table by the largest index a PUT names, so one
# LONG_BINPUT 0xFFFFFFFF allocates tens of GB; picklers number memo entries 0, 1, 2, ...
MAX_DEPTH = 1000
MAX_EXPANDED = 20_000_000
MEMO_SLACK = 1 << 16
_MARK, _SLICE = pickletools.markobject, pickletools.stackslice
_IN_PLACE = {"APPEND", "APPENDS", "SETITEM", "SETITEMS", "ADDITEMS", "BUILD"}
_PUTS = {"PUT", "BINPUT", "LONG_BINPUT"}
_GETS = {"GET", "BINGET", "LONG_BINGET"}


class _Node:
    """What the pre-scan knows of one stack object: its size if fully expanded, and its depth."""

    __slots__ = ("size", "depth")

    def __init__(self, size: int = 1, depth: int = 0):
        self.size, self.depth = size, depth


def _check_graph(f: Any, source: str) -> None:
    """Simulate the pickle machine's stack over the opcodes (nothing is built or called) and
    refuse a pickle whose objects nest deeper than MAX_DEPTH, expand through shared memo
    references past MAX_EXPANDED nodes, or name memo slots far beyond those it filled. An opcode
    stream the disassembler cannot read is refused too: what is not scanned is not unpickled."""
    stack: list[Any] = []
    marks: list[int] = []
    memo: dict[Any, _Node] = {}
    try:
        for op, arg, _pos in pickletools.genops(f):
            name = op.name
            if name == "MARK":
                marks.append(len(stack))
                continue
            if name in _PUTS:
                if not isinstance(arg, int) or arg < 0 or arg > len(memo) + MEMO_SLACK:
                    raise FormatError(f"{source}: pickle stores into memo slot {arg} after filling {len(memo)}; "
                                      f"no pickler does that, refusing it")
                if stack:
                    memo[arg] = stack[-1]
                continue
            if name == "MEMOIZE":
                if stack:
                    memo[len(memo)] = stack[-1]
                continue
            if name in _GETS:
                stack.append(memo.get(arg) or _Node())
                continue
            if name == "DUP":
                stack.append(stack[-1] if stack else _Node())
                continue
            before = op.stack_before
            popped: list[Any] = []
            if _MARK in before:
                k = marks.pop() if marks else 0
                popped = stack[k:]
                del stack[k:]
                for _ in range(before.index(_MARK)):
                    popped.insert(0, stack.pop() if stack else _Node())
            else:
                for _ in before:
                    popped.insert(0, stack.pop() if stack else _Node())
            after = op.stack_after
            if not after:
                continue
            if name in _IN_PLACE and popped:
                node = popped[0]
                for child in popped[1:]:
                    node.size += child.size
                    node.depth = max(node.depth, child.depth + 1)
            else:
                node = _Node(1 + sum(c.size for c in popped), 1 + max((c.depth for c in popped), default=0))
            if node.depth > MAX_DEPTH:
                raise FormatError(f"{source}: pickle nests objects more than {MAX_DEPTH} levels deep; "
                                  f"no checkpoint does that, refusing it")
            if node.size > MAX_EXPANDED:
                raise FormatError(f"{source}: pickle references shared objects so often that it expands to "
                                  f"more than {MAX_EXPANDED} objects (a pickle bomb); refusing it")
            stack.extend([node] * len(after))
    except FormatError:
        raise
    except RecursionError:
        raise FormatError(f"{source}: pickle is nested too deeply to be a checkpoint") from None
    except Exception as e:  # noqa: BLE001 - genops raises ValueError and friends on a corrupt stream
        raise FormatError(f"{source}: corrupt or truncated pickle ({type(e).__name__}: {str(e)[:120]})") from None


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


def unpickle(data: bytes | io.BufferedIOBase, source: str, accept: frozenset[str] | set[str] = frozenset(),
             extra: dict[tuple[str, str], Any] | None = None, pid_handler: Callable | None = None) -> Unpickled:
    """Unpickle without importing or calling anything outside the allowlist.

    ``accept`` names globals (``module.Name``) the user allowed: they load as inert `Opaque`
    records. Any other unknown global raises `UnsafeCheckpointError` naming all of them.
    """
    if isinstance(data, (bytes, bytearray, memoryview)):
        _check_graph(io.BytesIO(data), source)
        f: Any = io.BytesIO(data)
    else:
        f = _Capped(data) if hasattr(data, "fileno") else data
        start = f.tell()
        _check_graph(f, source)
        f.seek(start)
    up = _Unpickler(f, set(accept), extra, pid_handler)
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
    return Unpickled(obj, up.storages, sorted(set(up.accepted)))
