"""A restricted unpickler for torch checkpoints that never imports torch or runs foreign code.

``find_class`` hands out only stand-ins: tensor rebuild functions become `TensorRef` records,
storage classes become dtype markers, a few harmless containers are real. Any other global is
recorded and replaced by an inert `Opaque` class, so a `__reduce__` payload such as
``os.system`` is collected as a name and never called. After loading, any global that the
caller did not explicitly accept raises `UnsafeCheckpointError` listing all of them at once.
"""

from __future__ import annotations

import _compat_pickle
import collections
import functools
import io
import os
import pickle
from dataclasses import dataclass
from typing import Any, Callable

from ..checkpoint import canonical_from_torch, gc_paused
from ..errors import FormatError, UnsafeCheckpointError
from .pickle_scan import Truncated, scan
from .record_checks import _records, check_records
from .torch_records import (_LEGACY_TENSOR_DTYPES, _Dict, _QSCHEMES, _STORAGE_DTYPES, DType, LegacyTensorType, Opaque, QScheme,
                            StorageRef, StorageType, TensorRef, _bytearray, _codecs_encode, _device, _get_layout,
                            _LegacyTensor, _opaque_class, _ordered_dict, _Parameter, _rebuild_device_tensor_from_cpu_tensor,
                            _rebuild_device_tensor_from_numpy, _rebuild_from_type_v2, _rebuild_meta_tensor_no_storage,
                            _rebuild_nested_tensor, _rebuild_parameter, _rebuild_qtensor, _rebuild_sparse_tensor,
                            _rebuild_tensor, _rebuild_tensor_v2, _rebuild_tensor_v3, _rebuild_wrapper_subclass, _Sealed,
                            _torch_size)

# What each global a pickle names becomes: the stand-ins torch.load(weights_only=True) accepts.
_SAFE: dict[tuple[str, str], Any] = {
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch._utils", "_rebuild_qtensor"): _rebuild_qtensor,
    ("torch._utils", "_rebuild_sparse_tensor"): _rebuild_sparse_tensor,
    ("torch._utils", "_rebuild_nested_tensor"): _rebuild_nested_tensor,
    ("torch._utils", "_rebuild_meta_tensor_no_storage"): _rebuild_meta_tensor_no_storage,
    ("torch._utils", "_rebuild_device_tensor_from_cpu_tensor"): _rebuild_device_tensor_from_cpu_tensor,
    ("torch._utils", "_rebuild_device_tensor_from_numpy"): _rebuild_device_tensor_from_numpy,
    ("torch._utils", "_rebuild_wrapper_subclass"): _rebuild_wrapper_subclass,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
    ("torch.serialization", "_get_layout"): _get_layout,
    ("torch.nn.parameter", "Parameter"): _Parameter,
    ("torch", "Tensor"): _LegacyTensor,
    ("collections", "OrderedDict"): _ordered_dict,
    ("collections", "Counter"): collections.Counter,
    ("torch", "Size"): _torch_size,
    ("torch", "device"): _device,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "slice"): slice,
    ("builtins", "complex"): complex,
    ("builtins", "bytearray"): _bytearray,
    ("_codecs", "encode"): _codecs_encode,
    # plain dict subclasses seen in Lightning/fairseq checkpoints behave like dicts here
}


def _py3_name(module: str, name: str) -> tuple[str, str]:
    """Python 2 names in protocol-2 pickles (``__builtin__.long``, ``copy_reg._reconstructor``) as
    Python 3 spells them, by the table Python's own unpickler uses."""
    if (module, name) in _compat_pickle.NAME_MAPPING:
        return _compat_pickle.NAME_MAPPING[(module, name)]
    return _compat_pickle.IMPORT_MAPPING.get(module, module), name


def _torch_global(module: str, name: str) -> Any:
    """Stand-ins for the torch names torch.load(weights_only=True) accepts, or None."""
    if module in ("torch", "torch.cuda") and name in _STORAGE_DTYPES:
        return StorageType(_STORAGE_DTYPES[name])  # old GPU-saved files name torch.cuda.FloatStorage
    if module == "torch.storage" and name in ("UntypedStorage", "TypedStorage"):
        return StorageType("U8")
    if module in ("torch", "torch.cuda", "torch.sparse", "torch.cuda.sparse") and name.endswith("Tensor"):
        sparse = module.endswith("sparse")
        elem = name[: -len("Tensor")]
        if elem in _LEGACY_TENSOR_DTYPES and not (sparse and elem == "Bool"):
            return LegacyTensorType(f"{module}.{name}", _LEGACY_TENSOR_DTYPES[elem], sparse)
    if module == "torch":
        if name in _QSCHEMES:
            return QScheme(name)
        dt = canonical_from_torch(name)
        if dt is not None:
            return DType(dt)
    return None

def _accepted(qualname: str, accept: set[str]) -> bool:
    """Exact names, or patterns with a trailing '*' such as 'torch.nn.*' or 'torchvision.*'."""
    if qualname in accept:
        return True
    return any(a.endswith("*") and qualname.startswith(a[:-1]) for a in accept)


