"""What every run on an adapted folder starts from: :class:`RunInputs`, read and checked once.

``surgery train`` (and so ``--compare-scratch``) and ``--find-lr`` build their inputs here: the
manifest, the samples (split, checked against the model's classes, every image opened once), the
model, its input pipeline and the training and validation loaders. Nothing is written.
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
    samples, skipped = check_data(opts, manifest, need_val)
    model = load_adapted(opts.adapted, trust_code=opts.trust_code)
    pipe = input_pipeline(manifest, opts.image_size)
    if opts.image_size is not None:
        check_image_size(model, manifest, opts.image_size, pipe.channels)
    train_dl, val_dl = make_loaders(samples, pipe, batch_size=opts.batch_size, num_workers=opts.workers,
                                    seed=opts.seed, augment=opts.augment, flip=opts.flip, device=device,
                                    distributed=distributed, failure_log=failure_log,
                                    balanced=opts.balanced_sampler)
    return RunInputs(manifest, samples, skipped, model, pipe, train_dl, val_dl)


def check_data(opts: TrainOptions, manifest: Any, need_val: bool) -> tuple[Samples, list[tuple[str, str]]]:
    """The samples of ``opts.data`` (split by ``--val-split`` and ``--seed``) that match the
    manifest's classes, each image opened once; (samples, skipped images)."""
    samples = discover(opts.data, val_split=opts.val_split, seed=opts.seed)
    check_num_classes(samples, manifest.num_classes)
    named = manifest["class_names"] or manifest.head.get("class_names")
    if named and list(named) != list(samples.classes):
        raise DataError(f"{samples.root}: its classes ({', '.join(samples.classes[:8])}) are not the adapted "
                        f"model's class names ({', '.join(map(str, named[:8]))}); rename the class folders or "
                        f"re-run surgery adapt")
    if need_val and not samples.val:
        raise DataError(f"{samples.root}: no validation images; add val/<class>/ images or use --val-split")
    return scan_images(samples)


def check_image_size(model: nn.Module, manifest: Any, size: int, channels: int) -> None:
    """``--image-size`` other than adapt's: one image through the model first, so that a model
    built for one size (a ViT) is refused in one line, not with a traceback after the setup."""
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, channels, size, size))
    except Exception as e:  # noqa: BLE001 - any model code: reported as a refusal
        adapted = "x".join(map(str, manifest["input"]["size"]))
        raise TrainError(f"--image-size {size}: the model does not take {size}x{size} images "
                         f"({type(e).__name__}: {' '.join(str(e).split())[:120]}); it was adapted for {adapted}: "
                         f"drop --image-size, or re-run surgery adapt with --input-size {size}") from None
    finally:
        model.train(was)
