"""``evaluate()`` and ``predict()``: a trained (or adapted) folder on labelled data or on images.

    >>> rep = evaluate("run/", "data/")                      # doctest: +SKIP
    >>> rep.accuracy, rep.per_class
    >>> predict("run/", ["a.png", "b.jpg"], top_k=3)          # doctest: +SKIP
"""

from __future__ import annotations

import os
from pathlib import Path
from dataclasses import asdict, dataclass
from typing import Sequence

from ..errors import InputError, SurgeryError

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

    def to_json(self) -> dict:
        d = {"schema": EVALUATE_SCHEMA, **asdict(self)}
        d["per_class"] = dict(zip(self.classes, self.per_class))
        d["skipped"] = [{"path": p, "reason": r} for p, r in self.skipped]
        return d


def _setup(folder: str | os.PathLike, device: str, image_size: int | None, trust_code: bool = False):
    import torch

    from ..adapter.core import load_adapted
    from ..adapter.manifest import read_manifest
    from .data import build_transforms
    from .runner import _resolve_device

    m = read_manifest(folder)
    dev = _resolve_device(device)
    model = load_adapted(folder, device=dev, trust_code=trust_code)
    model.eval()
    inp = m["input"]
    if image_size is not None:
        size, resize = image_size, None
    else:
        size, resize = list(inp["size"]), inp.get("resize")
    tf = build_transforms(size, inp["mean"], inp["std"], int(inp.get("channels", 3)), train=False, resize=resize,
                          interpolation=inp.get("interpolation") or "bilinear")
    names = m["class_names"] or m.head.get("class_names") or [str(i) for i in range(m.num_classes)]
    del torch
    return m, dev, model, tf, [str(n) for n in names]


def evaluate(folder: str | os.PathLike, data: str | os.PathLike, *, split: str = "val",
             val_split: float | None = None, seed: int | None = None, batch_size: int = 64, workers: int = 0,
             device: str = "auto", image_size: int | None = None, trust_code: bool = False) -> EvalReport:
    """Accuracy, loss, per-class accuracy and confusion matrix of the model in ``folder`` on
    ``data``'s ``split`` (``val``, ``train`` or ``all``). For a single folder of class folders
    the split of the training run (its ``--val-split`` and ``--seed``, from the manifest's
    results) is reproduced unless given; ``split='all'`` needs no split at all. ``trust_code``:
    as in :func:`surgery.load_adapted`."""
    import torch
    from torch.utils.data import DataLoader

    from .data import DataError, ImageDataset, check_num_classes, discover, scan_images
    from .plots import confusion_matrix, per_class_accuracy

    if split not in SPLITS:
        raise SurgeryError(f"--split {split!r}: choose one of {', '.join(SPLITS)}")
    m, dev, model, tf, names = _setup(folder, device, image_size, trust_code)
    targs = (m.data.get("results") or {}).get("train_args") or {}
    if seed is None:
        seed = int(targs.get("seed") or 0)
    try:
        samples = discover(data, val_split=val_split, seed=seed)
    except DataError:
        fallback = val_split if val_split is not None else targs.get("val_split")
        if fallback is None and split == "all":
            fallback = 0.5  # any split: every image is used
        if fallback is None or val_split is not None:
            raise
        samples = discover(data, val_split=fallback, seed=seed)
    check_num_classes(samples, m.num_classes)
    if m["class_names"] and list(samples.classes) != names:
        raise DataError(f"{samples.root}: its classes ({', '.join(samples.classes[:8])}) are not the model's "
                        f"({', '.join(names[:8])})")
    samples, skipped = scan_images(samples)
    items = {"train": samples.train, "val": samples.val, "all": samples.train + samples.val}[split]
    if not items:
        raise DataError(f"{samples.root}: no images in the {split} split")
    loader = DataLoader(ImageDataset(items, tf), batch_size=batch_size, shuffle=False, num_workers=workers)
    preds, targets = [], []
    loss = 0.0
    with torch.no_grad():
        for x, y in loader:
            logits = model(x.to(dev)).float().cpu()
            loss += float(torch.nn.functional.cross_entropy(logits, y, reduction="sum"))
            preds.append(logits.argmax(1))
            targets.append(y)
    p, t = torch.cat(preds), torch.cat(targets)
    cm = confusion_matrix(p, t, m.num_classes)
    return EvalReport(split=split, images=len(t), accuracy=float((p == t).float().mean()), loss=loss / len(t),
                      classes=list(samples.classes), per_class=per_class_accuracy(cm), confusion=cm, skipped=skipped)


def _expand(images: Sequence[str | os.PathLike]) -> tuple[list[str], dict[str, str]]:
    """Every image path in the order given, a folder standing for the images under it; and
    ``{path: why}`` for those that cannot be read."""
    from .data import _image_problem, _images_under

    paths: list[str] = []
    bad: dict[str, str] = {}
    for img in images:
        if os.path.isdir(img):
            found = [str(p) for p in _images_under(Path(img))]
            if not found:
                bad[str(img)] = "a folder with no images in it"
            paths += found or [str(img)]
        else:
            paths.append(str(img))
    for p in paths:
        if p not in bad:
            why = _image_problem(p)
            if why is not None:
                bad[p] = why
    return list(dict.fromkeys(paths)), bad


def predict(folder: str | os.PathLike, images: Sequence[str | os.PathLike], *, top_k: int = 1, device: str = "auto",
            image_size: int | None = None, batch_size: int = 64, trust_code: bool = False) -> list[dict]:
    """``[{"path", "top": [{"class", "index", "prob"}, ...]}]`` for each image, in order; class
    names from the manifest. A folder stands for the images under it. An image that cannot be
    read gets ``"top": []`` and ``"error"`` (why) while the others are classified; when none can
    be read, an error names them. ``trust_code``: as in :func:`surgery.load_adapted`."""
    import torch

    if top_k < 1:
        raise SurgeryError(f"--top-k must be at least 1, got {top_k}")
    if not images:
        raise InputError("no images given; pass one or more image paths")
    order, bad = _expand(images)
    paths = [p for p in order if p not in bad]
    if not paths:
        listed = "; ".join(f"{p}: {why}" for p, why in list(bad.items())[:5])
        raise InputError(f"cannot read {len(bad)} image{'s' if len(bad) > 1 else ''}: {listed}")
    m, dev, model, tf, names = _setup(folder, device, image_size, trust_code)
    k = min(top_k, m.num_classes)
    from PIL import Image

    found: dict[str, dict] = {}
    with torch.no_grad():
        for i in range(0, len(paths), batch_size):
            chunk = paths[i:i + batch_size]
            xs = []
            for p in chunk:
                with Image.open(p) as im:
                    im.load()
                    xs.append(tf(im))
            probs = torch.softmax(model(torch.stack(xs).to(dev)).float(), 1).cpu()
            top = probs.topk(k, 1)
            for p, vals, idx in zip(chunk, top.values, top.indices):
                found[p] = {"path": p, "top": [{"class": names[j], "index": int(j), "prob": float(v)}
                                               for v, j in zip(vals.tolist(), idx.tolist())]}
    return [found[p] if p in found else {"path": p, "top": [], "error": bad[p]} for p in order]


__all__ = ["evaluate", "predict", "EvalReport"]
