"""`surgery average A B C ... --out OUT`: the weighted mean of checkpoints of one architecture."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from .common import console, escaped, handles_errors, human_bytes, print_json, shared_option


def register(app: typer.Typer) -> None:
    app.command("average")(average)


@handles_errors
def average(
    inputs: Annotated[list[Path], typer.Argument(help="Checkpoints to average (two or more), any format surgery reads.",
                                                 show_default=False)],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output: .safetensors, .pt, or a folder (sharded).",
                                      show_default=False)],
    weights: Annotated[Optional[str], typer.Option("--weights", metavar="W1,W2,...",
                                                   help="One weight per checkpoint (default: equal).")] = None,
    force: Annotated[bool, shared_option("force")] = False,
    allow_global: Annotated[Optional[list[str]], shared_option("allow_globals")] = None,
    as_json: Annotated[bool, shared_option("as_json")] = False,
) -> None:
    """Average checkpoints tensor by tensor: floating tensors in float64, cast back to their dtype;
    integer buffers (num_batches_tracked) from the first. Wrapper prefixes (module., _orig_mod.,
    _forward_module.) are stripped; names, shapes and dtypes must agree. Streamed."""
    from surgery.merging.average import average as run
    from surgery.merging.options import weights_text

    rep = run(inputs, out, weights_text(weights), force=force, allow_globals=tuple(allow_global or ()))
    if as_json:
        print_json(rep.to_json())
        return
    c = console()
    for path, weight, prefix in zip(rep.inputs, rep.weights, rep.prefixes):
        c.print(f"  {escaped(path)}  weight {weight:g}" + (f"  (stripped {escaped(prefix)})" if prefix else ""))
    c.print(f"{len(rep.averaged)} tensors averaged in float64, {len(rep.copied)} integer tensors from the first "
            f"input; wrote {rep.format} {escaped(rep.out)} ({human_bytes(rep.bytes_written)})")
