"""The data side of ``surgery train`` once the samples are known (:mod:`.samples` finds them):
check the images, transform and batch them.

    >>> samples = discover("data/", val_split=0.2, seed=0)
    >>> samples, bad = scan_images(samples)            # bad: [(path, reason)] for the run log
    >>> pipe = input_pipeline(manifest)                   # surgery.preprocess
    >>> train_dl, val_dl = make_loaders(samples, pipe, batch_size=64, num_workers=4, device="cuda")

Every problem with the user's data raises :class:`DataError` with a one-line message that names
the file and says what to do.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ..errors import DataError
from ..preprocess import InputPipeline, resize_for
from .augment import augment_policy, check_augment, policy_steps
from .balance import balanced_sampler
from .samples import Samples, few

log = logging.getLogger(__name__)

# ---------------------------------------------------------------- image checks


def image_problem(path: str) -> str | None:
    """None if ``path`` decodes, else why not. Formats with a real ``verify()`` (PNG: every chunk's
    CRC, up to IEND) use it; the rest (JPEG, ...) are fully decoded, JPEG at 1/8 scale via draft()."""
    from PIL import Image, ImageFile

    try:
        with Image.open(path) as im:
            if type(im).verify not in (Image.Image.verify, ImageFile.ImageFile.verify):
                im.verify()
            else:
                if im.format == "JPEG":
                    im.draft(im.mode, (1, 1))
                im.load()
        return None
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
        msg = " ".join(str(e).replace(f" {path!r}", "").split()) or type(e).__name__
        if isinstance(e, FileNotFoundError):
            msg = "no such file"
        return f"{type(e).__name__}: {msg}" if not isinstance(e, (OSError, SyntaxError)) else msg


def scan_images(samples: Samples, *, workers: int | None = None) -> tuple[Samples, list[tuple[str, str]]]:
    """Open every image once (threads: PIL decodes without the GIL) and drop those that fail.

    Returns the cleaned :class:`Samples` and ``[(path, reason)]`` of what was dropped, for the
    run log. Raises :class:`DataError` if a class is left without a readable image in a split
    where it had some, naming the class and a few of the bad files.
    """
    paths = sorted({p for p, _ in samples.train} | {p for p, _ in samples.val})
    workers = workers or min(8, os.cpu_count() or 1)
    if workers > 1 and len(paths) > 16:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            reasons = dict(zip(paths, pool.map(image_problem, paths, chunksize=32)))
    else:
        reasons = {p: image_problem(p) for p in paths}
    bad = [(p, r) for p, r in reasons.items() if r is not None]
    if not bad:
        return samples, []

    problems = []
    kept: dict[str, list[tuple[str, int]]] = {}
    for split, items in (("train", samples.train), ("val", samples.val)):
        kept[split] = [(p, lab) for p, lab in items if reasons[p] is None]
        had = {lab for _, lab in items}
        left = {lab for _, lab in kept[split]}
        for lab in sorted(had - left):
            lost = [Path(p).name for p, lb in items if lb == lab]
            problems.append(f"class {samples.classes[lab]!r} has no readable image left in {split} "
                            f"({len(lost)} unreadable: {few(lost, 3)})")
    if problems:
        raise DataError(f"{samples.root or 'the data'}: {'; '.join(problems)}; replace the broken files or remove the class")
    return dataclasses.replace(samples, train=kept["train"], val=kept["val"]), bad


# ---------------------------------------------------------------- transforms


# Grey modes deeper than 8 bits, which PIL's own convert("L") clips (every value above 255 is white)
_DEEP_GREY = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")
_ALPHA = ("RGBA", "LA", "PA", "La", "RGBa")


def to_mode(img: Any, mode: str) -> Any:
    """A decoded PIL image of any mode as ``'L'``, ``'RGB'`` or ``'RGBA'``, the model's channels.

    Deep grey goes to 8 bits by :func:`_deep_grey_to_8bit`. Transparency (an alpha channel, or a
    palette or colour key marked transparent) is kept for ``'RGBA'`` and otherwise composited over
    white, as a page shows the image (and as Hugging Face's ``convert_to_rgb`` does), rather than
    dropped, which would show whatever colour the encoder left under transparent pixels. Colour
    modes (CMYK, YCbCr, LAB, palette) become grey through RGB, by ITU-R 601 luma.
    """
    if img.mode == mode and "transparency" not in img.info:
        return img
    if img.mode in _DEEP_GREY:
        img = _deep_grey_to_8bit(img)
    if img.mode == "La":  # premultiplied: PIL converts it to nothing but LA
        img = img.convert("LA")
    if mode != "RGBA" and (img.mode in _ALPHA or "transparency" in img.info):
        img = _over_white(img)
    if mode == "L" and img.mode not in ("1", "L"):
        img = img.convert("RGB")
    return img if img.mode == mode else img.convert(mode)


def _deep_grey_to_8bit(img: Any) -> Any:
    """16- and 32-bit integer grey on the 16-bit scale, ``round(v / 257)`` (what 16-bit PNG and
    TIFF files hold, whichever of the two modes PIL decodes them to); float grey on [0, 1] when
    every finite value lies in it (the float image convention of torchvision and scikit-image),
    else on PIL's own 0..255 scale. Out of range values clip; NaN is black."""
    import numpy as np
    from PIL import Image

    a = np.asarray(img)
    if img.mode == "F":
        finite = a[np.isfinite(a)]
        top = 1.0 if finite.size and finite.min() >= 0 and finite.max() <= 1 else 255.0
        a = np.nan_to_num(a.astype(np.float64), nan=0.0, posinf=top, neginf=0.0) * (255.0 / top)
        out = np.rint(np.clip(a, 0, 255))
    else:
        out = (np.clip(a.astype(np.int64), 0, 65535) + 128) // 257  # round(v / 257): 65535 -> 255, no ties
    return Image.fromarray(out.astype(np.uint8))


def _over_white(img: Any) -> Any:
    """An image with transparency, composited over opaque white: ``round(c * a + 255 * (1 - a))``
    per channel with ``a`` in [0, 1], in integers so that it is exact."""
    import numpy as np
    from PIL import Image

    rgba = np.asarray(img.convert("RGBA"), dtype=np.uint32)
    rgb, alpha = rgba[..., :3], rgba[..., 3:]
    out = (rgb * alpha + 255 * (255 - alpha) + 127) // 255
    return Image.fromarray(out.astype(np.uint8))


class _ToMode:
    """:func:`to_mode` as a transform step (a class, not a lambda, so workers can pickle it)."""

    def __init__(self, mode: str):
        self.mode = mode

    def __call__(self, img: Any) -> Any:
        return to_mode(img, self.mode)

    def __repr__(self) -> str:
        return f"ToMode({self.mode!r})"


_PIL_MODES = {1: "L", 3: "RGB", 4: "RGBA"}


class _TileChannels:
    """``[3, H, W]`` -> ``[n, H, W]``: the RGB channels repeated cyclically, as ``adapt`` tiles
    the first conv's pretrained weights for ``--in-chans n``."""

    def __init__(self, n: int):
        self.n = n

    def __call__(self, x: Any) -> Any:
        reps = -(-self.n // x.shape[-3])
        return x.repeat(reps, 1, 1)[: self.n]

    def __repr__(self) -> str:
        return f"TileChannels({self.n})"


def _size_pair(image_size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(image_size, int) and not isinstance(image_size, bool):
        size = (image_size, image_size)
    else:
        try:
            size = tuple(int(s) for s in image_size)  # type: ignore[union-attr]
        except TypeError:
            raise DataError(f"image size must be an int or (height, width), got {image_size!r}") from None
        if len(size) == 1:
            size = (size[0], size[0])
    if len(size) != 2 or min(size) < 1:
        raise DataError(f"image size must be a positive int or (height, width), got {image_size!r}")
    return size  # type: ignore[return-value]


def _per_channel(name: str, values: Sequence[float], channels: int) -> list[float]:
    values = [float(v) for v in (values if isinstance(values, (list, tuple)) else list(values))]
    if len(values) == 1:
        values = values * channels
    if len(values) != channels:
        raise DataError(f"normalisation {name} has {len(values)} values for {channels} channel(s); give 1 or {channels}")
    if name == "std" and any(v <= 0 for v in values):
        raise DataError(f"normalisation std must be positive, got {values}")
    return values


def build_transforms(image_size: int | Sequence[int], mean: Sequence[float], std: Sequence[float], channels: int,
                     *, train: bool, augment: bool | str = True, flip: bool = True, resize: int | None = None,
                     interpolation: str = "bilinear", scale: tuple[float, float] = (0.35, 1.0)) -> Callable:
    """PIL image -> normalised float tensor ``[channels, H, W]``.

    Every image is first converted to the model's channel count by :func:`to_mode`: 1 grey, 3 RGB,
    4 RGBA (an opaque image gets alpha 1); any other count repeats the RGB channels cyclically.
    Training with ``augment`` (a policy of :mod:`.augment`: ``light``, the default, or True;
    ``randaugment``; ``trivialaugment``): ``RandomResizedCrop(size, scale)`` and, with ``flip``, a
    random horizontal flip (turn it off for digits, text, anything with a handedness), then the
    policy's operations. ``scale`` defaults to (0.35, 1): fine-tuning on little data wants milder
    crops than ImageNet's (0.08, 1).
    Evaluation (or training with ``augment`` ``none`` or False): ``Resize(resize)`` of the shorter side, then
    ``CenterCrop(size)``; ``resize`` defaults to ``preprocess.resize_for(max(size))``. Pass the manifest's
    ``input.resize`` only when not overriding its size. ``interpolation``: ``'bilinear'``,
    ``'bicubic'``, ``'nearest'`` (the manifest's ``input.interpolation``).
    """
    from torchvision.transforms import InterpolationMode, v2

    if not isinstance(channels, int) or isinstance(channels, bool) or channels < 1:
        raise DataError(f"channels must be a positive integer, got {channels!r}")
    size = _size_pair(image_size)
    mean_c, std_c = _per_channel("mean", mean, channels), _per_channel("std", std, channels)
    try:
        interp = interpolation if isinstance(interpolation, InterpolationMode) else InterpolationMode(str(interpolation).lower())
    except ValueError:
        raise DataError(f"unknown interpolation {interpolation!r}; use one of "
                        f"{', '.join(m.value for m in InterpolationMode)}") from None
    steps: list[Any] = [_ToMode(_PIL_MODES.get(channels, "RGB"))]
    policy = augment_policy(augment)
    if train and policy != "none":
        problems = check_augment(policy, channels)
        if problems:
            raise DataError(problems[0])
        steps.append(v2.RandomResizedCrop(size, scale=tuple(scale), interpolation=interp, antialias=True))
        if flip:
            steps.append(v2.RandomHorizontalFlip())
        steps += policy_steps(policy, interp)
    else:
        resize = int(resize) if resize is not None else resize_for(max(size))
        if resize < min(size):
            raise DataError(f"resize {resize} is smaller than the crop {size[0]}x{size[1]}")
        steps += [v2.Resize(resize, interpolation=interp, antialias=True), v2.CenterCrop(size)]
    steps += [v2.ToImage(), v2.ToDtype(torch.float32, scale=True)]
    if channels not in _PIL_MODES:
        steps.append(_TileChannels(channels))
    steps.append(v2.Normalize(mean_c, std_c))
    return v2.Compose(steps)


def pipeline_args(pipe: InputPipeline) -> dict[str, Any]:
    """The keyword arguments of :func:`build_transforms` that describe a model's input (:func:`surgery.preprocess.input_pipeline`)."""
    return dict(image_size=pipe.size, mean=pipe.mean, std=pipe.std, channels=pipe.channels, resize=pipe.resize,
                interpolation=pipe.interpolation)


def pipeline_transforms(pipe: InputPipeline, *, train: bool, augment: bool | str = True, flip: bool = True) -> Callable:
    """The transform of a model's input pipeline: what train, evaluate and predict apply to an image."""
    return build_transforms(**pipeline_args(pipe), train=train, augment=augment, flip=flip)


# ---------------------------------------------------------------- dataset and loaders


class ImageDataset(Dataset):
    """``(path, label)`` pairs and a transform; ``ds[i]`` is ``(tensor, label)``.

    A file that fails to decode here (after :func:`scan_images` passed it, or when it was not run)
    is not fatal. ``ds[i]`` then returns the next index ``i+1, i+2, ...`` (wrapping) whose file
    decodes, with that file's own label: the same substitute for the same ``i`` every time, so a
    seeded run stays reproducible. The bad file is remembered (not retried in this process),
    logged on the ``surgery.trainer.data`` logger, and, when ``failure_log`` is given, appended to
    that file as a JSON line ``{"path", "reason"}``: the one record that DataLoader workers and
    DDP ranks share. :meth:`collect_failures` merges both. More than ``max_substitutes`` bad files
    in a row raise :class:`DataError` (the data is broken, not a file).
    """

    def __init__(self, items: Sequence[tuple[str, int]], transform: Callable | None = None, *,
                 failure_log: str | os.PathLike | None = None, max_substitutes: int = 16):
        self.items = [(str(p), int(lab)) for p, lab in items]
        self.transform = transform
        self.failure_log = Path(failure_log) if failure_log is not None else None
        self.max_substitutes = max_substitutes
        self.failures: dict[str, str] = {}

    def __len__(self) -> int:
        return len(self.items)

    @property
    def targets(self) -> list[int]:
        return [lab for _, lab in self.items]

    @staticmethod
    def load(path: str) -> Any:
        """Decode ``path`` fully (lazy PIL decoding would fail later, outside our handling)."""
        from PIL import Image

        with Image.open(path) as im:
            im.load()
            return im

    def __getitem__(self, index: int) -> tuple[Any, int]:
        n = len(self.items)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {n} images")
        tries = min(n, self.max_substitutes + 1)
        for k in range(tries):
            path, label = self.items[(index + k) % n]
            if path in self.failures:
                continue
            try:
                img = self.load(path)
            except Exception as e:  # any decode failure: OSError, SyntaxError, ValueError, bomb errors
                self._record(path, " ".join(str(e).split()) or type(e).__name__)
                continue
            return (self.transform(img) if self.transform is not None else img), label
        raise DataError(f"{tries} images in a row from {self.items[index % n][0]} failed to decode "
                        f"(e.g. {self.failures.get(self.items[index % n][0], 'see the log')}); check the data "
                        f"folder is readable and run the image scan")

    def _record(self, path: str, reason: str) -> None:
        self.failures[path] = reason
        log.warning("skipping unreadable image %s: %s", path, reason)
        if self.failure_log is not None:
            try:  # O_APPEND: one short write per line, safe across processes
                with open(self.failure_log, "a", encoding="utf-8") as f:
                    f.write(json.dumps({"path": path, "reason": reason}) + "\n")
            except OSError as e:
                log.warning("cannot append to %s: %s", self.failure_log, e)

    def collect_failures(self) -> dict[str, str]:
        """``{path: reason}`` for files that failed in this process or any worker or rank."""
        out = dict(self.failures)
        if self.failure_log is not None and self.failure_log.is_file():
            for line in self.failure_log.read_text(encoding="utf-8").splitlines():
                try:
                    rec = json.loads(line)
                    out.setdefault(rec["path"], rec["reason"])
                except (ValueError, KeyError, TypeError):
                    continue  # a line cut short by a crash
        return out


class ShardSampler(Sampler[int]):
    """Indices ``rank, rank + world, ...`` in order, without DistributedSampler's padding: each
    validation image is seen exactly once across ranks. Ranks may get one batch more or less, so
    all-reduce totals after the loop, never a collective per batch."""

    def __init__(self, length: int, rank: int, world_size: int):
        self.length, self.rank, self.world_size = length, rank, world_size

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.length, self.world_size))

    def __len__(self) -> int:
        return len(range(self.rank, self.length, self.world_size))


def make_loaders(samples: Samples, pipe: InputPipeline, *, batch_size: int, num_workers: int = 0, seed: int = 0,
                 augment: bool | str = True, flip: bool = True, device: str | torch.device = "cpu",
                 distributed: bool = False, eval_batch_size: int | None = None,
                 failure_log: str | os.PathLike | None = None, balanced: bool = False) -> tuple[DataLoader, DataLoader]:
    """Training and validation loaders for ``samples``, transformed by the input pipeline ``pipe``
    (:func:`pipeline_transforms`).

    Training order comes from a ``torch.Generator`` seeded with ``seed`` (a new permutation each
    epoch, the same sequence every run); the same generator seeds the workers' augmentation
    (with ``num_workers=0`` augmentation draws from torch's global generator: seed it). With
    ``distributed`` (torch.distributed initialised), training uses ``DistributedSampler(seed=seed)``
    (call :func:`set_epoch` each epoch) and validation a :class:`ShardSampler`.
    ``pin_memory`` when ``device`` is CUDA and CUDA is available; ``persistent_workers`` when
    ``num_workers > 0``. The last training batch is dropped only when it would hold a single
    image (BatchNorm cannot train on one). ``balanced``: draw training images so that every class
    is equally likely (:func:`.balance.balanced_sampler`, from the same seeded generator); one
    process only.
    """
    if balanced and distributed:
        raise DataError("--balanced-sampler draws from one process's sampler; it cannot shard the data across "
                        "processes: drop it or --nproc")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise DataError(f"--batch-size must be a positive integer, got {batch_size!r}")
    if not isinstance(num_workers, int) or num_workers < 0:
        raise DataError(f"--num-workers must be 0 or more, got {num_workers!r}")
    if not samples.train:
        raise DataError(f"{samples.root or 'the data'}: no training images")
    train_ds = ImageDataset(samples.train, pipeline_transforms(pipe, train=True, augment=augment, flip=flip),
                            failure_log=failure_log)
    val_ds = ImageDataset(samples.val, pipeline_transforms(pipe, train=False), failure_log=failure_log)

    pin = torch.device(device).type == "cuda" and torch.cuda.is_available()
    common: dict[str, Any] = dict(num_workers=num_workers, pin_memory=pin, persistent_workers=num_workers > 0)
    rank, train_sampler, val_sampler = _distributed_samplers(train_ds, val_ds, seed) if distributed else (0, None, None)
    per_replica = len(train_sampler) if train_sampler is not None else len(train_ds)
    # distinct worker seeds per rank, or every rank would augment with the same random stream
    gen = torch.Generator().manual_seed(seed + 7919 * rank)
    if balanced:
        train_sampler = balanced_sampler([y for _, y in samples.train], len(samples.classes), gen)
    drop_last = per_replica > batch_size and per_replica % batch_size == 1
    train_loader = DataLoader(train_ds, batch_size=batch_size, shuffle=train_sampler is None, sampler=train_sampler,
                              generator=gen, drop_last=drop_last, **common)
    val_loader = DataLoader(val_ds, batch_size=eval_batch_size or batch_size, shuffle=False, sampler=val_sampler,
                            generator=torch.Generator().manual_seed(seed), **common)
    return train_loader, val_loader


def _distributed_samplers(train_ds: Dataset, val_ds: Dataset, seed: int) -> tuple[int, Sampler[int], Sampler[int]]:
    """(rank, training sampler, validation sampler) of this process under torch.distributed."""
    import torch.distributed as dist
    from torch.utils.data.distributed import DistributedSampler

    if not (dist.is_available() and dist.is_initialized()):
        raise DataError("distributed loading needs torch.distributed initialised first (launch with torchrun)")
    rank, world = dist.get_rank(), dist.get_world_size()
    return (rank, DistributedSampler(train_ds, num_replicas=world, rank=rank, shuffle=True, seed=seed),
            ShardSampler(len(val_ds), rank, world))


def set_epoch(loader: DataLoader, epoch: int) -> None:
    """Tell a DistributedSampler which epoch it is (its shuffle depends on it); a no-op otherwise."""
    sampler = getattr(loader, "sampler", None)
    if hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch)
