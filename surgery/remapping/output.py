"""From a plan to a `Payload` for the output format's writer: where each tensor's bytes come
from, what is converted on the way, and the provenance written beside the tensors."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from ..checkpoint import SPARSE_KINDS, Checkpoint, read_range, tensor_bytes, torch_dtype
from ..errors import OutputError
from ..formats import Format
from ..formats.chunks import CERTIFICATE_KEY, Digests
from ..formats.writing import Entry, Payload
from ..io import BackgroundHash, same_path
from .group_ops import apply as apply_group, piece_range
from .plan import PlanRow
from .rules import Rules
from .tensor_ops import apply_steps

if TYPE_CHECKING:  # pragma: no cover
    import torch

PENDING_SHA = "sha256-pending-" + "0" * 49  # 64 chars, as long as the hash that replaces it


def write(ckpt: Checkpoint, rows: list[PlanRow], rules: Rules, dst: Path, fmt: Format, shard_bytes: int) -> tuple[list[str], str]:
    """Write the plan to ``dst`` in ``fmt``; the files written and the source's sha256. A source
    stored in ranks' chunks gets its certificate, each written tensor's digest taken as its bytes
    are written, in the output's metadata."""
    hasher = _hash_source(ckpt)
    sha: list[str] = []
    kept = [r for r in rows if r.new is not None]
    stored = [r for r in kept if r.alias_of is None]
    digests = Digests(ckpt.certificate, [r.new for r in stored])
    metadata, index_metadata = _metadata(ckpt, rules), {"surgery.source": ckpt.path.name, "surgery.source_sha256": PENDING_SHA}
    if digests.certificate is not None:
        metadata[CERTIFICATE_KEY] = index_metadata[CERTIFICATE_KEY] = digests.placeholder

    def finish() -> dict[str, str]:
        sha.append(hasher.get())
        return {PENDING_SHA: sha[0], **digests.final()}

    last = LastRead(ckpt)
    payload = Payload(entries=[Entry(r.new, r.new_dtype, r.shape, digests.taken(r.new, source(ckpt, r, digests.on, last)))
                               for r in stored],
                      names=[r.new for r in kept], aliases={r.new: r.alias_of for r in kept if r.alias_of is not None},
                      metadata=metadata, state_dict=lambda: _state_dict(ckpt, kept),
                      shard_bytes=shard_bytes, index_metadata=index_metadata,
                      keep=_kept_in_place(ckpt, dst), finish=finish)
    try:
        files = fmt.writer(dst, payload)  # type: ignore[misc]
    except OSError as e:
        raise OutputError(f"{dst}: cannot write: {e.strerror or e}; nothing was left at the destination") from None
    return files, sha[0]


class LastRead:
    """The last source tensor read, kept while the pieces of one split or unstack are written
    (they are written one after another): the source is read once, and memory holds one group."""

    def __init__(self, ckpt: Checkpoint) -> None:
        self.ckpt, self.name, self.t = ckpt, None, None

    def __call__(self, name: str, keep: bool) -> "torch.Tensor":
        if name == self.name:
            return self.t
        t = self.ckpt.tensor(name)
        self.name, self.t = (name, t) if keep else (None, None)
        return t


def source(ckpt: Checkpoint, row: PlanRow, read: bool = False, last: LastRead | None = None
           ) -> tuple[str, int, int] | Callable[[], bytes]:
    """Where a row's bytes come from: a byte range of the source file when they are written as
    stored (unless ``read``: the bytes pass through this process), else a function that reads
    (and converts, or assembles from chunks) the tensor."""
    info = ckpt.tensors[row.old]
    rng = info.byte_range
    g = row.group
    if g is not None:
        if g.contiguous_piece and row.new_dtype == row.dtype and not row.steps and rng is not None and info.kind == "dense":
            start, end = piece_range(g, rng[0], info.dtype)
            return (lambda: read_range(info.file, start, end)) if read else (info.file, start, end)
        return lambda: tensor_bytes(made(ckpt, row, last or LastRead(ckpt)))
    # --densify / --dequantize (FP8 scales too), chunks: refuse_unsafetensorable let only those through;
    # tensor ops (transpose, rope_permute, ...) read the tensor and reorder it
    if row.kind != "dense" or row.scaling is not None or row.steps:
        return lambda: _converted_bytes(ckpt, row)
    if row.new_dtype == row.dtype and rng is not None:
        return (lambda: read_range(info.file, *rng)) if read else (info.file, rng[0], rng[1])
    if row.new_dtype == row.dtype:
        return lambda: ckpt.read_bytes(row.old)
    return lambda: _converted_bytes(ckpt, row)


