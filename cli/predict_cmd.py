"""`surgery predict DIR IMAGES...`: the top classes of each image."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

import surgery

from .common import console, escaped, handles_errors, print_json, shared_option


def register(app: typer.Typer) -> None:
    app.command("predict")(predict)


@handles_errors
def predict(
    folder: Annotated[Path, typer.Argument(help="A trained run (or an adapted folder).", show_default=False)],
    images: Annotated[list[Path], typer.Argument(help="Image files, or folders of images.", show_default=False)],
    top_k: Annotated[int, typer.Option("--top-k", help="How many classes to show per image.")] = 1,
    device: Annotated[str, shared_option("device")] = "auto",
    image_size: Annotated[int, typer.Option("--image-size", help="Override the manifest's input size (0: keep).")] = 0,
    tta: Annotated[bool, typer.Option("--tta", help="Average the probabilities over test-time views (5 crops, and their mirrors unless trained with --no-flip).")] = False,
    as_json: Annotated[bool, shared_option("as_json")] = False,
    trust_code: Annotated[bool, typer.Option("--trust-code", help="Run the file or module factory the folder's manifest names (it is code; torchvision and timm models need no flag).")] = False,
) -> None:
    """Classify images with a trained model; class names come from its manifest.

    An image that cannot be read is reported (a warning, or "error" in --json) and the others are
    still classified.

    Example: surgery predict run/ cat.jpg dog.png photos/ --top-k 3
    """
    from surgery.trainer.evaluate import PREDICT_SCHEMA  # a torch-importing module: only when predicting

    preds = surgery.predict(folder, [str(p) for p in images], top_k=top_k, device=device, image_size=image_size or None,
                            trust_code=trust_code, tta=tta)
    if as_json:
        print_json({"schema": PREDICT_SCHEMA, "model": str(folder), "predictions": preds})
        return
    out = console()
    for p in preds:
        if "error" in p:
            sys.stderr.write(escaped(f"warning: skipped {p['path']}: {p['error']}", markup=False) + "\n")
            continue
        tops = ", ".join(f"{t['class']} {t['prob']:.3f}" for t in p["top"])
        out.print(escaped(f"{p['path']}: {tops}", markup=False), markup=False)  # paths and class names
