"""`surgery train DIR --data DATA --epochs N --lr LR --out OUT`: fine-tune an adapted model."""

from __future__ import annotations

import os
import sys
import time
from typing import Annotated, Any, Optional

import typer
from typer.core import TyperCommand

import surgery
from surgery.errors import TrainError
from surgery.trainer.options import TrainOptions
from surgery.trainer.distributed import is_main_process, relaunch

from .common import console, escaped, handles_errors, option_values, print_json, shared_option, with_options
from .train_extras import run_compare, run_find_lr

_RESUME_LAST = "\0last"
_ENTRY = __spec__.name if __spec__ is not None else __name__  # what --nproc starts under torchrun: this module


class _OptionalResume(TyperCommand):
    """``--resume`` alone continues OUT's last.pt; ``--resume PATH`` (an existing file) that one.
    Click options cannot take an optional value, so the bare flag is rewritten before parsing."""

    def parse_args(self, ctx, args):
        fixed: list[str] = []
        i = 0
        while i < len(args):
            a = args[i]
            if a == "--resume":
                nxt = args[i + 1] if i + 1 < len(args) else None
                if nxt is not None and not nxt.startswith("-") and os.path.isfile(nxt):
                    fixed += ["--resume", nxt]
                    i += 2
                    continue
                fixed.append(f"--resume={_RESUME_LAST}")
            else:
                fixed.append(a)
            i += 1
        ctx.meta["surgery.raw_args"] = list(args)
        return super().parse_args(ctx, fixed)


def register(app: typer.Typer) -> None:
    app.command("train", cls=_OptionalResume)(train)


class Renderer:
    """Turns the runner's events into rich progress bars (TTY), plain epoch lines, or nothing."""

    SKIPPED_SHOWN = 5  # unreadable images listed on screen; run.log lists every one

    def __init__(self, quiet: bool, as_json: bool):
        self.quiet, self.as_json = quiet, as_json
        # `surgery train ... | head` must not kill the run: output to a closed pipe is dropped
        self.out = console(stderr=as_json, survive_pipe=True)
        self.live = not quiet and self.out.is_terminal
        self.progress = None
        self.task = None
        self.images = 0
        self.t0 = 0.0
        self.skipped = 0

    def __call__(self, event: str, info: dict) -> None:
        if self.quiet or not is_main_process():
            return
        if event == "log":
            self.log(info["message"])
        elif event == "epoch_start" and self.live:
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                       TimeRemainingColumn)

            if self.progress is None:
                self.progress = Progress(TextColumn("{task.description}", markup=False), BarColumn(), MofNCompleteColumn(),
                                         TextColumn("{task.fields[rate]}"), TextColumn("loss {task.fields[loss]}"),
                                         TimeElapsedColumn(), TimeRemainingColumn(), console=self.out, transient=False)
                self.progress.start()
            self.task = self.progress.add_task(f"epoch {info['epoch']}/{info['epochs']} [{info['phase']}]",
                                               total=info["steps"], rate="", loss="-")
            self.images, self.t0 = 0, time.perf_counter()
        elif event == "step" and self.live and self.task is not None:
            self.images += info["images"]
            dt = time.perf_counter() - self.t0
            self.progress.update(self.task, advance=1, loss=f"{info['loss']:.4f}",
                                 rate=f"{self.images / dt:.0f} img/s" if dt > 0 else "")
        elif event == "epoch_end":
            line = (f"epoch {info['epoch']} [{info['phase']}] train loss {info['train_loss']:.4f} acc "
                    f"{info['train_acc']:.3f} | val loss {info['val_loss']:.4f} acc {info['val_acc']:.3f} | "
                    + (f"ema val loss {info['ema_val_loss']:.4f} acc {info['ema_val_acc']:.3f} | "
                       if "ema_val_acc" in info else "")
                    + f"{info['images_per_s'] or 0:.0f} img/s"
                    + (f" *{' (ema)' if info['best'].get('weights') == 'ema' else ''}" if info.get("improved") else ""))
            self.out.print(line, markup=False)
        elif event == "lr_find" and self.live:  # plain output prints the run.log line instead
            from surgery.trainer.lr_find import fmt_lr

            line = (f"lr {fmt_lr(info['lr'])} (found){' for the scratch run' if info.get('run') == 'scratch' else ''}"
                    + (f" for the phase unfrozen at epoch {info['epoch']}" if info.get("epoch") else ""))
            self.out.print(line, markup=False)  # above the live progress bar when there is one
        elif event == "end":
            self.close()

    def log(self, msg: str) -> None:
        """A run.log line on screen, but for epoch lines (epoch_end prints them), the Ctrl-C line
        (the error message says it) and all but the first few skipped images."""
        if msg.startswith("  skipped "):
            self.skipped += 1
            if self.skipped <= self.SKIPPED_SHOWN:
                self.out.print(escaped(msg, markup=False), markup=False)
            return
        self._more_skipped()
        if not msg.startswith(("epoch ", "interrupted during epoch ")):
            self.out.print(escaped(msg, markup=False), markup=False)  # class and file names: escaped

    def _more_skipped(self) -> None:
        if self.skipped > self.SKIPPED_SHOWN:
            self.out.print(f"  ... {self.skipped - self.SKIPPED_SHOWN} more (run.log lists every one)", markup=False)
        self.skipped = 0

    def close(self) -> None:
        self._more_skipped()
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


