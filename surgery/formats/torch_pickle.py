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
import io
import math
import os
import pickle
import re
from dataclasses import dataclass, field
from typing import Any, Callable

from ..checkpoint import DTYPES, PACKED_DTYPES, QUANTIZED_DTYPES, canonical_from_torch, contiguous_stride, gc_paused, itemsize
from ..errors import FormatError, UnsafeCheckpointError
from .pickle_scan import Truncated, scan

_STORAGE_DTYPES = {
    "DoubleStorage": "F64", "FloatStorage": "F32", "HalfStorage": "F16", "BFloat16Storage": "BF16",
    "LongStorage": "I64", "IntStorage": "I32", "ShortStorage": "I16", "CharStorage": "I8",
    "ByteStorage": "U8", "BoolStorage": "BOOL", "ComplexFloatStorage": "C64", "ComplexDoubleStorage": "C128",
    "QInt8Storage": "QI8", "QUInt8Storage": "QU8", "QInt32Storage": "QI32", "QUInt4x2Storage": "QU4X2",
    "QUInt2x4Storage": "QU2X4", "UntypedStorage": "U8",
}
# The legacy tensor types (torch.FloatTensor, torch.sparse.LongTensor, torch.cuda.HalfTensor, ...):
# element type -> dtype. Sparse types exist for every one but Bool.
_LEGACY_TENSOR_DTYPES = {
    "Double": "F64", "Float": "F32", "Half": "F16", "BFloat16": "BF16", "Long": "I64", "Int": "I32",
    "Short": "I16", "Char": "I8", "Byte": "U8", "Bool": "BOOL",
}
_QSCHEMES = ("per_tensor_affine", "per_tensor_symmetric", "per_channel_affine", "per_channel_symmetric",
             "per_channel_affine_float_qparams")


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


@dataclass(frozen=True)
class Layout(_Sealed):
    """``torch.serialization._get_layout('torch.sparse_coo')``: the name, never the object."""

    name: str


@dataclass(frozen=True)
class QScheme(_Sealed):
    name: str


@dataclass
class StorageRef(_Sealed):
    key: str
    dtype: str
    location: str
    numel: int


@dataclass
class TensorRef(_Sealed):
    """A tensor as the pickle describes it. ``kind`` other than "dense": see `TensorInfo`."""

    storage: StorageRef | None
    storage_offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: str
    requires_grad: bool = False
    kind: str = "dense"
    parts: dict[str, "TensorRef"] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)


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


def _what(x: Any) -> str:
    """How a pickled value is named to a user: never after surgery's own record classes."""
    if isinstance(x, TensorRef):
        return "a tensor"
    if isinstance(x, StorageRef):
        return "a storage"
    if isinstance(x, Opaque) or (isinstance(x, type) and issubclass(x, Opaque)) or isinstance(x, LegacyTensorType):
        return x.qualname
    plain = {DType: "a dtype", StorageType: "a storage type", Layout: "a layout", QScheme: "a qscheme"}
    return plain.get(type(x)) or type(x).__name__


def _expect(x: Any, cls: type, what: str) -> Any:
    """``x`` if it is a ``cls`` record. A stand-in for an unknown global where tensor data belongs
    marks that global as one that builds tensors: accepting it would not give the tensor."""
    if isinstance(x, cls) and not (isinstance(x, TensorRef) and x.kind == "dense" and x.storage is None):
        return x
    if isinstance(x, Opaque) or (isinstance(x, type) and issubclass(x, Opaque)):
        opaque = x if isinstance(x, type) else type(x)
        opaque.builds_tensor = True
        raise FormatError(f"{what} is built by {opaque.qualname}, code surgery does not run")
    raise FormatError(f"{what} is not {'a storage' if cls is StorageRef else 'a tensor'} (got {_what(x)})")


def _ints(values: Any, what: str) -> tuple[int, ...]:
    if type(values) not in (tuple, list) or len(values) > MAX_RANK:
        raise FormatError(f"tensor record has a malformed {what} (not a tuple of at most {MAX_RANK} integers, the rank limit)")
    try:
        out = tuple(int(s) for s in values)
    except (TypeError, ValueError):
        raise FormatError(f"tensor record has a malformed {what}") from None
    if any(s < 0 for s in out):
        raise FormatError(f"tensor record has a negative {what} {out}")
    return out


