"""SRC as the restricted reader gives it, every global an inert record; refused where the pickle
calls a global that no rule reads (a value only code would build, an ``os.system`` payload)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import CodeNeededError, FormatError
from ..formats.torch_pickle import _accepted
from ..formats.torch_records import Opaque, StorageRef, _device, _Dict
from .base import Device
from .convert import PARTS, RULES

EVERY_GLOBAL = frozenset({"*"})  # inert records: nothing a file names is imported or called
READABLE = ("torch-zip", "torch-legacy", "torch-per-rank")


def _device_record(*args: Any) -> Device:
    return Device(_device(*args))  # torch.device's own grammar, checked by the shared stand-in


RECORDS = {("torch", "device"): _device_record}


@dataclass
class Source:
    obj: Any
    storages: dict[str, StorageRef]
    offsets: dict[str, tuple[int, int]]
    path: Path
    format: str


def read_source(src: Path, allow: tuple[str, ...]) -> Source:
    """The unpickled object of a torch.save file (zip or legacy) and where its storages are."""
    from ..formats import sniff

    fmt, real = sniff(src)
    if fmt not in READABLE or real != Path(src):
        raise FormatError(f"{src}: is {fmt}, not a torch.save file; sanitize rewrites pickled checkpoints "
                          f"(.pt/.pth/.bin/.ckpt), which are what torch.load(weights_only=True) can refuse")
    if fmt == "torch-legacy":
        from ..formats.torch_legacy import read_legacy

        up, offsets = read_legacy(real, EVERY_GLOBAL, RECORDS)
    else:
        from ..formats.torch_zip import read_zip

        up, offsets = read_zip(real, EVERY_GLOBAL, extra=RECORDS)
        if getattr(up, "torchscript", False):
            raise FormatError(f"{src}: a TorchScript archive; load it with torch.jit.load, which runs no pickled "
                              f"globals, or read its weights with surgery remap")
        fmt = "torch-zip"
    called = sorted(q for q in called_globals(up.obj) if not _accepted(q, set(allow)))
    if called:
        raise CodeNeededError(str(src), called)
    return Source(up.obj, up.storages, offsets, real, fmt)


def called_globals(obj: Any) -> set[str]:
    """The globals no rule reads that the pickle calls (REDUCE: ``cls(*args)``), anywhere in it,
    converted or not: an instance made by ``__new__`` and filled with state is data, a call is code."""
    known = set(RULES) | set(PARTS)
    out: set[str] = set()
    stack, seen = [obj], set()
    while stack:
        node = stack.pop()
        if id(node) in seen or node is None or isinstance(node, (str, bytes, int, float)):
            continue
        seen.add(id(node))
        if isinstance(node, dict):
            stack.extend(node.keys())
            stack.extend(node.values())
            if isinstance(node, _Dict):
                stack.append(node.pickled_state)
        elif isinstance(node, (list, tuple, set, frozenset)):
            stack.extend(node)
        elif isinstance(node, Opaque):
            if ("args" in node.__dict__ or "kwargs" in node.__dict__) and node.qualname not in known:
                out.add(node.qualname)
            stack.extend((*node.args, *node.kwargs.values(), node.state, node.__dict__.get("_items", ())))
    return out
