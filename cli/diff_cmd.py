"""`surgery diff A B`: what differs between two checkpoints."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer

from .common import console, escaped, handles_errors, print_json, shared_option

if TYPE_CHECKING:  # pragma: no cover
    from surgery.inspection.diff_report import DiffReport


def register(app: typer.Typer) -> None:
    app.command("diff")(diff)


@handles_errors
def diff(
    a: Annotated[Path, typer.Argument(help="First checkpoint.", show_default=False)],
    b: Annotated[Path, typer.Argument(help="Second checkpoint.", show_default=False)],
    values: Annotated[bool, typer.Option("--values/--no-values", help="Compare tensor values (reads the data).")] = True,
    strip: Annotated[bool, typer.Option("--strip-wrappers/--exact-names", help="Ignore module./_orig_mod./_forward_module. prefixes on either side.")] = True,
    select_a: Annotated[Optional[str], typer.Option("--select-a", metavar="PATH", help="Container inside A.")] = None,
    select_b: Annotated[Optional[str], typer.Option("--select-b", metavar="PATH", help="Container inside B.")] = None,
    allow_global: Annotated[Optional[list[str]], shared_option("allow_globals")] = None,
    as_json: Annotated[bool, shared_option("as_json")] = False,
) -> None:
    """Keys only in A, only in B, shape and dtype differences, and the largest |A - B| of common tensors.

    Exit code 0 when identical, 1 when they differ, 2 on bad input (like diff(1))."""
    from surgery.inspection.diff_report import diff as run_diff  # the library loads only when a diff runs

    res = run_diff(a, b, values=values, strip_wrappers=strip, select_a=select_a, select_b=select_b,
                   allow_globals=tuple(allow_global or ()))
    if as_json:
        print_json(res.to_json())
    else:
        _render(res.report, values)
    raise typer.Exit(0 if res.report.identical else 1)


def _render(rep: DiffReport, values: bool) -> None:
    out = console()
    if rep.prefix_a or rep.prefix_b:
        out.print(f"names compared without prefixes: A {escaped(rep.prefix_a or '-')}  B {escaped(rep.prefix_b or '-')}")
    out.print(f"{len(rep.common)} common tensors, {len(rep.only_a)} only in A, {len(rep.only_b)} only in B")
    for label, names in (("only in A", rep.only_a), ("only in B", rep.only_b)):
        for n in names[:50]:
            out.print(f"  {label}: {escaped(n)}")
        if len(names) > 50:
            out.print(f"  ... {len(names) - 50} more {label}")
    for n, sa, sb in rep.shape_mismatch:
        out.print(f"  shape: {escaped(n)}  {escaped(list(sa))} vs {escaped(list(sb))}")
    for n, da, db in rep.dtype_mismatch:
        out.print(f"  dtype: {escaped(n)}  {escaped(da)} vs {escaped(db)}")
    if values:
        differing = {k: v for k, v in rep.max_abs_diff.items() if v != 0.0}
        worst = sorted(differing.items(), key=lambda kv: -kv[1])[:20]
        out.print(f"{len(rep.max_abs_diff) - len(differing)} of {len(rep.max_abs_diff)} compared tensors are equal")
        for k, v in worst:
            out.print(f"  max |A-B| {v:.3g}  {escaped(k)}")
    out.print("identical" if rep.identical else "different")
