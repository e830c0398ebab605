"""`surgery match A B`: infer the key map from checkpoint A onto checkpoint or architecture B."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer

from surgery.keys import collapse_keys

from .common import console, escaped, handles_errors, print_json, shared_option

if TYPE_CHECKING:  # pragma: no cover
    from surgery.matching import MatchReport

SHOWN = 20  # of each list, in plain text; --json has them all


def register(app: typer.Typer) -> None:
    app.command("match")(match)


@handles_errors
def match(
    a: Annotated[Path, typer.Argument(help="The checkpoint whose keys to map.", show_default=False)],
    b: Annotated[str, typer.Argument(help="The checkpoint or architecture (resnet18, timm:NAME) to map them onto.",
                                     show_default=False)],
    out: Annotated[Optional[Path], typer.Option("--out", "-o", metavar="RULES",
                                                help="Write the rules here (.yaml/.yml: YAML, else JSON) for "
                                                     "`surgery remap A --rules RULES DST`.")] = None,
    values: Annotated[bool, typer.Option("--values/--no-values",
                                         help="Compare tensor values bit for bit where both are checkpoints.")] = True,
    allow_global: Annotated[Optional[list[str]], shared_option("allow_globals")] = None,
    force: Annotated[bool, shared_option("force")] = False,
    as_json: Annotated[bool, shared_option("as_json")] = False,
) -> None:
    """Propose remap rules taking A's keys to B's, from shapes, dtypes, key structure and values.

    Exit code 0 when every key of B is mapped unambiguously, 1 when not (rules still written), 2 on bad input."""
    from surgery.matching import match as run_match  # the library loads only when a match runs

    rep = run_match(a, b, out=out, force=force, values=values, allow_globals=tuple(allow_global or ()))
    if as_json:
        print_json(rep.to_json())
    else:
        _render(rep)
    raise typer.Exit(0 if rep.complete else 1)


def _render(rep: MatchReport) -> None:
    out, pg = console(), rep.pairing
    ops = rep.rules.ops
    for op in ops[:SHOWN]:
        out.print(f"  {escaped(op)}")
    if len(ops) > SHOWN:
        out.print(f"  ... {len(ops) - SHOWN} more ops (--json lists them, and each pair)")
    for bs, as_ in pg.ambiguous:
        out.print(f"  ambiguous: {escaped(', '.join(bs))} <- one of {escaped(', '.join(as_))}")
    for label, names in (("missing in A", pg.missing), ("unused in A", pg.unused)):
        keys = collapse_keys(names)
        for k in keys[:SHOWN]:
            out.print(f"  {label}: {escaped(k)}")
        if len(keys) > SHOWN:
            out.print(f"  ... {len(keys) - SHOWN} more {label}")
    for note in rep.notes:
        out.print(f"  note: {escaped(note)}")
    checked = f", {rep.confirmed} confirmed by value" if rep.values_compared else ""
    out.print(f"{len(pg.pairs)} of {rep.b_keys} keys of B mapped, {len(pg.pairs)} of {rep.a_keys} keys of A used"
              f"{checked}; {len(pg.ambiguous)} ambiguous, {len(pg.missing)} missing"
              + (f"; wrote {escaped(rep.written)} ({_ops(len(rep.rules.ops))})" if rep.written else ""))
    out.print("complete" if rep.complete else "incomplete")


def _ops(n: int) -> str:
    return f"{n} op" if n == 1 else f"{n} ops"
