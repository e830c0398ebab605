"""`surgery demo`: the whole job on an embedded default, each step a real command you can repeat."""

from __future__ import annotations

import json
import shlex
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from .common import console, handles_errors

PER_CLASS, VAL_PER_CLASS = 4, 40
RUNS = ("from scratch", "head only", "two phases (head, then all)")


def register(app: typer.Typer) -> None:
    app.command("demo")(demo)


class _Steps:
    """Each step is a `surgery` command, echoed as a user would type it and run in this process
    by the same code the shell command runs."""

    def __init__(self, out):
        self.out = out

    def run(self, *args: str) -> float:
        import typer.main

        from .main import app

        self.out.print(f"\n[bold]$ surgery {' '.join(shlex.quote(a) for a in args)}[/bold]")
        sys.stdout.flush()
        t0 = time.perf_counter()
        code = typer.main.get_command(app).main(list(args), prog_name="surgery", standalone_mode=False)
        if code:
            raise typer.Exit(code)
        return time.perf_counter() - t0


def _result(run: Path) -> dict:
    return json.loads((run / "manifest.json").read_text())["results"]


def _epochs(run: Path) -> list[dict]:
    """The run's epochs from its metrics, the last line of each epoch winning (a resumed run repeats some)."""
    lines = (run / "metrics.jsonl").read_text().splitlines()
    by_epoch = {m["epoch"]: m for m in (json.loads(line) for line in lines if line.strip())}
    return [by_epoch[e] for e in sorted(by_epoch)]


def _seconds(run: Path) -> float:
    """Time spent in the run's epochs (training and validation), from its metrics."""
    return sum(m.get("seconds") or 0.0 for m in _epochs(run))


def phase_rows(run: Path, unfreeze_at: int, epochs: int) -> list[tuple[str, ...]]:
    """Two rows under a two-phase run: the best val accuracy of its head phase (epochs
    1..unfreeze_at) and of the epochs after the unfreeze, each with its epoch, told apart by epoch
    number alone, so a collapse after the unfreeze shows even when the run's best epoch comes
    before it. EMA figures count where the run kept them, as its best does."""
    ms = _epochs(run)
    rows = []
    for name, first, last in (("head phase", 1, unfreeze_at), ("after unfreeze", unfreeze_at + 1, epochs)):
        phase = [m for m in ms if first <= m["epoch"] <= last]
        best = max(phase, key=_score, default=None)  # the run's own rule: accuracy, then the lower loss
        acc = "" if best is None else f"{_score(best)[0]:.3f}"
        rows.append((f"  {name} ({first}-{last})", str(last - first + 1), acc, str(best["epoch"]) if best else "", ""))
    return rows


def _score(m: dict) -> tuple[float, float]:
    """(val accuracy, minus val loss) of an epoch's better weights, raw or averaged (--ema)."""
    raw = (m["val_acc"], -m["val_loss"])
    ema = (m["ema_val_acc"], -m.get("ema_val_loss", m["val_loss"])) if "ema_val_acc" in m else raw
    return max(raw, ema)


COLUMNS = ("run", "epochs", "val accuracy", "best epoch", "time in epochs")


def table_rows(runs: dict[str, tuple[Path, int, int | None]]) -> list[tuple[str, ...]]:
    """The comparison, one row per run in COLUMNS' order (its best epoch's val accuracy), and under
    a run with an unfreeze (its third item) one row per phase."""
    rows = []
    for name in RUNS:
        run, epochs, unfreeze_at = runs[name]
        r = _result(run)
        rows.append((name, str(epochs), f"{r['val_acc']:.3f}", str(r["best_epoch"]), f"{_seconds(run):.1f} s"))
        if unfreeze_at:
            rows += phase_rows(run, unfreeze_at, epochs)
    return rows


@handles_errors
def demo(
    workdir: Annotated[Path, typer.Option("--workdir", help="Where the demo writes its files.")] = Path("surgery-demo"),
) -> None:
    """Fine-tune someone else's checkpoint for a new task, end to end, on real data with no download.

    A ResNet-18 trained on all ten digits of one half of scikit-learn's digit images and saved
    through nn.DataParallel (made on first use, then cached) is inspected, cleaned, adapted to
    digits 5-9 with 4 labelled images per class from the other half, and fine-tuned in two phases
    against the same network from random weights (--compare-scratch); the head alone completes
    the comparison. Needs scikit-learn (pip install 'surgery[demo]').
    """
    import torch

    # one thread: CPU kernels split their sums by thread count, so the demo's numbers are the same
    # on every run of one machine (they still move between CPUs, whose kernels differ by ISA)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _demo(workdir)
    finally:
        torch.set_num_threads(threads)


def _demo(workdir: Path) -> None:
    out = console()
    t_start = time.perf_counter()
    ckpt, data = _checkpoint_and_data(out, workdir)
    runs = _fine_tune(out, _Steps(out), workdir, ckpt, data)
    _summary(out, runs, data, workdir / "runs", t_start)


