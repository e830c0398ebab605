"""Between the phases of a run: the unfreeze and the guard after it.

**The unfreeze.** The lr found before the first epoch is the head's, measured on the head alone:
it is not an lr for a whole network (on the demo, 1.5e-2 for the head put AdamW's backbone at
1.5e-3 and took val accuracy from 0.955 to 0.395). So at the first epoch where frozen groups
open, the head phase's best weights come back (its val loss moves from epoch to epoch), and with
``--lr auto`` a range test of the whole network starts from them (each group at its ``lr_mult``;
:mod:`.lr_unfreeze`): the unfrozen phase trains at what it found, never above the first phase's
lr. Later stages of a gradual unfreeze keep that lr and the weights they reach. The groups that
open warm up over one epoch (their optimizer moments start empty), whatever the lr.

**The guard.** When, after the unfreeze, an epoch's val loss passes ``GUARD_LIMIT`` times the
head phase's best (and that best by ``GUARD_MARGIN``, so a near-zero loss is not noise's toy), or
is not a number, the best weights come back, the lr of the groups opened so far is cut tenfold
(their moments cleared, their warmup restarted) and the run goes on, at most ``GUARD_EVENTS``
times. Everything it changes lives in the model, the optimizer and the schedule's multipliers,
which checkpoints save, so a resumed run continues exactly. ``--no-guard`` turns it off.
"""

from __future__ import annotations

import math
from typing import Any, Callable

from ..adapter.freeze import group_trainable
from . import distributed as D
from . import lr_unfreeze
from .ema import WeightEma
from .lr_find import SweepOptim, fmt_lr
from .optim import refresh_lrs
from .prepare import Run, optimizer_steps
from .resume import load_moving

Observer = Callable[[str, dict], None]
GUARD_LIMIT = 2.0  # the guard acts when the val loss passes this many times the head phase's best
GUARD_MARGIN = 0.05  # and passes it by this much at least
GUARD_CUT = 0.1  # and multiplies the opened groups' lr by this
GUARD_EVENTS = 3  # at most this many times in a run
REFERENCE_IMAGES = 64  # the unfreeze's range test watches the loss of this many training images
#: what the run records (checkpoint ``args``, the manifest's ``train_args``): each unfreeze, each guard event
UNFREEZES, GUARD_EVENTS_KEY = "unfreezes", "guard_events"


def frozen_at_start(manifest: Any) -> set[str]:
    """The groups that do not train in the first epoch."""
    return {g["name"] for g in manifest.groups if not g["trainable"]}


def opening(manifest: Any, epoch: int) -> set[str]:
    """The groups that start to train at ``epoch`` (0-based) after being frozen."""
    if epoch <= 0:
        return set()
    return {g["name"] for g in manifest.groups
            if not g["trainable"] and group_trainable(g, epoch) and not group_trainable(g, epoch - 1)}


def first_unfreeze(manifest: Any) -> int | None:
    """The first epoch (0-based) at which a frozen group opens, or None."""
    ats = [g["unfreeze_at"] for g in manifest.groups if not g["trainable"] and g.get("unfreeze_at") is not None]
    return min(ats) if ats else None


def _steps_per_epoch(run: Run) -> int:
    return optimizer_steps(len(run.inputs.train_dl), run.opts.accumulate)


def _open(run: Run, groups: set[str], step: int) -> None:
    """Warm the optimizer groups of ``groups`` up over one epoch from ``step``."""
    for g, fn in zip(run.optim.opt.param_groups, run.optim.sched.lr_lambdas):
        if g["group"] in groups:
            fn.open_at(step, _steps_per_epoch(run))