def _rebuild_tensor(storage, storage_offset, size, stride):
    # torch 0.2-0.3 (before Variable and Tensor merged): no requires_grad, no hooks
    return _tensor(storage, storage_offset, size, stride, False, None)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, hooks=None, metadata=None):
    return _tensor(storage, storage_offset, size, stride, requires_grad, None)


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, hooks, dtype, metadata=None):
    return _tensor(storage, storage_offset, size, stride, requires_grad, dtype)


def _tensor(storage, storage_offset, size, stride, requires_grad, dtype) -> TensorRef:
    if type(storage) is not StorageRef:  # the exact type first: one check per tensor of a state dict
        _expect(storage, StorageRef, "a tensor's storage")
    if dtype is None:
        dt = storage.dtype
    elif isinstance(dtype, DType):
        dt = dtype.dtype
    else:
        raise FormatError(f"unsupported tensor dtype record {_what(dtype)}")
    # checked before anything is built from them: a pickle may pass one huge tuple to every tensor
    if type(size) not in (tuple, list) or type(stride) not in (tuple, list):
        raise FormatError("tensor record has a malformed size or stride (not two tuples of integers)")
    if len(size) > MAX_RANK:
        raise FormatError(f"tensor record's size has rank {len(size)} (at most {MAX_RANK})")
    try:
        shape = tuple(map(int, size))
        strides = tuple(map(int, stride))
        offset = int(storage_offset)
    except (TypeError, ValueError):
        raise FormatError("tensor record has a malformed size or stride") from None
    if len(shape) != len(strides) or offset < 0 or (shape and (min(shape) < 0 or min(strides) < 0)):
        raise FormatError(f"tensor record has an invalid shape {shape} / stride {strides} / offset {offset}")
    return TensorRef(storage, offset, shape, strides, dt, bool(requires_grad))


def _rebuild_parameter(data, requires_grad=False, hooks=None, state=None):
    data = _expect(data, TensorRef, "a parameter's data")
    data.requires_grad = bool(requires_grad)
    return data


def _rebuild_from_type_v2(func, new_type, args, state):
    # new_type (torch.Tensor, nn.Parameter or a subclass) changes the Python class, not the data
    return func(*args)


def _number(x: Any, kinds: tuple, what: str) -> Any:
    if isinstance(x, bool) or not isinstance(x, kinds):
        raise FormatError(f"quantized tensor has a malformed {what} ({_what(x)})")
    return x


def _rebuild_qtensor(storage, storage_offset, size, stride, quantizer_params, requires_grad=False, hooks=None):
    t = _tensor(storage, storage_offset, size, stride, requires_grad, None)
    if t.dtype not in QUANTIZED_DTYPES:
        raise FormatError(f"quantized tensor is backed by a {t.dtype} storage, not a quantized one")
    qp = quantizer_params
    if not isinstance(qp, tuple) or not qp or not isinstance(qp[0], QScheme):
        raise FormatError("quantized tensor has a malformed quantizer record")
    scheme = qp[0].name
    t.kind, t.params = "quantized", {"qscheme": scheme}
    if scheme == "per_tensor_affine" and len(qp) == 3:
        t.params.update(scale=float(_number(qp[1], (int, float), "scale")), zero_point=_number(qp[2], (int,), "zero point"))
        return t
    if scheme not in ("per_channel_affine", "per_channel_affine_float_qparams") or len(qp) != 4:
        raise FormatError(f"quantized tensor with qscheme torch.{scheme} cannot be rebuilt (torch.load refuses it too)")
    axis = _number(qp[3], (int,), "axis")
    if not 0 <= axis < len(t.shape):
        raise FormatError(f"quantized tensor has axis {axis} out of range for shape {list(t.shape)}")
    t.params["axis"] = axis
    for key, value in (("scales", qp[1]), ("zero_points", qp[2])):
        if isinstance(value, list):
            t.params[key] = [_number(v, (int, float), key) for v in value]
            n = len(value)
        else:
            part = t.parts[key] = _expect(value, TensorRef, f"a quantized tensor's {key}")
            n = math.prod(part.shape)
        if n != t.shape[axis]:
            raise FormatError(f"quantized tensor has {n} {key} for {t.shape[axis]} channels")
    return t


_SPARSE_LAYOUTS = {"torch.sparse_coo": "sparse_coo", "torch.sparse_csr": "sparse_csr", "torch.sparse_csc": "sparse_csc",
                   "torch.sparse_bsr": "sparse_bsr", "torch.sparse_bsc": "sparse_bsc"}


