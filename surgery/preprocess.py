"""The input pipeline a model expects, derived in one place from its manifest.

Evaluation resizes the shorter side to ``resize`` and centre-crops ``size``. When only a crop size
is known, ``resize = floor(size / crop_pct)`` with crop_pct 0.875: timm's rule, which gives
torchvision's 256 for 224. adapt records it, and train, evaluate, predict and export read it back
through :func:`input_pipeline`, so they cannot disagree.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

CROP_PCT = 0.875


def resize_for(size: int, crop_pct: float = CROP_PCT) -> int:
    """The evaluation resize of a ``size`` crop: ``floor(size / crop_pct)``."""
    return int(math.floor(int(size) / float(crop_pct)))


@dataclass(frozen=True)
class InputPipeline:
    """What one input image becomes: channels, crop, resize, normalisation, interpolation."""

    size: tuple[int, int]
    resize: int
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str


def input_pipeline(manifest: Any, image_size: int | None = None) -> InputPipeline:
    """The pipeline of a manifest (a ``Manifest`` or its dict); ``image_size`` overrides its size,
    and the resize then follows the new size."""
    inp: Mapping = manifest["input"]
    if image_size is not None:
        size, resize = (int(image_size), int(image_size)), resize_for(image_size)
    else:
        size = tuple(int(s) for s in inp["size"])
        resize = int(inp["resize"]) if inp.get("resize") is not None else resize_for(max(size))
    return InputPipeline(size=size, resize=resize, channels=int(inp.get("channels", 3)),
                         mean=tuple(float(m) for m in inp["mean"]), std=tuple(float(s) for s in inp["std"]),
                         interpolation=str(inp.get("interpolation") or "bilinear"))
