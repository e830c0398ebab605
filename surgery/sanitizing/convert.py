"""What the restricted reader returns, made into values ``torch.load(weights_only=True)`` takes.

A pure walk, no torch: plain containers stay (an unpickled OrderedDict becomes a real one), tensor
records stay records (`output` makes them tensors), numpy arrays become `ArrayData`, and each
record of a global the table `RULES` knows becomes plain data with a note of its type. Anything
else is dropped and noted with why; nothing is dropped or converted without a note.
"""

from __future__ import annotations

import collections
import datetime
import ntpath
import posixpath
import struct
from dataclasses import dataclass, field
from typing import Any, Callable

from ..formats.torch_records import DType, Opaque, StorageRef, TensorRef, _Dict
from . import omega
from .base import DROP, Device, Unsupported, label
from .numpy_records import array_data, dtype_of, scalar_value

@dataclass
class Notes:
    converted: dict[str, str] = field(default_factory=dict)  # path -> the type it had
    dropped: dict[str, str] = field(default_factory=dict)  # path -> why


def _numpy(*names: str) -> tuple[str, ...]:
    return tuple(f"numpy.{core}.multiarray.{n}" for core in ("core", "_core") for n in names)


def _namespace(w: "Walker", rec: Opaque, path: str) -> Any:
    state = rec.state if isinstance(rec.state, dict) else {}
    return w.mapping({**state, **rec.kwargs}, path)


def _scalar(w: "Walker", rec: Opaque, path: str) -> Any:
    value, dtype = scalar_value(rec.args)
    return value, f"numpy.{dtype}"


def _dtype(w: "Walker", rec: Opaque, path: str) -> Any:
    return dtype_of(rec).name, "numpy.dtype"


def _array(w: "Walker", rec: Opaque, path: str) -> Any:
    a = array_data(rec)
    return a, f"numpy.ndarray ({a.numpy_dtype}, shape {list(a.shape)})"


def _defaultdict(w: "Walker", rec: Opaque, path: str) -> Any:
    items = rec.__dict__.get("_items", [])
    if not all(isinstance(kv, tuple) and len(kv) == 2 for kv in items):
        raise Unsupported("defaultdict record is malformed")
    return w.mapping(dict(items), path)


def _attribute_dict(w: "Walker", rec: Opaque, path: str) -> Any:
    # a dict subclass: pickle stores its items as dict items, and its attributes are those items
    items = rec.__dict__.get("_items", [])
    if rec.args or rec.kwargs or rec.state or not all(isinstance(kv, tuple) and len(kv) == 2 for kv in items):
        raise Unsupported(f"{rec.qualname} record is malformed")
    return w.mapping(dict(items), path)


# Lightning's hyper_parameters (save_hyperparameters()), by every module that has defined the class
_ATTRIBUTE_DICTS = ("pytorch_lightning.utilities.parsing.AttributeDict", "lightning.pytorch.utilities.parsing.AttributeDict",
                    "lightning_fabric.utilities.data.AttributeDict", "lightning.fabric.utilities.data.AttributeDict")


def _path(join: Callable[..., str]) -> Callable[["Walker", Opaque, str], Any]:
    def convert(w: "Walker", rec: Opaque, path: str) -> Any:
        if not rec.args or not all(isinstance(p, str) for p in rec.args):
            raise Unsupported(f"{rec.qualname} record is malformed")
        return join(*rec.args)
    return convert


def _datetime(kind: type) -> Callable[["Walker", Opaque, str], Any]:
    # the pickled state is the value's own bytes, which the stdlib type (never the file) decodes
    def convert(w: "Walker", rec: Opaque, path: str) -> Any:
        args = rec.args
        if len(args) != 1 or not isinstance(args[0], bytes) or len(args[0]) > 16:
            raise Unsupported(f"{rec.qualname} with a time zone or in another form")
        return kind(args[0]).isoformat()
    return convert


def _timedelta(w: "Walker", rec: Opaque, path: str) -> Any:
    if len(rec.args) != 3 or not all(type(a) is int for a in rec.args):
        raise Unsupported("timedelta record is malformed")
    return datetime.timedelta(*rec.args).total_seconds()


_PATHS = {f"{module}.{cls}": join for module in ("pathlib", "pathlib._local")
          for cls, join in (("PosixPath", posixpath.join), ("PurePosixPath", posixpath.join),
                            ("WindowsPath", ntpath.join), ("PureWindowsPath", ntpath.join))}

# global -> how its record becomes plain data (any of them may be called by the pickle)
RULES: dict[str, Callable[["Walker", Opaque, str], Any]] = {
    "argparse.Namespace": _namespace,
    **{n: _scalar for n in _numpy("scalar")},
    **{n: _array for n in _numpy("_reconstruct")},
    "numpy.dtype": _dtype,
    "collections.defaultdict": _defaultdict,
    **{n: _attribute_dict for n in _ATTRIBUTE_DICTS},
    **{name: _path(join) for name, join in _PATHS.items()},
    "datetime.datetime": _datetime(datetime.datetime),
    "datetime.date": _datetime(datetime.date),
    "datetime.timedelta": _timedelta,
    **{n: omega.container for n in omega.CONTAINERS},
}
_DESCRIBED = {*_numpy("scalar", "_reconstruct"), "numpy.dtype"}  # rules that return (value, the type it had)
# globals the rules read as parts of another record (never on their own)
PARTS = ("numpy.ndarray", "builtins.bytes", *omega.PARTS)


