"""The one prediction loop: a model (or its head on cached features) over labelled batches.

Validation after each epoch, the confusion matrix of the best epoch and ``surgery evaluate`` all
run :func:`score`; they differ only in the batches they feed it and what they read back.

    >>> s = score(model, loader, prepare=lambda x, y: (x, y), keep=True)   # doctest: +SKIP
    >>> s.loss_sum / s.n, s.correct / s.n, confusion_matrix(s.predicted(), s.targets(), k)
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator

if TYPE_CHECKING:  # pragma: no cover
    import torch


@dataclass
class Scores:
    """Summed cross-entropy, correct predictions and images; with ``keep``, every prediction
    and target on the CPU in the batches' order."""

    loss_sum: float = 0.0
    correct: int = 0
    n: int = 0
    preds: list = field(default_factory=list)
    labels: list = field(default_factory=list)

    def predicted(self) -> "torch.Tensor":
        import torch

        return torch.cat(self.preds)

    def targets(self) -> "torch.Tensor":
        import torch

        return torch.cat(self.labels)


def score(forward: Callable[[Any], Any], batches: Iterable[tuple[Any, Any]], *,
          prepare: Callable[[Any, Any], tuple[Any, Any]],
          autocast: Callable[[], Any] = contextlib.nullcontext, keep: bool = False) -> Scores:
    """Run ``forward`` without gradients over ``batches`` of ``(inputs, labels)``, each first
    passed through ``prepare`` (to the device), the forward under ``autocast``. The loss is
    computed in float32 whatever the autocast dtype."""
    import torch
    import torch.nn.functional as F

    s = Scores()
    with torch.no_grad():
        for x, y in batches:
            x, y = prepare(x, y)
            with autocast():
                logits = forward(x)
            s.loss_sum += float(F.cross_entropy(logits.float(), y, reduction="sum"))
            pred = logits.argmax(1)
            s.correct += int((pred == y).sum())
            s.n += len(y)
            if keep:
                s.preds.append(pred.cpu())
                s.labels.append(y.cpu())
    return s


def feature_batches(x: "torch.Tensor", y: "torch.Tensor", size: int = 256) -> Iterator[tuple[Any, Any]]:
    """Cached features and their labels in batches of ``size``, in order."""
    for i in range(0, len(y), size):
        yield x[i:i + size], y[i:i + size]
