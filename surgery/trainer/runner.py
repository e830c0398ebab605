"""``surgery.train()``: fine-tune a folder written by ``surgery adapt`` on a small image dataset.

Phases come from the manifest: every group is in the optimizer from the first step and frozen
groups are toggled at each epoch start (``apply_schedule``), so the learning-rate schedule stays
right when layers unfreeze. The schedule (warmup, then cosine, one-cycle or constant) is a
multiplier on each group's base lr (``lr * lr_mult``), stepped per batch over the whole run.
Norm and bias parameters get no weight decay. Everything is written into OUT, each file
atomically; ``OUT/checkpoints/last.pt`` resumes exactly.

Library code never prints: pass ``observer(event, info)`` to follow progress. Events:
``start``, ``cache`` (images done), ``epoch_start``, ``step``, ``epoch_end`` (the epoch's
metrics), ``log`` (a run.log line), ``end``.

    >>> result = train("adapted/", "data/", epochs=5, lr=1e-3, out="run/")  # doctest: +SKIP
    >>> result.best_val_acc
    0.93
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import signal
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional

from ..errors import OutputError
from ..io import OUTPUTS, check_replaceable, remove_outputs, remove_temps
from .optim import LrMultiplier, optimizer_groups
from .outputs import RunFiles, plot_run_curves, write_model
from .state import (BEST, CHECKPOINT_DIR, LAST, ResumeError, TrainError, TrainInterrupted, check_fingerprint,
                    changing_keys, clean_state_dict, fingerprint, load_checkpoint, rng_state, save_checkpoint, set_rng_state, unwrap)

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torch import nn

Observer = Callable[[str, dict], None]
OPTIMIZERS = ("adamw", "sgd")
SCHEDULES = ("cosine", "onecycle", "constant")
CACHE_CHOICES = ("auto", "on", "off")
DEVICES = ("auto", "cpu", "cuda")
SCHEMA = "surgery.train/1"  # of TrainResult.to_json, what `surgery train --json` prints


@dataclass
class TrainResult:
    """What a run produced. ``metrics``: one dict per epoch, as in metrics.jsonl."""

    out: str
    best_epoch: int
    best_val_acc: float
    best_val_loss: float
    epochs_run: int
    stopped_early: bool
    class_names: list[str]
    metrics: list[dict]
    cache_used: bool = False
    cache_reason: str = ""
    skipped: list[tuple[str, str]] = field(default_factory=list)
    device: str = "cpu"
    world_size: int = 1
    resumed_from: str | None = None

    def to_json(self) -> dict:
        d = {"schema": SCHEMA, **asdict(self)}
        d["skipped"] = [{"path": p, "reason": r} for p, r in self.skipped]
        return d


# ----------------------------------------------------------------------------- helpers

def _phase(manifest: Any, epoch: int) -> str:
    from ..adapter.freeze import group_trainable

    groups = manifest.groups
    frozen0 = [g for g in groups if not g["trainable"]]
    if not frozen0:
        return "unfrozen"
    opened = [g for g in frozen0 if group_trainable(g, epoch)]
    if not opened:
        return "frozen"
    if len(opened) == len(frozen0):
        return "unfrozen"
    if manifest["schedule"].get("kind") == "gradual":
        return f"gradual {len({g.get('stage', g['name']) for g in opened})}"
    return "unfrozen"


def _resolve_device(device: str) -> "torch.device":
    import torch

    if device not in DEVICES and not str(device).startswith("cuda:"):
        raise TrainError(f"--device {device!r}: choose one of {', '.join(DEVICES)}")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise TrainError(f"--device {device}: CUDA is not available here; use --device cpu or auto")
    return torch.device(device)


def _check_options(**o: Any) -> None:
    problems = []
    if not isinstance(o["epochs"], int) or o["epochs"] < 1:
        problems.append(f"--epochs must be a positive integer, got {o['epochs']!r}")
    if o["lr"] != "auto" and not (isinstance(o["lr"], (int, float)) and o["lr"] > 0 and math.isfinite(o["lr"])):
        problems.append(f"--lr must be a positive number or 'auto', got {o['lr']!r}")
    if o["optimizer"] not in OPTIMIZERS:
        problems.append(f"--optimizer {o['optimizer']!r}: choose one of {', '.join(OPTIMIZERS)}")
    if o["schedule"] not in SCHEDULES:
        problems.append(f"--schedule {o['schedule']!r}: choose one of {', '.join(SCHEDULES)}")
    if o["cache_features"] not in CACHE_CHOICES:
        problems.append(f"--cache-features {o['cache_features']!r}: choose one of {', '.join(CACHE_CHOICES)}")
    if not 0 <= o["label_smoothing"] < 1:
        problems.append(f"--label-smoothing must be in [0, 1), got {o['label_smoothing']}")
    if o["clip_grad"] is not None and not o["clip_grad"] > 0:
        problems.append(f"--clip-grad must be positive, got {o['clip_grad']}")
    if o["patience"] is not None and o["patience"] < 1:
        problems.append(f"--patience must be at least 1 epoch, got {o['patience']}")
    if o["warmup_epochs"] is not None and o["warmup_epochs"] < 0:
        problems.append(f"--warmup-epochs must be >= 0, got {o['warmup_epochs']}")
    if o["cache_views"] < 0:
        problems.append(f"--cache-views must be >= 0, got {o['cache_views']}")
    if o["weight_decay"] is not None and o["weight_decay"] < 0:
        problems.append(f"--weight-decay must be >= 0, got {o['weight_decay']}")
    if not isinstance(o["batch_size"], int) or o["batch_size"] < 1:
        problems.append(f"--batch-size must be a positive integer, got {o['batch_size']!r}")
    if not isinstance(o["workers"], int) or o["workers"] < 0:
        problems.append(f"--workers must be 0 or more, got {o['workers']!r}")
    if o["image_size"] is not None and o["image_size"] < 1:
        problems.append(f"--image-size must be positive, got {o['image_size']}")
    if problems:
        raise TrainError("; ".join(problems))


def _inside(a: Path, b: Path) -> bool:
    a, b = a.resolve(), b.resolve()
    return a == b or b in a.parents


def _check_out(out: Path, *, force: bool, resuming_here: bool, inputs: list[Path]) -> None:
    """Refuse, before any work, an OUT that exists (without --force/--resume), holds an input,
    or cannot be written."""
    for src in inputs:
        if _inside(src, out) or _inside(out, src):
            raise OutputError(f"{out}: the output folder overlaps the input {src}; write the run elsewhere")
    if resuming_here:
        if not out.is_dir():
            raise ResumeError(f"{out}: --resume continues a run in OUT, but there is no such folder")
    elif (out.exists() or out.is_symlink()) and not force:
        raise OutputError(f"{out}: already exists; pass --force to replace it, or --resume to continue its run")
    elif out.exists() or out.is_symlink():
        check_replaceable(out, "folder", OUTPUTS["train"])
    probe = out if out.exists() else out.parent
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise OutputError(f"{out}: cannot create it: {probe} is not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise OutputError(f"{out}: cannot write there: {probe} is not writable")


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """SIGTERM raises KeyboardInterrupt while training (main thread only), like Ctrl-C."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):  # noqa: ARG001
        raise KeyboardInterrupt

    try:
        old = signal.signal(signal.SIGTERM, handler)
    except (ValueError, OSError):  # pragma: no cover
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


