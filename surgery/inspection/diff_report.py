"""The report behind `surgery diff`: names only in A or in B, shape and dtype differences, and
(with ``values``) max |A - B| per tensor, read one pair at a time.

Metadata is compared without torch; :func:`compare_values` reads tensor data and imports torch
inside the function.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterable, Mapping

DIFF_SCHEMA = "surgery.diff/1"

from ..keys import detect_wrapper_prefixes, strip_wrappers

if TYPE_CHECKING:  # pragma: no cover
    from ..checkpoint import Checkpoint, TensorInfo

_strip = strip_wrappers  # for diff(), whose keyword argument of that name hides it


@dataclass
class DiffReport:
    """What differs between two checkpoints' tensor metadata (and values, once compared).

    Names are compared after removing ``prefix_a``/``prefix_b`` (set only by
    ``diff(..., strip_wrappers=True)``); ``common`` lists names in both, in A's order.
    ``max_abs_diff`` is empty until :func:`compare_values` (or :meth:`compare`) fills it.
    """

    only_a: list[str] = field(default_factory=list)
    only_b: list[str] = field(default_factory=list)
    shape_mismatch: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)
    dtype_mismatch: list[tuple[str, str, str]] = field(default_factory=list)
    common: list[str] = field(default_factory=list)
    prefix_a: str = ""
    prefix_b: str = ""
    max_abs_diff: dict[str, float] = field(default_factory=dict)

    @property
    def comparable(self) -> list[str]:
        """Common names whose shapes agree: the ones whose values can be compared."""
        bad = {name for name, _, _ in self.shape_mismatch}
        return [n for n in self.common if n not in bad]

    @property
    def same_keys(self) -> bool:
        return not (self.only_a or self.only_b or self.shape_mismatch)

    @property
    def identical(self) -> bool:
        """Same names, shapes and dtypes, and every compared value equal."""
        return (self.same_keys and not self.dtype_mismatch
                and all(v == 0.0 for v in self.max_abs_diff.values()))

    def compare(self, a: "Checkpoint", b: "Checkpoint", names: Iterable[str] | None = None) -> "DiffReport":
        """Fill ``max_abs_diff`` for ``names`` (default: all comparable names). Imports torch."""
        self.max_abs_diff.update(compare_values(a, b, self.comparable if names is None else names,
                                                prefix_a=self.prefix_a, prefix_b=self.prefix_b))
        return self

    def to_json(self) -> dict:
        return {
            "prefix_a": self.prefix_a,
            "prefix_b": self.prefix_b,
            "n_common": len(self.common),
            "only_a": list(self.only_a),
            "only_b": list(self.only_b),
            "shape_mismatch": [{"name": n, "shape_a": list(sa), "shape_b": list(sb)}
                               for n, sa, sb in self.shape_mismatch],
            "dtype_mismatch": [{"name": n, "dtype_a": da, "dtype_b": db} for n, da, db in self.dtype_mismatch],
            "max_abs_diff": dict(self.max_abs_diff),
            "identical": self.identical,
        }


def diff_infos(a_infos: Mapping[str, "TensorInfo"], b_infos: Mapping[str, "TensorInfo"], *,
         strip_wrappers: bool = False) -> DiffReport:
    """Compare names, shapes and dtypes of two checkpoints; values are left to compare_values.

    With ``strip_wrappers``, each side loses its own ``module.``/``_orig_mod.`` prefixes first, so
    a DDP checkpoint diffs cleanly against a plain one.
    """
    pa = "".join(detect_wrapper_prefixes(a_infos)) if strip_wrappers else ""
    pb = "".join(detect_wrapper_prefixes(b_infos)) if strip_wrappers else ""
    a = dict(zip(_strip(a_infos)[0], a_infos.values())) if pa else dict(a_infos)
    b = dict(zip(_strip(b_infos)[0], b_infos.values())) if pb else dict(b_infos)
    rep = DiffReport(prefix_a=pa, prefix_b=pb)
    rep.only_a = [k for k in a if k not in b]
    rep.only_b = [k for k in b if k not in a]
    for k, ta in a.items():
        tb = b.get(k)
        if tb is None:
            continue
        rep.common.append(k)
        if tuple(ta.shape) != tuple(tb.shape):
            rep.shape_mismatch.append((k, tuple(ta.shape), tuple(tb.shape)))
        if ta.dtype != tb.dtype:
            rep.dtype_mismatch.append((k, ta.dtype, tb.dtype))
    return rep


def _plain(t: Any) -> Any:
    """The values of a sparse, quantized or nested tensor as one dense tensor; None for meta."""
    if t.device.type == "meta":
        return None
    if t.is_nested:
        return t.values()
    if t.is_quantized:
        return t.dequantize()
    return t.to_dense() if t.layout != _strided() else t


def _strided() -> Any:
    import torch

    return torch.strided


_CHUNK = 1 << 24  # elements per step: bounds the float copies made for one huge tensor


def compare_values(a: "Checkpoint", b: "Checkpoint", names: Iterable[str], *,
                   prefix_a: str = "", prefix_b: str = "") -> dict[str, float]:
    """name -> max |a - b| for tensors of equal shape, read one pair at a time (imports torch).

    Values are compared in the wider floating type of the two (at least float32; float64 for
    integers). NaN in both places counts as equal; NaN on one side only gives inf. Empty: 0.0.
    """
    import torch

    out: dict[str, float] = {}
    for name in names:
        ta, tb = _plain(a.tensor(prefix_a + name)), _plain(b.tensor(prefix_b + name))
        if ta is None or tb is None:  # a meta tensor has no values to compare
            continue
        if ta.shape != tb.shape:
            raise ValueError(f"{name!r}: shapes differ ({tuple(ta.shape)} vs {tuple(tb.shape)}); "
                             f"compare only DiffReport.comparable names")
        if ta.numel() == 0:
            out[name] = 0.0
            continue
        if ta.is_floating_point() or tb.is_floating_point() or ta.is_complex() or tb.is_complex():
            dt = torch.promote_types(torch.promote_types(ta.dtype, tb.dtype), torch.float32)
        else:
            dt = torch.float64
        fa, fb = ta.reshape(-1), tb.reshape(-1)
        worst = 0.0
        for start in range(0, fa.numel(), _CHUNK):
            ca = fa[start:start + _CHUNK].to(dt)
            cb = fb[start:start + _CHUNK].to(dt)
            d = (ca - cb).abs()  # real even for complex inputs
            na, nb = torch.isnan(ca), torch.isnan(cb)
            d = torch.where(na & nb, torch.zeros((), dtype=d.dtype), d)
            d = torch.where(na ^ nb, torch.full((), float("inf"), dtype=d.dtype), d)
            # inf - inf is nan: equal infinities are equal, unequal ones are infinitely apart
            both_inf = torch.isinf(ca) & torch.isinf(cb)
            if bool(both_inf.any()):
                d = torch.where(both_inf, torch.where(ca == cb, 0.0, float("inf")).to(d.dtype), d)
            worst = max(worst, float(d.max()))
        out[name] = worst
    return out


@dataclass
class DiffResult:
    a: Checkpoint
    b: Checkpoint
    report: DiffReport
    values_compared: bool = False
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"schema": DIFF_SCHEMA, "a": str(self.a.path), "b": str(self.b.path),
                "values_compared": self.values_compared, **self.report.to_json()}


def diff(a: str | os.PathLike, b: str | os.PathLike, *, values: bool = True, strip_wrappers: bool = True,
         select_a: str | None = None, select_b: str | None = None, allow_globals: tuple[str, ...] = ()) -> DiffResult:
    """Keys only in A, only in B, shape/dtype differences and (``values``) max |A - B| per tensor."""
    from ..formats import open_checkpoint

    ca = open_checkpoint(a, select=select_a, allow_globals=allow_globals)
    cb = open_checkpoint(b, select=select_b, allow_globals=allow_globals)
    rep = diff_infos(ca.tensors, cb.tensors, strip_wrappers=strip_wrappers)
    if values:
        rep.compare(ca, cb)
    return DiffResult(ca, cb, rep, values)