def _rebuild_sparse_tensor(layout, data):
    if not isinstance(layout, Layout) or layout.name not in _SPARSE_LAYOUTS:
        raise FormatError(f"sparse tensor has layout {layout.name if isinstance(layout, Layout) else _what(layout)}, "
                          f"which torch cannot rebuild either")
    kind = _SPARSE_LAYOUTS[layout.name]
    names = ("indices", "values") if kind == "sparse_coo" else ("compressed_indices", "plain_indices", "values")
    if not isinstance(data, tuple) or len(data) not in ((3, 4) if kind == "sparse_coo" else (4,)):
        raise FormatError(f"{kind.replace('_', ' ')} tensor record is malformed")
    parts = {n: _expect(v, TensorRef, f"a sparse tensor's {n}") for n, v in zip(names, data)}
    shape = _ints(data[len(names)], "sparse size")
    params: dict[str, Any] = {}
    if kind == "sparse_coo" and len(data) == 4:
        if data[3] is not None and not isinstance(data[3], bool):
            raise FormatError("sparse tensor record has a malformed is_coalesced flag")
        params["coalesced"] = data[3]
    return TensorRef(None, 0, shape, contiguous_stride(shape), parts["values"].dtype, False, kind, parts, params)


def _rebuild_nested_tensor(buffer, sizes, strides, storage_offsets):
    parts = {n: _expect(v, TensorRef, f"a nested tensor's {n}")
             for n, v in (("buffer", buffer), ("sizes", sizes), ("strides", strides), ("offsets", storage_offsets))}
    if len(parts["buffer"].shape) != 1 or len(parts["sizes"].shape) not in (1, 2):
        raise FormatError("nested tensor record is malformed")
    shape = parts["sizes"].shape[:1]
    return TensorRef(None, 0, shape, (1,), parts["buffer"].dtype, False, "nested", parts)


def _rebuild_meta_tensor_no_storage(dtype, size, stride, requires_grad=False):
    if not isinstance(dtype, DType):
        raise FormatError(f"meta tensor has a malformed dtype ({_what(dtype)})")
    shape, strides = _ints(size, "size"), _ints(stride, "stride")
    if len(shape) != len(strides):
        raise FormatError(f"meta tensor has shape {list(shape)} but stride {list(strides)}")
    return TensorRef(None, 0, shape, strides, dtype.dtype, bool(requires_grad), "meta")


def _rebuild_device_tensor_from_cpu_tensor(data, dtype, device, requires_grad=False):
    # a tensor of a storage-less backend (XLA, MTIA, ...), saved through a CPU copy
    data = _expect(data, TensorRef, "a device tensor's CPU copy")
    if not isinstance(dtype, DType) or dtype.dtype != data.dtype:
        raise FormatError(f"device tensor converts {data.dtype} data to {_what(dtype)} on load; surgery reads "
                          f"only the stored bytes")
    data.requires_grad = bool(requires_grad)
    return data


def _rebuild_device_tensor_from_numpy(data, dtype, device, requires_grad=False):
    _expect(data, TensorRef, "a device tensor's numpy data")  # numpy arrays are never on the allowlist
    raise FormatError("a device tensor rebuilt from a numpy array cannot be read")


def _rebuild_wrapper_subclass(cls, *args):
    if isinstance(cls, type) and issubclass(cls, Opaque):
        cls.builds_tensor = True  # accepting the subclass would not give its data
    raise FormatError(f"tensor subclass {_what(cls)} keeps its data in its own code; surgery cannot read it")


class _Parameter:
    """``torch.nn.Parameter``: NEWOBJ/calls give the data tensor, as torch.load does (a
    `_ParameterRef`, the one tensor record that takes the BUILD torch 0.2-0.3 wrote after it)."""

    __setstate__ = _Sealed.__setstate__  # BUILD on the class itself then fails instead of setattr

    def __new__(cls, data: Any = None, requires_grad: bool = True) -> Any:
        t = _expect(data, TensorRef, "a parameter's data")
        return _ParameterRef(t.storage, t.storage_offset, t.shape, t.stride, t.dtype, bool(requires_grad), t.kind,
                             t.parts, t.params)


class _ParameterRef(TensorRef):
    """A tensor made by calling ``torch.nn.Parameter(data)``. torch 0.2-0.3 pickled a parameter
    so (``Variable.__reduce_ex__``), then BUILD with ``(requires_grad, volatile, _backward_hooks)``;
    a dict of attributes is the other state a parameter can carry. Neither can change what the
    record was checked for (storage, shape, dtype): requires_grad is read, hooks (code torch
    would not keep either) and attributes are ignored."""

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 3 and type(state[0]) is bool and type(state[1]) is bool \
                and (state[2] is None or isinstance(state[2], dict)):
            self.requires_grad = state[0]
        elif not (isinstance(state, dict) and all(isinstance(k, str) for k in state)):
            raise FormatError("pickle sets state (BUILD) on a parameter that is not (requires_grad, volatile, hooks) "
                              "or a dict of attributes")


