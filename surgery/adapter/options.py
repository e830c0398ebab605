"""Every option of adapt in one frozen, validated object.

``surgery.adapt(...)`` and ``surgery adapt`` take the options as keywords and flags;
:meth:`AdaptOptions.create` folds the freeze keywords into a :class:`FreezeOptions`, checks
everything and raises one error naming every problem, before any work is done.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Optional

from ..errors import AdaptError
from ..option_table import nested, option, shared
from .freeze import FreezeOptions
from .manifest import HEAD_KINDS

FREEZE_KEYWORDS = tuple(f.name for f in fields(FreezeOptions))


@dataclass(frozen=True)
class AdaptOptions:
    """What to build and how to load and freeze it; the checkpoint itself is not an option. Each
    field is declared once, with its flag (:mod:`surgery.option_table`)."""

    arch: str = option("", "torchvision model name, timm:NAME, path/to/file.py:fn or package.module:fn.",
                       show_default=False)
    num_classes: int | None = option(None, "Outputs of the new head.", show_default=False)
    out: Path | None = option(None, "Folder to write model.safetensors, manifest.json, load_report.json.",
                              show_default=False)
    weights: str | None = option(None, "Start from torchvision's weights (DEFAULT, IMAGENET1K_V2, ...) instead of "
                                 "CKPT.", metavar="NAME")
    arch_kwargs: dict | str | None = option(None, "Keyword arguments for the model factory, a JSON object.",
                                            metavar="JSON", cli_type=Optional[str])
    rules: Any = None  # Rules, ops, a rules file or its dict: applied to the checkpoint's names first
    select: str | None = shared("select")
    allow_globals: tuple[str, ...] = shared("allow_globals", ())
    head: str = option("linear", "linear, or mlp (concat pool + BN/dropout/linear x2, CNN backbones).")
    hidden: int = option(512, "Hidden width of the mlp head.")
    dropout: float = option(0.5, "Dropout of the mlp head (the first layer uses half).")
    in_chans: int = option(3, "Input channels; the first conv's weights are adapted.")
    input_size: int | None = option(None, "Input size for the probe and the manifest (default: the weights' or 224); "
                                    "a timm ViT is rebuilt for it (img_size).")
    # per input channel; None: the weights' metadata, else ImageNet's
    mean: tuple[float, ...] | None = option(None, "Normalisation mean per input channel, recorded in the manifest "
                                            "(default: the weights' metadata, else ImageNet's); one value for "
                                            "--in-chans 1.", metavar="M,M,M", cli_type=Optional[str],
                                            show_default=False)
    std: tuple[float, ...] | None = option(None, "Normalisation std per input channel, as --mean.", metavar="S,S,S",
                                           cli_type=Optional[str], show_default=False)
    freezing: FreezeOptions = nested(FreezeOptions)
    strict: bool = option(False, "Anything missing besides the new head is an error.")
    min_coverage: float = option(0.5, "Refuse when less of the backbone than this loads.")
    interpolate: bool = True
    class_names: list[str] | None = None
    force: bool = option(False, "Replace --out if it exists.")
    seed: int = 0

    @classmethod
    def from_keywords(cls, **keywords: Any) -> "AdaptOptions":
        return cls.create(**keywords)

    @classmethod
    def create(cls, **keywords: Any) -> "AdaptOptions":
        """From ``adapt()``'s keywords; raises AdaptError naming every problem.

        >>> AdaptOptions.create(arch="resnet18", num_classes=4, freeze="head-only").freezing.freeze
        'head-only'
        """
        freezing = FreezeOptions(**{k: keywords.pop(k) for k in FREEZE_KEYWORDS if k in keywords})
        out = keywords.pop("out", None)
        allow = tuple(keywords.pop("allow_globals", ()) or ())
        problems = []
        for name in ("mean", "std"):  # "0.5,0.5,0.5", 0.5 or a sequence: a tuple of floats
            keywords[name], problem = _floats(name, keywords.get(name))
            problems += [problem] if problem else []
        opts = cls(freezing=freezing, out=Path(out) if out is not None else None, allow_globals=allow, **keywords)
        problems += opts.problems()
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
            problems.append("--num-classes is required: how many classes the new head predicts")
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
        for name, values in (("mean", self.mean), ("std", self.std)):
            if values is not None and len(values) != self.in_chans:
                problems.append(f"--{name} takes one value per input channel ({self.in_chans} for --in-chans "
                                f"{self.in_chans}), got {len(values)}")
        if self.std is not None and not all(s > 0 for s in self.std):
            problems.append(f"--std values must be positive, got {', '.join(f'{s:g}' for s in self.std)}")
        if self.class_names is not None and len(self.class_names) != n:
            problems.append(f"{len(self.class_names)} class names for --num-classes {n}")
        return problems + self.freezing.check()[2]


def _floats(name: str, value: Any) -> tuple[tuple[float, ...] | None, str | None]:
    """``--mean 0.5,0.4,0.3`` (commas or spaces), one number, or a sequence, as finite floats;
    or the problem with it."""
    if value is None:
        return None, None
    items = re.split(r"[,\s]+", value.strip()) if isinstance(value, str) else (
        [value] if isinstance(value, (int, float)) else value)
    try:
        floats = tuple(float(v) for v in items if not isinstance(v, bool))
    except (TypeError, ValueError):
        floats = ()
    if not floats or len(floats) != len(items) or not all(math.isfinite(f) for f in floats):
        return None, f"--{name} {value!r}: give one number per input channel, e.g. 0.5,0.5,0.5 (or 0.5 for one channel)"
    return floats, None
