"""`surgery demo`: the whole job on an embedded default, each step a real command you can repeat."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Annotated

import typer

from surgery.launch import module_command

from .common import console, handles_errors

EPOCHS, LR, PER_CLASS = 10, "3e-3", 4


def register(app: typer.Typer) -> None:
    app.command("demo")(demo)


class _Steps:
    def __init__(self, out):
        self.out = out

    def run(self, *args: str, quiet: bool = False) -> float:
        """Echo and run one `surgery` command in a child process, as a user would type it."""
        self.out.print(f"\n[bold]$ surgery {' '.join(shlex.quote(a) for a in args)}[/bold]")
        sys.stdout.flush()
        t0 = time.perf_counter()
        code = subprocess.call(module_command(f"{__package__}.main", args),  # never imports from the cwd
                               stdout=subprocess.DEVNULL if quiet else None)
        if code != 0:
            raise typer.Exit(code)
        return time.perf_counter() - t0


def _result(run: Path) -> dict:
    return json.loads((run / "manifest.json").read_text())["results"]


@handles_errors
def demo(
    workdir: Annotated[Path, typer.Option("--workdir", help="Where the demo writes its files.")] = Path("surgery-demo"),
) -> None:
    """Fine-tune someone else's checkpoint for new classes, end to end, on real data with no download.

    A ResNet-18 trained on digits 0-4 and saved through nn.DataParallel (made on first use, then
    cached) is inspected, cleaned, adapted to digits 5-9 with 4 labelled images per class, and
    fine-tuned in two phases; the same budget head-only and from scratch gives the comparison.
    """
    from fixtures.generate import digits_imagefolder
    from fixtures.pretrained import pretrained_digits, random_init

    out = console()
    t_start = time.perf_counter()
    step = _Steps(out)
    w = workdir
    out.print("[bold]1. A checkpoint the way users get them[/bold]: torchvision ResNet-18 trained by a plain PyTorch "
              "loop on scikit-learn's digits 0-4 (32 px), saved through nn.DataParallel (made once, then cached)")
    ckpt, info = pretrained_digits(w / "pretrained")
    out.print(f"   {ckpt}  (validation accuracy on digits 0-4: {info['val_acc']:.3f})")
    data = w / f"digits5-9_{PER_CLASS}-per-class"
    if not (data / "val").is_dir():
        # a few labelled images per class; all the others are the validation set
        digits_imagefolder(data, classes=range(5, 10), size=32, val_fraction=1 - PER_CLASS / 181)
    n_train = sum(1 for _ in (data / "train").rglob("*.png"))
    n_val = sum(1 for _ in (data / "val").rglob("*.png"))
    out.print(f"\n[bold]2. The new task[/bold]: digits 5-9 with {n_train // 5} labelled images per class "
              f"({n_train} to train on, {n_val} to validate): {data}/{{train,val}}/<class>/*.png")

    out.print("\n[bold]3. What is in the checkpoint[/bold]")
    step.run("inspect", str(ckpt), "--depth", "1")
    out.print("\n[bold]4. Clean it[/bold]: strip the DataParallel prefix, convert to safetensors, verify bit for bit")
    clean = w / "resnet18_digits0-4.safetensors"
    step.run("remap", str(ckpt), str(clean), "--auto", "--verify", "--force")

    out.print("\n[bold]5. Adapt it to 5 new classes[/bold]: new head, backbone frozen for the first epochs "
              "(preset small-similar), then everything trains with the backbone at 0.1x the head's learning rate")
    runs: dict[str, tuple[Path, float]] = {}
    adapted = w / "adapted"
    adapted.mkdir(parents=True, exist_ok=True)
    (w / "runs").mkdir(parents=True, exist_ok=True)
    train_args = ["--data", str(data), "--epochs", str(EPOCHS), "--lr", LR, "--batch-size", "16", "--no-flip", "--force"]
    step.run("adapt", str(clean), "--arch", "resnet18", "--num-classes", "5", "--preset", "small-similar",
             "--unfreeze-at", "3", "--input-size", "32", "--out", str(adapted / "two-phase"), "--force")
    out.print("\n[bold]6. Fine-tune[/bold]: 3 epochs head only (on cached backbone features), then 7 with everything unfrozen")
    runs["two phases (head, then all)"] = (w / "runs" / "two-phase",
                                           step.run("train", str(adapted / "two-phase"), *train_args,
                                                    "--out", str(w / "runs" / "two-phase")))
    step.run("evaluate", str(w / "runs" / "two-phase"), "--data", str(data))

    out.print(f"\n[bold]7. The comparison[/bold]: the same {EPOCHS}-epoch budget with only the head trained, "
              f"and the same architecture from random weights")
    step.run("adapt", str(clean), "--arch", "resnet18", "--num-classes", "5", "--freeze", "head-only",
             "--input-size", "32", "--out", str(adapted / "head-only"), "--force", quiet=True)
    runs["head only"] = (w / "runs" / "head-only",
                         step.run("train", str(adapted / "head-only"), *train_args, "--out", str(w / "runs" / "head-only"),
                                  "--quiet"))
    scratch_ckpt = random_init(w / "pretrained" / "resnet18_random.pth")
    step.run("adapt", str(scratch_ckpt), "--arch", "resnet18", "--num-classes", "5", "--freeze", "none",
             "--input-size", "32", "--out", str(adapted / "scratch"), "--force", quiet=True)
    runs["from scratch"] = (w / "runs" / "scratch",
                            step.run("train", str(adapted / "scratch"), *train_args, "--out", str(w / "runs" / "scratch"),
                                     "--quiet"))

    from rich.table import Table

    table = Table(title=f"digits 5-9, {n_train // 5} images per class, {EPOCHS} epochs, validation on {n_val} images",
                  title_justify="left", show_edge=False)
    for col in ("run", "val accuracy", "best epoch", "train wall time", "plots"):
        table.add_column(col, justify="right" if col in ("val accuracy", "best epoch", "train wall time") else "left")
    order = ["from scratch", "head only", "two phases (head, then all)"]
    for name in order:
        run, secs = runs[name]
        r = _result(run)
        table.add_row(name, f"{r['val_acc']:.3f}", str(r["best_epoch"]), f"{secs:.1f} s",
                      f"{run / 'curves.png'}, {run / 'confusion.png'}")
    out.print()
    out.print(table)
    out.print(f"\nDone in {time.perf_counter() - t_start:.0f} s. Each step above is a command you can run on your own "
              f"checkpoint and images; `surgery COMMAND --help` lists the options.")
