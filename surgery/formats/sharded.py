"""Sharded checkpoints: ``*.index.json`` with a ``weight_map`` from tensor name to shard file
(Hugging Face's ``model.safetensors.index.json`` and ``pytorch_model.bin.index.json``)."""

from __future__ import annotations

from pathlib import Path

from ..checkpoint import Checkpoint, TensorInfo
from ..errors import FormatError, SelectError


def open_index(path: Path, accept=frozenset(), select: str | None = None) -> Checkpoint:
    from . import FORMATS, read_json_index, sniff

    src = str(path)
    if select:
        raise SelectError(f"{src}: --select does not apply to a sharded checkpoint; it holds one flat tensor dict")
    index = read_json_index(path)
    wm = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(wm, dict) or not wm or not all(isinstance(k, str) and isinstance(v, str) for k, v in wm.items()):
        raise FormatError(f"{src}: not a shard index: expected a JSON object with a non-empty 'weight_map' of name -> file")
    folder = Path(path).parent
    shards: dict[str, Checkpoint] = {}
    for rel in dict.fromkeys(wm.values()):
        rp = Path(rel)
        if rp.is_absolute() or ".." in rp.parts or len(rp.parts) != 1:
            raise FormatError(f"{src}: shard {rel!r} is not a plain file name in the index's folder; refusing to follow it")
        shard_path = folder / rel
        try:
            present = shard_path.is_file()
        except OSError as e:  # a name too long for the file system, ...
            raise FormatError(f"{src}: shard {rel[:80]!r} cannot be looked up ({e.strerror})") from None
        if not present:
            raise FormatError(f"{src}: shard {rel} is missing from {folder}")
        check_inside(shard_path, path, src, f"shard {rel}")
        fmt, real = sniff(shard_path)
        if fmt not in ("safetensors", "torch-zip"):
            raise FormatError(f"{src}: shard {rel} is {fmt}, expected safetensors or a torch zip")
        shards[rel] = FORMATS[fmt].opener(real, accept, None)
    tensors: dict[str, TensorInfo] = {}
    problems = []
    for name, rel in wm.items():
        t = shards[rel].tensors.get(name)
        if t is None:
            problems.append(f"{name} (in {rel})")
            continue
        tensors[name] = t
    if problems:
        raise FormatError(f"{src}: the index names tensors its shards do not hold: {', '.join(problems[:5])}"
                          + (f" and {len(problems) - 5} more" if len(problems) > 5 else ""))
    extra = {f"{rel}:{n}": "tensor (not in weight_map)" for rel, c in shards.items() for n in c.tensors if n not in wm}
    meta = {k: str(v) for k, v in (index.get("metadata") or {}).items()} if isinstance(index.get("metadata"), dict) else {}
    files = [str(folder / r) for r in shards]
    first = next(iter(shards.values()))
    return Checkpoint(path=Path(path), format="safetensors-index", file_size=sum(c.file_size for c in shards.values()),
                      tensors=tensors, extras=extra, metadata={**first.metadata, **meta} if first.format == "safetensors" else meta,
                      files=files)


def check_inside(file: Path, anchor: Path, src: str, what: str) -> None:
    """Refuse ``file`` when it resolves (through symlinks) outside the anchor's folder. A Hugging
    Face cache links every file of a snapshot into one ``blobs`` folder, so the folder the anchor
    itself resolves into counts as inside too."""
    import os

    real = os.path.realpath(file)
    homes = {os.path.realpath(Path(anchor).parent), os.path.dirname(os.path.realpath(anchor))}
    if not any(os.path.commonpath([real, h]) == h for h in homes):
        raise FormatError(f"{src}: {what} is a link to {real}, outside the checkpoint's folder; refusing to follow it")