@with_options(TrainOptions)
@handles_errors
def train(
    ctx: typer.Context,
    *,
    find_lr: Annotated[bool, typer.Option("--find-lr", help="Only run the learning-rate range test: print the curve and the lr it suggests.")] = False,
    compare_scratch: Annotated[bool, typer.Option("--compare-scratch", help="Also train the same architecture from random weights with the same budget, and compare.")] = False,
    no_augment: Annotated[bool, typer.Option("--no-augment", help="Same as --augment none.")] = False,
    nproc: Annotated[Optional[int], typer.Option("--nproc", help="Launch N processes with torchrun (DDP).")] = None,
    quiet: Annotated[bool, shared_option("quiet")] = False,
    as_json: Annotated[bool, shared_option("as_json")] = False,
    **values: Any,
) -> None:
    """Fine-tune an adapted model in the phases its manifest schedules.

    Discriminative learning rates, checkpoints every epoch, and a best model you can load with
    surgery.load_adapted(OUT).

    Example: surgery train adapted/ --data data/ --epochs 10 --out run/
    """
    opts = _options(ctx, values, no_augment, find_lr)
    if compare_scratch and (values["resume"] not in (None, _RESUME_LAST) or nproc is not None or find_lr):
        raise TrainError("--compare-scratch runs both trainings in one process, and its --resume continues both from "
                         "OUT (no PATH); drop --nproc, --find-lr, the PATH after --resume")
    if nproc is not None:
        raise typer.Exit(relaunch(nproc, _forwarded(ctx), entry=_ENTRY))
    if find_lr:
        return run_find_lr(opts, as_json)
    renderer = Renderer(quiet, as_json)
    if compare_scratch:
        return run_compare(opts, renderer, as_json)
    try:
        result = surgery.train(options=opts, observer=renderer)
    finally:
        renderer.close()
    if not is_main_process():
        return
    if as_json:
        print_json(result.to_json())
        return
    render(result)


def _options(ctx: typer.Context, values: dict, no_augment: bool, find_lr: bool) -> TrainOptions:
    """The run's options from the command line: --resume alone is True; what a resumed run's
    command line leaves out (--epochs, --lr) comes from its checkpoint."""
    given = option_values(TrainOptions, values, ctx, resuming=values["resume"] is not None)
    if no_augment and given["augment"] not in ("light", "none"):
        raise TrainError(f"--no-augment and --augment {given['augment']} contradict each other; give one")
    opts = TrainOptions(**dict(given, augment="none" if no_augment else given["augment"],
                               resume=True if given["resume"] == _RESUME_LAST else given["resume"]))
    return opts.require("data") if find_lr else opts.require("data", "out")


def _forwarded(ctx: typer.Context) -> list[str]:
    """This command's arguments, for the processes torchrun starts (--nproc is dropped there)."""
    argv = ctx.meta.get("surgery.raw_args") or sys.argv[1:]
    return argv[1:] if argv and argv[0] == "train" else list(argv)


def render(result: Any) -> None:
    out = console(survive_pipe=True)
    stop = " (stopped early)" if result.stopped_early else ""
    out.print(f"best epoch {result.best_epoch} of {result.epochs_run}{stop}: val acc {result.best_val_acc:.4f}, "
              f"val loss {result.best_val_loss:.4f}", markup=False)
    if result.skipped:
        out.print(f"skipped {len(result.skipped)} unreadable images (listed in run.log)", markup=False)
    for u in result.unfreeze:
        out.print(u["message"], markup=False)
    for b, name in ((result.head_phase_best, "head phase"), (result.after_unfreeze_best, "after the unfreeze")):
        if b is not None:
            out.print(f"best {name}: epoch {b['epoch']}, val acc {b['val_acc']:.4f}, val loss {b['val_loss']:.4f}",
                      markup=False)
    for g in result.guard:
        from surgery.trainer.phases import guard_message

        out.print(guard_message(g), markup=False)
    if result.best_weights == "ema":
        out.print("kept the averaged (--ema) weights: they scored higher than the raw ones", markup=False)
    if result.per_class_val_acc is not None:
        out.print(escaped("skewed classes; val acc per class: "
                          + ", ".join(f"{c} {v:.3f}" for c, v in result.per_class_val_acc.items()), markup=False),
                  markup=False)
    if result.cache_used:
        out.print("trained the head on cached backbone features", markup=False)
    out.print(f"wrote {result.out} (model.safetensors, manifest.json, metrics.jsonl, curves.png, confusion.png)",
              markup=False)


def _main() -> None:
    """``python -m cli.train_cmd ARGS``: what ``--nproc`` launches under torchrun."""
    app = typer.Typer(pretty_exceptions_enable=False, add_completion=False)
    register(app)

    @app.callback()
    def _root() -> None:
        """surgery train (torchrun entry)"""

    app(["train", *sys.argv[1:]], prog_name="surgery")


if __name__ == "__main__":
    _main()
