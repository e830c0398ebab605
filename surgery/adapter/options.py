"""Every option of adapt in one frozen, validated object.

``surgery.adapt(...)`` and ``surgery adapt`` take the options as keywords and flags;
:meth:`AdaptOptions.create` folds the freeze keywords into a :class:`FreezeOptions`, checks
everything and raises one error naming every problem, before any work is done.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from ..errors import AdaptError
from .freeze import FreezeOptions
from .manifest import HEAD_KINDS

FREEZE_KEYWORDS = tuple(f.name for f in fields(FreezeOptions))


@dataclass(frozen=True)
class AdaptOptions:
    """What to build and how to load and freeze it; the checkpoint itself is not an option."""

    arch: str
    num_classes: int
    out: Path | None = None
    weights: str | None = None  # torchvision weights name, instead of a checkpoint
    arch_kwargs: dict | str | None = None
    rules: Any = None  # Rules, ops, a rules file or its dict: applied to the checkpoint's names first
    select: str | None = None
    allow_globals: tuple[str, ...] = ()
    head: str = "linear"
    hidden: int = 512
    dropout: float = 0.5
    in_chans: int = 3
    input_size: int | None = None
    freezing: FreezeOptions = field(default_factory=FreezeOptions)
    strict: bool = False
    min_coverage: float = 0.5
    interpolate: bool = True
    class_names: list[str] | None = None
    force: bool = False
    seed: int = 0

    @classmethod
    def create(cls, **keywords: Any) -> "AdaptOptions":
        """From ``adapt()``'s keywords; raises AdaptError naming every problem.

        >>> AdaptOptions.create(arch="resnet18", num_classes=4, freeze="head-only").freezing.freeze
        'head-only'
        """
        freezing = FreezeOptions(**{k: keywords.pop(k) for k in FREEZE_KEYWORDS if k in keywords})
        out = keywords.pop("out", None)
        allow = tuple(keywords.pop("allow_globals", ()) or ())
        opts = cls(freezing=freezing, out=Path(out) if out is not None else None, allow_globals=allow, **keywords)
        problems = opts.problems()
        if problems:
            raise AdaptError("; ".join(problems))
        return opts

    def problems(self) -> list[str]:
        """Every problem with the options, the freeze options' included, as one-line sentences."""
        problems = []
        if not self.arch:
            problems.append("--arch is required (a torchvision name such as resnet18, timm:NAME, or file.py:fn)")
        n = self.num_classes
        if n is None:
            problems.append("--num-classes N is required: how many classes the new head predicts")
        elif not isinstance(n, int) or isinstance(n, bool) or n < 1:
            problems.append(f"--num-classes must be a positive integer, got {n!r}")
        if self.head not in HEAD_KINDS:
            problems.append(f"--head {self.head!r}: choose one of {', '.join(HEAD_KINDS)}")
        if self.in_chans < 1:
            problems.append(f"--in-chans must be >= 1, got {self.in_chans}")
        if self.head == "mlp" and (self.hidden < 1 or not 0 <= self.dropout < 1):
            problems.append(f"--hidden must be >= 1 and --dropout in [0, 1) (got {self.hidden}, {self.dropout})")
        if not 0 <= self.min_coverage <= 1:
            problems.append(f"--min-coverage must be in [0, 1], got {self.min_coverage}")
        if self.class_names is not None and len(self.class_names) != n:
            problems.append(f"{len(self.class_names)} class names for --num-classes {n}")
        return problems + self.freezing.check()[2]