def _checkpoint_and_data(out: Any, w: Path) -> tuple[Path, Path]:
    """Steps 1 and 2: the pretrained checkpoint (made once) and the new task's images."""
    from rich.markup import escape

    from surgery.demo import digits_imagefolder, pretrained_digits

    out.print("[bold]1. A checkpoint the way users get them[/bold]: torchvision ResNet-18 trained by a plain PyTorch "
              "loop on all ten digits (32 px) of one half of scikit-learn's digit images, saved through "
              "nn.DataParallel (made once, then cached)")
    ckpt, info = pretrained_digits(w / "pretrained", classes=range(10), half=0)
    out.print(f"   {ckpt}  (validation accuracy on digits 0-9: {info['val_acc']:.3f})", markup=False)
    data = w / f"digits5-9_other-half_{PER_CLASS}-per-class"  # never reuses a folder of other images
    if not (data / "val").is_dir():
        digits_imagefolder(data, classes=range(5, 10), size=32, per_class=PER_CLASS, val_per_class=VAL_PER_CLASS,
                           half=1)
    n_train, n_val = _count(data / "train"), _count(data / "val")
    out.print(f"\n[bold]2. The new task[/bold]: another labelling, digits 5-9 alone (a new 5-class head), with "
              f"{n_train // 5} labelled images per class ({n_train} to train on, {n_val} to validate), all from the "
              f"other half: images the checkpoint never saw. {escape(str(data))}/{{train,val}}/<class>/*.png")
    return ckpt, data


def _count(folder: Path) -> int:
    return sum(1 for _ in folder.rglob("*.png"))


def _fine_tune(out: Any, step: "_Steps", w: Path, ckpt: Path, data: Path) -> dict:
    """Steps 3 to 7: inspect, clean, adapt, the two-phase run against scratch, the head alone."""
    from surgery.demo import Plan

    plan = Plan.for_data(_count(data / "train"))
    out.print("\n[bold]3. What is in the checkpoint[/bold]")
    step.run("inspect", str(ckpt), "--depth", "1")
    out.print("\n[bold]4. Clean it[/bold]: strip the DataParallel prefix, convert to safetensors, verify bit for bit")
    clean = w / "resnet18_digits.safetensors"
    step.run("remap", str(ckpt), str(clean), "--auto", "--verify", "--force")

    ad, rd = w / "adapted", w / "runs"
    ad.mkdir(parents=True, exist_ok=True)
    rd.mkdir(parents=True, exist_ok=True)
    common = ["--data", str(data), "--batch-size", str(plan.batch_size), "--no-flip", "--force"]
    adapt_args = ["--arch", "resnet18", "--num-classes", "5", "--input-size", "32", "--force"]
    out.print(f"\n[bold]5. Adapt it to 5 classes[/bold]: a new head, the backbone frozen for the first "
              f"{plan.unfreeze_at} epochs (preset small-similar), then everything trains with the backbone at 0.1x "
              f"the head's learning rate")
    step.run("adapt", str(clean), *adapt_args, "--preset", "small-similar", "--unfreeze-at", str(plan.unfreeze_at),
             "--out", str(ad / "two-phase"))
    out.print(f"\n[bold]6. Fine-tune, and train from scratch to compare[/bold]: {plan.unfreeze_at} epochs head only, "
              f"then {plan.epochs - plan.unfreeze_at} with everything unfrozen (the backbone trains later, so every "
              f"epoch runs the whole network: no feature cache); then --compare-scratch trains the same network "
              f"from random weights, everything at one learning rate, for the same {plan.epochs} epochs")
    step.run("train", str(ad / "two-phase"), *common, "--epochs", str(plan.epochs), "--out", str(rd / "two-phase"),
             "--compare-scratch")
    step.run("evaluate", str(rd / "two-phase"), "--data", str(data))

    out.print(f"\n[bold]7. The head alone[/bold] ({plan.head_epochs} epochs: the backbone never trains, so it runs "
              f"once per image and each epoch trains the head on cached features)")
    step.run("adapt", str(clean), *adapt_args, "--freeze", "head-only", "--out", str(ad / "head-only"), "-q")
    step.run("train", str(ad / "head-only"), *common, "--epochs", str(plan.head_epochs), "--out",
             str(rd / "head-only"), "--quiet")
    return {RUNS[0]: (rd / "two-phase" / "scratch", plan.epochs, None),
            RUNS[1]: (rd / "head-only", plan.head_epochs, None),
            RUNS[2]: (rd / "two-phase", plan.epochs, plan.unfreeze_at)}


def _summary(out: Any, runs: dict, data: Path, rd: Path, t_start: float) -> None:
    """The comparison table, where the plots are, and the time the demo took."""
    from rich.table import Table

    n_train, n_val = _count(data / "train"), _count(data / "val")
    table = Table(title=f"digits 5-9, {n_train // 5} images per class, validation on {n_val} images",
                  title_justify="left", show_edge=False)
    for col in COLUMNS:
        table.add_column(col, justify="left" if col == "run" else "right")
    for row in table_rows(runs):
        table.add_row(*row)
    out.print()
    out.print(table)
    out.print(f"plots: {rd}/two-phase/compare.png, {rd}/{{two-phase,two-phase/scratch,head-only}}/"
              f"{{curves,confusion}}.png", markup=False)
    out.print(f"\nDone in {time.perf_counter() - t_start:.0f} s. Each step above is a command you can run on your own "
              f"checkpoint and images; `surgery COMMAND --help` lists the options.")
