"""`surgery match A B`: which of A's tensors each of B's is, proposed as a rules file.

- `sides`: A (a checkpoint) and B (a checkpoint, or an architecture built on the meta device).
- `structure`: what key names say (numbers per module level, leaf names) and which dim orders fit.
- `values`: tensors compared bit for bit, as they are or in another dim order.
- `pairing`: mutual single-best pairs; ties left as ambiguities, never guessed.
- `ruleset`: the pairs as `surgery remap --rules` ops, checked with remap's planner, and written.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from ..errors import OutputError
from ..io import check_destination
from .pairing import Pair, Pairing, pair_keys
from .ruleset import propose_rules, write_rules
from .sides import Side, open_side
from .values import Values

SCHEMA = "surgery.match/1"


@dataclass
class MatchReport:
    a: str
    b: str
    b_kind: str  # checkpoint | architecture
    a_keys: int
    b_keys: int
    pairing: Pairing
    dropped: list[str]  # A keys the rules drop
    rules: Any  # remapping.Rules
    values_compared: bool
    written: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        """Every key of B has exactly one of A's: no ambiguity, nothing missing."""
        return not self.pairing.missing and not self.pairing.ambiguous

    @property
    def confirmed(self) -> int:
        return sum(p.evidence == "value" for p in self.pairing.pairs)

    def to_json(self) -> dict:
        pg = self.pairing
        return {"schema": SCHEMA, "a": self.a, "b": self.b, "b_kind": self.b_kind, "complete": self.complete,
                "coverage": {"b_mapped": len(pg.pairs), "b_keys": self.b_keys, "a_used": len(pg.pairs),
                             "a_keys": self.a_keys, "confirmed_by_value": self.confirmed},
                "values_compared": self.values_compared,
                "pairs": [p.to_json() for p in pg.pairs],
                "ambiguous": [{"b": bs, "a": as_} for bs, as_ in pg.ambiguous],
                "missing": pg.missing, "unused": pg.unused, "dropped": self.dropped,
                "rules": self.rules.to_json(), "written": self.written, "notes": self.notes}


def match(a: Any, b: Any, *, out: str | os.PathLike | None = None, force: bool = False, values: bool = True,
          select_a: str | None = None, select_b: str | None = None, allow_globals: Iterable[str] = ()) -> MatchReport:
    """Infer a key map from checkpoint ``a`` onto ``b`` (a checkpoint, a state dict, or an
    architecture such as ``"resnet18"`` or ``"timm:resnet18"``), as remap rules; with ``out``,
    write them (YAML for ``.yaml``/``.yml``, else JSON). ``values``: compare tensors bit for bit
    where both sides have them.

    >>> rep = match("renamed.pt", "resnet18", out="rules.yaml")  # doctest: +SKIP
    >>> rep.complete, len(rep.pairing.pairs)
    """
    globs = tuple(allow_globals)
    if out is not None:  # refuse a bad destination before reading anything
        _check_out(Path(out), [x for x in (a, b) if isinstance(x, (str, os.PathLike))], force)
    sa = open_side(a, "A", select_a, globs)
    sb = open_side(b, "B", select_b, globs, arch_allowed=True)
    compare = values and bool(sa.readable) and bool(sb.readable)
    pg = pair_keys(sa, sb, Values(sa, sb) if compare else None)
    dropped = _to_drop(pg)
    rules = propose_rules(sa.shapes, pg.pairs, dropped)
    rep = MatchReport(sa.label, sb.label, sb.kind, len(sa.shapes), len(sb.shapes), pg, dropped, rules, compare,
                      notes=_notes(sa, sb, pg))
    if out is not None:
        write_rules(rules, out, _inputs(a, b), force, _header(rep))
        rep.written = str(out)
    return rep


def _to_drop(pg: Pairing) -> list[str]:
    """A's unused keys, and any tied one whose name a pair takes (it would collide)."""
    targets = {p.b for p in pg.pairs}
    tied = [k for _, aks in pg.ambiguous for k in aks if k in targets]
    return pg.unused + tied


def _inputs(a: Any, b: Any) -> list[Path]:
    return [Path(x) for x in (a, b) if isinstance(x, (str, os.PathLike)) and Path(x).exists()]


def _check_out(out: Path, inputs: list, force: bool) -> None:
    if out.suffix.lower() == ".toml":  # remap's reader refuses it
        raise OutputError(f"{out}: rules files are YAML (.yaml/.yml) or JSON (any other name), not TOML")
    check_destination(out, [Path(x) for x in inputs if Path(x).exists()], force, None)


def _notes(a: Side, b: Side, pg: Pairing) -> list[str]:
    out = []
    casts = sorted({(a.dtypes[p.a], b.dtypes[p.b]) for p in pg.pairs if a.dtypes[p.a] != b.dtypes[p.b]})
    for da, db in casts:
        out.append(f"{da} in A is {db} in B (load_state_dict casts; remap --dtype converts)")
    differ = sum(p.values == "different" for p in pg.pairs)
    if differ:
        out.append(f"{differ} pairs differ in value: matched by name and shape only")
    return out


def _header(rep: MatchReport) -> list[str]:
    pg = rep.pairing
    lines = [f"surgery match {rep.a} {rep.b}: {len(pg.pairs)} of {rep.b_keys} keys of B mapped, "
             f"{len(pg.pairs)} of {rep.a_keys} keys of A used"]
    for bs, as_ in pg.ambiguous:
        lines.append(f"ambiguous, not mapped: {', '.join(bs)} <- one of {', '.join(as_)}")
    lines += [f"missing in A: {k}" for k in pg.missing]
    return lines


__all__ = ["match", "MatchReport", "Pair", "Pairing", "SCHEMA"]
