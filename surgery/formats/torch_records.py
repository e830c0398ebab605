"""The stand-ins the restricted unpickler hands out: tensor and storage records, torch's dtype,
layout and qscheme markers, inert `Opaque` records for accepted globals, and the few real
callables (containers, ``torch.Size``, ``torch.device``) that take exactly what torch's
weights-only loader takes. Nothing here imports torch or calls anything a file names.
"""

from __future__ import annotations

import collections
import math
import re
from dataclasses import dataclass, field
from typing import Any

from ..checkpoint import QUANTIZED_DTYPES, contiguous_stride
from ..errors import FormatError

# Bounds on tensor records, checked once the pickle is done. torch keeps sizes, strides, offsets
# and byte counts in int64 (``computeStorageNbytes`` refuses overflow); numpy's NPY_MAXDIMS is 64.
MAX_RANK = 64
MAX_INT64 = (1 << 63) - 1
MAX_LOGICAL = 1 << 256
MAX_NAME = 4096

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
    # what torch.save writes for every tensor, passed in this frame: a storage record, an int offset and
    # two tuples of one rank of plain non-negative ints, which `_tensor` would keep as they are; it
    # takes (and checks) anything else
    if (type(storage) is StorageRef and type(storage_offset) is int and type(size) is tuple and type(stride) is tuple
            and storage_offset >= 0 and len(size) == len(stride) <= MAX_RANK and _plain_dims(size, stride)):
        return TensorRef(storage, storage_offset, size, stride, storage.dtype, bool(requires_grad))
    return _tensor(storage, storage_offset, size, stride, requires_grad, None)


def _plain_dims(size: tuple, stride: tuple) -> bool:
    """Every size and stride a plain non-negative int (a loop: a tensor has a few dimensions)."""
    for x in size:
        if type(x) is not int or x < 0:
            return False
    for x in stride:
        if type(x) is not int or x < 0:
            return False
    return True


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
    out = func(*args)
    if isinstance(out, Opaque) and getattr(out, "wrapper", False):
        out.__setstate__(state)  # a wrapper subclass record (a DTensor) keeps its fields: local tensor, spec
    return out


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
    if isinstance(cls, type) and issubclass(cls, Opaque) and getattr(cls, "wrapper", False):
        return cls(*args)  # a reader's record of a subclass whose data are its fields (a DTensor's local tensor)
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
