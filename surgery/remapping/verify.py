"""`--verify`: re-read what was written and compare every tensor with what the plan promised."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from ..checkpoint import Checkpoint, tensor_bytes
from ..errors import FormatError, OutputError
from ..formats import open_checkpoint
from ..formats.chunks import CERTIFICATE_KEY
from .output import LastRead, converted, source
from .plan import PlanRow

if TYPE_CHECKING:  # pragma: no cover
    import torch


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


def source_digests(ckpt: Checkpoint, rows: list[PlanRow]) -> dict[str, str]:
    """What :func:`verify` compares each written tensor with, taken from the source now: a
    rewrite in place replaces the source before it is verified."""
    last = LastRead(ckpt)
    return {r.new: _expected(ckpt, r, last) for r in rows if r.new is not None}


def _expected(ckpt: Checkpoint, r: PlanRow, last: LastRead) -> str:
    if r.new_kind != "dense":
        return _tensor_digest(converted(ckpt.tensor(r.old), r, ckpt))
    return _digest(ckpt, r.old, source(ckpt, r, last=last))


def verify(ckpt: Checkpoint, rows: list[PlanRow], dst: Path, expected: dict[str, str] | None = None) -> None:
    """Re-read the written output and compare every tensor's bytes with what the plan promised
    (the source's, or ``expected``: :func:`source_digests` taken before an in-place rewrite);
    one OutputError naming the first differences."""
    out = open_checkpoint(dst)
    problems = []
    kept = [r for r in rows if r.new is not None]
    written: dict[str, str] = {}  # name -> sha256 of its bytes in the output
    last = LastRead(ckpt)  # a split's source read once for all its pieces, as when they were written
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
        want = expected[r.new] if expected is not None else _expected(ckpt, r, last)
        if r.new_kind != "dense":  # kept as it is in a torch file: compare what makes it that tensor
            if _tensor_digest(out.tensor(r.new)) != want:
                problems.append(f"{r.new!r} differs from the source")
            continue
        written[r.new] = _digest(out, r.new)
        if written[r.new] != want:
            problems.append(f"{r.new!r} bytes differ from the source")
    problems += _certificate_problems(out, written)
    if problems:
        raise OutputError(f"{dst}: verification failed: {'; '.join(problems[:5])}")


def _certificate_problems(out: Checkpoint, written: dict[str, str]) -> list[str]:
    """The digests a certificate in the output's metadata gives, against the bytes written."""
    text = out.metadata.get(CERTIFICATE_KEY)
    if text is None:
        return []
    try:
        digests = json.loads(text)["digests"]
    except (ValueError, KeyError, TypeError):
        return [f"its {CERTIFICATE_KEY} metadata is not a certificate"]
    if not isinstance(digests, dict):
        return [f"its {CERTIFICATE_KEY} metadata is not a certificate"]
    wrong = [n for n, d in digests.items() if n not in written or d != "sha256:" + written[n]]
    return [f"the certificate's digest of {n!r} is not the written bytes'" for n in wrong[:3]]


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
        h.update(tensor_bytes(t))
        parts = []
    for p in parts:
        h.update(_tensor_digest(p).encode())
    return h.hexdigest()