@dataclass
class Unpickled:
    obj: Any
    storages: dict[str, StorageRef]
    size: int = 0  # the pickle's bytes


class Refused(list):
    """The refused global names, with what accepting them would give: ``builds_tensors`` names
    those that build tensor data by running code (accepting them loses the tensors), and
    ``tensors_found`` says whether surgery finds any tensor with every refused name accepted."""

    builds_tensors: list[str]
    tensors_found: bool = True


def _explain(refused: list[str], obj: Any, classes: dict[str, type]) -> Refused:
    """Which refused globals hold tensor data in what they were called with (accepting them
    would lose those tensors), and whether any tensor is found with all of them accepted."""
    out = Refused(refused)
    builds = {q for q, c in classes.items() if getattr(c, "builds_tensor", False)}
    found = obj is None  # a pickle that failed part way: nothing more is known
    stack: list[tuple[Any, str | None]] = [(obj, None)]
    seen: set[int] = set()
    while stack and len(seen) < 1_000_000:
        node, holder = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, (TensorRef, StorageRef)):
            if holder is not None:
                builds.add(holder)
            found = found or holder is None
        elif isinstance(node, dict):
            stack.extend((v, holder) for v in node.values())
        elif isinstance(node, (list, tuple, set, frozenset)):
            stack.extend((v, holder) for v in node)
        elif isinstance(node, Opaque):
            stack.extend([(node.state, holder), (node.__dict__.get("_items", ()), holder)])
            caller = node.qualname if getattr(type(node), "refused", False) else holder
            stack.extend((a, caller) for a in (*node.args, *node.kwargs.values()))
    out.builds_tensors = sorted(builds & set(refused))
    out.tensors_found = found
    return out


class _Unpickler(pickle.Unpickler):
    def __init__(self, f, accept: set[str], extra: dict[tuple[str, str], Any] | None, pid_handler: Callable | None,
                 pickle_bytes: int):
        self.storages: dict[str, StorageRef] = {}
        self.pid_handler = pid_handler
        if pid_handler is None:  # torch's storage ids, once per tensor: no method frame around `storage_ref`
            self.persistent_load = functools.partial(storage_ref, storages=self.storages)
        super().__init__(f, encoding="utf-8")
        self.size = pickle_bytes
        self.meter = _Meter(pickle_bytes)
        self.accept = accept
        self.extra = extra or {}
        self.refused: list[str] = []
        self.opaque: dict[str, type] = {}

    def load(self) -> Any:
        obj = None
        try:
            obj = super().load()
            return obj
        finally:
            if self.refused:
                self.refused = _explain(self.refused, obj, self.opaque)

    def find_class(self, module: str, name: str) -> Any:
        module, name = _py3_name(module, name)  # protocol-2 pickles use Python 2 names
        key = (module, name)
        if key in self.extra:  # a reader's own record for a name, before the shared stand-in
            return self.extra[key]
        if key in _SAFE:
            return _SAFE[key]
        known = _torch_global(module, name)
        if known is not None:
            return known
        qualname = f"{module}.{name}"
        accepted = _accepted(qualname, self.accept)
        if not accepted:
            self.refused.append(qualname)
        if qualname not in self.opaque:
            self.opaque[qualname] = _opaque_class(qualname)
            self.opaque[qualname].refused = not accepted
        return self.opaque[qualname]

    def persistent_load(self, pid: Any) -> Any:
        if self.pid_handler is not None:
            # a format's own persistent ids (legacy, tar): what it hands back is declared here too,
            # so `check_records` holds its tensors to their storages like any other
            out = self.pid_handler(pid)
            for ref in (out, getattr(out, "storage", None)):
                if isinstance(ref, StorageRef):
                    self.storages.setdefault(ref.key, ref)
            return out
        return storage_ref(pid, self.storages)


