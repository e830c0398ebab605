"""`surgery demo`: the main job on an embedded default, each step a real command you can repeat."""

from __future__ import annotations

import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Annotated

import typer

from .common import console, handles_errors


def register(app: typer.Typer) -> None:
    app.command("demo")(demo)


def _step(out, args: list[str]) -> None:
    out.print(f"\n[bold]$ surgery {' '.join(shlex.quote(a) for a in args)}[/bold]")
    sys.stdout.flush()
    code = subprocess.call([sys.executable, "-m", "cli.main", *args])
    if code != 0:
        raise typer.Exit(code)


@handles_errors
def demo(
    workdir: Annotated[Path, typer.Option("--workdir", help="Where the demo writes its files.")] = Path("surgery-demo"),
) -> None:
    """Make a checkpoint the way users get them (saved through nn.DataParallel), then inspect and clean it."""
    out = console()
    workdir.mkdir(parents=True, exist_ok=True)
    ckpt = workdir / "dataparallel_pt" / "dataparallel_pt.pt"
    t0 = time.perf_counter()
    if not ckpt.exists():
        out.print("Making a pretrained-style checkpoint: torchvision mobilenet_v3_small wrapped in nn.DataParallel, "
                  "saved with torch.save (keys start with 'module.') ...")
        from fixtures.generate import build

        ckpt = Path(build("dataparallel_pt", workdir / "dataparallel_pt"))
    clean = workdir / "clean.safetensors"
    _step(out, ["inspect", str(ckpt)])
    _step(out, ["remap", str(ckpt), str(clean), "--auto", "--verify", "--force"])
    _step(out, ["inspect", str(clean), "--depth", "1"])
    out.print(f"\nDone in {time.perf_counter() - t0:.1f} s. Try it on your own file: surgery inspect PATH")