# ----------------------------------------------------------------------------- train

def _load_moving(model: "nn.Module", state: dict, moving: set[str], where: str) -> None:
    """Load a checkpoint's tensors: those the run can change. The rest are the adapted weights."""
    from ..adapter.core import load_weights

    missing, unexpected = load_weights(unwrap(model), state, strict=False)
    lacking = sorted(set(missing) & moving)
    if lacking or unexpected:
        raise ResumeError(f"{where}: does not match this run's model (missing {lacking[:3]}, unexpected "
                          f"{sorted(unexpected)[:3]}); it was written by a different run")


# what a resumed run may do differently: its length (the schedule follows it), and how it runs
_MAY_CHANGE = ("epochs", "workers", "device")
_NEGATED = {"augment": "--no-augment", "flip": "--no-flip", "amp": "--no-amp"}


def _flag(name: str, value: Any) -> str:
    if name in _NEGATED:
        return _NEGATED[name] if not value else f"{name} on"
    if isinstance(value, bool):
        return f"--{name}" if value else f"no --{name}"
    return f"--{name.replace('_', '-')} {value}"


def _open_resume(resume: Any, out_p: Path) -> tuple[dict, bool]:
    """The checkpoint ``resume`` names (True: OUT's last.pt), and whether it continues OUT."""
    if resume is True:
        where = out_p / CHECKPOINT_DIR / LAST
        if not where.is_file():
            raise ResumeError(f"{where}: no checkpoint to resume from; --resume continues a run in OUT "
                              f"(or give --resume PATH)")
        return load_checkpoint(where), True
    where = Path(resume)
    return load_checkpoint(where), out_p.is_dir() and _inside(where, out_p)


def _restore_args(args: dict, saved: dict, where: str) -> tuple[dict, list[str]]:
    """The run's arguments as the checkpoint saved them. An argument left at its default takes
    the saved value; one given differently is refused, naming both, so that a resumed run never
    silently computes something else. Other epochs (the schedule follows), workers or device are
    allowed."""
    import inspect

    defaults = {k: p.default for k, p in inspect.signature(train).parameters.items()}
    out, restored, conflicts = dict(args), [], []
    for k, was in saved.items():
        if k not in args or args[k] == was:
            continue
        now = args[k]
        if now is None or (k in defaults and now == defaults[k]):
            out[k] = was
            restored.append(_flag(k, was))
        elif k in _MAY_CHANGE:
            continue
        else:
            conflicts.append(f"{_flag(k, now)} (the run was started with {_flag(k, was)})")
    if conflicts:
        raise ResumeError(f"{where}: --resume continues a run with its own arguments, but {'; '.join(conflicts)}; "
                          f"drop them to continue the same run (--epochs may change), or start a new run")
    return out, restored


