"""What ``surgery demo`` runs on: real images with no download, and a checkpoint made the way
users get them.

The images are scikit-learn's bundled handwritten digits (``pip install 'surgery[demo]'``), each
class split once into two halves of different images. The checkpoint is what "someone else" made
with a plain PyTorch loop (no surgery involved): a torchvision ResNet-18 trained on all ten digits
of the first half at 32 px and saved through ``nn.DataParallel``, so every key carries
``module.``. The new task is another labelling, digits 5-9 (a 5-class head), with a few labelled
images per class from the second half: images the checkpoint never saw.

Everything here is deterministic on the CPU: the same files and the same numbers on every run.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from .errors import DemoError

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
INSTALL = "pip install 'surgery[demo]'"


def _load_digits():
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise DemoError(f"the demo's images come from scikit-learn, which is not installed; {INSTALL}") from None
    return load_digits()


def digits_imagefolder(out_dir: Path | str, classes: Iterable[int] = range(10), per_class: int | None = None,
                       size: int = 32, val_fraction: float = 0.2, val_per_class: int | None = None,
                       half: int | None = None) -> Path:
    """scikit-learn's bundled 8x8 digits as RGB PNGs in ImageFolder layout:
    ``out_dir/{train,val}/<digit>/<i>.png`` (i: index in ``load_digits``), a deterministic
    stratified split, upscaled to ``size`` x ``size``. Returns ``out_dir``.

    ``per_class`` keeps that many images of each class (train and val together);
    ``val_fraction`` of them go to val (at least one). With ``val_per_class`` instead, exactly
    that many of each class go to val and ``per_class`` is the train count. ``half`` (0 or 1)
    takes only that half of each class's images (a fixed split, so the two halves never share an
    image), before any of the above.
    """
    import numpy as np
    from PIL import Image

    digits = _load_digits()
    out_dir = Path(out_dir)
    if half not in (None, 0, 1):
        raise ValueError(f"half is 0, 1 or None, got {half!r}")
    pixels = np.clip(np.rint(digits.images * (255 / 16)), 0, 255).astype(np.uint8)  # values are 0..16
    for c in classes:
        c = int(c)
        if not 0 <= c <= 9:
            raise ValueError(f"digit classes are 0..9, got {c}")
        idx = np.flatnonzero(digits.target == c)
        # seeded per class, so a class's split does not depend on which other classes are asked for
        idx = idx[np.random.default_rng(c).permutation(len(idx))]
        if half is not None:
            idx = idx[:len(idx) // 2] if half == 0 else idx[len(idx) // 2:]
        if val_per_class is not None:
            n_val = min(val_per_class, len(idx) - 1)
            idx = idx[:n_val + (per_class if per_class is not None else len(idx))]
        else:
            if per_class is not None:
                idx = idx[:per_class]
            n_val = max(1, round(len(idx) * val_fraction)) if len(idx) > 1 else 0
        for split, part in (("val", idx[:n_val]), ("train", idx[n_val:])):
            folder = out_dir / split / str(c)
            folder.mkdir(parents=True, exist_ok=True)
            for i in sorted(part.tolist()):
                img = Image.fromarray(pixels[i]).resize((size, size), Image.Resampling.BILINEAR)
                img.convert("RGB").save(folder / f"{i}.png")
    return out_dir


def pretrained_digits(out_dir: Path | str, classes: Iterable[int] = range(10), *, arch: str = "resnet18",
                      size: int = 32, epochs: int = 6, seed: int = 0, half: int | None = 0) -> tuple[Path, dict]:
    """Train ``arch`` on the digits ``classes`` (the images of ``half``, see
    :func:`digits_imagefolder`) with :func:`surgery.trainer.loop.plain_epochs` and save it through
    ``nn.DataParallel``.
    Returns the checkpoint path and a summary (validation accuracy, epochs).
    Cached: a second call with the same arguments returns the file already there.
    """
    import torch
    import torchvision

    from .trainer.data import ImageDataset, build_transforms
    from .trainer.loop import plain_epochs
    from .trainer.predictions import score
    from .trainer.samples import discover

    out_dir = Path(out_dir)
    classes = [int(c) for c in classes]
    part = "" if half is None else f"_half{half}"
    name = f"{arch}_digits{classes[0]}-{classes[-1]}{part}_dataparallel.pth"
    path, info_path = out_dir / name, out_dir / (name + ".json")
    want = {"arch": arch, "classes": classes, "size": size, "epochs": epochs, "seed": seed, "half": half}
    if path.is_file() and info_path.is_file():
        info = json.loads(info_path.read_text())
        if {k: info.get(k) for k in want} == want:
            return path, info
    out_dir.mkdir(parents=True, exist_ok=True)
    samples = discover(digits_imagefolder(out_dir / f"digits{part}", classes=classes, size=size, half=half))
    train = ImageDataset(samples.train, build_transforms(size, MEAN, STD, 3, train=True, flip=False))
    val = ImageDataset(samples.val, build_transforms(size, MEAN, STD, 3, train=False))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = getattr(torchvision.models, arch)(num_classes=len(classes))
        opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.05)
        loader = torch.utils.data.DataLoader(train, batch_size=64, shuffle=True,
                                             generator=torch.Generator().manual_seed(seed))
        plain_epochs(model, loader, opt, epochs=epochs)
    model.eval()
    s = score(model, torch.utils.data.DataLoader(val, batch_size=256), prepare=lambda x, y: (x, y))
    info = {**want, "val_acc": s.correct / len(val), "val_images": len(val)}
    from .io import atomic_file

    # the way multi-GPU training scripts save: every key gets DataParallel's 'module.'
    with atomic_file(path) as tmp:
        torch.save(torch.nn.DataParallel(model).state_dict(), tmp)
    info_path.write_text(json.dumps(info, indent=2))
    return path, info


@dataclass(frozen=True)
class Plan:
    """How long each run trains, decided from the data. The head-only run trains on cached
    backbone features, so its epochs cost almost nothing: it gets enough optimizer steps for a
    linear head to converge. The runs that train the whole network share one budget of epochs."""

    train_images: int
    batch_size: int
    head_epochs: int
    epochs: int
    unfreeze_at: int

    @classmethod
    def for_data(cls, train_images: int, *, batch_size: int = 8, head_steps: int = 300,
                 full_steps: int = 60) -> "Plan":
        steps = max(math.ceil(train_images / batch_size), 1)
        epochs = max(math.ceil(full_steps / steps), 2)
        return cls(train_images, batch_size, max(math.ceil(head_steps / steps), 1), epochs,
                   unfreeze_at=max(epochs // 3, 1))


__all__ = ["DemoError", "digits_imagefolder", "pretrained_digits", "Plan", "INSTALL"]
