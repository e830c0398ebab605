"""Writing a remap plan to disk (safetensors single or sharded, torch zip) and verifying it."""

from __future__ import annotations

import errno
import hashlib
import json
import os
from pathlib import Path
from typing import Callable

from .checkpoint import SPARSE_KINDS, Checkpoint, torch_dtype
from .errors import FormatError, OutputError
from .formats.safetensors_fmt import ALIASES_KEY, Entry, build_header, copy_ranges
from .io import BackgroundHash, atomic_dir, atomic_file, same_path
from .rules import PlanRow, RemapReport, Rules

_PLACEHOLDER = "sha256-pending-" + "0" * 49  # 64 chars, replaced in place once the hash is known


def _source(ckpt: Checkpoint, row: PlanRow) -> tuple[str, int, int] | Callable[[], bytes]:
    info = ckpt.tensors[row.old]
    rng = info.byte_range
    if row.kind != "dense":  # --densify / --dequantize: refuse_unsafetensorable let only those through
        return lambda: _cast_bytes(ckpt, row)
    if row.new_dtype == row.dtype and rng is not None:
        return (info.file, rng[0], rng[1])
    if row.new_dtype == row.dtype:
        return lambda: ckpt.read_bytes(row.old)
    return lambda: _cast_bytes(ckpt, row)


def _cast_bytes(ckpt: Checkpoint, row: PlanRow) -> bytes:
    import torch

    t = converted(ckpt.tensor(row.old), row).contiguous()
    return t.reshape(-1).view(torch.uint8).numpy().tobytes()


def converted(t: "torch.Tensor", row: PlanRow) -> "torch.Tensor":
    """The tensor as the plan row writes it: densified, dequantized, cast."""
    if row.new_kind == "dense" and row.kind in SPARSE_KINDS:
        t = t.to_dense()
    elif row.new_kind == "dense" and row.kind == "quantized":
        t = t.dequantize()
    target = torch_dtype(row.new_dtype)
    return t.to(target) if t.dtype != target else t


