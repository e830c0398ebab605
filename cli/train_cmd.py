"""`surgery train DIR --data DATA --epochs N --lr LR --out OUT`: fine-tune an adapted model."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Annotated, Any, Optional

import typer
from typer.core import TyperCommand

import surgery
from surgery.errors import TrainError
from surgery.trainer.distributed import is_main_process, relaunch

from .common import console, escaped, handles_errors, print_json
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


@handles_errors
def train(
    ctx: typer.Context,
    adapted: Annotated[Path, typer.Argument(help="Folder written by `surgery adapt` (or an earlier train run).", show_default=False)],
    data: Annotated[Optional[Path], typer.Option("--data", help="ImageFolder root (train/ and val/), one folder of class folders with --val-split, or a CSV of path,label.", show_default=False)] = None,
    epochs: Annotated[int, typer.Option("--epochs", help="Epochs in the whole run (all phases); with --resume, another count changes the run's length.")] = 10,
    lr: Annotated[str, typer.Option("--lr", metavar="auto|LR", help="Learning rate of the head (pretrained groups use lr x their multiplier); auto: found by a range test before training.")] = "auto",
    find_lr: Annotated[bool, typer.Option("--find-lr", help="Only run the learning-rate range test: print the curve and the lr it suggests.")] = False,
    compare_scratch: Annotated[bool, typer.Option("--compare-scratch", help="Also train the same architecture from random weights with the same budget, and compare.")] = False,
    out: Annotated[Optional[Path], typer.Option("--out", help="Folder for the run (must not exist, unless --force or --resume).", show_default=False)] = None,
    val_split: Annotated[Optional[float], typer.Option("--val-split", help="Hold out this fraction (stratified, seeded) when DATA has no val set.")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Images per step (per process).")] = 32,
    workers: Annotated[int, typer.Option("--workers", help="DataLoader worker processes.")] = 0,
    optimizer: Annotated[str, typer.Option("--optimizer", metavar="adamw|sgd", help="AdamW, or SGD with momentum 0.9.")] = "adamw",
    weight_decay: Annotated[Optional[float], typer.Option("--weight-decay", help="Default 0.05 (adamw) / 1e-4 (sgd); never on norms and biases.")] = None,
    schedule: Annotated[str, typer.Option("--schedule", metavar="cosine|onecycle|constant", help="LR schedule over the whole run, per batch.")] = "cosine",
    warmup_epochs: Annotated[Optional[float], typer.Option("--warmup-epochs", help="Linear warmup length in epochs; 0: no warmup (default 1, none for a one-epoch run).")] = None,
    label_smoothing: Annotated[float, typer.Option("--label-smoothing", help="Cross-entropy label smoothing.")] = 0.0,
    clip_grad: Annotated[Optional[float], typer.Option("--clip-grad", help="Clip the gradient norm to this.")] = None,
    patience: Annotated[Optional[int], typer.Option("--patience", help="Stop after this many epochs without a better val accuracy.")] = None,
    image_size: Annotated[Optional[int], typer.Option("--image-size", help="Override the manifest's input size.")] = None,
    augment: Annotated[str, typer.Option("--augment", metavar="none|light|randaugment|trivialaugment", help="Training augmentation: light = random resized crop and flip; randaugment / trivialaugment add torchvision's policies.")] = "light",
    no_augment: Annotated[bool, typer.Option("--no-augment", help="Same as --augment none.")] = False,
    mixup: Annotated[float, typer.Option("--mixup", metavar="ALPHA", help="Mix pairs of images and labels (Beta(ALPHA, ALPHA); 0.2 is usual; 0: off).")] = 0.0,
    cutmix: Annotated[float, typer.Option("--cutmix", metavar="ALPHA", help="Paste a patch of another image, labels mixed by area (1.0 is usual; 0: off).")] = 0.0,
    ema: Annotated[Optional[float], typer.Option("--ema", metavar="DECAY", help="Keep an exponential moving average of the weights (e.g. 0.999); validated beside the raw weights, the better saved.", show_default=False)] = None,
    accumulate: Annotated[int, typer.Option("--accumulate", metavar="N", help="Sum gradients over N batches per optimizer step (effective batch N x --batch-size).")] = 1,
    class_weights: Annotated[str, typer.Option("--class-weights", metavar="none|auto", help="auto: weight each class's loss by n / (classes x its images).")] = "none",
    balanced_sampler: Annotated[bool, typer.Option("--balanced-sampler", help="Draw training images so every class is equally likely.")] = False,
    no_guard: Annotated[bool, typer.Option("--no-guard", help="After an unfreeze, do not undo a val loss past 2x the head phase's best (by default the best weights come back and the unfrozen groups' lr drops tenfold).")] = False,
    tensorboard: Annotated[bool, typer.Option("--tensorboard", help="Write TensorBoard event files to OUT/tensorboard (needs the tensorboard package).")] = False,
    no_flip: Annotated[bool, typer.Option("--no-flip", help="No horizontal flips (digits, text).")] = False,
    seed: Annotated[int, typer.Option("--seed", help="Seed of everything random.")] = 0,
    device: Annotated[str, typer.Option("--device", metavar="auto|cpu|cuda", help="auto: CUDA when present.")] = "auto",
    no_amp: Annotated[bool, typer.Option("--no-amp", help="No bf16/fp16 autocast on CUDA.")] = False,
    compile_: Annotated[bool, typer.Option("--compile", help="torch.compile the model.")] = False,
    cache_features: Annotated[str, typer.Option("--cache-features", metavar="auto|on|off", help="Train the head on cached backbone features (auto: when the backbone stays frozen).")] = "auto",
    cache_views: Annotated[int, typer.Option("--cache-views", help="With the feature cache: K augmented views of each training image; 0 (the default): one plain view, so the cached head trains without augmentation.")] = 0,
    resume: Annotated[Optional[str], typer.Option("--resume", metavar="[PATH]", help="Continue OUT's checkpoints/last.pt, or the checkpoint at PATH, with the run's saved arguments.", show_default=False)] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace OUT if it exists.")] = False,
    nproc: Annotated[Optional[int], typer.Option("--nproc", help="Launch N processes with torchrun (DDP).")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Only the final summary.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="The result as JSON on stdout, nothing else there.")] = False,
    trust_code: Annotated[bool, typer.Option("--trust-code", help="Run the file or module factory the folder's manifest names (it is code; torchvision and timm models need no flag).")] = False,
) -> None:
    """Fine-tune an adapted model in the phases its manifest schedules.

    Discriminative learning rates, checkpoints every epoch, and a best model you can load with
    surgery.load_adapted(OUT).

    Example: surgery train adapted/ --data data/ --epochs 10 --out run/
    """
    a = SimpleNamespace(**{k: v for k, v in locals().items() if k != "ctx"})  # every option, by name
    _check(a)
    if nproc is not None:
        raise typer.Exit(relaunch(nproc, _forwarded(ctx), entry=_ENTRY))
    a.lr = _parse_lr(lr)
    if find_lr:
        return run_find_lr(adapted, data, out, dict(_shared(a), epochs=a.epochs, accumulate=a.accumulate), as_json)
    renderer = Renderer(quiet, as_json)
    if compare_scratch:
        return run_compare(adapted, data, out, renderer, as_json, dict(_shared(a), **_run_only(a)),
                           resume=a.resume is not None, ctx=ctx)
    result = _run(ctx, a, renderer)
    if not is_main_process():
        return
    if as_json:
        print_json(result.to_json())
        return
    render(result)


def _check(a: SimpleNamespace) -> None:
    if a.data is None:
        raise TrainError("--data is required: an ImageFolder root, a folder of class folders, or a CSV")
    if a.out is None and not a.find_lr:
        raise TrainError("--out DIR is required: where to write the run")
    if a.no_augment and a.augment not in ("light", "none"):
        raise TrainError(f"--no-augment and --augment {a.augment} contradict each other; give one")
    if a.compare_scratch and (a.resume not in (None, _RESUME_LAST) or a.nproc is not None or a.find_lr):
        raise TrainError("--compare-scratch runs both trainings in one process, and its --resume continues both from "
                         "OUT (no PATH); drop --nproc, --find-lr, the PATH after --resume")


def _forwarded(ctx: typer.Context) -> list[str]:
    """This command's arguments, for the processes torchrun starts (--nproc is dropped there)."""
    argv = ctx.meta.get("surgery.raw_args") or sys.argv[1:]
    return argv[1:] if argv and argv[0] == "train" else list(argv)


