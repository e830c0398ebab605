"""A training run's options: one frozen object, validated once, every problem named in one error.

Each option is declared once, as a field of :class:`TrainOptions` (its flag, help and default;
:mod:`surgery.option_table`): ``surgery train``'s flags are built from it, and ``surgery.train``
takes the object or keywords checked against it. With ``resume``, options left at their defaults take the checkpoint's values first
(:func:`surgery.trainer.resume.restore_args`); :meth:`TrainOptions.validated` then checks the lot.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Optional

from ..errors import TrainError
from ..option_table import option, shared, text_to_path
from .augment import DEFAULT_AUGMENT, augment_policy, check_augment
from .balance import CLASS_WEIGHTS
from .ema import check_decay

OPTIMIZERS = ("adamw", "sgd")
SCHEDULES = ("cosine", "onecycle", "constant")
CACHE_CHOICES = ("auto", "on", "off")
DEFAULT_MOMENTUM = 0.9

#: the options a checkpoint saves and a resumed run restores (``args`` in last.pt), in this order
HYPER = ("epochs", "lr", "val_split", "seed", "batch_size", "workers", "optimizer", "weight_decay", "momentum",
         "schedule", "warmup_epochs", "label_smoothing", "clip_grad", "patience", "image_size", "augment", "flip",
         "device", "amp", "compile", "cache_features", "cache_views", "mixup", "cutmix", "ema", "accumulate",
         "class_weights", "balanced_sampler", "guard")


def parse_lr(text: str) -> float | str:
    """``--lr``'s text: ``auto`` or a number."""
    if text == "auto":
        return "auto"
    try:
        return float(text)
    except ValueError:
        raise TrainError(f"--lr {text!r}: give a number (e.g. 3e-3) or auto") from None