class _LegacyTensor(TensorRef):
    """``torch.Tensor`` built by NEWOBJ and filled by BUILD with (storage, offset, size, stride),
    as very old torch pickled it (or the 5-tuple of a pre-0.4 Variable)."""

    storage = None
    kind = "dense"

    def __new__(cls, *args: Any) -> Any:
        if args:
            raise FormatError("torch.Tensor(...) called with arguments is not a pickled tensor")
        return object.__new__(cls)

    def __init__(self, *args: Any) -> None:  # pragma: no cover - pickle never calls it
        raise FormatError("torch.Tensor(...) called with arguments is not a pickled tensor")

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 4:
            t = _tensor(*state, False, None)
        elif isinstance(state, tuple) and len(state) == 5:
            t = _expect(state[0], TensorRef, "a legacy Variable's data")
            t = TensorRef(t.storage, t.storage_offset, t.shape, t.stride, t.dtype, bool(state[3]))
        else:
            raise FormatError("legacy tensor record is malformed")
        self.__dict__.update(t.__dict__)


@dataclass(frozen=True)
class LegacyTensorType(_Sealed):
    """``torch.FloatTensor``, ``torch.sparse.LongTensor``, ``torch.cuda.HalfTensor``, ...: a value
    as a class reference; called, a tensor over a whole storage or a sparse tensor."""

    qualname: str
    dtype: str
    sparse: bool

    def __call__(self, *args: Any) -> TensorRef:
        if self.sparse and len(args) == 3:
            t = _rebuild_sparse_tensor(Layout("torch.sparse_coo"), tuple(args))
            if t.dtype == self.dtype:
                return t
        elif not self.sparse and len(args) == 1 and isinstance(args[0], StorageRef) and args[0].dtype == self.dtype:
            return TensorRef(args[0], 0, (args[0].numel,), (1,), self.dtype)
        raise FormatError(f"{self.qualname}({', '.join(_what(a) for a in args)}) builds a tensor surgery cannot read")


def _get_layout(name):
    if not isinstance(name, str):
        raise FormatError(f"layout record is malformed ({_what(name)})")
    return Layout(name)


def _bytearray(data=b""):
    if isinstance(data, (bytes, bytearray)):
        return bytearray(data)
    if isinstance(data, list) and all(isinstance(b, int) and 0 <= b < 256 for b in data):
        return bytearray(data)
    raise FormatError(f"malformed bytearray record ({_what(data)})")


def _ordered_dict(*args, **kwargs):
    return _Dict(*args, **kwargs)


_SIZE_SOURCES = (list, tuple, set, frozenset, dict, bytes, bytearray)


def _torch_size(*args):
    # torch.Size takes one iterable of ints (bytes count as ints, bool as 0/1); a str, a float or
    # a nested tuple fails in torch.load at once, and here too rather than building a tuple of chars
    if len(args) > 1 or (args and not isinstance(args[0], _SIZE_SOURCES)):
        raise FormatError(f"torch.Size({_args(args)}) is not a size; torch.Size takes one "
                          f"sequence of integers (torch.load refuses it too)")
    out = tuple(args[0]) if args else ()
    kinds = set(map(type, out))  # C loops: a size may be long, and a pickle may call this often
    if not kinds <= {int, bool} or (out and not (-(1 << 63) <= min(out) and max(out) <= MAX_INT64)):
        bad = next(x for x in out if type(x) not in (int, bool) or not -(1 << 63) <= x <= MAX_INT64)
        raise FormatError(f"torch.Size holds {_what(bad)}, not a 64-bit integer (torch.load refuses it too)")
    return tuple(map(int, out)) if bool in kinds else out


# torch.device's own grammar: a known type name, then ':' and an index without leading zeros
_DEVICE = re.compile(r"([a-z]+)(?::(0|[1-9][0-9]{0,18}))?")
_DEVICE_TYPES = frozenset(("cpu cuda ipu xpu mkldnn opengl opencl ideep hip ve fpga maia xla lazy vulkan mps meta "
                           "hpu mtia privateuseone").split())