def continue_command(adapted: Path, data: Path, out: Path, trust_code: bool = False) -> str:
    """The command that continues an interrupted run (its other arguments are in the checkpoint;
    consent to run the folder's factory is not, so it is repeated when it was given)."""
    import shlex

    return " ".join(["surgery train", shlex.quote(str(adapted)), "--data", shlex.quote(str(data)),
                     "--out", shlex.quote(str(out)), "--resume", *(["--trust-code"] if trust_code else [])])


def _check_image_size(model: "nn.Module", manifest: Any, size: int, channels: int) -> None:
    """``--image-size`` other than adapt's: one image through the model first, so that a model
    built for one size (a ViT) is refused in one line, not with a traceback after the setup."""
    import torch

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


def train(adapted_dir: str | os.PathLike, data: str | os.PathLike, *, epochs: int | None = None,
          lr: float | str | None = None, out: str | os.PathLike, val_split: float | None = None, seed: int = 0, batch_size: int = 32,
          workers: int = 0, optimizer: str = "adamw", weight_decay: float | None = None, momentum: float = 0.9,
          schedule: str = "cosine", warmup_epochs: float | None = None, label_smoothing: float = 0.0,
          clip_grad: float | None = None, patience: int | None = None, image_size: int | None = None,
          augment: bool = True, flip: bool = True, device: str = "auto", amp: bool = True,
          compile: bool = False, cache_features: str = "auto", cache_views: int = 0,
          resume: bool | str | os.PathLike | None = None, force: bool = False,
          observer: Optional[Observer] = None, trust_code: bool = False) -> TrainResult:
    """Fine-tune the model in ``adapted_dir`` (written by ``surgery adapt``) on ``data`` and
    write the run into ``out``: checkpoints, metrics.jsonl, curves.png, confusion.png, run.log,
    and the best weights as model.safetensors with an updated manifest.json, so that
    ``surgery.load_adapted(out)`` returns the fine-tuned model.

    ``lr="auto"`` (the default): a learning-rate range test (:mod:`.lr_find`) picks it before the
    first epoch. ``trust_code``: run a file or module factory named by the folder's manifest (see
    :func:`surgery.load_adapted`). ``resume``: True continues ``out/checkpoints/last.pt``; a path
    continues that checkpoint. The run's arguments come back from the checkpoint: those left at
    their defaults (``None`` for ``epochs`` and ``lr``) take the saved values, and one given with
    another value is refused, naming both (except ``epochs``, whose change stretches or shrinks
    the schedule, and ``workers``/``device``).
    ``warmup_epochs`` defaults to 1 epoch (0 for one-epoch runs). ``weight_decay`` defaults to
    0.05 (adamw) or 1e-4 (sgd). Raises :class:`TrainInterrupted` (exit code 130) on Ctrl-C or
    SIGTERM after saving; every other problem with the input is a SurgeryError raised before
    anything is written.
    """
    import torch

    from . import distributed as D

    obs: Observer = observer or (lambda event, info: None)
    out_p = Path(out)
    adapted_p = Path(adapted_dir)
    ckpt, resuming_here = _open_resume(resume, out_p) if resume else (None, False)
    args = dict(epochs=epochs, lr=lr, val_split=val_split, seed=seed, batch_size=batch_size, workers=workers,
                optimizer=optimizer, weight_decay=weight_decay, momentum=momentum, schedule=schedule,
                warmup_epochs=warmup_epochs, label_smoothing=label_smoothing, clip_grad=clip_grad,
                patience=patience, image_size=image_size, augment=augment, flip=flip, device=device, amp=amp,
                compile=compile, cache_features=cache_features, cache_views=cache_views)
    restored: list[str] = []
    if ckpt is not None:
        args, restored = _restore_args(args, ckpt.get("args") or {}, ckpt["path"])
    if args["lr"] is None:
        args["lr"] = "auto"  # the default: found by a range test (a resumed run takes its own)
    if args["epochs"] is None:
        raise TrainError("--epochs is required (it comes from the checkpoint only with --resume)")
    _check_options(**args)
    epochs, optimizer, weight_decay, warmup_epochs = (args[k] for k in ("epochs", "optimizer", "weight_decay",
                                                                         "warmup_epochs"))
    if weight_decay is None:
        weight_decay = 0.05 if optimizer == "adamw" else 1e-4
    if warmup_epochs is None:
        warmup_epochs = 1.0 if epochs > 1 else 0.0
    dev = _resolve_device(args["device"])
    dist = D.setup(dev.type)
    try:
        if dist.enabled and dev.type == "cuda":
            dev = torch.device("cuda", dist.local_rank)
        return _train(adapted_p, Path(data), out_p, args, dict(weight_decay=weight_decay, warmup_epochs=warmup_epochs),
                      dev, dist, (ckpt, resuming_here, restored), force, obs, trust_code)
    finally:
        D.teardown(dist)


