"""Find the tensor dict inside a nested checkpoint object, and summarise everything else.

Training scripts wrap the weights: Lightning under ``state_dict``, timm beside ``state_dict_ema``,
others under ``model``/``net``/``module``. The rule: a *tensor dict* is a dict with string keys
whose values are mostly tensors; the chosen one is the top level if it is one, else the one with
the most familiar name (EMA copies only when asked), else the largest.
"""

from __future__ import annotations

import collections
import functools
import reprlib
from dataclasses import dataclass, field
from typing import Any, Callable

from ..errors import FormatError, SelectError
from .torch_records import DType, Layout, LegacyTensorType, Opaque, QScheme, StorageRef, StorageType, TensorRef

# Most preferred first. EMA copies come after every plain name: they are picked only by --select
# or when nothing else holds tensors.
PREFERRED = ("state_dict", "model_state_dict", "model", "module", "net", "network", "weights", "params",
             "model_state", "student", "teacher")
EMA_NAMES = ("state_dict_ema", "model_ema", "ema", "ema_state_dict", "ema_model", "params_ema", "model_ema_state_dict")
# Steps (entries looked at, name characters built) that one read's searches of the unpickled
# object may take together: a base, and more for each byte of the pickle. Every search is linear
# in the object graph, which the pickle scan and the reader's stand-ins keep linear in the pickle
# (an entry costs it at least one opcode byte, and every search visits an object once), so a real
# checkpoint's metadata, however large, stays within it; the budget is the backstop for a crafted
# file whose walk grows faster than its bytes (long names built at every level of a deep tree).
WALK_BUDGET = 32_000_000
WALK_PER_BYTE = 4


class Walk:
    """The steps left to one read's searches (containers, pickled modules, summaries)."""

    def __init__(self, source: str, pickle_bytes: int = 0):
        self.source = source
        self.budget = self.left = WALK_BUDGET + WALK_PER_BYTE * pickle_bytes

    def spend(self, n: int) -> None:
        self.left -= n
        if self.left < 0:
            raise FormatError(f"{self.source}: searching the checkpoint's objects takes more than {self.budget:,} steps "
                              f"(surgery's walk budget); no checkpoint's metadata is that large, so the file is crafted")


BARE_TENSOR_NAME = "tensor"  # the one name of a file that is a single tensor (torch.save(t))


@dataclass
class Found:
    path: str
    tensors: dict[str, TensorRef]
    others: dict[str, Any]
    keys: tuple = ()  # the keys (list indices) leading to it, as the pickle has them
    module: bool = False  # read from a pickled nn.Module rather than a dict
    walk: Walk | None = field(default=None, repr=False, compare=False)  # the budget `extras` goes on with


def as_tensor(v: Any) -> TensorRef | None:
    """The tensor record ``v`` is, or None. A bare storage (torch.save({'s': t.untyped_storage()}))
    reads as the 1-D tensor of its elements."""
    if isinstance(v, TensorRef):
        return v if (v.kind != "dense" or isinstance(v.storage, StorageRef)) else None
    if isinstance(v, StorageRef):
        return TensorRef(v, 0, (v.numel,), (1,), v.dtype)
    return None


def _tensor_entries(d: dict | list | tuple, share: float = 0.5) -> tuple[dict[str, TensorRef], dict[str, Any]] | None:
    """A tensor dict or list: string keys (list indices), values mostly (``share``) tensors; else None."""
    if isinstance(d, dict):  # a state dict as torch.save writes it, every value a tensor record: one pass
        tensors = {k: v for k, v in d.items() if type(v) is TensorRef and type(k) is str
                   and (v.kind != "dense" or type(v.storage) is StorageRef)}
        if tensors and len(tensors) == len(d):
            return tensors, {}
    # most large containers in a checkpoint hold no tensor at all: ruled out before any item is built
    refs = sum(1 for v in (d.values() if isinstance(d, dict) else d) if isinstance(v, (TensorRef, StorageRef)))
    if not refs or refs < share * len(d):
        return None
    items = list(d.items()) if isinstance(d, dict) else [(str(i), v) for i, v in enumerate(d)]
    if not all(isinstance(k, str) for k, _ in items):
        return None
    tensors = {k: t for k, v in items if (t := as_tensor(v)) is not None}
    if not tensors or len(tensors) < share * len(items):
        return None
    return tensors, {k: v for k, v in items if k not in tensors}


