"""`surgery train --find-lr` and `surgery train --compare-scratch`: the renderers of two
variations of a training run, on the run's options."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .common import console, print_json

if TYPE_CHECKING:  # pragma: no cover
    from surgery.trainer.options import TrainOptions


def run_find_lr(opts: "TrainOptions", as_json: bool) -> None:
    """Only the range test; the curve as text, the suggestion, and the command that trains with it."""
    from surgery.trainer.lr_find import find_lr, fmt_lr

    found = find_lr(options=opts)
    out = opts.out
    if as_json:
        print_json(found.to_json())
        return
    from surgery.trainer.lr_find import curve_text, rule_text

    c = console(survive_pipe=True)
    where = " on cached features" if found.cached else ""
    c.print(f"lr range test: {found.steps} steps{where}, lr {fmt_lr(found.lrs[0])} to {fmt_lr(found.lrs[-1])}"
            f" ({'stopped: the loss diverged' if found.stopped == 'diverged' else 'the whole sweep'})", markup=False)
    for row in curve_text(found):
        c.print(row, markup=False)
    c.print(f"smoothed loss lowest at lr {fmt_lr(found.min_lr)}"
            + (f", its descent centred at lr {fmt_lr(found.descent_lr)}" if found.descent_lr is not None else ""),
            markup=False)
    c.print(f"suggested lr {fmt_lr(found.suggestion)} ({rule_text(found)})", markup=False)
    if out is not None:
        c.print(f"wrote {out / 'lr_find.png'}, {out / 'lr_find.json'}", markup=False)
    c.print(f"({found.seconds:.1f}s)", markup=False)


def run_compare(opts: "TrainOptions", renderer: Any, as_json: bool) -> None:
    """The run, then the same budget from random weights in OUT/scratch, then the verdict; with
    ``--resume``, whatever of the three an interruption left unfinished."""
    from surgery.trainer.compare import compare_scratch

    try:
        report = compare_scratch(options=opts, observer=renderer)
    finally:
        renderer.close()
    out = opts.out
    if as_json:
        print_json(report)
        return
    c = console(survive_pipe=True)
    for name in ("pretrained", "scratch"):
        r = report[name]
        c.print(f"{name:<10} best epoch {r['best_epoch']} of {r['epochs_run']}: val acc {r['best_val_acc']:.4f}, "
                f"val loss {r['best_val_loss']:.4f}  ({r['out']})", markup=False)
    c.print(f"verdict: {report['verdict']['text']}", markup=False)
    c.print(f"wrote {out} (compare.json, compare.png, metrics.jsonl with scratch_* columns; the scratch run in "
            f"{out / 'scratch'})", markup=False)
