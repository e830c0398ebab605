"""numpy values as pickles describe them, decoded without numpy: dtypes from their type code and
byte order, scalars from their raw bytes, arrays from ``_reconstruct``'s state. Pure Python; the
arrays become tensors later (`ArrayData`), where torch is already loaded to write the output."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

from ..formats.torch_records import Opaque
from .base import Unsupported

# numpy type code (kind + item size) -> (numpy's name, struct format, surgery's canonical dtype)
_CODES = {
    "b1": ("bool", "?", "BOOL"), "i1": ("int8", "b", "I8"), "u1": ("uint8", "B", "U8"),
    "i2": ("int16", "h", "I16"), "u2": ("uint16", "H", "U16"), "i4": ("int32", "i", "I32"),
    "u4": ("uint32", "I", "U32"), "i8": ("int64", "q", "I64"), "u8": ("uint64", "Q", "U64"),
    "f2": ("float16", "e", "F16"), "f4": ("float32", "f", "F32"), "f8": ("float64", "d", "F64"),
    "c8": ("complex64", "ff", "C64"), "c16": ("complex128", "dd", "C128"),
}


@dataclass(frozen=True)
class NumpyDType:
    code: str  # "f4", "U5", "O8", ...
    order: str  # "<", ">" or "|"

    @property
    def name(self) -> str:
        known = _CODES.get(self.code)
        return known[0] if known else self.order + self.code if self.order in "<>" else self.code

    @property
    def itemsize(self) -> int:
        return struct.calcsize(_CODES[self.code][1]) if self.code in _CODES else 0


@dataclass
class ArrayData:
    """A numpy array of a dtype torch has, to become a tensor (in C order, little-endian, when written)."""

    dtype: str  # surgery's canonical name (F32, I64, ...)
    shape: tuple[int, ...]
    data: bytes  # as pickled: in Fortran order where ``fortran``, big-endian where ``swap`` > 1
    numpy_dtype: str
    fortran: bool = False
    swap: int = 0  # bytes per swapped unit (a complex swaps its two halves each); 0: little-endian


def _is(x: Any, *qualnames: str) -> bool:
    return isinstance(x, Opaque) and x.qualname in qualnames


def dtype_of(rec: Any) -> NumpyDType:
    """``numpy.dtype('f4', False, True)`` with its BUILD state ``(3, '<', ...)``."""
    if not _is(rec, "numpy.dtype") or not rec.args or not isinstance(rec.args[0], str):
        raise Unsupported("numpy dtype record is malformed")
    code, state = rec.args[0], rec.state
    order = state[1] if isinstance(state, tuple) and len(state) > 1 and isinstance(state[1], str) else "|"
    if isinstance(state, tuple) and len(state) > 3 and state[3] is not None:
        raise Unsupported("numpy structured dtype (named fields)")
    return NumpyDType(code, "<" if order == "=" else order)


def scalar_value(args: tuple) -> tuple[Any, str]:
    """``numpy.core.multiarray.scalar(dtype, payload)`` as the Python int, float, bool, complex,
    str or bytes it holds, and its dtype's name."""
    if len(args) != 2:
        raise Unsupported("numpy scalar record is malformed")
    dt, payload = dtype_of(args[0]), args[1]
    if not isinstance(payload, (bytes, bytearray)):
        raise Unsupported(f"numpy scalar of dtype {dt.name} holds a Python object, not bytes")
    if dt.code.startswith("U"):
        return bytes(payload).decode("utf-32-be" if dt.order == ">" else "utf-32-le").rstrip("\x00"), "str_"
    if dt.code.startswith("S"):
        return bytes(payload).rstrip(b"\x00"), "bytes_"
    if dt.code not in _CODES:
        raise Unsupported(f"numpy scalar of dtype {dt.name} has no Python equivalent")
    fmt = _CODES[dt.code][1]
    if len(payload) != struct.calcsize(fmt):
        raise Unsupported(f"numpy scalar of dtype {dt.name} has {len(payload)} bytes")
    values = struct.unpack(("<" if dt.order != ">" else ">") + fmt, payload)
    return (complex(*values) if len(values) == 2 else values[0]), dt.name


def array_data(rec: Opaque) -> ArrayData:
    """``_reconstruct(ndarray, (0,), b'b')`` with BUILD state ``(version, shape, dtype, fortran, data)``."""
    state = rec.state
    cls = rec.args[0] if rec.args else None
    if not (isinstance(cls, type) and issubclass(cls, Opaque) and cls.qualname == "numpy.ndarray"):
        raise Unsupported(f"array of class {getattr(cls, 'qualname', type(cls).__name__)}, not numpy.ndarray")
    if not isinstance(state, tuple) or len(state) != 5:
        raise Unsupported("numpy array record is malformed")
    _, shape, dt_rec, fortran, data = state
    dt = dtype_of(dt_rec)
    if isinstance(data, list) or dt.code.startswith("O"):
        raise Unsupported("numpy object array (its elements are Python objects)")
    if dt.code not in _CODES:
        raise Unsupported(f"numpy array of dtype {dt.name}, which torch has no dtype for")
    if not isinstance(shape, tuple) or not all(type(n) is int and n >= 0 for n in shape):
        raise Unsupported("numpy array record has a malformed shape")
    if isinstance(data, Opaque) and data.qualname == "builtins.bytes" and data.args == ():
        data = b""  # numpy pickles an empty array's data as bytes()
    if not isinstance(data, (bytes, bytearray)):
        raise Unsupported("numpy array record holds no bytes")
    n = 1
    for s in shape:
        n *= s
    if len(data) != n * dt.itemsize:
        raise Unsupported(f"numpy array of shape {list(shape)} holds {len(data)} bytes, not {n * dt.itemsize}")
    part = dt.itemsize // 2 if dt.code.startswith("c") else dt.itemsize
    swap = part if dt.order == ">" and part > 1 else 0
    return ArrayData(_CODES[dt.code][2], shape, data, dt.name, bool(fortran) and len(shape) > 1, swap)
