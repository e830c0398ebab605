"""The two sides of a match: a checkpoint (file, folder or state dict) whose tensors can be read,
or an architecture built on the meta device, which has names, shapes and dtypes only."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

from ..adapter.arch import build, resolve_arch, torchvision_models
from ..checkpoint import canonical_from_torch
from ..errors import ArchError, InputError
from ..formats import open_checkpoint

if TYPE_CHECKING:  # pragma: no cover
    import torch


@dataclass
class Side:
    """Names in their order, with shape and dtype; ``get`` reads a tensor (None: no values)."""

    label: str  # the path, the architecture, or "state dict"
    kind: str  # checkpoint | architecture
    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, str]
    get: Callable[[str], "torch.Tensor"] | None = None
    readable: frozenset[str] = frozenset()  # the names whose values can be compared
    ordered: bool = True  # the keys come in the order the model built its modules


# formats that keep a state dict's own order: a pickled dict keeps its insertion order, while
# safetensors headers list names sorted and sharded or distributed layouts group them by file
ORDERED_FORMATS = frozenset({"torch-zip", "torch-legacy", "torch-tar"})


def open_side(x: Any, role: str, select: str | None = None, allow_globals: tuple[str, ...] = (),
              arch_allowed: bool = False) -> Side:
    """``x``: a state dict, a checkpoint path, or (``arch_allowed``) an architecture name as
    ``surgery adapt --arch`` takes it, built on the meta device."""
    if isinstance(x, Mapping):
        return _from_state_dict(x)
    if not isinstance(x, (str, os.PathLike)):
        raise InputError(f"{role}: expected a checkpoint path or a state dict, not {type(x).__name__}")
    if Path(x).exists() or not arch_allowed or not _looks_like_arch(str(x)):
        return _from_path(x, select, allow_globals, arch_allowed)
    return _from_arch(str(x))


def _looks_like_arch(text: str) -> bool:
    return text.startswith("timm:") or ":" in text or text in torchvision_models()


def _from_path(x: Any, select: str | None, allow_globals: tuple[str, ...], arch_allowed: bool) -> Side:
    try:
        c = open_checkpoint(x, select=select, allow_globals=allow_globals)
    except InputError as e:
        if not arch_allowed or Path(x).exists() or Path(x).suffix:  # a file name: the file is what is missing
            raise
        raise InputError(f"{e}, and {_arch_refusal(str(x))}") from None
    readable = frozenset(k for k, t in c.tensors.items() if t.kind == "dense")
    return Side(str(x), "checkpoint", {k: tuple(t.shape) for k, t in c.tensors.items()},
                {k: t.dtype for k, t in c.tensors.items()}, c.tensor, readable, c.format in ORDERED_FORMATS)


def _arch_refusal(name: str) -> str:
    """Why ``name`` is no architecture either, as adapt's --arch would say it."""
    try:
        resolve_arch(name)
    except ArchError as e:
        return str(e)
    return f"{name!r} names no architecture"


def _from_state_dict(sd: Mapping[str, Any]) -> Side:
    import torch  # a state dict of tensors: torch is loaded already

    tensors = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}
    readable = frozenset(k for k, v in tensors.items()
                         if not v.is_meta and v.layout == torch.strided and not v.is_quantized)
    return Side("state dict", "checkpoint", {k: tuple(v.shape) for k, v in tensors.items()},
                {k: _dtype(v) for k, v in tensors.items()}, tensors.__getitem__, readable)


def _from_arch(name: str) -> Side:
    spec = resolve_arch(name)
    sd = build(spec, meta=True).state_dict()
    return Side(spec.display, "architecture", {k: tuple(v.shape) for k, v in sd.items()},
                {k: _dtype(v) for k, v in sd.items()})


def _dtype(t: Any) -> str:
    name = str(t.dtype)
    return canonical_from_torch(name) or name.removeprefix("torch.")

