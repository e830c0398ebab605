"""`surgery soup RUN1 RUN2 ... --data DATA --out OUT`: a model soup of trained runs of one architecture."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from .common import console, escaped, handles_errors, print_json, shared_option


def register(app: typer.Typer) -> None:
    app.command("soup")(soup)


@handles_errors
def soup(
    runs: Annotated[list[Path], typer.Argument(help="Trained runs (two or more) fine-tuned from one adapted folder.",
                                               show_default=False)],
    data: Annotated[Optional[Path], typer.Option("--data", help="The runs' data: its validation images choose the soup.",
                                                 show_default=False)] = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Output folder, a trained run.",
                                                show_default=False)] = None,
    method: Annotated[str, typer.Option("--method", metavar="greedy|uniform",
                                        help="What OUT holds: the greedy soup, or the mean of every run.")] = "greedy",
    val_split: Annotated[Optional[float], typer.Option("--val-split", help="Fraction held out (default: the runs').")] = None,
    seed: Annotated[Optional[int], typer.Option("--seed", help="Split seed (default: the runs').")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Images per batch.")] = 64,
    workers: Annotated[int, typer.Option("--workers", help="DataLoader worker processes.")] = 0,
    device: Annotated[str, shared_option("device")] = "auto",
    force: Annotated[bool, shared_option("force")] = False,
    as_json: Annotated[bool, shared_option("as_json")] = False,
    trust_code: Annotated[bool, typer.Option("--trust-code", help="Run the file or module factory the runs' manifests name (it is code; torchvision and timm models need no flag).")] = False,
) -> None:
    """Mix trained runs: the greedy soup (best first, each run kept only when it improves validation
    accuracy beyond the noise) and the uniform mean, BatchNorm statistics averaged or recomputed,
    and the loss between the two best runs before any mixing. OUT evaluates, predicts and exports
    like a run.

    Example: surgery soup run1 run2 run3 --data data/ --out soup/
    """
    import surgery
    from surgery.errors import DataError, OutputError

    if data is None:
        raise DataError("--data is required: the data the runs trained on (its validation images choose the soup)")
    if out is None:
        raise OutputError("--out is required: the folder to write the soup into")
    c = console()
    rep = surgery.soup(runs, data, out, method=method, val_split=val_split, seed=seed, batch_size=batch_size,
                       workers=workers, device=device, trust_code=trust_code, force=force,
                       observer=None if as_json else _progress(c))
    if as_json:
        print_json(rep.to_json())
        return
    acc = rep.val_acc
    c.print(f"uniform soup: val acc {acc['uniform']:.4f}; greedy soup: val acc {acc['greedy']:.4f}, "
            f"kept {len(rep.kept)} of {len(rep.ingredients)}; best run: val acc {acc['best_run']:.4f} "
            f"({rep.images} validation images)", markup=False)
    c.print(f"wrote {escaped(rep.out)}: the {rep.method} soup, val acc {acc['out']:.4f} ({_verdict(rep)})")


def _progress(c):
    """Each finding as it comes: the runs, the interpolation (before mixing), the greedy steps, BatchNorm."""
    def show(event: str, info: dict) -> None:
        if event == "ingredient":
            c.print(f"  {escaped(info['path'])}  val acc {info['val_acc']:.4f}")
        elif event == "interpolation":
            losses = "  ".join(f"{a:g}: {x:.3f}" for a, x in zip(info["alphas"], info["losses"]))
            c.print(f"loss from {escaped(info['runs'][0])} to {escaped(info['runs'][1])}: {losses}")
            if info["warning"]:
                c.print(f"warning: {escaped(info['warning'])}")
        elif event == "step":
            what = "kept" if info["kept"] else "refused"
            c.print(f"  {what} {escaped(info['path'])}: soup val acc {info['soup_val_acc']:.4f}, "
                    f"{100 * info['gain']:+.1f} points (noise +-{100 * info['noise']:.1f})")
        elif event == "bn" and info["recomputed"] is not None:
            c.print(f"BatchNorm statistics: averaged val acc {info['averaged']:.4f}, recomputed on "
                    f"{info['images']} training images {info['recomputed']:.4f}; kept the {info['kept']}")
    return show


def _verdict(rep) -> str:
    if rep.verdict == "best-run":
        return "no run improved the best one beyond the noise: OUT holds the best run's weights"
    if rep.verdict == "soup":
        return f"{100 * (rep.val_acc['out'] - rep.val_acc['best_run']):+.1f} points over the best run"
    return "no better than the best run"
