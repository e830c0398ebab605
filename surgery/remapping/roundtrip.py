"""`--verify-roundtrip`: apply the plan's inverse to what was written and prove A -> B -> A bit for bit.

The inverse plan maps each written name back to its source name (renames are one-to-one: the plan
refuses clashes) and undoes each tensor's ops in reverse order (`tensor_ops.Step.inverse`); what a
group op wrote is cut or joined back (`group_ops.undo`: a concat's output split by its members'
sizes, a split's pieces concatenated, stack <-> unstack). Casts
and densifying have no inverse, so a plan with them is refused before anything is written; dropped
tensors are not in B, and the proof covers the tensors kept.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from ..checkpoint import Checkpoint, tensor_bytes, torch_shape
from ..errors import OutputError, RuleError
from ..formats import open_checkpoint
from .fp8 import Scaling
from .group_ops import Group, undo
from .plan import PlanRow
from .tensor_ops import undo_steps
from .verify import _digest, _tensor_digest


def refuse_one_way(src: str, rows: list[PlanRow]) -> None:
    """Conversions no inverse undoes (a cast, densify, dequantize), named before anything is written."""
    one_way = [r for r in rows if r.new is not None and r.kind != "chunked"
               and (r.new_dtype != r.dtype or r.new_kind != r.kind or r.scaling is not None)]
    if one_way:
        shown = "; ".join(f"{r.old!r} ({_change(r)})" for r in one_way[:4])
        more = f" (and {len(one_way) - 4} more)" if len(one_way) > 4 else ""
        raise RuleError(f"{src}: --verify-roundtrip proves A -> B -> A, but {len(one_way)} tensors are converted one "
                        f"way: {shown}{more}. Nothing was written; check such a remap with --verify instead")


def _change(r: PlanRow) -> str:
    if r.scaling is not None:
        kind = "FP8" if isinstance(r.scaling, Scaling) else "packed FP4"
        return f"{kind} with scales {', '.join(map(repr, r.scaling.scales))} -> {r.new_dtype}"
    return f"{r.kind} -> {r.new_kind}" if r.kind != r.new_kind else f"{r.dtype} -> {r.new_dtype}"


def source_digests(ckpt: Checkpoint, rows: list[PlanRow]) -> dict[str, str]:
    """Each tensor of A the round trip must give back, by its name in A."""
    return {name: _source_digest(ckpt, name) for name in _proved(rows)}


def _proved(rows: list[PlanRow]) -> list[str]:
    """The names of A that B holds: kept ones, the members of a concat or stack kept, and the
    sources of splits and unstacks all of whose pieces are kept."""
    names = [r.old for r in rows if r.group is None and r.new is not None]
    names += [s for r in rows if r.group is not None and r.group.kind in ("concat", "stack") and r.new is not None
              for s in r.group.sources]
    pieces: dict[str, list[PlanRow]] = {}
    for r in rows:
        if r.group is not None and r.group.kind in ("split", "unstack"):
            pieces.setdefault(r.old, []).append(r)
    return names + [old for old, rs in pieces.items() if all(r.new is not None for r in rs)]


def _source_digest(ckpt: Checkpoint, name: str) -> str:
    kind = ckpt.tensors[name].kind
    if kind == "chunked":  # ranks' pieces: the tensor they assemble
        return hashlib.sha256(_bytes(ckpt.tensor(name))).hexdigest()
    if kind != "dense":  # kept as it is in a torch file
        return _tensor_digest(ckpt.tensor(name))
    return _digest(ckpt, name)


def verify_roundtrip(ckpt: Checkpoint, rows: list[PlanRow], dst: Path, before: dict[str, str] | None = None) -> int:
    """Read each tensor of B, undo its ops, compare with A (or ``before``: `source_digests` taken
    before an in-place rewrite); the number of tensors of A proved. OutputError names every one
    that does not come back."""
    out = open_checkpoint(dst)
    want = before if before is not None else source_digests(ckpt, rows)
    got = {name: digest for r in rows if r.group is None and r.new is not None
           for name, digest in [(r.old, _plain_back(out, r))]}
    got.update(_groups_back(out, rows, set(want)))
    bad = [name for name in want if got.get(name) != want[name]]
    if bad:
        more = f" (and {len(bad) - 8} more)" if len(bad) > 8 else ""
        raise OutputError(f"{dst}: the round trip A -> B -> A is not bit-exact for {len(bad)} tensors: "
                          f"{', '.join(map(repr, bad[:8]))}{more}")
    return len(want)


def _plain_back(out: Checkpoint, r: PlanRow) -> str:
    """The digest of a renamed (and reordered) tensor of B, its ops undone: "" when it is missing."""
    if r.new not in out.tensors:
        return ""
    back = undo_steps(out.tensor(r.new), r.steps)
    if r.kind not in ("dense", "chunked"):
        return _tensor_digest(back)
    if tuple(back.shape) != torch_shape(r.dtype, r.old_shape):
        return ""
    return hashlib.sha256(_bytes(back)).hexdigest()


def _groups_back(out: Checkpoint, rows: list[PlanRow], wanted: set[str]) -> dict[str, str]:
    """The digests of the tensors of A that group ops wrote, cut or joined back from B, one group at a time."""
    got: dict[str, str] = {}
    groups: dict[tuple, list[PlanRow]] = {}
    for r in rows:
        if r.group is not None and r.new is not None:
            groups.setdefault((r.group.kind, r.group.sources, r.group.op), []).append(r)
    for members in groups.values():
        g: Group = members[0].group  # type: ignore[assignment]
        if not set(g.sources) & wanted or any(r.new not in out.tensors for r in members):
            continue
        back = undo(g, [undo_steps(out.tensor(r.new), r.steps) for r in members])  # type: ignore[arg-type]
        for name, shape, t in zip(g.sources, g.shapes, back):
            same = tuple(t.shape) == torch_shape(members[0].dtype, shape)  # F4: torch counts its bytes
            got[name] = hashlib.sha256(_bytes(t)).hexdigest() if same else ""
    return got


def _bytes(t) -> bytes:  # noqa: ANN001 - a torch.Tensor; torch loads only when this runs
    return bytes(tensor_bytes(t))