def _tensor_digest(t: "torch.Tensor") -> str:
    """A digest of everything that makes a tensor the tensor it is, for every kind."""
    import torch

    h = hashlib.sha256(repr((str(t.dtype), str(t.layout), t.device.type, t.is_nested)).encode())
    if t.is_nested:
        parts = list(t.unbind())
    elif t.device.type == "meta":
        h.update(repr((tuple(t.shape), t.stride())).encode())
        parts = []
    elif t.layout == torch.sparse_coo:
        parts = [t._indices(), t._values()]
        h.update(repr((tuple(t.shape), t.is_coalesced())).encode())
    elif t.layout in (torch.sparse_csr, torch.sparse_bsr):
        parts = [t.crow_indices(), t.col_indices(), t.values()]
        h.update(repr(tuple(t.shape)).encode())
    elif t.layout in (torch.sparse_csc, torch.sparse_bsc):
        parts = [t.ccol_indices(), t.row_indices(), t.values()]
        h.update(repr(tuple(t.shape)).encode())
    elif t.is_quantized:
        per_tensor = t.qscheme() == torch.per_tensor_affine
        h.update(repr((t.q_scale(), t.q_zero_point()) if per_tensor else t.q_per_channel_axis()).encode())
        parts = [t.int_repr()] if per_tensor else [t.int_repr(), t.q_per_channel_scales(), t.q_per_channel_zero_points()]
    else:
        h.update(repr(tuple(t.shape)).encode())
        h.update(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        parts = []
    for p in parts:
        h.update(_tensor_digest(p).encode())
    return h.hexdigest()


def _entries(ckpt: Checkpoint, rows: list[PlanRow]) -> list[Entry]:
    return [Entry(r.new, r.new_dtype, r.shape, _source(ckpt, r)) for r in rows if r.new is not None and r.alias_of is None]


def _metadata(ckpt: Checkpoint, rules: Rules, aliases: dict[str, str]) -> dict[str, str]:
    meta = {k: v for k, v in ckpt.metadata.items() if not k.startswith("surgery.")} if ckpt.format.startswith("safetensors") else {}
    meta.setdefault("format", "pt")
    meta["surgery.source"] = ckpt.path.name
    meta["surgery.source_format"] = ckpt.format
    meta["surgery.source_sha256"] = _PLACEHOLDER
    meta["surgery.rules"] = json.dumps(rules.to_json(), separators=(",", ":"))
    if aliases:
        meta[ALIASES_KEY] = json.dumps(aliases, separators=(",", ":"))
    return meta


def _hash_source(ckpt: Checkpoint) -> BackgroundHash:
    p = Path(ckpt.path)
    if p.is_dir():  # DCP or sharded folder: hash the metadata file that names everything else
        p = p / ".metadata" if (p / ".metadata").is_file() else Path(ckpt.files[0])
    return BackgroundHash(p)


def _write_one(path: Path, entries: list[Entry], meta: dict[str, str]) -> int:
    """Write a safetensors file; returns the byte offset of the sha256 placeholder."""
    header = build_header(entries, meta)
    pos = header.find(_PLACEHOLDER.encode())
    with open(path, "wb") as f:
        f.write(header)
        copy_ranges(f, entries)
    return pos


def _patch(path: Path, pos: int, sha: str) -> None:
    if pos < 0:
        return
    with open(path, "r+b") as f:
        f.seek(pos)
        f.write(sha.encode())


def write(ckpt: Checkpoint, rows: list[PlanRow], rules: Rules, dst: Path, fmt: str, shard_bytes: int,
          report: RemapReport) -> None:
    hasher = _hash_source(ckpt)
    aliases = {r.new: r.alias_of for r in rows if r.new is not None and r.alias_of is not None}
    try:
        if fmt == "safetensors":
            entries = _entries(ckpt, rows)
            with atomic_file(dst) as tmp:
                pos = _write_one(tmp, entries, _metadata(ckpt, rules, aliases))
                report.source_sha256 = hasher.get()
                _patch(tmp, pos, report.source_sha256)
            report.files = [str(dst)]
        elif fmt == "torch-zip":
            _write_torch(ckpt, rows, dst)
            report.source_sha256 = hasher.get()
            report.files = [str(dst)]
        else:
            _write_sharded(ckpt, rows, rules, dst, shard_bytes, aliases, hasher, report)
    except OSError as e:
        raise OutputError(f"{dst}: cannot write: {e.strerror or e}; nothing was left at the destination") from None
    report.bytes_written = sum(os.path.getsize(f) for f in report.files)


def _write_torch(ckpt: Checkpoint, rows: list[PlanRow], dst: Path) -> None:
    import torch

    kept = [r for r in rows if r.new is not None]
    sd = ckpt.state_dict([r.old for r in kept])  # tied names come back as one shared tensor
    cast_cache: dict[int, torch.Tensor] = {}
    out = {}
    for r in kept:
        t = sd[r.old]
        if r.converted:
            if id(t) not in cast_cache:
                cast_cache[id(t)] = converted(t, r)
            t = cast_cache[id(t)]
        out[r.new] = t
    with atomic_file(dst) as tmp:
        try:
            torch.save(out, tmp)
        except RuntimeError as e:  # torch's writer reports a failed write (EFBIG, ENOSPC) as RuntimeError
            first = (str(e).strip().splitlines() or [""])[0][:160]
            raise OSError(errno.EIO, f"torch.save could not finish writing ({first}); is the disk full?") from None


def _write_sharded(ckpt, rows, rules, dst: Path, shard_bytes: int, aliases, hasher, report) -> None:
    entries = _entries(ckpt, rows)
    shards: list[list[Entry]] = [[]]
    size = 0
    for e in entries:
        if shards[-1] and size + e.nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += e.nbytes
    n = len(shards)
    names = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    where = {e.name: names[i] for i, shard in enumerate(shards) for e in shard}
    weight_map = {}
    for r in rows:
        if r.new is not None:
            weight_map[r.new] = where[r.alias_of] if r.alias_of else where[r.new]
    with atomic_dir(dst, keep=_kept_in_place(ckpt, dst)) as tmp:
        patches = []
        for name, shard in zip(names, shards):
            shard_aliases = {a: t for a, t in aliases.items() if where[t] == name}
            patches.append((tmp / name, _write_one(tmp / name, shard, _metadata(ckpt, rules, shard_aliases))))
        sha = hasher.get()
        for path, pos in patches:
            _patch(path, pos, sha)
        index = {"metadata": {"total_size": sum(e.nbytes for e in entries), "surgery.source": ckpt.path.name,
                              "surgery.source_sha256": sha}, "weight_map": weight_map}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        report.source_sha256 = sha
    report.files = [str(dst / n) for n in names] + [str(dst / "model.safetensors.index.json")]


def _kept_in_place(ckpt: Checkpoint, dst: Path) -> list[str]:
    """Rewriting a sharded folder in place replaces its shards and the index naming them;
    everything else there (config.json, tokenizer files, other formats' shards) moves into the
    new folder."""
    if not dst.is_dir() or not same_path(dst, ckpt.path):
        return []
    shards = {os.path.realpath(f) for f in ckpt.files}
    own = {os.path.basename(f) for f in shards}
    for entry in os.scandir(dst):
        if entry.name.endswith(".index.json") and entry.is_file():
            try:
                names = set(json.loads(Path(entry.path).read_text()).get("weight_map", {}).values())
            except (OSError, ValueError, AttributeError, TypeError):
                continue
            if names and names <= own:
                own.add(entry.name)
    return [e.name for e in os.scandir(dst) if e.name not in own and os.path.realpath(e.path) not in shards]


def _digest(ckpt: Checkpoint, name: str, rng: tuple[str, int, int] | Callable[[], bytes] | None = None) -> str:
    h = hashlib.sha256()
    if rng is None:
        info = ckpt.tensors[name]
        br = info.byte_range
        rng = (info.file, br[0], br[1]) if br is not None else (lambda: ckpt.read_bytes(name))
    if callable(rng):
        h.update(rng())
        return h.hexdigest()
    path, start, end = rng
    with open(path, "rb") as f:
        pos = start
        while pos < end:
            block = os.pread(f.fileno(), min(8 << 20, end - pos), pos)
            if not block:
                raise FormatError(f"{path}: ended early while verifying")
            h.update(block)
            pos += len(block)
    return h.hexdigest()


def verify(ckpt: Checkpoint, rows: list[PlanRow], rules: Rules, dst: Path, report: RemapReport) -> None:
    """Re-read the written output and compare every tensor's bytes with what the plan promised."""
    from .formats import open_checkpoint

    out = open_checkpoint(dst)
    problems = []
    kept = [r for r in rows if r.new is not None]
    extra = set(out.tensors) - {r.new for r in kept}
    if extra:
        problems.append(f"unexpected tensors {sorted(extra)[:3]}")
    for r in kept:
        t = out.tensors.get(r.new)
        if t is None:
            problems.append(f"{r.new!r} missing")
            continue
        if t.dtype != r.new_dtype or t.shape != r.shape or t.kind != r.new_kind:
            problems.append(f"{r.new!r} is {t.dtype}{list(t.shape)} {t.kind}, expected {r.new_dtype}{list(r.shape)} "
                            f"{r.new_kind}")
            continue
        if r.new_kind != "dense":  # kept as it is in a torch file: compare what makes it that tensor
            if _tensor_digest(out.tensor(r.new)) != _tensor_digest(converted(ckpt.tensor(r.old), r)):
                problems.append(f"{r.new!r} differs from the source")
            continue
        if _digest(out, r.new) != _digest(ckpt, r.old, _source(ckpt, r)):
            problems.append(f"{r.new!r} bytes differ from the source")
    if problems:
        raise OutputError(f"{dst}: verification failed: {'; '.join(problems[:5])}")
    report.verified = True