@dataclass(frozen=True)
class TrainOptions:
    """What ``surgery.train`` was asked to do, and the flags of ``surgery train``: each field is
    declared once here (:mod:`surgery.option_table`). ``epochs``/``lr`` of ``None``: from the
    checkpoint when resuming; otherwise ``lr`` becomes ``"auto"`` and ``epochs`` is required."""

    adapted: Path | None = option(None, "Folder written by `surgery adapt` (or an earlier train run).", argument=True,
                                  show_default=False)
    data: Path | None = option(None, "ImageFolder root (train/ and val/), one folder of class folders with "
                               "--val-split, or a CSV of path,label.", show_default=False)
    out: Path | None = option(None, "Folder for the run (must not exist, unless --force or --resume).",
                              show_default=False)
    epochs: int | None = option(None, "Epochs in the whole run (all phases); with --resume, another count changes "
                                "the run's length.", cli_type=int, cli_default=10)
    lr: float | str | None = option(None, "Learning rate of the head (pretrained groups use lr x their multiplier); "
                                    "auto: found by a range test before training.", metavar="auto|LR", cli_type=str,
                                    cli_default="auto", parse=parse_lr)
    val_split: float | None = option(None, "Hold out this fraction (stratified, seeded) when DATA has no val set.")
    seed: int = option(0, "Seed of everything random.")
    batch_size: int = option(32, "Images per step (per process).")
    workers: int = option(0, "DataLoader worker processes.")
    optimizer: str = option("adamw", "AdamW, or SGD with --momentum.", metavar="adamw|sgd")
    weight_decay: float | None = option(None, "Default 0.05 (adamw) / 1e-4 (sgd); never on norms and biases.")
    momentum: float = option(DEFAULT_MOMENTUM, "SGD's momentum (--optimizer sgd).")
    schedule: str = option("cosine", "LR schedule over the whole run, per batch.", metavar="cosine|onecycle|constant")
    warmup_epochs: float | None = option(None, "Linear warmup length in epochs; 0: no warmup (default 1, none for a "
                                         "one-epoch run).")
    label_smoothing: float = option(0.0, "Cross-entropy label smoothing.")
    clip_grad: float | None = option(None, "Clip the gradient norm to this.")
    patience: int | None = option(None, "Stop after this many epochs without a better val accuracy.")
    image_size: int | None = option(None, "Override the manifest's input size.")
    augment: bool | str = option(DEFAULT_AUGMENT, "Training augmentation: light = random resized crop and flip; "
                                 "randaugment / trivialaugment add torchvision's policies.",
                                 metavar="none|light|randaugment|trivialaugment", cli_type=str)
    flip: bool = option(True, "No horizontal flips (digits, text).", flag="--no-flip", negated=True)
    device: str = shared("device", "auto")
    amp: bool = option(True, "No bf16/fp16 autocast on CUDA.", flag="--no-amp", negated=True)
    compile: bool = option(False, "torch.compile the model.")
    cache_features: str = option("auto", "Train the head on cached backbone features (auto: when the backbone stays "
                                 "frozen).", metavar="auto|on|off")
    cache_views: int = option(0, "With the feature cache: K augmented views of each training image; 0 (the "
                              "default): one plain view, so the cached head trains without augmentation.")
    mixup: float = option(0.0, "Mix pairs of images and labels (Beta(ALPHA, ALPHA); 0.2 is usual; 0: off).",
                          metavar="ALPHA")
    cutmix: float = option(0.0, "Paste a patch of another image, labels mixed by area (1.0 is usual; 0: off).",
                           metavar="ALPHA")
    ema: float | None = option(None, "Keep an exponential moving average of the weights (e.g. 0.999); validated "
                               "beside the raw weights, the better saved.", metavar="DECAY", show_default=False)
    accumulate: int = option(1, "Sum gradients over N batches per optimizer step (effective batch N x --batch-size).",
                             metavar="N")
    class_weights: str = option("none", "auto: weight each class's loss by n / (classes x its images).",
                                metavar="none|auto")
    balanced_sampler: bool = option(False, "Draw training images so every class is equally likely.")
    guard: bool = option(True, "After an unfreeze, do not undo a val loss past 2x the head phase's best (by default "
                         "the best weights come back and the unfrozen groups' lr drops tenfold).", flag="--no-guard",
                         negated=True)
    tensorboard: bool = option(False, "Write TensorBoard event files to OUT/tensorboard (needs the tensorboard "
                               "package).")
    resume: bool | str | os.PathLike | None = option(None, "Continue OUT's checkpoints/last.pt, or the checkpoint at "
                                                     "PATH, with the run's saved arguments.", metavar="[PATH]",
                                                     cli_type=Optional[str], show_default=False)
    force: bool = option(False, "Replace OUT if it exists.")
    trust_code: bool = option(False, "Run the file or module factory the folder's manifest names (it is code; "
                              "torchvision and timm models need no flag).")

    @classmethod
    def from_keywords(cls, **keywords: Any) -> "TrainOptions":
        return cls(**keywords)

    def __post_init__(self) -> None:
        # --no-augment / augment=False is the policy "none"; augment=True the default policy
        object.__setattr__(self, "augment", augment_policy(self.augment))
        for name in ("adapted", "data", "out"):
            object.__setattr__(self, name, text_to_path(getattr(self, name)))

    @property
    def mixing(self) -> bool:
        """Batches are mixed (--mixup/--cutmix): training needs whole images and soft targets."""
        return bool(self.mixup or self.cutmix)

    def hyper(self) -> dict[str, Any]:
        """The options a checkpoint records, in :data:`HYPER` order."""
        return {k: getattr(self, k) for k in HYPER}

    def require(self, *names: str) -> "TrainOptions":
        """These options, if each of ``names`` (``data``, ``out``) is given; else the TrainError
        naming the first missing one."""
        said = {"adapted": "the adapted folder is required: a folder written by `surgery adapt`",
                "data": "--data is required: an ImageFolder root, a folder of class folders, or a CSV",
                "out": "--out is required: the folder the run is written to"}
        for name in names:
            if getattr(self, name) is None:
                raise TrainError(said[name])
        return self

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
        if self.optimizer != "sgd" and self.momentum != DEFAULT_MOMENTUM:
            said.append(f"--momentum {self.momentum:g} has no effect: it is SGD's, and the optimizer is {self.optimizer}")
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
        (0 <= o.momentum < 1, f"--momentum must be in [0, 1), got {o.momentum}"),
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
