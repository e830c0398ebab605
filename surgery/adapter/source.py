"""The checkpoint adapt loads from, in one of three kinds: torchvision's published weights
(``--weights NAME``), a state dict already in memory, or a file or folder any reader opens (a
local path, or ORG/NAME in the Hugging Face cache). Each becomes a :class:`Source`: tensor shapes
by name, after the remap rules, and a getter that reads one tensor's bytes only when asked."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping

from ..errors import AdaptError
from ..formats import open_checkpoint
from ..hub import resolve
from ..io import sha256_file
from ..remapping import Rules, plan_names
from .arch import ArchSpec, torchvision_weights

if TYPE_CHECKING:  # pragma: no cover
    import torch

Shapes = dict[str, tuple[int, ...]]
Getter = Callable[[str], "torch.Tensor"]


@dataclass
class Source:
    shapes: Shapes  # after rules, before wrapper stripping
    get: Getter  # by name after rules
    info: dict  # the manifest's ``source`` section, before the alignment is added


def open_source(ckpt: Any, weights: str | None, spec: ArchSpec, rules: Any, select: str | None,
                allow_globals: Iterable[str]) -> Source:
    """The tensors to load: from ``weights`` (torchvision's), a state dict or a checkpoint path."""
    rules = Rules.coerce(rules)
    if select is not None:
        rules.select = select
    info: dict[str, Any] = {"path": None, "sha256": None, "format": None, "container": None, "weights": None,
                            "rules": rules.to_json()}
    if weights is not None:
        shapes, get = _from_weights(ckpt, weights, spec, info)
    elif isinstance(ckpt, Mapping):
        shapes, get = _from_state_dict(ckpt, info)
    elif ckpt is None:
        raise AdaptError("nothing to load: give a checkpoint path or --weights NAME")
    else:
        shapes, get = _from_path(ckpt, rules, tuple(allow_globals), info)
    return _after_rules(shapes, get, rules, info)


def _tensor_shapes(sd: Mapping[str, Any]) -> Shapes:
    return {k: tuple(v.shape) for k, v in sd.items() if hasattr(v, "shape")}


def _from_weights(ckpt: Any, weights: str, spec: ArchSpec, info: dict) -> tuple[Shapes, Getter]:
    if ckpt is not None:
        raise AdaptError("give either a checkpoint or --weights, not both")
    if spec.kind != "torchvision":
        raise AdaptError(f"--weights names torchvision weights; {spec.display} is not a torchvision model")
    import torch

    w = torchvision_weights(spec.name, weights)
    cache = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(w.url)
    try:
        sd = w.get_state_dict(progress=False, weights_only=True)
    except Exception as e:  # noqa: BLE001 - network or cache problems are the user's to fix
        raise AdaptError(f"--weights {weights}: cannot get {w.url} ({type(e).__name__}: {e}); "
                         f"without internet, place the file at {cache}") from None
    info.update(path=str(cache), format="torchvision-weights", weights=f"{type(w).__name__}.{w.name}",
                url=w.url, sha256=sha256_file(cache) if cache.is_file() else None)
    return _tensor_shapes(sd), sd.__getitem__


def _from_state_dict(ckpt: Mapping[str, Any], info: dict) -> tuple[Shapes, Getter]:
    sd = dict(ckpt)
    info.update(format="state_dict")
    return _tensor_shapes(sd), sd.__getitem__


def _from_path(ckpt: Any, rules: Rules, allow_globals: tuple[str, ...], info: dict) -> tuple[Shapes, Getter]:
    path = resolve(ckpt)  # a local path, or ORG/NAME in the Hugging Face cache
    c = open_checkpoint(path, select=rules.select, allow_globals=allow_globals)
    info.update(path=str(path.resolve()), sha256=_digest(path, c.files), format=c.format, container=c.container)
    return {k: tuple(t.shape) for k, t in c.tensors.items()}, c.tensor


def _digest(path: Path, files: Iterable[str]) -> str:
    """A file's sha256; for a folder (sharded, DCP), the sha256 of its files' digests in name order."""
    if path.is_file():
        return sha256_file(path)
    h = hashlib.sha256()
    for f in sorted(set(files) or {str(path)}):
        if os.path.isfile(f):
            h.update(sha256_file(f).encode())
    return h.hexdigest()


def _after_rules(raw_shapes: Shapes, raw_get: Getter, rules: Rules, info: dict) -> Source:
    kept = plan_names(raw_shapes, rules.ops).kept
    shapes = {new: raw_shapes[old] for old, new in kept.items()}
    back = {new: old for old, new in kept.items()}
    if not shapes:
        raise AdaptError(f"{info['path'] or 'checkpoint'}: no tensors left to load" +
                         (" after the rules" if rules.ops else ""))
    return Source(shapes, lambda name: raw_get(back[name]), info)
