"""The optimizer side of a run: per-group decay/no-decay split and the per-batch lr multiplier.

Every manifest group is in the optimizer from the first step; the schedule multiplies each
group's base lr (``lr * lr_mult``), so unfreezing a group later needs no new group and no
scheduler surgery.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from ..adapter.core import param_groups

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn

_NO_DECAY_NAMES = ("pos_embed", "pos_embedding", "cls_token", "class_token", "position_embeddings",
                   "absolute_pos_embed", "relative_position_bias_table")


class LrMultiplier:
    """Step -> factor on one group's base lr: linear warmup, then cosine / one-cycle / constant,
    times ``scale`` (the unfrozen phase's measured lr over the first one, and the guard's cuts),
    with a linear ramp over ``ramp`` steps from ``opened``, the step where the group started to
    train after a freeze (Adam's moments start empty there, so full steps would jolt it).
    A plain object (its ``__dict__`` is all LambdaLR saves), so checkpoints stay weights-only."""

    def __init__(self, kind: str, total_steps: int, warmup_steps: int):
        self.kind = kind
        self.total = max(int(total_steps), 1)
        self.warmup = min(max(int(warmup_steps), 0), self.total - 1)
        self.scale = 1.0
        self.opened: int | None = None
        self.ramp = 0

    def __call__(self, step: int) -> float:
        factor = self.schedule(step) * self.scale
        if self.opened is not None and self.ramp > 0 and step >= self.opened:
            factor *= min(1.0, (step - self.opened + 1) / (self.ramp + 1))
        return factor

    def open_at(self, step: int, ramp: int) -> None:
        """The group trains from ``step`` on, warming up over ``ramp`` steps."""
        self.opened, self.ramp = int(step), max(int(ramp), 0)

    def schedule(self, step: int) -> float:
        """The run's shape alone: warmup, then the decay of ``kind``."""
        if self.kind == "onecycle":
            start, final = 1 / 25, 1e-4
            w = self.warmup if self.warmup > 0 else max(int(0.3 * self.total), 1) if self.total > 1 else 0
            if step < w:
                return start + (1 - start) * step / w
            t = (step - w) / max(self.total - w, 1)
            return final + (1 - final) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))
        if step < self.warmup:
            return (step + 1) / (self.warmup + 1)
        if self.kind == "constant":
            return 1.0
        t = (step - self.warmup) / max(self.total - self.warmup, 1)
        return 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))


#: what a resumed run with another --epochs may change in each group's multiplier
LENGTH_FIELDS = ("kind", "total", "warmup")


def refresh_lrs(opt: Any, sched: Any) -> None:
    """Each group's lr as its multiplier says now (after a multiplier changed mid-run)."""
    for g, fn in zip(opt.param_groups, sched.lr_lambdas):
        g["lr"] = g["initial_lr"] * fn(sched.last_epoch)
    sched._last_lr = [g["lr"] for g in opt.param_groups]


def optimizer_groups(model: "nn.Module", manifest: Any, lr: float, weight_decay: float) -> list[dict]:
    """The manifest's groups (``param_groups``), each split into a decay and a no-decay part
    (biases, norm weights, 1-d tensors, position embeddings): ``name`` and ``name/no_decay``."""
    names = {id(p): n for n, p in model.named_parameters()}
    out = []
    for g in param_groups(model, manifest, lr):
        decay, no_decay = [], []
        for p in g["params"]:
            n = names[id(p)]
            (no_decay if p.ndim <= 1 or n.rsplit(".", 1)[-1] in _NO_DECAY_NAMES else decay).append(p)
        for params, wd, suffix in ((decay, weight_decay, ""), (no_decay, 0.0, "/no_decay")):
            if params:
                out.append({"params": params, "lr": g["lr"], "weight_decay": wd, "name": g["name"] + suffix,
                            "group": g["name"], "lr_mult": g["lr_mult"]})
    return out
