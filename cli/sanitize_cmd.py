"""`surgery sanitize SRC DST`: a checkpoint torch.load(weights_only=True) refuses, rewritten as one it loads."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from .common import console, escaped, handles_errors, human_bytes, option_values, print_json, shared_option, with_options
from surgery.sanitizing.options import SanitizeOptions

if TYPE_CHECKING:  # pragma: no cover
    from surgery.sanitizing import SanitizeReport

SHOWN = 20  # lines of each list on the terminal; --json has them all


def register(app: typer.Typer) -> None:
    app.command("sanitize")(sanitize)


@with_options(SanitizeOptions)
@handles_errors
def sanitize(
    src: Annotated[Path, typer.Argument(help="torch.save file to read (never modified, nothing in it is run).", show_default=False)],
    dst: Annotated[Path, typer.Argument(help="torch.save file to write, which torch.load(weights_only=True) loads.", show_default=False)],
    *,
    as_json: Annotated[bool, shared_option("as_json")] = False,
    **values: Any,
) -> None:
    """Rewrite a checkpoint that torch.load(weights_only=True) refuses as one it loads.

    argparse.Namespace, omegaconf configs, numpy arrays, scalars and dtypes, defaultdicts, sets
    and paths become plain data; anything else is dropped. Both lists are printed and stored in
    DST under "surgery.sanitize". Tensors are copied byte for byte; nothing in SRC is imported or run.

    Example: surgery sanitize timm_args.pth clean.pth --verify
    """
    from surgery.sanitizing import sanitize as run  # the rest loads only when it runs

    report = run(src, dst, SanitizeOptions.from_keywords(**option_values(SanitizeOptions, values)))
    if as_json:
        print_json(report.to_json())
        return
    _render(report)


def _render(rep: SanitizeReport) -> None:
    out = console()
    for title, items in (("converted", rep.converted), ("dropped", rep.dropped)):
        for path, what in list(items.items())[:SHOWN]:
            out.print(f"  {title} {escaped(path)}: {escaped(what)}")
        if len(items) > SHOWN:
            out.print(f"  ... {len(items) - SHOWN} more {title} (--json lists them all)")
    arrays = f" ({rep.arrays} from numpy arrays)" if rep.arrays else ""
    where = f"; notes in {escaped(rep.dst)}['surgery.sanitize']" if rep.notes_in_file else ""
    verified = ", verified with torch.load(weights_only=True) bit for bit" if rep.verified else ""
    out.print(f"{_count(len(rep.converted), 'value')} converted, {len(rep.dropped)} dropped; wrote {_count(rep.tensors, 'tensor')}{arrays} "
              f"to {escaped(rep.dst)} ({human_bytes(rep.bytes_written)}){verified}{where}")


def _count(n: int, what: str) -> str:
    return f"{n} {what}" + ("" if n == 1 else "s")