def _shared(a: SimpleNamespace) -> dict:
    """The options of a run that --find-lr and --compare-scratch take too."""
    return dict(val_split=a.val_split, seed=a.seed, batch_size=a.batch_size, optimizer=a.optimizer,
                weight_decay=a.weight_decay, label_smoothing=a.label_smoothing, image_size=a.image_size,
                augment="none" if a.no_augment else a.augment, flip=not a.no_flip, device=a.device,
                cache_features=a.cache_features,
                force=a.force, trust_code=a.trust_code)


def _run_only(a: SimpleNamespace) -> dict:
    return dict(epochs=a.epochs, lr=a.lr, workers=a.workers, schedule=a.schedule, warmup_epochs=a.warmup_epochs,
                clip_grad=a.clip_grad, patience=a.patience, amp=not a.no_amp, compile=a.compile_,
                cache_views=a.cache_views, mixup=a.mixup, cutmix=a.cutmix, ema=a.ema, accumulate=a.accumulate,
                class_weights=a.class_weights, balanced_sampler=a.balanced_sampler, tensorboard=a.tensorboard,
                guard=not a.no_guard)


def _run(ctx: typer.Context, a: SimpleNamespace, renderer: "Renderer") -> Any:
    options = dict(_shared(a), **_run_only(a))
    if a.resume is not None:  # what the command line leaves out comes from the checkpoint
        for name in ("epochs", "lr"):
            if getattr(ctx.get_parameter_source(name), "name", "") != "COMMANDLINE":
                options[name] = None
    try:
        return surgery.train(a.adapted, a.data, out=a.out, resume=(True if a.resume == _RESUME_LAST else a.resume),
                             observer=renderer, **options)
    finally:
        renderer.close()


def _parse_lr(text: str) -> float | str:
    if text == "auto":
        return "auto"
    try:
        return float(text)
    except ValueError:
        raise TrainError(f"--lr {text!r}: give a number (e.g. 3e-3) or auto") from None


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
