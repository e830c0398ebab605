"""Test-time augmentation for ``surgery evaluate/predict --tta``.

Each image is resized and centre-cropped to the evaluation resize (``input.resize``, a square),
then cut into five crops of the model's size: the centre and the four corners (torchvision's
``five_crop``), plus their horizontal mirrors unless the run trained with ``--no-flip`` (digits and
text have a handedness). The model's softmax probabilities are averaged over the views. Cropping
and mirroring commute with the per-channel normalisation, so the views are cut from the normalised
tensor that the plain pipeline would produce at the larger size.
"""

from __future__ import annotations

from typing import Any

from ..preprocess import InputPipeline


class TTAViews:
    """PIL image -> ``[V, C, H, W]``: 5 crops, or 10 with mirrors. Picklable for loader workers."""

    def __init__(self, pipeline: InputPipeline, flip: bool):
        from .data import build_transforms

        r = max(pipeline.resize, *pipeline.size)
        self.size = list(pipeline.size)
        self.flip = bool(flip)
        self.base = build_transforms((r, r), pipeline.mean, pipeline.std, pipeline.channels, train=False, resize=r,
                                     interpolation=pipeline.interpolation)

    @property
    def count(self) -> int:
        return 10 if self.flip else 5

    def __call__(self, img: Any) -> Any:
        import torch
        from torchvision.transforms.v2 import functional as F

        crops = list(F.five_crop(self.base(img), self.size))
        if self.flip:
            crops += [c.flip(-1) for c in crops]
        return torch.stack(crops)


def tta_probabilities(model: Any, views: Any) -> Any:
    """``[B, V, C, H, W]`` -> ``[B, K]``: the softmax averaged over the views."""
    b, v = views.shape[:2]
    logits = model(views.flatten(0, 1)).float()
    return logits.softmax(-1).view(b, v, -1).mean(1)
