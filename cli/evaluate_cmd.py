"""`surgery evaluate DIR --data DATA`: accuracy, per-class accuracy and confusion matrix."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

import surgery
from surgery.errors import DataError

from .common import console, escaped, handles_errors, print_json, shared_option, skipped_lines


def register(app: typer.Typer) -> None:
    app.command("evaluate")(evaluate)


@handles_errors
def evaluate(
    folder: Annotated[Path, typer.Argument(help="A trained run (or an adapted folder).", show_default=False)],
    data: Annotated[Optional[Path], typer.Option("--data", help="ImageFolder root, folder of class folders, or CSV.", show_default=False)] = None,
    split: Annotated[str, typer.Option("--split", metavar="train|val|all", help="Which images to score.")] = "val",
    val_split: Annotated[Optional[float], typer.Option("--val-split", help="Fraction held out (default: the training run's).")] = None,
    seed: Annotated[Optional[int], typer.Option("--seed", help="Split seed (default: the training run's).")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Images per batch.")] = 64,
    workers: Annotated[int, typer.Option("--workers", help="DataLoader worker processes.")] = 0,
    device: Annotated[str, shared_option("device")] = "auto",
    image_size: Annotated[Optional[int], typer.Option("--image-size", help="Override the manifest's input size.")] = None,
    tta: Annotated[bool, typer.Option("--tta", help="Also score with test-time augmentation (5 crops, and their mirrors unless trained with --no-flip) and show the difference.")] = False,
    as_json: Annotated[bool, shared_option("as_json")] = False,
    trust_code: Annotated[bool, typer.Option("--trust-code", help="Run the file or module factory the folder's manifest names (it is code; torchvision and timm models need no flag).")] = False,
) -> None:
    """Score a model on labelled images: accuracy, loss, per-class accuracy, confusion matrix.

    Example: surgery evaluate run/ --data data/ --split val
    """
    if data is None:
        raise DataError("--data is required: an ImageFolder root, a folder of class folders, or a CSV")
    rep = surgery.evaluate(folder, data, split=split, val_split=val_split, seed=seed, batch_size=batch_size,
                           workers=workers, device=device, image_size=image_size, trust_code=trust_code, tta=tta)
    if as_json:
        print_json(rep.to_json())
        return
    from rich.table import Table

    out = console()
    out.print(f"{rep.split}: {rep.images} images, accuracy {rep.accuracy:.4f}, loss {rep.loss:.4f}", markup=False)
    if rep.tta is not None:
        t = rep.tta
        out.print(f"with TTA ({t['views']} views): accuracy {t['accuracy']:.4f} ({t['difference']:+.4f}), "
                  f"loss {t['loss']:.4f}", markup=False)
    for line in skipped_lines(rep.skipped):
        out.print(line, markup=False)
    table = Table(title="confusion matrix (rows: true, columns: predicted)", title_justify="left", show_edge=False)
    table.add_column("class")
    for c in rep.classes:
        table.add_column(escaped(c), justify="right")  # class names are folder names: escaped
    table.add_column("accuracy", justify="right")
    for c, row, acc in zip(rep.classes, rep.confusion, rep.per_class):
        table.add_row(escaped(c), *map(str, row), "-" if acc is None else f"{acc:.3f}")
    out.print(table)
