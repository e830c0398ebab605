"""The range test at an unfreeze: the unfrozen phase's lr, measured from the trained head.

The lr found before the first epoch is the head's; at the unfreeze the whole network trains from
a head that already fits the data, so the loss does not descend: it holds, then rises once the lr
starts to undo what the head phase reached. A copy of the network trains at each group's
``lr_mult`` while the lr grows from ``START``; after each step the loss of fixed training images
(up to 64, as evaluation sees them: eval mode, no augmentation) is the *probe*. The training
loss of a few augmented images jumps tenfold from batch to batch; the probe does not. The
*ceiling* is the first lr whose step leaves the probe above ``RISE`` times its value before the
sweep; the phase trains at a tenth of it (:func:`suggest`). The sweep is as long as the rest of
the run (``MIN_STEPS`` to ``MAX_STEPS`` steps), so it never costs much more than what it tunes.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from .lr_find import BACKOFF, END, START, LrFind, SweepOptim, on_images, plot

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn

RULE = ("the unfreeze, from the trained head: a tenth of the lr after which the loss of fixed training images "
        "(no augmentation, eval mode) first passes 1.5 x its value before the sweep; the sweep stops at 4x")
RISE = 1.5  # the probe's loss has clearly risen once past this many times its start
MIN_STEPS, MAX_STEPS = 24, 60  # the sweep: as many steps as the rest of the run, within these


def suggest(lrs: list[float], after: list[float], before: float, start: float = START,
            end: float = END) -> tuple[float, float, float, bool]:
    """(suggestion, lr at the probe's minimum, the ceiling, whether the probe rose): ``after[i]``
    is the probe after the step at ``lrs[i]`` and ``before`` the probe before the first step. The
    ceiling is the first lr whose step leaves the probe above ``RISE x before`` (or not finite);
    when none does, the end of the sweep."""
    if not lrs or not after:
        return start, start, start, False
    i_min = min(range(len(after)), key=lambda i: after[i] if math.isfinite(after[i]) else math.inf)
    rise = next((i for i, v in enumerate(after[:len(lrs)]) if not (math.isfinite(v) and v <= RISE * before)), None)
    ceiling = lrs[rise] if rise is not None else lrs[-1]
    return min(max(ceiling / BACKOFF, start), end), lrs[i_min], ceiling, rise is not None


def _rule(sweep: Any, start: float, end: float) -> dict:
    """What :func:`~.lr_find.range_test` records for a sweep with a probe."""
    suggestion, lr_min, ceiling, rose = suggest(sweep.lrs, sweep.probed[1:], sweep.probed[0], start, end)
    return dict(suggestion=suggestion, min_lr=lr_min, ceiling_lr=ceiling, rose=rose, rule=RULE, probe=sweep.probed)


def steps_for(remaining: int) -> int:
    """The sweep's length for a phase of ``remaining`` optimizer steps."""
    return min(MAX_STEPS, max(MIN_STEPS, remaining))


def range_test(model: "nn.Module", manifest: Any, *, loader: Any, reference: tuple, place: Any, optim: SweepOptim,
               seed: int, epoch: int, steps: int) -> LrFind:
    """The test on ``model`` as the head phase left it, with every group that trains from
    ``epoch`` on (``requires_grad`` already set), over the training batches in an order of its own;
    ``reference``: the fixed images ``(x, y)`` of the probe."""
    import torch

    gen = torch.Generator().manual_seed(seed + 7919 + epoch)
    loss_fn = optim.loss()
    x_ref, y_ref = place.batch(*reference)

    def probe(work: "nn.Module") -> float:
        work.eval()
        with torch.no_grad(), place.autocast():
            v = float(loss_fn(work(x_ref).float(), y_ref))
        work.train()
        return v

    return on_images(model, manifest, loader, gen, steps=steps, place=place, optim=replace(optim, loss_fn=loss_fn),
                     probe=probe, rule=_rule)


def describe(found: LrFind, images: int) -> str:
    """What the test found, in words that stay true when the probe never rose."""
    from .lr_find import fmt_lr

    where = (f"passes {RISE:g}x its start at lr {fmt_lr(found.ceiling_lr)}" if found.rose else
             f"did not rise by the sweep's end at lr {fmt_lr(found.ceiling_lr)}")
    return (f"range test of {found.steps} steps ({found.seconds:.0f} s) from the head phase's weights: the loss of "
            f"{images} training images {where}, a tenth of it")


def write_files(found: LrFind, lr: float, epoch: int, first_lr: float | None, out: Any) -> None:
    """The test beside the first one: ``lr_find.json`` gains ``unfreeze`` (the curve and the lr
    used) and ``phases`` (each phase's first epoch and lr); the curve goes to
    ``lr_find_unfreeze.png``. ``first_lr``: the lr the first phase trained at."""
    from ..io import atomic_file

    out = Path(out)
    path = out / "lr_find.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (OSError, ValueError):
        data = {}
    if not isinstance(data, dict):
        data = {}
    phases = [{"epoch": 1, "lr": first_lr, "rule": data.get("rule")}] if first_lr is not None else []
    data["phases"] = phases + [{"epoch": epoch, "lr": lr, "rule": found.rule}]
    data["unfreeze"] = dict(found.to_json(), lr=lr, epoch=epoch)
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    plot(found, out / "lr_find_unfreeze.png")