def _train(adapted_p: Path, data_p: Path, out_p: Path, args: dict, resolved: dict, dev: "torch.device",
           dist: Any, resume: tuple, force: bool, obs: Observer, trust_code: bool = False) -> TrainResult:
    import torch
    from torch import nn

    from ..adapter.core import load_adapted
    from ..adapter.freeze import apply_schedule, group_trainable
    from ..adapter.manifest import read_manifest
    from . import cache as cache_mod
    from . import distributed as D
    from .data import DataError, check_num_classes, discover, make_loaders, scan_images, set_epoch

    epochs, lr, seed = args["epochs"], args["lr"], args["seed"]
    lr = 1e-3 if lr == "auto" else lr  # "auto": a placeholder until the range test has run
    is_main = dist.is_main

    # ---- every input checked before anything is written
    manifest = read_manifest(adapted_p)
    samples = discover(data_p, val_split=args["val_split"], seed=seed)
    check_num_classes(samples, manifest.num_classes)
    named = manifest["class_names"] or manifest.head.get("class_names")
    if named and list(named) != list(samples.classes):
        raise DataError(f"{samples.root}: its classes ({', '.join(samples.classes[:8])}) are not the adapted "
                        f"model's class names ({', '.join(map(str, named[:8]))}); rename the class folders or "
                        f"re-run surgery adapt")
    if not samples.val:
        raise DataError(f"{samples.root}: no validation images; add val/<class>/ images or use --val-split")
    samples, skipped = scan_images(samples)
    model = load_adapted(adapted_p, trust_code=trust_code)
    inp = manifest["input"]
    channels = int(inp.get("channels", 3))
    if args["image_size"] is not None:
        size, resize = args["image_size"], None
        _check_image_size(model, manifest, size, channels)
    else:
        size, resize = list(inp["size"]), inp.get("resize")
    if not any(g["trainable"] for g in manifest.groups) and not any(
            g["unfreeze_at"] is not None and g["unfreeze_at"] < epochs for g in manifest.groups):
        raise TrainError(f"{adapted_p}: every parameter group is frozen for the whole run; re-run surgery adapt "
                         f"with a freeze policy that leaves something to train")
    if not any(g["trainable"] for g in manifest.groups):
        raise TrainError(f"{adapted_p}: nothing trains in the first epoch (every group is frozen until later); "
                         f"re-run surgery adapt so the head trains from the start")

    # feature cache decision
    cache_req = args["cache_features"]
    use_cache, cache_reason = False, ""
    if cache_req != "off":
        ok, why = cache_mod.eligibility(model, manifest, epochs)
        if ok and dist.enabled:
            ok, why = False, "the feature cache is off under DDP (several processes)"
        if ok and args["compile"]:
            ok, why = False, "--compile trains the whole model"
        if not ok and cache_req == "on":
            raise TrainError(f"--cache-features on: not possible here: {why}; use --cache-features auto or off")
        use_cache, cache_reason = ok, why

    # resume
    ckpt, resuming_here, restored = resume
    if ckpt is not None:
        where = ckpt["path"]
        check_fingerprint(ckpt.get("fingerprint") or {}, fingerprint(manifest, model, samples.classes), str(where))
        if int(ckpt["epoch"]) > epochs:
            raise ResumeError(f"{where}: holds {ckpt['epoch']} finished epochs but --epochs is {epochs}; "
                              f"pass --epochs {ckpt['epoch']} or more")
    _check_out(out_p, force=force, resuming_here=resuming_here, inputs=[adapted_p, data_p])
    D.barrier(dist)

    # ---- from here on OUT is ours
    if is_main:
        if out_p.exists() and not resuming_here and force:
            remove_outputs(out_p, OUTPUTS["train"]) if out_p.is_dir() and not out_p.is_symlink() else out_p.unlink()
        if resuming_here:
            remove_temps(out_p)  # what a process killed mid-write left
        (out_p / CHECKPOINT_DIR).mkdir(parents=True, exist_ok=True)
    D.barrier(dist)
    files = RunFiles(out_p, is_main, obs)
    if resuming_here:
        files.load_existing()
    failure_log = out_p / "failures.jsonl"  # shared by workers and ranks (one O_APPEND line each)

    random.seed(seed)
    try:
        import numpy as np

        np.random.seed(seed)
    except ImportError:  # pragma: no cover
        pass
    torch.manual_seed(seed + dist.rank)

    cuda = dev.type == "cuda"
    model.to(dev)
    if cuda:
        model.to(memory_format=torch.channels_last)
    amp_dtype = None
    if cuda and args["amp"]:
        amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16

    def autocast():
        return torch.autocast("cuda", dtype=amp_dtype) if amp_dtype is not None else contextlib.nullcontext()

    def to_dev(x):
        x = x.to(dev, non_blocking=cuda)
        return x.contiguous(memory_format=torch.channels_last) if cuda and x.ndim == 4 else x

    train_dl, val_dl = make_loaders(samples, image_size=size, mean=inp["mean"], std=inp["std"], channels=channels,
                                    batch_size=args["batch_size"], num_workers=args["workers"], seed=seed,
                                    augment=args["augment"], flip=args["flip"], device=dev,
                                    distributed=dist.enabled, resize=resize,
                                    interpolation=inp.get("interpolation") or "bilinear", failure_log=failure_log)
    gen = train_dl.generator
    steps_per_epoch = len(train_dl)
    total_steps = steps_per_epoch * epochs

    groups = optimizer_groups(model, manifest, lr, resolved["weight_decay"])
    if args["optimizer"] == "adamw":
        opt = torch.optim.AdamW(groups, lr=lr, weight_decay=resolved["weight_decay"])
    else:
        opt = torch.optim.SGD(groups, lr=lr, momentum=args["momentum"], weight_decay=resolved["weight_decay"])
    mult = LrMultiplier(args["schedule"], total_steps, round(resolved["warmup_epochs"] * steps_per_epoch))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, mult)
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None
    crit = nn.CrossEntropyLoss(label_smoothing=args["label_smoothing"])
    val_crit = nn.CrossEntropyLoss(reduction="sum")
    head_path = cache_mod.head_path(manifest)

    counts = samples.counts()
    files.log(f"surgery train: {adapted_p} on {samples.root} ({samples.source}) -> {out_p}")
    files.log(f"classes ({len(samples.classes)}): {', '.join(samples.classes)}")
    files.log(f"images: {len(samples.train)} train, {len(samples.val)} val; per class train "
              f"{json.dumps(counts['train'])}, val {json.dumps(counts['val'])}")
    if skipped:
        files.log(f"skipped {len(skipped)} unreadable images:")
        for p, r in skipped:
            files.log(f"  skipped {p}: {r}")
    files.log(f"device {dev}{' x' + str(dist.world_size) + ' processes' if dist.enabled else ''}; "
              f"amp {amp_dtype if amp_dtype is not None else 'off'}; optimizer {args['optimizer']} lr {args['lr']} "
              f"weight decay {resolved['weight_decay']:g}; schedule {args['schedule']} over {total_steps} steps, "
              f"warmup {mult.warmup} steps")

    # ---- restore
    start_epoch, best, bad_epochs, history = 0, {"epoch": 0, "val_acc": -1.0, "val_loss": float("inf")}, 0, []
    best_state: dict | None = None
    moving = changing_keys(model, manifest)
    if ckpt is not None:
        _load_moving(model, ckpt["model"], moving, str(ckpt["path"]))
        opt.load_state_dict(ckpt["optimizer"])
        length = dict(vars(mult))
        sched.load_state_dict(ckpt["scheduler"])
        for f in sched.lr_lambdas:  # LambdaLR restores the saved length; another --epochs changes it
            f.__dict__.update(length)
        if scaler is not None and ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        start_epoch = int(ckpt["epoch"])
        best = dict(ckpt["best"])
        bad_epochs = int(ckpt["bad_epochs"])
        history = list(ckpt.get("history") or [])
        best_file = Path(ckpt["path"]).parent / BEST
        if best_file.is_file() and best["epoch"] > 0:
            best_state = load_checkpoint(best_file)["model"]
        files.log(f"resumed from {ckpt['path']} after epoch {start_epoch}"
                  + (f"; from the checkpoint: {', '.join(restored)}" if restored else ""))
        saved_epochs = (ckpt.get("args") or {}).get("epochs")
        if saved_epochs is not None and saved_epochs != epochs:
            files.log(f"--epochs {epochs} (the run was started with {saved_epochs}): the schedule now runs over "
                      f"{total_steps} steps")

    # ---- feature cache
    feats = None
    if use_cache:
        from torch.utils.data import DataLoader

        from .data import ImageDataset, build_transforms

        views = args["cache_views"] if args["augment"] else 0
        x0, _ = next(iter(val_dl))
        why = cache_mod.verify_split(model, head_path, to_dev(x0[:8]))
        if why is not None:
            use_cache, cache_reason = False, f"the split at {head_path!r} does not reproduce the model: {why}"
            if args["cache_features"] == "on":
                raise TrainError(f"--cache-features on: {cache_reason}; use --cache-features auto or off")
            files.log(f"feature cache off: {cache_reason}")
        else:
            plain_tf = build_transforms(size, inp["mean"], inp["std"], channels, train=False, resize=resize,
                                        interpolation=inp.get("interpolation") or "bilinear")
            aug_tf = build_transforms(size, inp["mean"], inp["std"], channels, train=True, augment=True,
                                      flip=args["flip"], resize=resize,
                                      interpolation=inp.get("interpolation") or "bilinear")
            kw = dict(batch_size=max(args["batch_size"], 64), shuffle=False, num_workers=args["workers"],
                      pin_memory=cuda)
            total = len(samples.train) * max(views, 1) + len(samples.val)
            done = [0]

            def tick(n):
                done[0] += n
                obs("cache", {"done": done[0], "total": total})

            train_views = []
            # the cache draws its own random numbers: training then sees the same generator
            # states as the uncached path, so both give the same result without augmentation
            with torch.random.fork_rng(devices=[]):
                for v in range(max(views, 1)):
                    tf = aug_tf if views else plain_tf
                    ds = ImageDataset(samples.train, tf, failure_log=failure_log)
                    torch.manual_seed(seed * 1009 + v)
                    train_views.append(cache_mod.extract(model, head_path, DataLoader(ds, **kw), dev, to_dev,
                                                         autocast, tick))
                val_feats = cache_mod.extract(model, head_path, DataLoader(val_dl.dataset, **kw), dev, to_dev,
                                              autocast, tick)
            feats = {"train": train_views, "val": val_feats}
            files.log(f"feature cache on: {len(samples.train)} train images x {max(views, 1)} "
                      f"{'augmented views' if views else 'view (no augmentation)'}, features "
                      f"{list(train_views[0][0].shape[1:])} from the input of {head_path!r}")
    elif cache_reason and args["cache_features"] == "auto":
        files.log(f"feature cache off: {cache_reason}")

    if args["lr"] == "auto" and ckpt is None:  # resuming: the optimizer's state holds the lr found
        from . import lr_find

        found = lr_find.for_run(model, manifest, feats=feats, head_path=head_path, loader=train_dl, prepare=lambda x, y: (
            to_dev(x), y.to(dev)), autocast=autocast, optimizer=args["optimizer"], weight_decay=resolved["weight_decay"],
            momentum=args["momentum"], label_smoothing=args["label_smoothing"], seed=seed, run_steps=total_steps)
        lr = D.all_reduce_sum(dist, [found.suggestion], dev if dev.type == "cuda" else "cpu")[0] / dist.world_size
        lr_find.use(found, lr, opt, sched, out_p, write=is_main)
        resolved["lr_find"] = dict(found.summary(), lr=lr)
        obs("lr_find", dict(found.to_json(), lr=lr))
        files.log(lr_find.message(found, lr))
    elif args["lr"] == "auto":
        resolved["lr_find"] = (ckpt.get("args") or {}).get("lr_find")
    if ckpt is not None:
        set_rng_state(ckpt["rng"], {"train_loader": gen})

    net: nn.Module = model
    if args["compile"]:
        net = torch.compile(model)
    head = model.get_submodule(head_path)

    obs("start", {"epochs": epochs, "start_epoch": start_epoch, "steps_per_epoch": steps_per_epoch,
                  "train_images": len(samples.train), "val_images": len(samples.val), "device": str(dev),
                  "cache": use_cache, "classes": samples.classes, "world_size": dist.world_size,
                  "groups": [g["name"] for g in opt.param_groups]})
    fp = fingerprint(manifest, model, samples.classes)
    stopped_early = False
    epoch = start_epoch
    wrapped_for: tuple | None = None
    ddp_net = net

    def evaluate_val() -> tuple[float, float, float]:
        model.eval()
        loss_sum, correct, n = 0.0, 0, 0
        with torch.no_grad():
            if feats is not None:
                vx, vy = feats["val"]
                for i in range(0, len(vy), 256):
                    xb, yb = vx[i:i + 256].to(dev), vy[i:i + 256].to(dev)
                    with autocast():
                        logits = head(xb)
                    loss_sum += float(val_crit(logits.float(), yb))
                    correct += int((logits.argmax(1) == yb).sum())
                    n += len(yb)
            else:
                for xb, yb in val_dl:
                    xb, yb = to_dev(xb), yb.to(dev, non_blocking=cuda)
                    with autocast():
                        logits = net(xb)
                    loss_sum += float(val_crit(logits.float(), yb))
                    correct += int((logits.argmax(1) == yb).sum())
                    n += len(yb)
        loss_sum, correct, n = D.all_reduce_sum(dist, [loss_sum, correct, n], dev if dev.type == "cuda" else "cpu")
        return loss_sum, correct, n

    def checkpoint_state(done_epochs: int) -> dict:
        return {"epoch": done_epochs, "model": clean_state_dict(model, moving, copy=False), "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(), "scaler": scaler.state_dict() if scaler is not None else None,
                "best": dict(best), "bad_epochs": bad_epochs, "rng": rng_state({"train_loader": gen}),
                "fingerprint": fp, "history": list(history), "args": {**args, **resolved}}

    interrupted_at: int | None = None
    try:
        with _sigterm_as_interrupt():
            if ckpt is None and is_main:
                # a resumable state before the first epoch, in case it is interrupted
                save_checkpoint(out_p / CHECKPOINT_DIR / LAST, checkpoint_state(0))
            for epoch in range(start_epoch, epochs):
                t0 = time.perf_counter()
                set_epoch(train_dl, epoch)
                model.train()
                apply_schedule(model, manifest, epoch)  # requires_grad and BatchNorm modes for this epoch
                phase = _phase(manifest, epoch)
                trainable = [n for n, p in model.named_parameters() if p.requires_grad]
                n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
                if dist.enabled and wrapped_for != tuple(trainable):
                    ddp_net = D.wrap(net, dist, dev)  # DDP syncs the parameters that train at wrap time
                    wrapped_for = tuple(trainable)
                if history and phase != history[-1]["phase"]:
                    files.log(f"epoch {epoch + 1}: phase {phase}, {n_trainable} trainable parameters")
                obs("epoch_start", {"epoch": epoch + 1, "epochs": epochs, "phase": phase,
                                    "trainable_params": n_trainable, "steps": steps_per_epoch})
                loss_sum, correct, seen = 0.0, 0, 0
                if feats is not None:
                    from torch.utils.data import DataLoader

                    tx, ty = feats["train"][epoch % len(feats["train"])]
                    batches = ((tx[idx], ty[idx]) for idx in DataLoader(
                        cache_mod.IndexDataset(len(ty)), batch_size=train_dl.batch_size, shuffle=True,
                        generator=gen, drop_last=train_dl.drop_last))
                    step_net = head
                    head.train()
                else:
                    batches = iter(train_dl)
                    step_net = ddp_net
                last_lrs: list[float] = [g["lr"] for g in opt.param_groups]
                for step, (xb, yb) in enumerate(batches):
                    xb, yb = to_dev(xb), yb.to(dev, non_blocking=cuda)
                    lrs = [g["lr"] for g in opt.param_groups]
                    opt.zero_grad(set_to_none=True)
                    with autocast():
                        logits = step_net(xb)
                        loss = crit(logits.float(), yb)
                    if scaler is not None:
                        scaler.scale(loss).backward()
                    else:
                        loss.backward()
                    if args["clip_grad"] is not None:
                        if scaler is not None:
                            scaler.unscale_(opt)
                        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None],
                                                       args["clip_grad"])
                    if scaler is not None:
                        scaler.step(opt)
                        scaler.update()
                    else:
                        opt.step()
                    sched.step()
                    bl = float(loss.detach())
                    loss_sum += bl * len(yb)
                    correct += int((logits.detach().argmax(1) == yb).sum())
                    seen += len(yb)
                    last_lrs = lrs
                    obs("step", {"epoch": epoch + 1, "step": step + 1, "steps": steps_per_epoch, "loss": bl,
                                 "lrs": lrs, "images": len(yb) * dist.world_size})
                train_secs = time.perf_counter() - t0
                loss_sum, correct, seen = D.all_reduce_sum(dist, [loss_sum, correct, seen],
                                                           dev if dev.type == "cuda" else "cpu")
                v_loss, v_correct, v_n = evaluate_val()
                if feats is None and dist.is_main:
                    fails = train_dl.dataset.collect_failures()
                    new = sorted(set(fails) - {p for p, _ in skipped})
                    for p in new:
                        skipped.append((p, fails[p]))
                        files.log(f"  skipped {p}: {fails[p]} (failed while training)", write=False)
                # the lr each group trained at: 0 for a group frozen this epoch (the schedule's value
                # is not what it saw), and which groups were frozen
                frozen_now = {g["name"]: not group_trainable(g, epoch) for g in manifest.groups}
                by_group: dict[str, float] = {}
                for g, l_ in zip(opt.param_groups, last_lrs):
                    name = g.get("group", g.get("name"))
                    by_group.setdefault(name, 0.0 if frozen_now.get(name) else l_)
                m = {"epoch": epoch + 1, "phase": phase,
                     "train_loss": loss_sum / max(seen, 1), "train_acc": correct / max(seen, 1),
                     "val_loss": v_loss / max(v_n, 1), "val_acc": v_correct / max(v_n, 1),
                     "lr": by_group, "frozen": frozen_now, "images_per_s": seen / train_secs if train_secs > 0 else None,
                     "seconds": time.perf_counter() - t0, "trainable_params": n_trainable, "cached": feats is not None}
                history.append(m)
                improved = (m["val_acc"] > best["val_acc"]
                            or (m["val_acc"] == best["val_acc"] and m["val_loss"] < best["val_loss"]))
                if improved:
                    best = {"epoch": epoch + 1, "val_acc": m["val_acc"], "val_loss": m["val_loss"]}
                    bad_epochs = 0
                    best_state = clean_state_dict(model, moving)
                else:
                    bad_epochs += 1
                if is_main:
                    state = checkpoint_state(epoch + 1)
                    save_checkpoint(out_p / CHECKPOINT_DIR / LAST, state)
                    if improved:
                        save_checkpoint(out_p / CHECKPOINT_DIR / BEST, state)
                    files.metrics(history)
                    files.log(f"epoch {epoch + 1}/{epochs} [{phase}] train loss {m['train_loss']:.4f} acc "
                              f"{m['train_acc']:.3f} | val loss {m['val_loss']:.4f} acc {m['val_acc']:.3f} | "
                              f"{m['images_per_s'] or 0:.0f} img/s {m['seconds']:.1f}s"
                              + (" *best" if improved else ""))
                obs("epoch_end", dict(m, best=dict(best), improved=improved))
                if args["patience"] is not None and bad_epochs >= args["patience"] and epoch + 1 < epochs:
                    stopped_early = True
                    files.log(f"early stopping: no better val accuracy for {bad_epochs} epochs "
                              f"(best {best['val_acc']:.3f} at epoch {best['epoch']})")
                    break
    except KeyboardInterrupt:
        interrupted_at = epoch + 1
    if interrupted_at is not None:
        done = history[-1]["epoch"] if history else 0
        if is_main:
            files.log(f"interrupted during epoch {interrupted_at}; {out_p / CHECKPOINT_DIR / LAST} holds "
                      f"{done} finished epoch{'s' if done != 1 else ''}; continue with: "
                      f"{continue_command(adapted_p, data_p, out_p, trust_code)}")
            if history:
                plot_run_curves(history, out_p, manifest, epochs)
        raise TrainInterrupted(f"interrupted; {done} of {epochs} epochs are saved in {out_p / CHECKPOINT_DIR / LAST}; "
                               f"continue with: {continue_command(adapted_p, data_p, out_p, trust_code)} (the run's other "
                               f"arguments come from the checkpoint)")

    # ---- the best model, its confusion matrix, the outputs
    if best_state is None:
        best_state = clean_state_dict(model, moving)
    _load_moving(model, best_state, moving, "the best epoch's weights")
    best_state = clean_state_dict(model)
    from .plots import confusion_matrix, per_class_accuracy, plot_confusion

    model.eval()
    preds, targets = [], []
    with torch.no_grad():
        if feats is not None:
            vx, vy = feats["val"]
            for i in range(0, len(vy), 256):
                with autocast():
                    preds.append(head(vx[i:i + 256].to(dev)).argmax(1).cpu())
                targets.append(vy[i:i + 256])
        else:
            for xb, yb in val_dl:
                with autocast():
                    preds.append(model(to_dev(xb)).argmax(1).cpu())
                targets.append(yb)
    n_cls = len(samples.classes)
    cm = torch.tensor(confusion_matrix(torch.cat(preds), torch.cat(targets), n_cls), dtype=torch.float64)
    cm = D.all_reduce_tensor(dist, cm.to(dev) if dev.type == "cuda" else cm).cpu().long().tolist()
    result = TrainResult(out=str(out_p), best_epoch=int(best["epoch"]), best_val_acc=float(best["val_acc"]),
                         best_val_loss=float(best["val_loss"]), epochs_run=len(history), stopped_early=stopped_early,
                         class_names=list(samples.classes), metrics=history, cache_used=feats is not None,
                         cache_reason=cache_reason, skipped=list(skipped), device=str(dev),
                         world_size=dist.world_size, resumed_from=ckpt["path"] if ckpt is not None else None)
    if is_main:
        plot_run_curves(history, out_p, manifest, epochs, result.best_epoch, stopped_early)
        plot_confusion(cm, samples.classes, out_p / "confusion.png",
                       title=f"Confusion matrix (validation, best epoch {result.best_epoch})")
        write_model(out_p, adapted_p, manifest, best_state, samples.classes, result, {**args, **resolved}, cm,
                     per_class_accuracy(cm))
        files.log(f"best epoch {result.best_epoch}: val acc {result.best_val_acc:.4f} loss {result.best_val_loss:.4f}; "
                  f"wrote {out_p / 'model.safetensors'}")
    D.barrier(dist)
    obs("end", result.to_json())
    return result


__all__ = ["train", "TrainResult", "LrMultiplier", "optimizer_groups", "TrainError", "TrainInterrupted"]