def storage_ref(pid: Any, storages: dict[str, StorageRef]) -> StorageRef:
    """torch's storage persistent id ``('storage', type, key, location, numel[, view])`` as the
    one `StorageRef` of ``key`` in ``storages`` (made on first sight)."""
    if type(pid) is tuple and len(pid) == 5:  # what torch.save writes, once per tensor: checked in one line
        tag, stype, key, location, numel = pid
        if (tag == "storage" and type(key) is str and type(stype) is StorageType and type(location) is str
                and type(numel) is int and numel >= 0):
            ref = storages.get(key)
            if ref is None:
                ref = storages[key] = StorageRef(key, stype.dtype, location, numel)
            return ref
    if not isinstance(pid, tuple) or len(pid) < 5 or pid[0] != "storage":
        raise FormatError(f"unknown persistent id {str(pid)[:80]!r}")
    if not isinstance(pid[2], str):  # torch looks storages up by the key as pickled: str() would join keys it keeps apart
        raise FormatError(f"storage record's key {str(pid[2])[:40]!r} is not a string; torch.save never writes that")
    stype, key, location, numel = pid[1], pid[2], str(pid[3]), pid[4]
    if len(pid) > 5 and pid[5] is not None:
        raise FormatError("legacy storage views are not supported; re-save the checkpoint with a current torch")
    if not isinstance(stype, StorageType) or not isinstance(numel, int) or numel < 0:
        raise FormatError(f"malformed storage record for storage {key!r}")
    ref = storages.get(key)
    if ref is None:
        ref = storages[key] = StorageRef(key, stype.dtype, location, numel)
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
    change inside this process)."""

    __slots__ = ("fn",)

    def __init__(self, fn: Callable):
        object.__setattr__(self, "fn", fn)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, **kwargs)

    def __setstate__(self, state: Any) -> None:
        raise FormatError(f"pickle sets state (BUILD) on the function {self!r}; no checkpoint does that")

    def __setattr__(self, name: str, value: Any) -> None:
        raise FormatError(f"pickle sets attribute {name[:40]!r} on the function {self!r}")

    def __repr__(self) -> str:
        return f"<{getattr(self.fn, '__qualname__', type(self.fn).__name__)}>"


_CALL_TYPES: dict[Any, type] = {}


def _call(fn: Callable) -> _Call:
    """``_Call(fn)`` of a class whose ``__call__`` is ``fn`` itself: a REDUCE (one per tensor in
    a state dict) then runs no wrapper frame."""
    cls = _CALL_TYPES.get(fn)
    if cls is None:
        cls = _CALL_TYPES[fn] = type("_Call", (_Call,), {"__slots__": (), "__call__": staticmethod(fn)})
    return cls(fn)


class _Meter:
    """What the stand-ins below build in all, for one pickle. Each builds in time linear in its
    argument, but a pickle can pass one large object to them again and again through the memo
    (two bytes a reference); a checkpoint passes each object once, so all they build together
    stays within one element per byte of pickle plus `BUILD_BUDGET`."""

    def __init__(self, pickle_bytes: int):
        self.budget = self.left = BUILD_BUDGET + pickle_bytes

    def spend(self, args: tuple) -> None:
        for a in args:
            if isinstance(a, _SIZED):
                self.left -= len(a)
        if self.left < 0:
            raise FormatError(f"pickle passes the same objects to torch.Size, set, OrderedDict and the like again and "
                              f"again: together they would build more than {self.budget:,} elements (one per byte of "
                              f"pickle plus {BUILD_BUDGET:,}), which no checkpoint does")


class _Metered(_Call):
    """A stand-in whose work grows with its argument: `_Call`, charging its `_Meter` first."""

    __slots__ = ("meter",)

    def __init__(self, fn: Callable, meter: _Meter):
        super().__init__(fn)
        object.__setattr__(self, "meter", meter)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if args or kwargs:  # torch.save's empty OrderedDict of hooks, once per tensor, builds nothing
            self.meter.spend(args + tuple(kwargs.values()))
        return self.fn(*args, **kwargs)


class _MeteredDict(_Metered):
    """`_Metered` of OrderedDict: torch.save's empty OrderedDict of hooks, once per tensor, is made
    in this frame (``_ordered_dict()`` is ``_Dict()``), and builds nothing to charge."""

    __slots__ = ()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if not args and not kwargs:
            return _Dict()
        return _Metered.__call__(self, *args, **kwargs)


BUILD_BUDGET = 1 << 20
_SIZED = (str, bytes, bytearray, list, tuple, dict, set, frozenset)
_METERED = {id(f) for f in (_torch_size, _ordered_dict, _bytearray, _codecs_encode, set, frozenset,
                            collections.Counter, complex)}


class _Guarded(_Unpickler):
    """The restricted unpickler with every function it hands out wrapped in `_Call`. Records
    (`_Sealed`) refuse BUILD themselves; classes with a ``__setstate__`` (inert records, torch's
    legacy tensor and parameter) stay classes, since NEWOBJ needs a type, and BUILD on the class
    object calls that method unbound, which fails."""

    def find_class(self, module: str, name: str) -> Any:
        obj = super().find_class(module, name)
        if isinstance(obj, _Sealed) or not callable(obj):
            return obj
        if obj is _ordered_dict:
            return _MeteredDict(obj, self.meter)
        if id(obj) in _METERED:
            return _Metered(obj, self.meter)
        if isinstance(obj, type) and hasattr(obj, "__setstate__"):
            return obj
        return _call(obj)


def _scan_stream(f: Any, source: str) -> int:
    """`scan` the pickle that starts at ``f``'s position, reading only as much as it needs: a
    legacy checkpoint is a few pickles followed by gigabytes of storage bytes. Returns its length."""
    start = f.tell()
    want = 1 << 20
    while True:
        f.seek(start)
        buf = f.read(want)
        try:
            return scan(buf, source)
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
            size = scan(buf, source)
        except Truncated:
            raise FormatError(f"{source}: pickle is truncated; the file is incomplete") from None
        f: Any = io.BytesIO(buf)
    else:
        f = _Capped(data) if hasattr(data, "fileno") else data
        start = f.tell()
        size = _scan_stream(f, source)
        f.seek(start)
    up = _Guarded(f, set(accept), extra, pid_handler, size)
    with gc_paused():
        return _load(up, source)


def _load(up: "_Guarded", source: str) -> Unpickled:
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
    check_records(_records(obj), up.storages, source)
    return Unpickled(obj, up.storages, up.size)