def _device(*args):
    """``torch.device(type)``, ``(type, index)`` or ``(index)`` as torch pickles and parses them: the
    device string ("cuda:1"). Anything else is refused as torch.load refuses it."""
    kind = args[0].decode("latin-1") if args and type(args[0]) is bytes and len(args[0]) <= 64 else args[0] if args else None
    index = args[1] if len(args) == 2 else None
    m = _DEVICE.fullmatch(kind) if type(kind) is str and len(kind) <= 64 else None
    if len(args) == 1 and type(kind) is int and 0 <= kind <= MAX_INT64:
        return f"cuda:{kind}"
    if m and m[1] in _DEVICE_TYPES and len(args) <= 2 and (index is None or (type(index) is int and 0 <= index <= MAX_INT64
                                                                              and m[2] is None)):
        return kind if index is None else f"{kind}:{index}"
    raise FormatError(f"torch.device({_args(args)}) names no device torch.load accepts")


def _args(args: tuple) -> str:
    """A call's arguments by kind, the first few: never their (maybe huge) contents."""
    return ", ".join(_what(a) for a in args[:4]) + (f", ... ({len(args)} arguments)" if len(args) > 4 else "")


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
        super().__init__(f, encoding="utf-8")
        self.size = pickle_bytes
        self.meter = _Meter(pickle_bytes)
        self.accept = accept
        self.extra = extra or {}
        self.refused: list[str] = []
        self.storages: dict[str, StorageRef] = {}
        self.pid_handler = pid_handler
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
        if key in _SAFE:
            return _SAFE[key]
        if key in self.extra:
            return self.extra[key]
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
    if not isinstance(pid, tuple) or len(pid) < 5 or pid[0] != "storage":
        raise FormatError(f"unknown persistent id {str(pid)[:80]!r}")
    stype, key, location, numel = pid[1], str(pid[2]), str(pid[3]), pid[4]
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
        self.meter.spend(args + tuple(kwargs.values()))
        return self.fn(*args, **kwargs)


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
        if id(obj) in _METERED:
            return _Metered(obj, self.meter)
        if isinstance(obj, type) and hasattr(obj, "__setstate__"):
            return obj
        return _call(obj)


# Bounds on tensor records, checked once the pickle is done. torch keeps sizes, strides, offsets
# and byte counts in int64 (``computeStorageNbytes`` refuses overflow); numpy's NPY_MAXDIMS is 64.
MAX_RANK = 64
MAX_INT64 = (1 << 63) - 1
MAX_LOGICAL = 1 << 256
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


def _int64s(values: tuple) -> bool:
    for x in values:
        if type(x) is not int or not 0 <= x <= MAX_INT64:
            return False
    return True


_FIELDS = ("shape", "stride", "storage_offset", "dtype", "kind", "parts")


def _shape_problem(t: TensorRef) -> str | None:
    # a TensorRef itself always has its fields (BUILD cannot reach it); a legacy one is filled by BUILD
    if type(t) is not TensorRef and not all(hasattr(t, a) for a in _FIELDS):
        return "tensor record is incomplete (a legacy tensor never given its state)"
    shape, stride = t.shape, t.stride
    if not (type(shape) is tuple and type(stride) is tuple and len(shape) == len(stride) <= MAX_RANK):
        return "tensor record's size and stride are not two tuples of one rank (at most 64)"
    if not (_int64s(shape) and _int64s(stride) and _int64(t.storage_offset)):
        return "tensor record has a size, stride or offset outside 0..2**63-1"
    if t.dtype not in DTYPES:
        return f"tensor has unknown dtype {str(t.dtype)[:30]!r}"
    # a tensor with bytes fits int64 as torch counts them; one without (meta, the logical shape of
    # a sparse or nested one) is only kept far below the float range that sums and reports use
    limit = MAX_INT64 if t.storage is not None else MAX_LOGICAL
    numel = 1
    for n in shape:
        numel *= n
        if numel > limit:
            return f"tensor's {len(shape)} dimensions hold more than {'2**63' if limit == MAX_INT64 else '2**256'} elements"
    if t.storage is not None and numel * itemsize(t.dtype) > MAX_INT64:
        return "tensor holds more than 2**63 bytes"
    return None