def made(ckpt: Checkpoint, row: PlanRow, last: LastRead) -> "torch.Tensor":
    """A split, concat, stack or unstack's output: its sources read (a split's once for all its
    pieces), cast as the plan says, joined or cut, then the tensor ops that follow applied."""
    g: Any = row.group
    target = torch_dtype(row.new_dtype)
    tensors = [last(s, keep=g.index < g.count - 1) for s in g.sources]  # the last piece lets the source go
    return apply_steps(apply_group(g, [t.to(target) if t.dtype != target else t for t in tensors]), row.steps)


def _converted_bytes(ckpt: Checkpoint, row: PlanRow) -> memoryview:
    """The converted tensor's bytes, a view of its memory (no copy)."""
    return tensor_bytes(converted(ckpt.tensor(row.old), row, ckpt))


def converted(t: "torch.Tensor", row: PlanRow, ckpt: Checkpoint) -> "torch.Tensor":
    """The tensor as the plan row writes it: densified, dequantized, cast, then its tensor ops
    applied. A scaled FP8 or FP4 weight's scales are read from ``ckpt`` (the tensors beside it)."""
    if row.scaling is not None:
        return apply_steps(row.scaling.dequantize(t, ckpt.tensor, torch_dtype(row.new_dtype)), row.steps)
    if row.new_kind == "dense" and row.kind in SPARSE_KINDS:
        t = t.to_dense()
    elif row.new_kind == "dense" and row.kind == "quantized":
        t = t.dequantize()
    target = torch_dtype(row.new_dtype)
    return apply_steps(t.to(target) if t.dtype != target else t, row.steps)


def _state_dict(ckpt: Checkpoint, kept: list[PlanRow]) -> dict[str, Any]:
    """Every kept name -> its tensor as written; tied names stay one shared tensor."""
    sd = ckpt.state_dict([r.old for r in kept if r.group is None])  # tied names come back as one shared tensor
    done: dict[tuple, Any] = {}
    out = {}
    last = LastRead(ckpt)
    for r in kept:
        if r.group is not None:
            out[r.new] = made(ckpt, r, last).contiguous()
            continue
        t = sd[r.old]
        if r.converted:
            key = (id(t), r.steps)  # tied names with other tensor ops are other tensors
            if key not in done:
                done[key] = converted(t, r, ckpt).contiguous() if r.steps else converted(t, r, ckpt)
            t = done[key]
        out[r.new] = t
    return out


def _metadata(ckpt: Checkpoint, rules: Rules) -> dict[str, str]:
    meta = {k: v for k, v in ckpt.metadata.items() if not k.startswith("surgery.")} if ckpt.format.startswith("safetensors") else {}
    meta.setdefault("format", "pt")
    meta["surgery.source"] = ckpt.path.name
    meta["surgery.source_format"] = ckpt.format
    meta["surgery.source_sha256"] = PENDING_SHA
    meta["surgery.rules"] = json.dumps(rules.to_json(), separators=(",", ":"))
    return meta


def _hash_source(ckpt: Checkpoint) -> BackgroundHash:
    p = Path(ckpt.path)
    if p.is_dir():  # DCP or sharded folder: hash the metadata file that names everything else
        p = p / ".metadata" if (p / ".metadata").is_file() else Path(ckpt.files[0])
    return BackgroundHash(p)


def _kept_in_place(ckpt: Checkpoint, dst: Path) -> list[str]:
    """Rewriting a sharded folder in place replaces its shards and the index naming them;
    everything else there (config.json, tokenizer files, other formats' shards) moves into the
    new folder."""
    if not dst.is_dir() or not same_path(dst, ckpt.path):
        return []
    shards = {os.path.realpath(f) for f in ckpt.files}
    own = {os.path.basename(f) for f in shards}
    if (dst / ".metadata").is_file():  # a DCP folder's metadata names its files: it goes with them
        own.add(".metadata")
    for entry in os.scandir(dst):
        if entry.name.endswith(".index.json") and entry.is_file():
            try:
                names = set(json.loads(Path(entry.path).read_text()).get("weight_map", {}).values())
            except (OSError, ValueError, AttributeError, TypeError):
                continue
            if names and names <= own:
                own.add(entry.name)
    return [e.name for e in os.scandir(dst) if e.name not in own and os.path.realpath(e.path) not in shards]
