"""`surgery advise CKPT --arch ARCH --data DATA`: the preset the data calls for, measured."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from .common import console, handles_errors, print_json, shared_option


def register(app: typer.Typer) -> None:
    app.command("advise")(advise)


@handles_errors
def advise(
    ckpt: Annotated[Path, typer.Argument(help="The pretrained checkpoint.", show_default=False)],
    arch: Annotated[str, typer.Option("--arch", help="Architecture: a torchvision name, timm:NAME, or file.py:fn.", show_default=False)],
    data: Annotated[Path, typer.Option("--data", help="ImageFolder root (train/ and val/), or class folders with --val-split.", show_default=False)],
    val_split: Annotated[Optional[float], typer.Option("--val-split", help="Hold out this fraction when DATA has no val set.")] = None,
    input_size: Annotated[Optional[int], typer.Option("--input-size", help="Input size (default: the architecture's).")] = None,
    no_flip: Annotated[bool, typer.Option("--no-flip", help="No horizontal flips in the scratch probe (digits, text).")] = False,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the probe subset and the probes.")] = 0,
    device: Annotated[str, shared_option("device")] = "auto",
    as_json: Annotated[bool, shared_option("as_json")] = False,
) -> None:
    """Recommend a preset from the data: its size per class, and quick probes of how well the
    checkpoint's features transfer (against random features and a short scratch run).

    Example: surgery advise resnet18.pth --arch resnet18 --data data/
    """
    from surgery.advice import advise as run, preset_does

    a = run(ckpt, arch=arch, data=data, val_split=val_split, input_size=input_size, flip=not no_flip, seed=seed,
            device=device)
    if as_json:
        print_json(a.to_json())
        return
    out = console()
    what = {"better": f"{a.domain} domain", "tied": "frozen features no better than random",
            "worse": "frozen features worse than random"}[a.features]
    out.print(f"regime: {a.size} data ({a.per_class} per class), {what} -> preset {a.preset} "
              f"({preset_does(a.preset)})", markup=False)
    for r in a.reasons:
        out.print(f"  {r}", markup=False)
    for p in a.probes:
        out.print(f"  probe {p.name:<10} val acc {p.val_acc:.3f}  {p.seconds:5.1f}s  {p.detail}", markup=False)
    for w in a.warnings:
        out.print(f"warning: {w}", markup=False)
    out.print("next:", markup=False)
    for c in a.commands:
        out.print(f"  {c}", markup=False)
    out.print(f"({a.seconds:.1f}s)", markup=False)
