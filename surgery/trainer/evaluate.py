"""``evaluate()`` and ``predict()``: a trained (or adapted) folder on labelled data or on images.

    >>> rep = evaluate("run/", "data/")                      # doctest: +SKIP
    >>> rep.accuracy, rep.per_class
    >>> predict("run/", ["a.png", "b.jpg"], top_k=3)          # doctest: +SKIP
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch.utils.data import DataLoader

from ..adapter.manifest import read_manifest
from ..errors import DataError, InputError, SurgeryError
from .data import ImageDataset, image_problem, pipeline_transforms, scan_images
from .inputs import check_classes, read_model
from .samples import Samples, discover, images_under
from .device import resolve_device
from .plots import confusion_matrix, per_class_accuracy
from .predictions import score
from .tta import TTAViews, tta_probabilities

SPLITS = ("train", "val", "all")
EVALUATE_SCHEMA = "surgery.evaluate/1"  # of EvalReport.to_json, what `surgery evaluate --json` prints
PREDICT_SCHEMA = "surgery.predict/1"  # what `surgery predict --json` prints


@dataclass
class EvalReport:
    split: str
    images: int
    accuracy: float
    loss: float
    classes: list[str]
    per_class: list[float | None]
    confusion: list[list[int]]
    skipped: list[tuple[str, str]]
    tta: dict | None = None  # with --tta: {"views", "accuracy", "loss", "difference"} (accuracy - the plain one)

    def to_json(self) -> dict:
        d = {"schema": EVALUATE_SCHEMA, **asdict(self)}
        d["per_class"] = dict(zip(self.classes, self.per_class))
        d["skipped"] = [{"path": p, "reason": r} for p, r in self.skipped]
        return d


@dataclass
class _Loaded:
    """A folder's model in eval mode on its device, its manifest, its transform and class names."""

    manifest: Any
    device: Any
    model: Any
    transform: Callable
    names: list[str]
    views: TTAViews | None = None  # with --tta

    def probabilities(self, x: Any) -> Any:
        """Softmax of a batch: ``[B, C, H, W]``, or ``[B, V, C, H, W]`` views averaged."""
        return tta_probabilities(self.model, x) if x.ndim == 5 else self.model(x).float().softmax(1)


def _load(folder: str | os.PathLike, device: str, image_size: int | None, trust_code: bool = False,
          tta: bool = False) -> _Loaded:
    m = read_manifest(folder)
    dev = resolve_device(device)
    model, pipe = read_model(folder, m, image_size, trust_code=trust_code, device=dev)
    model.eval()
    tf = pipeline_transforms(pipe, train=False)
    names = m["class_names"] or m.head.get("class_names") or [str(i) for i in range(m.num_classes)]
    targs = train_args(m)
    views = TTAViews(pipe, flip=bool(targs.get("flip", True))) if tta else None
    return _Loaded(m, dev, model, tf, [str(n) for n in names], views)


def train_args(m: Any) -> dict:
    """The run's arguments the manifest records (``results.train_args``), or none when that part is
    missing or not a record: they only supply defaults (the split's seed, flips for TTA)."""
    results = m.data.get("results")
    targs = results.get("train_args") if isinstance(results, dict) else None
    return targs if isinstance(targs, dict) else {}


def _samples(data: str | os.PathLike, m: Any, split: str, val_split: float | None,
             seed: int | None) -> tuple[Samples, list[tuple[str, str]]]:
    """DATA split as the training run split it (its --val-split and --seed from the manifest's
    results) unless given; any split for ``all``."""
    targs = train_args(m)
    if seed is None:
        seed = targs.get("seed") if isinstance(targs.get("seed"), int) and not isinstance(targs.get("seed"), bool) else 0
    try:
        samples = discover(data, val_split=val_split, seed=seed)
    except DataError as e:
        saved = targs.get("val_split")
        saved = saved if isinstance(saved, float) and 0 < saved < 1 else None
        fallback = val_split if val_split is not None else saved
        if fallback is None and split == "all":
            fallback = 0.5  # any split: every image is used
        if fallback is None and val_split is None:
            _no_split_hint(data, seed, split, e)
        if fallback is None or val_split is not None:
            raise
        samples = discover(data, val_split=fallback, seed=seed)
    check_classes(samples, m)
    return scan_images(samples)


def _no_split_hint(data: str | os.PathLike, seed: int, split: str, error: DataError) -> None:
    """DATA that only lacks a val split (one folder of class folders, a CSV without a split
    column) and a model whose run recorded none: scoring it whole is what evaluate can do."""
    try:
        discover(data, val_split=0.5, seed=seed)
    except DataError:
        return  # something else is wrong with DATA: its own message says what
    raise DataError(f"{data}: has no {split} split (no train/ and val/ folders, no split column) and the model's "
                    f"run recorded no --val-split; pass --split all to score every image, or --val-split F to "
                    f"score a held-out fraction") from error


