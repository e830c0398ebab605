"""A training run's options: one frozen object, validated once, every problem named in one error.

``surgery.train(...)`` keeps its keyword signature for users and builds a :class:`TrainOptions`
from it. With ``resume``, options left at their defaults take the checkpoint's values first
(:func:`surgery.trainer.resume.restore_args`); :meth:`TrainOptions.validated` then checks the lot.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from ..errors import TrainError
from .augment import DEFAULT_AUGMENT, augment_policy, check_augment
from .balance import CLASS_WEIGHTS
from .ema import check_decay

OPTIMIZERS = ("adamw", "sgd")
SCHEDULES = ("cosine", "onecycle", "constant")
CACHE_CHOICES = ("auto", "on", "off")

#: the options a checkpoint saves and a resumed run restores (``args`` in last.pt), in this order
HYPER = ("epochs", "lr", "val_split", "seed", "batch_size", "workers", "optimizer", "weight_decay", "momentum",
         "schedule", "warmup_epochs", "label_smoothing", "clip_grad", "patience", "image_size", "augment", "flip",
         "device", "amp", "compile", "cache_features", "cache_views", "mixup", "cutmix", "ema", "accumulate",
         "class_weights", "balanced_sampler", "guard")


@dataclass(frozen=True)
class TrainOptions:
    """What ``surgery.train`` was asked to do. ``epochs``/``lr`` of ``None``: from the checkpoint
    when resuming; otherwise ``lr`` becomes ``"auto"`` and ``epochs`` is required."""

    adapted: Path
    data: Path
    out: Path
    epochs: int | None = None
    lr: float | str | None = None
    val_split: float | None = None
    seed: int = 0
    batch_size: int = 32
    workers: int = 0
    optimizer: str = "adamw"
    weight_decay: float | None = None
    momentum: float = 0.9
    schedule: str = "cosine"
    warmup_epochs: float | None = None
    label_smoothing: float = 0.0
    clip_grad: float | None = None
    patience: int | None = None
    image_size: int | None = None
    augment: bool | str = DEFAULT_AUGMENT
    flip: bool = True
    device: str = "auto"
    amp: bool = True
    compile: bool = False
    cache_features: str = "auto"
    cache_views: int = 0
    mixup: float = 0.0
    cutmix: float = 0.0
    ema: float | None = None
    accumulate: int = 1
    class_weights: str = "none"
    balanced_sampler: bool = False
    guard: bool = True
    tensorboard: bool = False
    resume: bool | str | os.PathLike | None = None
    force: bool = False
    trust_code: bool = False

    def __post_init__(self) -> None:
        # --no-augment / augment=False is the policy "none"; augment=True the default policy
        object.__setattr__(self, "augment", augment_policy(self.augment))

    @property
    def mixing(self) -> bool:
        """Batches are mixed (--mixup/--cutmix): training needs whole images and soft targets."""
        return bool(self.mixup or self.cutmix)

    def hyper(self) -> dict[str, Any]:
        """The options a checkpoint records, in :data:`HYPER` order."""
        return {k: getattr(self, k) for k in HYPER}

    def validated(self) -> "TrainOptions":
        """These options with ``lr`` defaulted to ``"auto"``; every problem raised in one TrainError."""
        done = replace(self, lr="auto") if self.lr is None else self
        problems = _problems(done)
        if problems:
            raise TrainError("; ".join(problems))
        return done

    def warnings(self) -> list[str]:
        """Combinations that run but are likely not what was meant (run.log says them)."""
        said = []
        if self.class_weights == "auto" and self.balanced_sampler:
            said.append("--class-weights auto and --balanced-sampler each correct skewed classes; together they "
                        "correct twice (a rare class weighs about (largest / its count) times too much, and "
                        "predictions can collapse onto it): use one of them")
        return said

    @property
    def decay(self) -> float:
        """``weight_decay``, defaulting to 0.05 (adamw) or 1e-4 (sgd)."""
        if self.weight_decay is not None:
            return self.weight_decay
        return 0.05 if self.optimizer == "adamw" else 1e-4

    @property
    def warmup(self) -> float:
        """``warmup_epochs``, defaulting to 1 (0 for a one-epoch run)."""
        if self.warmup_epochs is not None:
            return self.warmup_epochs
        return 1.0 if self.epochs > 1 else 0.0

    def resolved(self) -> dict[str, Any]:
        """The defaults this run chose, saved beside :meth:`hyper` (a resumed run keeps them)."""
        return {"weight_decay": self.decay, "warmup_epochs": self.warmup}


DEFAULTS = {f.name: f.default for f in fields(TrainOptions)}


def _problems(o: TrainOptions) -> list[str]:
    if o.epochs is None:
        return ["--epochs is required (it comes from the checkpoint only with --resume)"]
    checks = [
        (isinstance(o.epochs, int) and o.epochs >= 1, f"--epochs must be a positive integer, got {o.epochs!r}"),
        (o.lr == "auto" or (isinstance(o.lr, (int, float)) and o.lr > 0 and math.isfinite(o.lr)),
         f"--lr must be a positive number or 'auto', got {o.lr!r}"),
        (o.optimizer in OPTIMIZERS, f"--optimizer {o.optimizer!r}: choose one of {', '.join(OPTIMIZERS)}"),
        (o.schedule in SCHEDULES, f"--schedule {o.schedule!r}: choose one of {', '.join(SCHEDULES)}"),
        (o.cache_features in CACHE_CHOICES,
         f"--cache-features {o.cache_features!r}: choose one of {', '.join(CACHE_CHOICES)}"),
        (0 <= o.label_smoothing < 1, f"--label-smoothing must be in [0, 1), got {o.label_smoothing}"),
        (o.clip_grad is None or o.clip_grad > 0, f"--clip-grad must be positive, got {o.clip_grad}"),
        (o.patience is None or o.patience >= 1, f"--patience must be at least 1 epoch, got {o.patience}"),
        (o.warmup_epochs is None or o.warmup_epochs >= 0, f"--warmup-epochs must be >= 0, got {o.warmup_epochs}"),
        (o.cache_views >= 0, f"--cache-views must be >= 0, got {o.cache_views}"),
        (o.weight_decay is None or o.weight_decay >= 0, f"--weight-decay must be >= 0, got {o.weight_decay}"),
        (isinstance(o.batch_size, int) and o.batch_size >= 1,
         f"--batch-size must be a positive integer, got {o.batch_size!r}"),
        (isinstance(o.workers, int) and o.workers >= 0, f"--workers must be 0 or more, got {o.workers!r}"),
        (o.image_size is None or o.image_size >= 1, f"--image-size must be positive, got {o.image_size}"),
        (isinstance(o.accumulate, int) and not isinstance(o.accumulate, bool) and o.accumulate >= 1,
         f"--accumulate must be a positive integer (batches per optimizer step), got {o.accumulate!r}"),
        (o.class_weights in CLASS_WEIGHTS,
         f"--class-weights {o.class_weights!r}: choose one of {', '.join(CLASS_WEIGHTS)}"),
        (not (o.mixing and o.cache_features == "on"),
         "--mixup/--cutmix mix whole images, so they cannot train on cached features: drop --cache-features on"),
    ]
    return [msg for ok, msg in checks if not ok] + check_decay(o.ema) + check_augment(o.augment, None, o.mixup,
                                                                                     o.cutmix)