def _tensor_problem(t: TensorRef, storages: dict[str, StorageRef]) -> str | None:
    problem = _shape_problem(t)
    if problem:
        return problem
    s = t.storage
    if s is None:  # sparse, nested, meta: their parts (indices, values, ...) have the storages
        if t.kind == "dense":
            return "dense tensor record has no storage"
        for part in t.parts.values():
            problem = _tensor_problem(part, storages) if isinstance(part, TensorRef) else "tensor part is not a tensor"
            if problem:
                return problem
        return None
    if not isinstance(s, StorageRef) or storages.get(s.key) is not s:
        return "tensor record points at a storage the checkpoint does not declare"
    if 0 in t.shape:
        return None
    last = t.storage_offset + sum((n - 1) * st for n, st in zip(t.shape, t.stride))
    per_byte = PACKED_DTYPES.get(t.dtype, 0)
    need = -(-(last + 1) // per_byte) if per_byte else (last + 1) * itemsize(t.dtype)
    if need > s.numel * itemsize(s.dtype):
        return (f"tensor {list(t.shape)} (offset {t.storage_offset}, stride {list(t.stride)}) reaches past the end of its "
                f"storage {s.key[:60]!r} ({s.numel} elements)")
    return None


def _records(obj: Any) -> list[TensorRef]:
    """Every tensor record reachable from the unpickled object, each once (a loop: no recursion)."""
    out: list[TensorRef] = []
    seen: set[int] = set()
    stack = [obj]
    while stack:
        x = stack.pop()
        if x is None or id(x) in seen or isinstance(x, (str, bytes, int, float)):
            continue
        seen.add(id(x))
        if isinstance(x, TensorRef):
            out.append(x)
        elif isinstance(x, dict):
            stack.extend(x.values())
        elif isinstance(x, (list, tuple, set, frozenset)):
            stack.extend(x)
        elif isinstance(x, Opaque):
            stack.extend((x.state, x.args, x.kwargs, x.__dict__.get("_items", ())))
    return out


def check_records(tensors: list[TensorRef], storages: dict[str, StorageRef], source: str) -> None:
    """Validate the final tensor and storage records in one pass, after the pickle is done (so
    nothing a later opcode changed escapes): dtypes known, sizes, strides and offsets in int64,
    rank at most MAX_RANK, every view inside its storage; parts of sparse, nested and quantized
    tensors likewise. Raises one FormatError for all."""
    problems = [p for p in map(_storage_problem, storages.values()) if p]
    if not problems:
        problems = _tensor_problems(tensors, storages)
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise FormatError(f"{source}: {'; '.join(problems[:3])}{more}; the file is corrupt or crafted")


def _tensor_problems(tensors: list[TensorRef], storages: dict[str, StorageRef]) -> list[str]:
    """`_tensor_problem` of each tensor. A model repeats a few (shape, stride, dtype) layouts
    many times: each layout is checked once, and a dense tensor of a sound layout then needs only
    its offset and its storage checked here; any other tensor, and any problem, goes through
    `_tensor_problem` itself (which words the error)."""
    layouts: dict[tuple, tuple[bool, int, int, int]] = {}
    sizes: dict[str, int] = {}  # storage key -> bytes (storages are checked already)
    out: list[str] = []
    for t in tensors:
        s = t.storage
        if type(t) is TensorRef and type(s) is StorageRef and type(t.shape) is tuple and type(t.stride) is tuple \
                and type(t.dtype) is str:
            key = (t.shape, t.stride, t.dtype)
            lay = layouts.get(key)
            if lay is None:
                lay = layouts[key] = _layout(t)
            sound, span, per_byte, size = lay
            off = t.storage_offset
            if sound and type(off) is int and 0 <= off <= MAX_INT64 and storages.get(s.key) is s:
                if span < 0:
                    continue
                last = off + span
                need = -(-(last + 1) // per_byte) if per_byte else (last + 1) * size
                have = sizes.get(s.key)
                if have is None:
                    have = sizes[s.key] = s.numel * itemsize(s.dtype)
                if need <= have:
                    continue
        problem = _tensor_problem(t, storages)
        if problem:
            out.append(problem)
    return out


def _layout(t: TensorRef) -> tuple[bool, int, int, int]:
    """(sound, span, values per byte or 0, item size) of a dense tensor's shape, stride and dtype:
    sound when `_shape_problem` finds nothing in them; span is the last element's distance from
    the first (-1 for a tensor with no elements)."""
    if _shape_problem(TensorRef(t.storage, 0, t.shape, t.stride, t.dtype)) is not None:
        return False, -1, 0, 0
    span = -1 if 0 in t.shape else sum((n - 1) * st for n, st in zip(t.shape, t.stride))
    return True, span, PACKED_DTYPES.get(t.dtype, 0), itemsize(t.dtype)


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
