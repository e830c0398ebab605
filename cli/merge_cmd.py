"""`surgery merge --method linear|task-arithmetic|ties|dare|slerp [--base B] A B ... --out OUT`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from surgery.merging.options import MergeOptions

from .common import (console, escaped, handles_errors, human_bytes, option_values, print_json, shared_option,
                     with_options)


def register(app: typer.Typer) -> None:
    app.command("merge")(merge)


@with_options(MergeOptions)
@handles_errors
def merge(
    models: Annotated[list[Path], typer.Argument(help="Checkpoints to merge, any format surgery reads.",
                                                 show_default=False)],
    *,
    method: Annotated[str, typer.Option("--method", "-m", metavar="linear|task-arithmetic|ties|dare|slerp",
                                        help="How to merge.", show_default=False)],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output: .safetensors, .pt, or a folder (sharded).",
                                      show_default=False)],
    as_json: Annotated[bool, shared_option("as_json")] = False,
    **values: Any,
) -> None:
    """Merge fine-tuned checkpoints of one architecture: linear (weighted mean), task-arithmetic
    (base + lambda * sum of weighted task vectors), ties (trim, elect sign, disjoint mean), dare
    (random drop and rescale, then task arithmetic), slerp (two checkpoints). Floating tensors in
    float64, cast back; integer buffers from the base (or first). Streamed."""
    from surgery.merging.merge import merge as run

    rep = run(models, out, method, MergeOptions.from_keywords(**option_values(MergeOptions, values)))
    if as_json:
        print_json(rep.to_json())
        return
    c = console()
    named = ([("base", rep.base)] if rep.base else []) + [("model", m) for m in rep.models]
    for (role, path), prefix in zip(named, rep.prefixes):
        c.print(f"  {role}  {escaped(path)}" + (f"  (stripped {escaped(prefix)})" if prefix else ""))
    params = ", ".join(f"{k} {_shown(v)}" for k, v in rep.to_json()["params"].items())
    c.print(f"{rep.method} ({params}): {len(rep.merged)} tensors merged in float64, {len(rep.copied)} integer "
            f"tensors from the {'base' if rep.base else 'first input'}; wrote {rep.format} {escaped(rep.out)} "
            f"({human_bytes(rep.bytes_written)})")


def _shown(v: object) -> str:
    if isinstance(v, list):
        return ",".join(f"{x:g}" for x in v)
    if isinstance(v, bool):
        return "yes" if v else "no"
    return f"{v:g}" if isinstance(v, float) else str(v)
