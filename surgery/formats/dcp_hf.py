"""DCP folders written by torch's Hugging Face storage writer with ``save_distributed=True``: each
rank's pieces in its own safetensors files, ``shard-{rank+1:05d}-model-{k:05d}-of-{n:05d}.safetensors``,
each piece's place in the global tensor in the file's ``DCP_SHARDING_INFO`` metadata
(``{"name": {"saved_offsets": [...]}}``). The layout records no global shapes: each tensor's shape
is where its pieces end, and the pieces must cover it exactly once.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from ..checkpoint import Checkpoint, TensorInfo
from ..errors import FormatError
from .chunks import certify, chunked, cover_problem, refuse_gaps
from .safetensors_fmt import open_safetensors

SHARD_FILE = re.compile(r"shard-(\d{5})-model-(\d{5})-of-(\d{5})\.safetensors$")
INFO_KEY = "DCP_SHARDING_INFO"


def shard_files(folder: Path) -> list[Path]:
    """The folder's rank shard files, in name order (none: not this layout)."""
    return sorted(p for p in folder.glob("shard-*-model-*.safetensors") if SHARD_FILE.match(p.name))


def open_hf_dcp(folder: Path, accept=frozenset(), select: str | None = None) -> Checkpoint:
    src = str(folder)
    if select:
        from ..errors import SelectError

        raise SelectError(f"{src}: --select does not apply here; the shard files hold one flat tensor dict")
    files = shard_files(folder)
    ranks = sorted({int(SHARD_FILE.match(p.name).group(1)) for p in files})
    if ranks != list(range(1, len(ranks) + 1)):
        missing = sorted(set(range(1, ranks[-1] + 1)) - set(ranks))
        raise FormatError(f"{src}: the shard files of rank{'s' if len(missing) > 1 else ''} "
                          f"{', '.join(str(r - 1) for r in missing[:8])} are missing (shard-{missing[0]:05d}-*)")
    pieces: dict[str, list[tuple[tuple[int, ...], TensorInfo]]] = {}
    for path in files:
        for name, offsets, info in _pieces(path, src):
            pieces.setdefault(name, []).append((offsets, info))
    tensors, gaps = {}, []
    for name, parts in pieces.items():
        tensor, problem = _whole(name, parts)
        if problem:
            gaps.append(f"{name!r}: {problem}")
        else:
            tensors[name] = tensor
    refuse_gaps(src, gaps, "pieces")
    ckpt = Checkpoint(path=folder, format="torch-dcp-hf", file_size=sum(os.path.getsize(p) for p in files),
                      tensors=tensors, files=[str(p) for p in files])
    ckpt.certificate = certify(tensors, "pieces' own offsets (this layout records no global shape)", len(ranks))
    return ckpt


def _pieces(path: Path, src: str):
    """(name, offsets, piece) for each tensor of one shard file."""
    part = open_safetensors(path)
    try:
        info = json.loads(part.metadata.get(INFO_KEY, ""))
    except ValueError:
        raise FormatError(f"{src}: {path.name} has no readable {INFO_KEY} metadata; not a DCP shard file") from None
    if not isinstance(info, dict):
        raise FormatError(f"{src}: {path.name}: {INFO_KEY} is not a JSON object")
    for name, t in part.tensors.items():
        offsets = info.get(name, {}).get("saved_offsets") if isinstance(info.get(name), dict) else None
        if (not isinstance(offsets, list) or len(offsets) != len(t.shape)
                or not all(type(o) is int and 0 <= o < 1 << 62 for o in offsets)):
            raise FormatError(f"{src}: {path.name}: tensor {name!r} has no valid saved_offsets in {INFO_KEY} "
                              f"(got {str(offsets)[:60]})")
        yield name, tuple(offsets), t


def _whole(name: str, parts: list[tuple[tuple[int, ...], TensorInfo]]) -> tuple[TensorInfo | None, str | None]:
    """The tensor its pieces make (its shape: where they end), or why they do not make one."""
    dtypes = {p.dtype for _, p in parts}
    if len(dtypes) > 1:
        return None, f"pieces of different dtypes ({', '.join(sorted(dtypes))})"
    ranks = {len(p.shape) for _, p in parts}
    if len(ranks) > 1:
        return None, "pieces of different ranks"
    shape = tuple(max(o[d] + p.shape[d] for o, p in parts) for d in range(ranks.pop()))
    problem = cover_problem(shape, [(o, p.shape) for o, p in parts])
    if problem:
        return None, f"{list(shape)}: {problem}"
    if len(parts) == 1 and not any(parts[0][0]):
        return parts[0][1], None
    return chunked(name, dtypes.pop(), shape, parts), None
