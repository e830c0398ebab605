"""Skewed classes: ``--class-weights auto`` and ``--balanced-sampler``.

``auto`` weights each class's loss by ``n / (k * n_c)`` (n images, k classes, n_c images of the
class: scikit-learn's "balanced" rule), so every class carries the same total weight. The balanced
sampler draws training images with probability proportional to ``1 / n_c``, with replacement, as
many per epoch as there are training images, from the training loader's seeded generator.
A run's classes count as skewed when the largest class has at least twice the images of the
smallest; the summary then prints the accuracy of each class.
"""

from __future__ import annotations

from typing import Any, Sequence

SKEW_RATIO = 2.0
CLASS_WEIGHTS = ("none", "auto")


def class_counts(labels: Sequence[int], num_classes: int) -> list[int]:
    counts = [0] * num_classes
    for y in labels:
        counts[int(y)] += 1
    return counts


def balanced_weights(counts: Sequence[int]) -> list[float]:
    """``n / (k * n_c)`` per class; a class with no images gets 0."""
    n, k = sum(counts), len(counts)
    return [n / (k * c) if c else 0.0 for c in counts]


def is_skewed(counts: Sequence[int]) -> bool:
    present = [c for c in counts if c]
    return bool(present) and max(present) >= SKEW_RATIO * min(present)


def balanced_sampler(labels: Sequence[int], num_classes: int, generator: Any) -> Any:
    """A ``WeightedRandomSampler`` that draws every class equally often on average, from
    ``generator`` (the training loader's, so a checkpoint's random state covers it)."""
    import torch
    from torch.utils.data import WeightedRandomSampler

    w = balanced_weights(class_counts(labels, num_classes))
    per_image = torch.tensor([w[int(y)] for y in labels], dtype=torch.double)
    return WeightedRandomSampler(per_image, num_samples=len(labels), replacement=True, generator=generator)