def _children(obj: Any, key: str) -> dict | None:
    """``obj[key]`` when both are dicts, else None (a record may hold anything under any name)."""
    v = obj.get(key) if isinstance(obj, dict) else None
    return v if isinstance(v, dict) else None


def module_state(obj: Any, walk: Walk | None = None, visited: set[int] | None = None) -> dict[str, TensorRef] | None:
    """The state dict of a pickled ``nn.Module`` (read as an inert record), or None.

    A module pickles its ``__dict__``: ``_parameters`` and ``_buffers`` (name -> tensor) and
    ``_modules`` (name -> child). Walking those gives what ``model.state_dict()`` would, without
    building a single module. ``visited`` collects the ids of the modules walked.
    """
    if not (isinstance(obj, Opaque) and isinstance(obj.state, dict) and "_modules" in obj.state):
        return None
    walk = walk or Walk("checkpoint")
    out: dict[str, TensorRef] = {}
    stack: list[tuple[str, Any]] = [("", obj)]
    seen: set[int] = set() if visited is None else visited
    while stack:
        prefix, mod = stack.pop()
        walk.spend(1 + len(prefix))  # a name is built for each entry below: its prefix counts
        if id(mod) in seen or not isinstance(mod, Opaque) or not isinstance(mod.state, dict):
            continue
        seen.add(id(mod))
        st = mod.state
        skip = st.get("_non_persistent_buffers_set")
        skip = skip if isinstance(skip, (set, frozenset, list, tuple, dict)) else ()
        for section in ("_parameters", "_buffers"):
            entries = _children(st, section) or {}
            walk.spend(len(entries))
            for k, v in entries.items():
                t = as_tensor(v)
                if t is not None and not (section == "_buffers" and _member(k, skip)):
                    out[prefix + str(k)] = t
        children = list((_children(st, "_modules") or {}).items())
        walk.spend(len(children))
        stack.extend((f"{prefix}{k}.", c) for k, c in reversed(children))
    return out


def _member(k: Any, group: Any) -> bool:
    try:
        return k in group
    except TypeError:  # an unhashable name
        return False


def _record_dict(node: Opaque) -> dict | None:
    """What an accepted record holds like a dict: its pickled __dict__, or the items a dict
    subclass (an addict.Dict, an omegaconf container) was filled with."""
    if isinstance(node.state, dict):
        return node.state
    items = node.__dict__.get("_items")
    if items and all(isinstance(i, tuple) and len(i) == 2 for i in items):
        try:
            return dict(items)
        except TypeError:  # an unhashable key
            return None
    return None


def find_containers(obj: Any, share: float = 0.5, walk: Walk | None = None) -> list[Found]:
    """Every tensor dict reachable through dicts, lists and records, breadth first (shallow ones
    first). A file that is one tensor is a tensor dict of one, named `BARE_TENSOR_NAME`.
    ``share``: the least fraction of a dict's values that must be tensors."""
    bare = as_tensor(obj)
    if bare is not None:
        return [Found("", {BARE_TENSOR_NAME: bare}, {})]
    walk = walk or Walk("checkpoint")
    out: list[Found] = []
    seen: set[int] = set()
    tensorless: set[int] = set()  # pickled modules whose whole tree holds no tensor: walked once
    # (node, trail): a trail is (key, parent's trail), so queuing a child costs the same at any depth
    queue: collections.deque[tuple[Any, tuple | None]] = collections.deque([(obj, None)])
    while queue:
        node, trail = queue.popleft()
        walk.spend(1)
        if id(node) in seen:
            continue
        seen.add(id(node))
        if id(node) not in tensorless:
            walked: set[int] = set()
            pickled_module = module_state(node, walk, walked)
            if pickled_module:
                out.append(_found(trail, walk, pickled_module, {}, module=True))
                continue
            tensorless |= walked
        if isinstance(node, Opaque):
            node = _record_dict(node)
        if isinstance(node, (dict, list, tuple)):
            walk.spend(len(node))
            entries = _tensor_entries(node, share)
            if entries is not None:
                out.append(_found(trail, walk, *entries))
                continue
            items = node.items() if isinstance(node, dict) else enumerate(node)
            queue.extend([(v, (k, trail)) for k, v in items if isinstance(v, _NESTED)])
    return out


