"""Sharded checkpoints: ``*.index.json`` with a ``weight_map`` from tensor name to shard file
(Hugging Face's ``model.safetensors.index.json`` and ``pytorch_model.bin.index.json``)."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Callable

from ..checkpoint import Checkpoint, TensorInfo
from ..errors import FormatError, InputError, SelectError
from ..io import atomic_dir
from .safetensors_fmt import patch_header, write_file
from .writing import Entry, Payload

# how a shard is opened, given by the registry: its sniffed format, and a function that opens it
ShardOpener = Callable[[Path, frozenset], "tuple[str, Callable[[], Checkpoint]]"]


def open_index(path: Path, accept=frozenset(), select: str | None = None, *, open_shard: ShardOpener) -> Checkpoint:
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
        fmt, opener = open_shard(shard_path, accept)
        if fmt not in ("safetensors", "torch-zip"):
            raise FormatError(f"{src}: shard {rel} is {fmt}, expected safetensors or a torch zip")
        shards[rel] = _flat_shard(opener(), src, rel)
    _check_stored_once(shards, src)
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
    unmapped = [f"{n} (in {rel})" for rel, c in shards.items() for n in c.tensors if n not in wm]
    if unmapped:  # transformers loads every tensor of every shard: these would load unseen
        raise FormatError(f"{src}: its shards hold {len(unmapped)} tensor{'s' if len(unmapped) > 1 else ''} the index "
                          f"does not map: {', '.join(unmapped[:5])}" + (f" and {len(unmapped) - 5} more" if len(unmapped) > 5
                                                                          else "")
                          + "; transformers would load them and surgery would not show them, refusing it")
    extra: dict[str, str] = {}
    meta = {k: str(v) for k, v in (index.get("metadata") or {}).items()} if isinstance(index.get("metadata"), dict) else {}
    files = [str(folder / r) for r in shards]
    first = next(iter(shards.values()))
    return Checkpoint(path=Path(path), format="safetensors-index", file_size=sum(c.file_size for c in shards.values()),
                      tensors=tensors, extras=extra, metadata={**first.metadata, **meta} if first.format == "safetensors" else meta,
                      files=files)


def _flat_shard(shard: Checkpoint, src: str, rel: str) -> Checkpoint:
    """A shard as transformers loads it: the loader is chosen by the file's name (``.safetensors``:
    safetensors, anything else: torch.load(weights_only=True), which refuses TorchScript), and the
    file's top level is the tensor dict. surgery's search for the tensors inside a checkpoint
    (``{'model': {...}, 'epoch': 3}``) is no loader's rule for a shard, so a shard that needs it, or
    whose bytes are not what its name says, is refused rather than read differently."""
    expected = "safetensors" if rel.endswith(".safetensors") else "torch-zip"
    if shard.format != expected:
        raise FormatError(f"{src}: shard {rel} is {shard.format}, but its name makes transformers read it as "
                          f"{expected}; refusing it")
    if shard.container or shard.file_kind != "state_dict" or shard.extras:
        inside = f"its tensors are under {shard.container!r}" if shard.container else (
            f"it holds {', '.join(sorted(shard.extras)[:3])} beside its tensors" if shard.extras else
            f"it is {shard.description or shard.file_kind}")
        raise FormatError(f"{src}: shard {rel} is not a flat dict of tensors ({inside}); transformers would load its "
                          f"top level as the state dict, refusing it")
    return shard


def _check_stored_once(shards: dict[str, Checkpoint], src: str) -> None:
    """Refuse a tensor stored in two shards: transformers loads every shard in turn, so a later
    shard's copy replaces the one the index maps, and what surgery shows would not be what loads."""
    where: dict[str, str] = {}
    twice = []
    for rel, shard in shards.items():
        for name in shard.tensors:
            if name in where:
                twice.append(f"{name} (in {where[name]} and {rel})")
            where.setdefault(name, rel)
    if twice:
        raise FormatError(f"{src}: {len(twice)} tensor{'s are' if len(twice) > 1 else ' is'} stored in two shards: "
                          f"{', '.join(twice[:3])}; loaders differ on which copy wins, refusing it")


def read_json_index(path: Path) -> dict:
    try:
        # O_NONBLOCK: an index that is (or links to) a FIFO must not block the open forever
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise InputError(f"{path}: not a regular file; a shard index must be a file")
        with open(fd, "rb") as f:
            data = json.loads(f.read(64 * 1024 * 1024).decode("utf-8"))
    except (ValueError, RecursionError) as e:  # bad UTF-8/JSON, a 5000-digit number, [[[[... nested
        raise FormatError(f"{path}: not valid JSON ({type(e).__name__}: {str(e)[:120]})") from None
    except OSError as e:
        raise InputError(f"{path}: cannot read: {e.strerror or e}") from None
    return data


def check_inside(file: Path, anchor: Path, src: str, what: str) -> None:
    """Refuse ``file`` when it resolves (through symlinks) outside the anchor's folder. A Hugging
    Face cache links every file of a snapshot into one ``blobs`` folder, so the folder the anchor
    itself resolves into counts as inside too."""
    real = os.path.realpath(file)
    homes = {os.path.realpath(Path(anchor).parent), os.path.dirname(os.path.realpath(anchor))}
    if not any(os.path.commonpath([real, h]) == h for h in homes):
        raise FormatError(f"{src}: {what} is a link to {real}, outside the checkpoint's folder; refusing to follow it")


# ---------------------------------------------------------------------------- writing

WRITTEN_INDEX = "model.safetensors.index.json"


def write(dst: Path, payload: Payload) -> list[str]:
    """Safetensors shards of at most ``payload.shard_bytes`` each and the index naming them, as
    one folder at ``dst`` (built in a temp folder beside it, renamed into place)."""
    shards = _split(payload.entries, payload.shard_bytes)
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    where = {e.name: names[i] for i, shard in enumerate(shards) for e in shard}
    weight_map = {name: where[payload.aliases.get(name, name)] for name in payload.names}
    with atomic_dir(dst, keep=payload.keep) as tmp:
        for name, shard in zip(names, shards):
            aliases = {a: t for a, t in payload.aliases.items() if where[t] == name}
            write_file(tmp / name, shard, payload.metadata, aliases)
        late = payload.finish()
        for name in names:
            patch_header(tmp / name, late)
        meta = {k: late.get(v, v) for k, v in payload.index_metadata.items()}
        index = {"metadata": {"total_size": sum(e.nbytes for e in payload.entries), **meta}, "weight_map": weight_map}
        (tmp / WRITTEN_INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return [str(dst / n) for n in names] + [str(dst / WRITTEN_INDEX)]


def _split(entries: list[Entry], shard_bytes: int) -> list[list[Entry]]:
    """Entries in order, a new shard whenever the next would take this one past ``shard_bytes``."""
    shards: list[list[Entry]] = [[]]
    size = 0
    for e in entries:
        if shards[-1] and size + e.nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += e.nbytes
    return shards