def unfreeze(run: Run, epoch: int, obs: Observer) -> None:
    """At the start of ``epoch``, after the schedule opened its groups: their warmup; at the first
    unfreeze also the head phase's best weights and, with ``--lr auto``, the phase's lr, measured."""
    groups = opening(run.inputs.manifest, epoch)
    if not groups:
        return
    _open(run, groups, run.optim.sched.last_epoch)
    record: dict[str, Any] = {"epoch": epoch + 1, "groups": sorted(groups), "warmup_steps": _steps_per_epoch(run)}
    p, first = run.progress, epoch == first_unfreeze(run.inputs.manifest)
    if first and p.best_state is not None and p.best["epoch"] < epoch:
        # the head phase's val loss moves from epoch to epoch: the unfrozen phase starts from its best
        load_moving(run.inputs.model, p.best_state, run.optim.moving, "the best epoch's weights")
        record["from_epoch"] = p.best["epoch"]
    if first and run.opts.lr == "auto":
        record.update(_measure(run, epoch, obs))
    refresh_lrs(run.optim.opt, run.optim.sched)
    record["lrs"] = _lrs(run)
    run.resolved.setdefault(UNFREEZES, []).append(record)
    lrs = ", ".join(f"{k} {fmt_lr(v)}" for k, v in record["lrs"].items())
    how = (f"lr {fmt_lr(record['lr'])} ({record['how']})" if "lr" in record
           else f"lr {fmt_lr(_base_lr(run))} ({'given' if run.opts.lr != 'auto' else 'kept from the unfreeze'})")
    start = f"from epoch {record['from_epoch']}'s weights (the best so far), " if "from_epoch" in record else ""
    record["message"] = (f"unfreeze at epoch {epoch + 1} ({', '.join(sorted(groups))}): {start}{how}; peak lrs {lrs}; "
                         f"the opened groups warm up over {record['warmup_steps']} steps")
    run.files.log(record["message"])


def _measure(run: Run, epoch: int, obs: Observer) -> dict:
    """The range test from the head phase's weights, as long as the rest of the run; every
    group's multiplier scaled so the base lr becomes what it found (never more than the first
    phase's)."""
    o, place = run.opts, run.place
    remaining = run.optim.mult.total - run.optim.sched.last_epoch
    found = lr_unfreeze.range_test(run.inputs.model, run.inputs.manifest, loader=run.inputs.train_dl,
                                   reference=_reference(run), place=place, optim=SweepOptim.of(o), seed=o.seed,
                                   epoch=epoch, steps=lr_unfreeze.steps_for(remaining))
    lr = D.all_reduce_sum(run.dist, [found.suggestion], place.reduce_on)[0] / run.dist.world_size
    before = _base_lr(run)
    new = min(lr, before)
    for fn in run.optim.sched.lr_lambdas:
        fn.scale *= new / before
    how = lr_unfreeze.describe(found, min(REFERENCE_IMAGES, len(run.inputs.samples.train)))
    if new < lr:
        how += f", capped at the first phase's lr {fmt_lr(before)}"
    if run.dist.is_main:
        lr_unfreeze.write_files(found, new, epoch + 1, (run.resolved.get("lr_find") or {}).get("lr"), run.opts.out)
    obs("lr_find", dict(found.to_json(), lr=new, epoch=epoch + 1))
    return {"lr": new, "found": dict(found.summary(), lr=new), "how": how}


