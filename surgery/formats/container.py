"""Find the tensor dict inside a nested checkpoint object, and summarise everything else.

Training scripts wrap the weights: Lightning under ``state_dict``, timm beside ``state_dict_ema``,
others under ``model``/``net``/``module``. The rule: a *tensor dict* is a dict with string keys
whose values are mostly tensors; the chosen one is the top level if it is one, else the one with
the most familiar name (EMA copies only when asked), else the largest.
"""

from __future__ import annotations

import reprlib
from dataclasses import dataclass
from typing import Any, Callable

from ..errors import SelectError
from .torch_pickle import Opaque, TensorRef

# Most preferred first. EMA copies come after every plain name: they are picked only by --select
# or when nothing else holds tensors.
PREFERRED = ("state_dict", "model_state_dict", "model", "module", "net", "network", "weights", "params",
             "model_state", "student", "teacher")
EMA_NAMES = ("state_dict_ema", "model_ema", "ema", "ema_state_dict", "ema_model", "params_ema", "model_ema_state_dict")
_MAX_NODES = 1_000_000


@dataclass
class Found:
    path: str
    tensors: dict[str, TensorRef]
    others: dict[str, Any]


def _is_tensor_dict(d: dict) -> bool:
    if not d or not all(isinstance(k, str) for k in d):
        return False
    n = sum(isinstance(v, TensorRef) for v in d.values())
    return n > 0 and n * 2 >= len(d)


def module_state(obj: Any) -> dict[str, TensorRef] | None:
    """The state dict of a pickled ``nn.Module`` (read as an inert record), or None.

    A module pickles its ``__dict__``: ``_parameters`` and ``_buffers`` (name -> tensor) and
    ``_modules`` (name -> child). Walking those gives what ``model.state_dict()`` would, without
    building a single module.
    """
    if not (isinstance(obj, Opaque) and isinstance(obj.state, dict) and "_modules" in obj.state):
        return None
    out: dict[str, TensorRef] = {}
    stack: list[tuple[str, Any]] = [("", obj)]
    seen: set[int] = set()
    while stack and len(seen) < _MAX_NODES:
        prefix, mod = stack.pop()
        if id(mod) in seen or not isinstance(mod, Opaque) or not isinstance(mod.state, dict):
            continue
        seen.add(id(mod))
        st = mod.state
        skip = st.get("_non_persistent_buffers_set") or set()
        for section in ("_parameters", "_buffers"):
            for k, v in (st.get(section) or {}).items():
                if isinstance(v, TensorRef) and not (section == "_buffers" and k in skip):
                    out[prefix + str(k)] = v
        children = list((st.get("_modules") or {}).items())
        stack.extend((f"{prefix}{k}.", c) for k, c in reversed(children))
    return out


def find_containers(obj: Any) -> list[Found]:
    """Every tensor dict reachable through dicts and lists, breadth first (shallow ones first)."""
    out: list[Found] = []
    seen: set[int] = set()
    queue: list[tuple[str, Any]] = [("", obj)]
    visited = 0
    while queue and visited < _MAX_NODES:
        path, node = queue.pop(0)
        visited += 1
        if id(node) in seen:
            continue
        seen.add(id(node))
        pickled_module = module_state(node)
        if pickled_module:
            out.append(Found(path, pickled_module, {}))
            continue
        if isinstance(node, dict):
            if _is_tensor_dict(node):
                tensors = {k: v for k, v in node.items() if isinstance(v, TensorRef)}
                others = {k: v for k, v in node.items() if not isinstance(v, TensorRef)}
                out.append(Found(path, tensors, others))
                continue
            for k, v in node.items():
                if isinstance(v, (dict, list, tuple)):
                    queue.append((f"{path}.{label(k)}" if path else label(k), v))
        elif isinstance(node, (list, tuple)):
            for i, v in enumerate(node):
                if isinstance(v, (dict, list, tuple)):
                    queue.append((f"{path}.{i}" if path else str(i), v))
    return out


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
    numbered = any(p.isdigit() for p in parts)
    return (4 if numbered else 2, len(parts), 0, -len(found.tensors))


def choose(obj: Any, source: str, select: str | None) -> tuple[Found, list[Found]]:
    """The container to use and all candidates; ``select`` is a dotted path chosen by the user."""
    found = find_containers(obj)
    listed = [f for f in found if not any(p.isdigit() for p in f.path.split("."))] or found
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
    return type(obj).__name__


def summarize(value: Any, count_tensors: Callable[[Any], int] | None = None) -> str:
    """One short line for a non-tensor entry: '12', 'dict (3 entries, 40 tensors)', ..."""
    if isinstance(value, TensorRef):
        return f"tensor {value.dtype} {list(value.shape)}"
    if isinstance(value, Opaque):
        return f"{value.qualname} (opaque)"
    if isinstance(value, (bool, int, float)) or value is None:
        return repr(value)
    if isinstance(value, (str, bytes)):
        r = repr(value[:60])  # never the repr of a whole (maybe huge) string
        return r if len(r) <= 60 and len(value) <= 60 else r[:57] + "..."
    n = _count_tensors(value)
    extra = f", {n} tensors" if n else ""
    if isinstance(value, dict):
        return f"dict ({len(value)} entries{extra})"
    if isinstance(value, (list, tuple)):
        return f"{type(value).__name__} ({len(value)} items{extra})"
    return type(value).__name__


def _count_tensors(value: Any) -> int:
    n, stack, seen = 0, [value], set()
    while stack and len(seen) < _MAX_NODES:
        v = stack.pop()
        if id(v) in seen:
            continue
        seen.add(id(v))
        if isinstance(v, TensorRef):
            n += 1
        elif isinstance(v, dict):
            stack.extend(v.values())
        elif isinstance(v, (list, tuple)):
            stack.extend(v)
    return n


def extras(obj: Any, chosen: Found) -> dict[str, str]:
    """Summaries of every entry that is not the chosen container, along the path to it."""
    out: dict[str, str] = {}
    parts = chosen.path.split(".") if chosen.path else []
    node, prefix = obj, ""
    for part in parts:
        if isinstance(node, dict):
            for k, v in node.items():
                if label(k) != part:
                    out[f"{prefix}{label(k)}"] = summarize(v)
            node = node.get(part, node.get(int(part)) if part.isdigit() else None)
        elif isinstance(node, (list, tuple)):
            for i, v in enumerate(node):
                if str(i) != part:
                    out[f"{prefix}{i}"] = summarize(v)
            node = node[int(part)]
        prefix += part + "."
    for k, v in chosen.others.items():
        out[f"{prefix}{label(k)}"] = summarize(v)
    return out


def label(key: Any) -> str:
    """A dict key as text, bounded: a pickle's keys may be megabyte strings or huge tuples."""
    if isinstance(key, str):
        return key if len(key) <= 200 else key[:197] + "..."
    return reprlib.repr(key)
