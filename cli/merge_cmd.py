"""`surgery merge --method linear|task-arithmetic|ties|dare|slerp [--base B] A B ... --out OUT`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from .common import console, escaped, handles_errors, human_bytes, print_json, shared_option


def register(app: typer.Typer) -> None:
    app.command("merge")(merge)


@handles_errors
def merge(
    models: Annotated[list[Path], typer.Argument(help="Checkpoints to merge, any format surgery reads.",
                                                 show_default=False)],
    method: Annotated[str, typer.Option("--method", "-m", metavar="linear|task-arithmetic|ties|dare|slerp",
                                        help="How to merge.", show_default=False)],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output: .safetensors, .pt, or a folder (sharded).",
                                      show_default=False)],
    base: Annotated[Optional[Path], typer.Option(
        "--base", help="The checkpoint the models were fine-tuned from (task-arithmetic, ties, dare; slerp's t=0).",
        show_default=False)] = None,
    weights: Annotated[Optional[str], typer.Option("--weights", metavar="W1,W2,...",
                                                   help="One weight per model, the base excluded (default: 1 each).",
                                                   show_default=False)] = None,
    density: Annotated[Optional[float], typer.Option(
        "--density", help="ties, dare: the fraction of each task vector kept, in (0, 1].", show_default=False)] = None,
    lam: Annotated[Optional[float], typer.Option("--lambda", help="task-arithmetic, ties, dare: scales the merged "
                                                 "task vector (default 1).", show_default=False)] = None,
    t: Annotated[Optional[float], typer.Option("--t", "-t", help="slerp: 0 gives the first (or --base), 1 the other "
                                               "(default 0.5).", show_default=False)] = None,
    normalize: Annotated[Optional[bool], typer.Option(
        "--normalize/--no-normalize", help="Divide by the sum of the weights (ties: of those that "
        "agree; default: linear and ties yes, task-arithmetic and dare no).", show_default=False)] = None,
    rescale: Annotated[Optional[str], typer.Option(
        "--rescale", metavar="density|l1|none", help="dare: scale what is kept by 1/density (the paper), to the "
        "delta's l1 norm (mergekit), or not (default density).", show_default=False)] = None,
    seed: Annotated[Optional[int], typer.Option("--seed", help="dare: seed of the random drop (default 0).",
                                                show_default=False)] = None,
    force: Annotated[bool, shared_option("force")] = False,
    allow_global: Annotated[Optional[list[str]], shared_option("allow_globals")] = None,
    as_json: Annotated[bool, shared_option("as_json")] = False,
) -> None:
    """Merge fine-tuned checkpoints of one architecture: linear (weighted mean), task-arithmetic
    (base + lambda * sum of weighted task vectors), ties (trim, elect sign, disjoint mean), dare
    (random drop and rescale, then task arithmetic), slerp (two checkpoints). Floating tensors in
    float64, cast back; integer buffers from the base (or first). Streamed."""
    from surgery.errors import RuleError
    from surgery.merging.merge import merge as run

    try:
        w = [float(x) for x in weights.split(",")] if weights is not None else None
    except ValueError:
        raise RuleError(f"--weights {weights!r}: give numbers separated by commas, e.g. 1,1,2") from None
    rep = run(models, out, method, base=base, weights=w, density=density, lam=lam, t=t, normalize=normalize,
              rescale=rescale, seed=seed, force=force, allow_globals=tuple(allow_global or ()))
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