def _reference(run: Run) -> tuple:
    """Up to ``REFERENCE_IMAGES`` training images, evenly spaced, as evaluation sees them (no
    augmentation), in one batch: what the unfreeze's range test watches."""
    import torch

    from .data import ImageDataset, pipeline_transforms

    ds = ImageDataset(run.inputs.samples.train, pipeline_transforms(run.inputs.pipe, train=False))
    n = min(REFERENCE_IMAGES, len(ds))
    items = [ds[i * len(ds) // n] for i in range(n)]  # spread over the classes, which come in order
    return torch.stack([x for x, _ in items]), torch.tensor([int(y) for _, y in items])


def _base_lr(run: Run) -> float:
    """The base lr (``lr_mult`` 1) as a group that trains from the start stands (the guard cuts
    only opened groups; a multiplier of 0 says nothing), before the schedule's shape."""
    frozen = frozen_at_start(run.inputs.manifest)
    g, fn = next((g, fn) for g, fn in zip(run.optim.opt.param_groups, run.optim.sched.lr_lambdas)
                 if g["group"] not in frozen and g.get("lr_mult", 1.0) > 0)
    return g["initial_lr"] / g.get("lr_mult", 1.0) * fn.scale


def _lrs(run: Run) -> dict[str, float]:
    """Each manifest group's peak lr from here on: base lr x multiplier x scale."""
    out: dict[str, float] = {}
    for g, fn in zip(run.optim.opt.param_groups, run.optim.sched.lr_lambdas):
        out.setdefault(g["group"], g["initial_lr"] * fn.scale)
    return out


# ----------------------------------------------------------------------------- the guard

def head_phase_best(run: Run) -> float | None:
    """The lowest val loss of the epochs before the first unfreeze; None when nothing unfreezes."""
    at = first_unfreeze(run.inputs.manifest)
    if at is None:
        return None
    losses = [m["val_loss"] for m in run.progress.history if m["epoch"] <= at]
    return min(losses) if losses else None


def guard_limit(best: float) -> float:
    """The val loss past which the guard acts, for a head phase whose best was ``best``."""
    return max(GUARD_LIMIT * best, best + GUARD_MARGIN)


def guard(run: Run, m: dict) -> dict | None:
    """After the unfreeze: an epoch whose val loss passes :func:`guard_limit` (or is not a number)
    brings the best weights back and cuts the lr of the groups opened so far tenfold. The event,
    or None."""
    at = first_unfreeze(run.inputs.manifest)
    events = run.resolved.get(GUARD_EVENTS_KEY, [])
    if not run.opts.guard or at is None or m["epoch"] <= at or run.progress.best_state is None \
            or len(events) >= GUARD_EVENTS:
        return None
    best = head_phase_best(run)
    if best is None or (math.isfinite(m["val_loss"]) and m["val_loss"] <= guard_limit(best)):
        return None
    p = run.progress
    load_moving(run.inputs.model, p.best_state, run.optim.moving, "the best epoch's weights")
    if run.objective.ema is not None:  # the average of the collapsed weights is no better: start it again
        run.objective.ema = WeightEma(run.inputs.model, run.objective.ema.decay)
    opened = {g["name"] for g in run.inputs.manifest.groups
              if not g["trainable"] and group_trainable(g, m["epoch"] - 1)}
    for g, fn in zip(run.optim.opt.param_groups, run.optim.sched.lr_lambdas):
        if g["group"] in opened:
            fn.scale *= GUARD_CUT
            for param in g["params"]:
                run.optim.opt.state.pop(param, None)
    _open(run, opened, run.optim.sched.last_epoch)
    refresh_lrs(run.optim.opt, run.optim.sched)
    event = {"epoch": m["epoch"], "val_loss": m["val_loss"], "limit": guard_limit(best),
             "restored_epoch": p.best["epoch"], "restored_val_loss": p.best["val_loss"],
             "lrs": {k: v for k, v in _lrs(run).items() if k in opened}, "left": GUARD_EVENTS - len(events) - 1}
    run.resolved.setdefault(GUARD_EVENTS_KEY, []).append(event)
    return event


def guard_message(event: dict) -> str:
    """The guard's one line for run.log and the summary."""
    lrs = ", ".join(f"{k} {fmt_lr(v)}" for k, v in event["lrs"].items())
    left = (f"it acts {event['left']} more time{'s' if event['left'] != 1 else ''} at most" if event.get("left")
            else "it will not act again in this run")
    return (f"guard: epoch {event['epoch']}'s val loss {event['val_loss']:.4f} passed the limit {event['limit']:.4f} "
            f"({GUARD_LIMIT:g}x the head phase's best); restored epoch {event['restored_epoch']}'s weights and cut the "
            f"unfrozen groups' lr tenfold ({lrs}); {left}; --no-guard turns this off")


def bests(manifest: Any, history: list[dict]) -> tuple[dict | None, dict | None]:
    """The best epoch (val acc, then loss) before the first unfreeze and the best after it, so a
    collapse after the unfreeze cannot hide behind the run's best epoch. (None, None) when nothing
    unfreezes."""
    at = first_unfreeze(manifest)
    if at is None:
        return None, None

    def best(ms: list[dict]) -> dict | None:
        if not ms:
            return None
        m = max(ms, key=lambda m: (m["val_acc"], -m["val_loss"]))
        return {"epoch": m["epoch"], "val_acc": m["val_acc"], "val_loss": m["val_loss"]}

    return best([m for m in history if m["epoch"] <= at]), best([m for m in history if m["epoch"] > at])
