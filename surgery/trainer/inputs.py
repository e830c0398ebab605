"""What every run on an adapted folder starts from: :class:`RunInputs`, read and checked once.

``surgery train`` (and so ``--compare-scratch``) and ``--find-lr`` build their inputs here: the
manifest, the samples (split, checked against the model's classes, every image opened once), the
model, its input pipeline and the training and validation loaders. ``evaluate``, ``predict`` and
``advise`` score rather than train, and take the parts they need from here: :func:`read_samples`,
:func:`check_classes` and :func:`read_model` (which refuses an ``--image-size`` the model cannot take).
Nothing is written.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from ..adapter.core import load_adapted
from ..adapter.manifest import Manifest, read_manifest
from ..errors import DataError, TrainError
from ..preprocess import InputPipeline, input_pipeline
from .data import make_loaders, scan_images
from .options import TrainOptions
from .samples import Samples, check_num_classes, discover


@dataclass
class RunInputs:
    """An adapted folder and a dataset, ready to train on: the manifest, the samples (and the
    images the scan skipped), the model (on the CPU, as the folder holds it), its input pipeline,
    and the loaders."""

    manifest: Manifest
    samples: Samples
    skipped: list[tuple[str, str]]
    model: nn.Module
    pipe: InputPipeline
    train_dl: DataLoader
    val_dl: DataLoader


def read_inputs(opts: TrainOptions, *, device: torch.device, distributed: bool = False,
                failure_log: str | os.PathLike | None = None, need_val: bool = True) -> RunInputs:
    """``opts.adapted`` and ``opts.data`` read and checked (the classes, the images, ``--image-size``),
    then the loaders of :func:`.data.make_loaders` from ``opts``. ``need_val``: refuse data without
    validation images (a training run validates every epoch)."""
    manifest = read_manifest(opts.adapted)
    samples, skipped = read_samples(opts.data, val_split=opts.val_split, seed=opts.seed, need_val=need_val,
                                    manifest=manifest)
    model, pipe = read_model(opts.adapted, manifest, opts.image_size, trust_code=opts.trust_code)
    train_dl, val_dl = make_loaders(samples, pipe, batch_size=opts.batch_size, num_workers=opts.workers,
                                    seed=opts.seed, augment=opts.augment, flip=opts.flip, device=device,
                                    distributed=distributed, failure_log=failure_log,
                                    balanced=opts.balanced_sampler)
    return RunInputs(manifest, samples, skipped, model, pipe, train_dl, val_dl)


def read_samples(data: str | os.PathLike, *, val_split: float | None, seed: int, need_val: bool,
                 manifest: Manifest | None = None) -> tuple[Samples, list[tuple[str, str]]]:
    """The samples of ``data`` (split by ``val_split`` and ``seed``), checked against the manifest's
    classes when one is given, each image opened once; (samples, skipped images). ``need_val``:
    refuse data without validation images."""
    samples = discover(data, val_split=val_split, seed=seed)
    if manifest is not None:
        check_classes(samples, manifest)
    if need_val and not samples.val:
        raise DataError(f"{samples.root}: no validation images; add val/<class>/ images or use --val-split")
    return scan_images(samples)


def check_classes(samples: Samples, manifest: Manifest) -> None:
    """As many classes as the model's head, and, when the manifest names them, the same names in
    the same order (else a model would learn or be scored on labels shuffled against its head)."""
    check_num_classes(samples, manifest.num_classes)
    named = manifest["class_names"] or manifest.head.get("class_names")
    if named and list(named) != list(samples.classes):
        raise DataError(f"{samples.root}: its classes ({', '.join(samples.classes[:8])}) are not the model's "
                        f"class names ({', '.join(map(str, named[:8]))}); rename the class folders to match, "
                        f"or adapt the checkpoint again for these classes")


def read_model(folder: str | os.PathLike, manifest: Manifest, image_size: int | None, *, trust_code: bool,
               device: torch.device | None = None) -> tuple[nn.Module, InputPipeline]:
    """The folder's model (on ``device``, else the CPU) and its input pipeline at ``image_size``
    (adapt's when None), one image through it first when the size is not adapt's."""
    model = load_adapted(folder, device=device, trust_code=trust_code)
    pipe = input_pipeline(manifest, image_size)
    if image_size is not None:
        check_image_size(model, manifest, image_size, pipe.channels, next_device(model))
    return model, pipe


def next_device(model: nn.Module) -> torch.device:
    """Where the model's first parameter or buffer lives (the CPU for a model with neither)."""
    for t in (*model.parameters(), *model.buffers()):
        return t.device
    return torch.device("cpu")


def check_image_size(model: nn.Module, manifest: Any, size: int, channels: int,
                     device: torch.device | None = None) -> None:
    """``--image-size`` other than adapt's: one image through the model first, so that a model
    built for one size (a ViT) is refused in one line, not with a traceback after the setup."""
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, channels, size, size, device=device))
    except Exception as e:  # noqa: BLE001 - any model code: reported as a refusal
        adapted = "x".join(map(str, manifest["input"]["size"]))
        raise TrainError(f"--image-size {size}: the model does not take {size}x{size} images "
                         f"({type(e).__name__}: {' '.join(str(e).split())[:120]}); it was adapted for {adapted}: "
                         f"drop --image-size, or re-run surgery adapt with --input-size {size}") from None
    finally:
        model.train(was)