def evaluate(folder: str | os.PathLike, data: str | os.PathLike, *, split: str = "val",
             val_split: float | None = None, seed: int | None = None, batch_size: int = 64, workers: int = 0,
             device: str = "auto", image_size: int | None = None, trust_code: bool = False,
             tta: bool = False) -> EvalReport:
    """Accuracy, loss, per-class accuracy and confusion matrix of the model in ``folder`` on
    ``data``'s ``split`` (``val``, ``train`` or ``all``). For a single folder of class folders
    the split of the training run (its ``--val-split`` and ``--seed``, from the manifest's
    results) is reproduced unless given; ``split='all'`` needs no split at all. ``trust_code``:
    as in :func:`surgery.load_adapted`. ``tta``: also score with test-time augmentation
    (:mod:`.tta`: five crops, and their mirrors unless the run trained with ``--no-flip``) and
    report its accuracy beside the plain one."""
    if split not in SPLITS:
        raise SurgeryError(f"--split {split!r}: choose one of {', '.join(SPLITS)}")
    ld = _load(folder, device, image_size, trust_code, tta)
    samples, skipped = _samples(data, ld.manifest, split, val_split, seed)
    items = {"train": samples.train, "val": samples.val, "all": samples.train + samples.val}[split]
    if not items:
        raise DataError(f"{samples.root}: no images in the {split} split")
    loader = DataLoader(ImageDataset(items, ld.transform), batch_size=batch_size, shuffle=False, num_workers=workers)
    s = score(ld.model, loader, prepare=lambda x, y: (x.to(ld.device), y.to(ld.device)), keep=True)
    p, t = s.predicted(), s.targets()
    cm = confusion_matrix(p, t, ld.manifest.num_classes)
    acc = float((p == t).float().mean())
    return EvalReport(split=split, images=len(t), accuracy=acc, loss=s.loss_sum / len(t),
                      classes=list(samples.classes), per_class=per_class_accuracy(cm), confusion=cm, skipped=skipped,
                      tta=_tta_scores(ld, items, batch_size, workers, acc) if tta else None)


def _tta_scores(ld: _Loaded, items: list, batch_size: int, workers: int, plain_acc: float) -> dict:
    """Accuracy and loss of the views' averaged probabilities (the loss is their negative log)."""
    loader = DataLoader(ImageDataset(items, ld.views), batch_size=max(1, batch_size // ld.views.count),
                        shuffle=False, num_workers=workers)
    s = score(lambda x: ld.probabilities(x).clamp_min(1e-12).log(), loader,
              prepare=lambda x, y: (x.to(ld.device), y.to(ld.device)))
    acc = s.correct / max(s.n, 1)
    return {"views": ld.views.count, "accuracy": acc, "loss": s.loss_sum / max(s.n, 1), "difference": acc - plain_acc}


def _expand(images: Sequence[str | os.PathLike]) -> tuple[list[str], dict[str, str]]:
    """Every image path in the order given, a folder standing for the images under it; and
    ``{path: why}`` for those that cannot be read."""
    paths: list[str] = []
    bad: dict[str, str] = {}
    for img in images:
        if os.path.isdir(img):
            found = [str(p) for p in images_under(Path(img))]
            if not found:
                bad[str(img)] = "a folder with no images in it"
            paths += found or [str(img)]
        else:
            paths.append(str(img))
    for p in paths:
        if p not in bad:
            why = image_problem(p)
            if why is not None:
                bad[p] = why
    return list(dict.fromkeys(paths)), bad


def predict(folder: str | os.PathLike, images: Sequence[str | os.PathLike], *, top_k: int = 1, device: str = "auto",
            image_size: int | None = None, batch_size: int = 64, trust_code: bool = False,
            tta: bool = False) -> list[dict]:
    """``[{"path", "top": [{"class", "index", "prob"}, ...]}]`` for each image, in order; class
    names from the manifest. A folder stands for the images under it. An image that cannot be
    read gets ``"top": []`` and ``"error"`` (why) while the others are classified; when none can
    be read, an error names them. ``trust_code``: as in :func:`surgery.load_adapted`. ``tta``: the
    probabilities averaged over test-time views (:mod:`.tta`)."""
    if top_k < 1:
        raise SurgeryError(f"--top-k must be at least 1, got {top_k}")
    if not images:
        raise InputError("no images given; pass one or more image paths")
    order, bad = _expand(images)
    paths = [p for p in order if p not in bad]
    if not paths:
        listed = "; ".join(f"{p}: {why}" for p, why in list(bad.items())[:5])
        raise InputError(f"cannot read {len(bad)} image{'s' if len(bad) > 1 else ''}: {listed}")
    ld = _load(folder, device, image_size, trust_code, tta)
    k = min(top_k, ld.manifest.num_classes)
    transform = ld.views if tta else ld.transform

    found: dict[str, dict] = {}
    with torch.no_grad():
        for i in range(0, len(paths), batch_size):
            chunk = paths[i:i + batch_size]
            xs = [transform(ImageDataset.load(p)) for p in chunk]
            probs = ld.probabilities(torch.stack(xs).to(ld.device)).cpu()
            top = probs.topk(k, 1)
            for p, vals, idx in zip(chunk, top.values, top.indices):
                found[p] = {"path": p, "top": [{"class": ld.names[j], "index": int(j), "prob": float(v)}
                                               for v, j in zip(vals.tolist(), idx.tolist())]}
    return [found[p] if p in found else {"path": p, "top": [], "error": bad[p]} for p in order]


__all__ = ["evaluate", "predict", "EvalReport"]