class Walker:
    """One pass over a pickled object: each value converted once (shared values stay shared)."""

    def __init__(self) -> None:
        self.notes = Notes()
        self.memo: dict[int, Any] = {}
        self.why: dict[int, str] = {}  # id of a dropped value -> why
        self.last_why = ""

    def value(self, x: Any, path: str) -> Any:
        if x is None or type(x) in (bool, int, float, complex, str, bytes, bytearray, TensorRef, DType, Device):
            return x
        if id(x) in self.memo:
            out = self.memo[id(x)]
            if out is DROP:  # a shared value dropped: listed at each place it is left out of
                self.drop(path, self.why[id(x)])
            return out
        out = self._convert(x, path)
        self.memo[id(x)] = out
        if out is DROP:
            self.why[id(x)] = self.last_why
        return out

    def _convert(self, x: Any, path: str) -> Any:
        if isinstance(x, TensorRef):
            return x
        if isinstance(x, dict):
            return self._dict(x, path)
        if isinstance(x, list):
            return self.sequence(x, path)
        if isinstance(x, tuple):
            return tuple(self.sequence(list(x), path))
        if isinstance(x, (set, frozenset)):
            if isinstance(x, frozenset):
                self.notes.converted[path] = "frozenset"
            return self._set(x, path)
        if isinstance(x, slice):
            self.notes.converted[path] = "slice"
            return tuple(self.sequence([x.start, x.stop, x.step], path))
        if isinstance(x, Opaque):
            return self._record(x, path)
        return self.drop(path, _why(x))

    def _dict(self, x: dict, path: str) -> Any:
        if isinstance(x, _Dict):  # the reader's OrderedDict: a real one, with state_dict()'s _metadata
            out: Any = collections.OrderedDict()
            self.memo[id(x)] = out
            out.update(self.mapping(x, path))
            meta = (x.pickled_state or {}).get("_metadata")
            if meta is not None:
                out._metadata = self.value(meta, label(path, "_metadata"))
            return out
        kind = collections.Counter if isinstance(x, collections.Counter) else dict
        out = kind()
        self.memo[id(x)] = out
        out.update(self.mapping(x, path))
        return out

    def mapping(self, x: dict, path: str) -> dict:
        out = {}
        for k, v in x.items():
            where = label(path, k)
            key = self.value(k, where + " (key)") if not isinstance(k, (str, int)) else k
            if key is DROP:
                continue
            try:
                hash(key)
            except TypeError:
                self.drop(where, f"its key {type(key).__name__} is not hashable once converted")
                continue
            v = self.value(v, where)
            if v is not DROP:
                out[key] = v
        return out

    def sequence(self, x: list, path: str) -> list:
        out: list = []
        self.memo[id(x)] = out
        for i, v in enumerate(x):
            v = self.value(v, f"{path}[{i}]")
            if v is not DROP:
                out.append(v)
        return out

    def _set(self, x: Any, path: str) -> set:
        out = set()
        for i, v in enumerate(sorted(x, key=repr)):
            v = self.value(v, f"{path}{{{i}}}")
            if v is not DROP:
                out.add(v)
        return out

    def _record(self, rec: Opaque, path: str) -> Any:
        rule = RULES.get(rec.qualname)
        if rule is None:
            return self.drop(path, _why(rec))
        try:
            out = rule(self, rec, path)
        except Unsupported as e:
            return self.drop(path, str(e))
        except (ValueError, TypeError, OverflowError, struct.error) as e:  # a record no writer of the type makes
            return self.drop(path, f"{rec.qualname} record is malformed ({type(e).__name__}: {str(e)[:80]})")
        original = rec.qualname
        if original in _DESCRIBED:
            out, original = out
        self.notes.converted[path] = original
        return out

    def drop(self, path: str, why: str) -> Any:
        self.notes.dropped[path or "(the whole object)"] = why
        self.last_why = why
        return DROP


def _why(x: Any) -> str:
    if isinstance(x, type) and issubclass(x, Opaque):
        return f"a reference to {x.qualname} (a class or function; surgery never imports it)"
    if isinstance(x, Opaque):
        return f"an instance of {x.qualname}, which has no weights-only form (its class is never imported)"
    if isinstance(x, StorageRef):
        return "a bare storage (not a tensor)"
    what = getattr(x, "qualname", None) or type(x).__name__
    return f"a {what} record, which has no weights-only form"


def convert(obj: Any) -> tuple[Any, Notes]:
    """``obj`` (what the restricted reader returned) as weights-only data, and the notes."""
    w = Walker()
    out = w.value(obj, "")
    return (None if out is DROP else out), w.notes