def _found(trail: tuple | None, walk: Walk, tensors: dict, others: dict, module: bool = False) -> Found:
    keys: list = []
    while trail is not None:
        key, trail = trail
        keys.append(key)
    keys.reverse()
    path = ".".join(map(label, keys))
    walk.spend(len(path))
    return Found(path, tensors, others, tuple(keys), module=module)


def _numbered(part: str) -> bool:
    return part.isdecimal()


def _rank(found: Found) -> tuple:
    parts = found.path.split(".") if found.path else []
    last = parts[-1] if parts else ""
    if not parts:
        return (0, 0, 0, 0)
    if last in PREFERRED:
        return (1, len(parts), PREFERRED.index(last), 0)
    if last in EMA_NAMES or "ema" in last.lower():
        return (3, len(parts), 0, -len(found.tensors))
    # a numbered path is almost always optimizer state; rank it last
    numbered = any(_numbered(p) for p in parts)
    return (4 if numbered else 2, len(parts), 0, -len(found.tensors))


def choose(obj: Any, source: str, select: str | None, pickle_bytes: int = 0) -> tuple[Found, list[Found]]:
    """The container to use and all candidates; ``select`` is a dotted path chosen by the user;
    ``pickle_bytes``, the size of the pickle ``obj`` came from, sets the walk's budget."""
    # a dict mostly of tensors; failing that, any dict with a tensor (a config beside one tensor)
    walk = Walk(source, pickle_bytes)
    found = find_containers(obj, walk=walk) or find_containers(obj, share=0, walk=walk)
    for f in found:
        f.walk = walk
    listed = [f for f in found if not any(_numbered(p) for p in f.path.split("."))] or found
    if select is not None:
        sel = select.strip(".")
        for f in found:
            if f.path == sel:
                return f, listed
        names = ", ".join(f.path or "(top level)" for f in listed) or "none"
        raise SelectError(f"{source}: --select {select!r} names no tensor dict; the checkpoint has: {names}")
    if not found:
        raise SelectError(f"{source}: the checkpoint holds no tensors (entries: {describe_keys(obj)})")
    return min(found, key=_rank), listed


def describe_keys(obj: Any) -> str:
    if isinstance(obj, dict):
        return ", ".join(label(k) for k in list(obj)[:12]) + (" ..." if len(obj) > 12 else "")
    if isinstance(obj, (list, tuple)):
        return f"a {type(obj).__name__} of {len(obj)} items, none of them tensors"
    if isinstance(obj, Opaque):
        return f"a {obj.qualname} record"
    return f"only the value {summarize(obj)}"


def file_shape(obj: Any, chosen: Found, listed: list[Found]) -> dict[str, str]:
    """What the file is, for `Checkpoint.file_kind` / `Checkpoint.description`."""
    if not chosen.path and len(chosen.keys) == 0 and as_tensor(obj) is not None:
        return {"file_kind": "tensor", "description": f"a single tensor (read as {BARE_TENSOR_NAME!r})"}
    if isinstance(obj, (list, tuple)) and not chosen.keys:
        return {"file_kind": "tensor_list", "description": f"{type(obj).__name__} of {len(chosen.tensors)} tensors"}
    state = obj.get("state") if isinstance(obj, dict) else None
    if isinstance(state, dict) and "param_groups" in obj and chosen.keys[:1] == ("state",):
        return {"file_kind": "optimizer",
                "description": f"optimizer state (param_groups + state for {len(state)} params)"}
    if isinstance(obj, (list, tuple)) and len(chosen.keys) == 1:
        n = sum(1 for f in listed if len(f.keys) == 1)
        return {"file_kind": "state_dict_list", "description": f"{type(obj).__name__} of {n} state dicts"}
    if chosen.module:
        return {"file_kind": "model", "description": "a whole pickled model (torch.save(model))"}
    return {"file_kind": "state_dict", "description": "state dict"}


