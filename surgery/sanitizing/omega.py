"""omegaconf's ``DictConfig`` and ``ListConfig`` as the plain dicts and lists they hold, read from
their pickled node structure (never from omegaconf, which is not imported or needed).

A config pickles its ``__dict__``: ``_content`` holds a dict (or list) of child nodes, or None, or
a string (``???`` for a missing value, ``${...}`` for an interpolation of the whole node); each
value node (``AnyNode``, ``IntegerNode``, ...) keeps its value in ``_val``. Values are taken as
stored: an interpolation stays its ``${...}`` text, since resolving it would be omegaconf's logic.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..formats.torch_records import Opaque
from .base import DROP, Unsupported, label

if TYPE_CHECKING:  # pragma: no cover
    from .convert import Walker

_BASE = "omegaconf"
DICT = (f"{_BASE}.dictconfig.DictConfig",)
LIST = (f"{_BASE}.listconfig.ListConfig",)
CONTAINERS = DICT + LIST
NODES = tuple(f"{_BASE}.nodes.{n}" for n in ("AnyNode", "StringNode", "IntegerNode", "FloatNode", "BooleanNode",
                                             "BytesNode", "PathNode", "EnumNode", "InterpolationResultNode",
                                             "UnionNode"))
# read as parts of a config: its nodes and their metadata records, and the types metadata names
PARTS = (*NODES, f"{_BASE}.base.ContainerMetadata", f"{_BASE}.base.Metadata", "typing.Any")


def container(w: "Walker", rec: Opaque, path: str) -> Any:
    """A DictConfig or ListConfig record as a dict or list."""
    return _node(w, rec, path)


def _node(w: "Walker", node: Any, path: str) -> Any:
    if not isinstance(node, Opaque):
        return w.value(node, path)  # a plain value inside a config (omegaconf wraps them all, but a file may not)
    state = node.state if isinstance(node.state, dict) else None
    if state is None:
        raise Unsupported(f"{node.qualname} record has no pickled state")
    if node.qualname in NODES:
        return w.value(state.get("_val"), path)
    if node.qualname not in CONTAINERS:
        return w.value(node, path)  # another record: the walker converts or drops it, with its note
    content = state.get("_content")
    if content is None or isinstance(content, str):
        return content  # None, "???" (missing) or an interpolation of the whole node
    if node.qualname in DICT and isinstance(content, dict):
        return _items(w, content, path)
    if node.qualname in LIST and isinstance(content, list):
        return [v for i, c in enumerate(content) if (v := _node(w, c, f"{path}[{i}]")) is not DROP]
    raise Unsupported(f"{node.qualname} record holds {type(content).__name__}, not its nodes")


def _items(w: "Walker", content: dict, path: str) -> dict:
    out = {}
    for k, child in content.items():
        key = k if isinstance(k, (str, int, float, bool)) or k is None else w.value(k, label(path, k) + " (key)")
        v = _node(w, child, label(path, k))
        if v is not DROP and key is not DROP:
            out[key] = v
    return out
