"""Training curves and confusion matrices as PNG files, plus the numbers behind them.

matplotlib is imported inside the plotting functions, and only its object API is used
(``matplotlib.figure.Figure`` rendered by Agg): no pyplot, no global backend switch, nothing
shown, safe from threads. Files are written through a temp file and renamed into place.

    >>> m = confusion_matrix(preds, targets, num_classes=3)
    >>> per_class_accuracy(m)
    [0.9, 1.0, None]
    >>> plot_confusion(m, ["cat", "dog", "fox"], run / "confusion.png")
    >>> plot_curves(history, run / "curves.png", unfreeze_epochs=[3])
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

from ..io import atomic_file


def confusion_matrix(preds: Iterable[int] | Any, targets: Iterable[int] | Any, num_classes: int) -> list[list[int]]:
    """``m[true][predicted]`` counts. ``preds``/``targets``: sequences of ints or 1-D tensors."""
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    if type(preds).__module__.startswith("torch") and type(targets).__module__.startswith("torch"):
        import torch

        p, t = preds.reshape(-1).long().cpu(), targets.reshape(-1).long().cpu()
        if p.numel() != t.numel():
            raise ValueError(f"{p.numel()} predictions for {t.numel()} targets")
        for name, v in (("prediction", p), ("target", t)):
            if v.numel() and (int(v.min()) < 0 or int(v.max()) >= num_classes):
                raise ValueError(f"a {name} is outside 0..{num_classes - 1}")
        counts = torch.bincount(t * num_classes + p, minlength=num_classes * num_classes)
        return counts.view(num_classes, num_classes).tolist()
    p_list = [int(v) for v in (preds.tolist() if hasattr(preds, "tolist") else preds)]
    t_list = [int(v) for v in (targets.tolist() if hasattr(targets, "tolist") else targets)]
    if len(p_list) != len(t_list):
        raise ValueError(f"{len(p_list)} predictions for {len(t_list)} targets")
    m = [[0] * num_classes for _ in range(num_classes)]
    for i, (p_, t_) in enumerate(zip(p_list, t_list)):
        if not (0 <= p_ < num_classes and 0 <= t_ < num_classes):
            raise ValueError(f"item {i}: prediction {p_} / target {t_} outside 0..{num_classes - 1}")
        m[t_][p_] += 1
    return m


def per_class_accuracy(matrix: Sequence[Sequence[int]]) -> list[float | None]:
    """Recall of each class (``m[c][c] / sum(m[c])``); None for a class with no examples."""
    return [(row[i] / sum(row)) if sum(row) else None for i, row in enumerate(matrix)]


def _figure(width: float, height: float) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _save(fig: Any, path: str | os.PathLike) -> Path:
    path = Path(path)
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png")  # the temp name ends in .tmp: say the format
    return path


def _finite(v: Any) -> float | None:
    if v is None:
        return None
    try:
        v = float(v)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _mark(ax: Any, epoch: int, label: str, style: str) -> None:
    ax.axvline(epoch, linestyle=style, color="0.45", linewidth=1)
    ax.text(epoch, 0.98, f" {label}", transform=ax.get_xaxis_transform(), rotation=90,
            va="top", ha="right", fontsize=8, color="0.3")


def _plot_lr(ax: Any, metrics: Sequence[dict]) -> None:
    """Each group's learning rate at the end of each epoch (0 while the group is frozen)."""
    groups = list(dict.fromkeys(g for m in metrics for g in (m.get("lr") or {})))
    for g in groups:
        pts = [(m["epoch"], _finite((m.get("lr") or {}).get(g))) for m in metrics if "epoch" in m]
        pts = [(x, y) for x, y in pts if y is not None]
        if pts:
            ax.plot([x for x, _ in pts], [y for _, y in pts], "-", marker=".", label=g)
    ax.set_title("learning rate")
    if groups:
        ax.legend(fontsize=7)


def plot_curves(metrics: Sequence[dict], path: str | os.PathLike, unfreeze_epochs: Iterable[int] = (),
                best_epoch: int | None = None, stopped_at: int | None = None) -> Path:
    """Loss, accuracy (train and val) and each group's learning rate per epoch, in three panels;
    dashed lines at each epoch in ``unfreeze_epochs``, a dotted one at ``best_epoch`` (whose
    weights were kept) and at ``stopped_at`` (early stopping). ``metrics``: dicts with ``epoch``,
    ``train_loss``, ``val_loss``, ``train_acc``, ``val_acc``, ``lr`` (missing, None, NaN: not drawn)."""
    from matplotlib.ticker import MaxNLocator

    fig = _figure(14, 4)
    axes = fig.subplots(1, 3)
    unfreeze = sorted({int(e) for e in unfreeze_epochs})
    _plot_lr(axes[2], metrics)
    for ax in axes:
        for e in unfreeze:
            _mark(ax, e, "unfreeze", "--")
        if best_epoch:
            _mark(ax, best_epoch, "best", ":")
        if stopped_at:
            _mark(ax, stopped_at, "early stop", "-.")
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    for ax, key, title in ((axes[0], "loss", "loss"), (axes[1], "acc", "accuracy")):
        drawn = []
        for split, style in (("train", "-o"), ("val", "--s")):
            pts = [(m["epoch"], _finite(m.get(f"{split}_{key}"))) for m in metrics if "epoch" in m]
            pts = [(x, y) for x, y in pts if y is not None]
            if pts:
                ax.plot([x for x, _ in pts], [y for _, y in pts], style, markersize=4, label=split)
                drawn.extend(y for _, y in pts)
        if key == "acc" and drawn and max(drawn) <= 1.0:
            ax.set_ylim(0, 1.02)
        ax.set_title(title)
        if drawn:
            ax.legend()
        else:
            ax.text(0.5, 0.5, "no data yet", transform=ax.transAxes, ha="center", va="center", color="0.5")
    return _save(fig, path)


def plot_confusion(matrix: Sequence[Sequence[int]], classes: Sequence[str], path: str | os.PathLike,
                   title: str = "Confusion matrix (validation)") -> Path:
    """Rows: true class, columns: predicted. Cells coloured by the fraction of their row (so
    small classes are as readable as large ones) and annotated with the count (up to 30 classes)."""
    n = len(classes)
    if n < 1 or len(matrix) != n or any(len(row) != n for row in matrix):
        raise ValueError(f"matrix must be {n}x{n} for {n} classes")
    totals = [sum(row) for row in matrix]
    norm = [[(v / totals[i]) if totals[i] else 0.0 for v in row] for i, row in enumerate(matrix)]
    side = min(max(4.5, 0.45 * n + 2.5), 40)
    fig = _figure(side + 1.2, side)
    ax = fig.subplots()
    im = ax.imshow(norm, cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
    if n <= 30:
        size = 9 if n <= 12 else 7 if n <= 20 else 5
        for i in range(n):
            for j in range(n):
                ax.text(j, i, str(matrix[i][j]), ha="center", va="center", fontsize=size,
                        color="white" if norm[i][j] > 0.5 else "black")
    if n <= 60:
        ax.set_xticks(range(n), labels=[str(c) for c in classes], rotation=45 if n > 6 else 0,
                      ha="right" if n > 6 else "center", fontsize=8)
        ax.set_yticks(range(n), labels=[str(c) for c in classes], fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    total = sum(totals)
    correct = sum(matrix[i][i] for i in range(n))
    ax.set_title(f"{title}\naccuracy {correct / total:.1%} of {total}" if total else title, fontsize=10)
    return _save(fig, path)