def summarize(value: Any, count_tensors: Callable[[Any], int] | None = None) -> str:
    """One short line for a non-tensor entry: '12', 'dict (3 entries, 40 tensors)', ..."""
    if isinstance(value, (TensorRef, StorageRef)):
        t = as_tensor(value)
        if t is None:
            return "tensor (unreadable)"
        return f"tensor {t.dtype} {list(t.shape)}" + (f" ({t.kind})" if t.kind != "dense" else "")
    if isinstance(value, Opaque):
        return f"{value.qualname} (opaque)"
    if isinstance(value, (bool, int, float)) or value is None:
        return repr(value)
    if isinstance(value, (str, bytes)):
        r = repr(value[:60])  # never the repr of a whole (maybe huge) string
        return r if len(r) <= 60 and len(value) <= 60 else r[:57] + "..."
    n = (count_tensors or _count_tensors)(value)
    extra = f", {n} tensors" if n else ""
    if isinstance(value, dict):
        return f"dict ({len(value)} entries{extra})"
    if isinstance(value, (list, tuple)):
        return f"{type(value).__name__} ({len(value)} items{extra})"
    return _plain_type(value)


def _plain_type(value: Any) -> str:
    """A value as a user knows it: the stand-ins for torch's dtypes, layouts, qschemes, storage
    and tensor types are named as torch names them."""
    if isinstance(value, DType):
        return f"dtype {value.dtype}"
    if isinstance(value, StorageType):
        return f"storage type {value.dtype}"
    if isinstance(value, Layout):
        return value.name
    if isinstance(value, QScheme):
        return f"torch.{value.name}"
    if isinstance(value, LegacyTensorType):
        return value.qualname
    return type(value).__name__


_NESTED = (dict, list, tuple, Opaque)
_LEAVES = frozenset((bool, int, float, str, bytes))


def _count_tensors(value: Any, seen: set[int] | None = None, walk: Walk | None = None) -> int:
    """Tensors reachable from ``value`` and not in ``seen`` (ids already counted)."""
    n, stack = 0, [value]
    seen = set() if seen is None else seen
    walk = walk or Walk("checkpoint")
    while stack:
        v = stack.pop()
        if v is None or type(v) in _LEAVES or id(v) in seen:
            continue
        seen.add(id(v))
        if as_tensor(v) is not None:
            n += 1
        elif isinstance(v, dict):
            walk.spend(len(v))
            stack.extend(v.values())
        elif isinstance(v, (list, tuple)):
            walk.spend(len(v))
            stack.extend(v)
    return n


def extras(obj: Any, chosen: Found) -> dict[str, str]:
    """Summaries of every entry that is not the chosen container, along the path to it. A tensor
    that two entries reach is counted under the first (one walk for all: entries that share a
    large object cost it once)."""
    out: dict[str, str] = {}
    walk = chosen.walk or Walk("checkpoint")
    count = functools.partial(_count_tensors, seen=set(), walk=walk)
    node, prefix = obj, ""
    for key in chosen.keys:
        if isinstance(node, Opaque):
            node = _record_dict(node)
        if isinstance(node, dict):
            walk.spend(len(node))
            for k, v in node.items():
                if k != key:
                    out[f"{prefix}{label(k)}"] = summarize(v, count)
            node = node.get(key)
        elif isinstance(node, (list, tuple)) and isinstance(key, int) and 0 <= key < len(node):
            walk.spend(len(node))
            for i, v in enumerate(node):
                if i != key:
                    out[f"{prefix}{i}"] = summarize(v, count)
            node = node[key]
        prefix += f"{label(key)}."
    for k, v in chosen.others.items():
        out[f"{prefix}{label(k)}"] = summarize(v, count)
    return out


def label(key: Any) -> str:
    """A dict key as text, bounded: a pickle's keys may be megabyte strings or huge tuples."""
    if isinstance(key, str):
        return key if len(key) <= 200 else key[:197] + "..."
    return reprlib.repr(key)
