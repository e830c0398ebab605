"""`--verify-roundtrip`: apply the plan's inverse to what was written and prove A -> B -> A bit for bit.

The inverse plan maps each written name back to its source name (renames are one-to-one: the plan
refuses clashes) and undoes each tensor's ops in reverse order (`tensor_ops.Step.inverse`). Casts
and densifying have no inverse, so a plan with them is refused before anything is written; dropped
tensors are not in B, and the proof covers the tensors kept.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from ..checkpoint import Checkpoint, tensor_bytes
from ..errors import OutputError, RuleError
from ..formats import open_checkpoint
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
        return f"FP8 with scale {r.scaling.scale!r} -> {r.new_dtype}"
    return f"{r.kind} -> {r.new_kind}" if r.kind != r.new_kind else f"{r.dtype} -> {r.new_dtype}"


def source_digests(ckpt: Checkpoint, rows: list[PlanRow]) -> dict[str, str]:
    """Each kept tensor of A as the round trip must give it back, by its name in B."""
    return {r.new: _source_digest(ckpt, r) for r in rows if r.new is not None}


def _source_digest(ckpt: Checkpoint, r: PlanRow) -> str:
    if r.kind == "chunked":  # ranks' pieces: the tensor they assemble
        return hashlib.sha256(_bytes(ckpt.tensor(r.old))).hexdigest()
    if r.kind != "dense":  # kept as it is in a torch file
        return _tensor_digest(ckpt.tensor(r.old))
    return _digest(ckpt, r.old)


def verify_roundtrip(ckpt: Checkpoint, rows: list[PlanRow], dst: Path, before: dict[str, str] | None = None) -> int:
    """Read each tensor of B, undo its ops, compare with A (or ``before``: `source_digests` taken
    before an in-place rewrite); the number of tensors proved. OutputError names every one that
    does not come back."""
    out = open_checkpoint(dst)
    bad = []
    kept = [r for r in rows if r.new is not None]
    for r in kept:
        want = before[r.new] if before is not None else _source_digest(ckpt, r)
        if r.new not in out.tensors:
            bad.append(r.new)
            continue
        back = undo_steps(out.tensor(r.new), r.steps)
        if r.kind not in ("dense", "chunked"):
            got = _tensor_digest(back)
        elif tuple(back.shape) != tuple(r.old_shape):
            got = ""
        else:
            got = hashlib.sha256(_bytes(back)).hexdigest()
        if got != want:
            bad.append(r.new)
    if bad:
        more = f" (and {len(bad) - 8} more)" if len(bad) > 8 else ""
        raise OutputError(f"{dst}: the round trip A -> B -> A is not bit-exact for {len(bad)} tensors: "
                          f"{', '.join(map(repr, bad[:8]))}{more}")
    return len(kept)


def _bytes(t) -> bytes:  # noqa: ANN001 - a torch.Tensor; torch loads only when this runs
    return bytes(tensor_bytes(t))
