"""``surgery.train()``: fine-tune a folder written by ``surgery adapt`` on a small image dataset.

Phases come from the manifest: every group is in the optimizer from the first step and frozen
groups are toggled at each epoch start (``apply_schedule``), so the learning-rate schedule stays
right when layers unfreeze. The schedule (warmup, then cosine, one-cycle or constant) is a
multiplier on each group's base lr (``lr * lr_mult``), stepped per batch over the whole run.
Norm and bias parameters get no weight decay. Everything is written into OUT, each file
atomically; ``OUT/checkpoints/last.pt`` resumes exactly.

Library code never prints: pass ``observer(event, info)`` to follow progress. Events:
``cache`` (images done), ``lr_find`` (the range test's result), ``start``, ``epoch_start``,
``step``, ``epoch_end`` (the epoch's metrics), ``log`` (a run.log line), ``end``.

    >>> result = train("adapted/", "data/", epochs=5, lr=1e-3, out="run/")  # doctest: +SKIP
    >>> result.best_val_acc
    0.93
"""

from __future__ import annotations

import os
from typing import Any, Callable, Optional

import torch

from ..errors import TrainError
from ..option_table import options_from, signature
from . import balance, lr_find, phases
from . import distributed as D
from .cache import Features, build as build_cache, verify_split
from .data import pipeline_transforms
from .device import Placement, resolve_device
from .loop import run_epochs, val_scores
from .options import TrainOptions
from .outputs import TrainResult, plot_run_curves, write_model
from .plots import confusion_matrix, per_class_accuracy, plot_confusion
from .prepare import Run, prepare
from .resume import load_moving, open_resume, restore_args
from .state import clean_state_dict, set_rng_state
from .tensorboard import TensorBoardObserver

Observer = Callable[[str, dict], None]


def train(adapted_dir: str | os.PathLike | None = None, data: str | os.PathLike | None = None,
          options: TrainOptions | None = None, *, observer: Optional[Observer] = None, **keywords: Any) -> TrainResult:
    """Fine-tune the model in ``adapted_dir`` (written by ``surgery adapt``) on ``data`` and
    write the run into ``out``. The keywords are the fields of :class:`TrainOptions` (the flags of
    ``surgery train``, each declared there once); ``options``: a TrainOptions, the keywords laid
    over it. Writes: checkpoints, metrics.jsonl, curves.png, confusion.png, run.log,
    and the best weights as model.safetensors with an updated manifest.json, so that
    ``surgery.load_adapted(out)`` returns the fine-tuned model.

    ``lr="auto"`` (the default): a learning-rate range test (:mod:`.lr_find`) picks it before the
    first epoch. ``trust_code``: run a file or module factory named by the folder's manifest (see
    :func:`surgery.load_adapted`). ``resume``: True continues ``out/checkpoints/last.pt``; a path
    continues that checkpoint. The run's arguments come back from the checkpoint: those left at
    their defaults (``None`` for ``epochs`` and ``lr``) take the saved values, and one given with
    another value is refused, naming both (except ``epochs``, whose change stretches or shrinks
    the schedule, and ``workers``/``device``).
    ``augment``: a policy (``none``, ``light``, ``randaugment``, ``trivialaugment``; True is
    ``light``), ``mixup``/``cutmix`` the alpha of batch mixing (:mod:`.augment`); ``ema``: a decay
    for an average of the weights, validated beside the raw ones, the better kept (:mod:`.ema`);
    ``guard``: after an unfreeze, an epoch whose val loss passes twice the head phase's best brings
    the best weights back and cuts the unfrozen groups' lr tenfold (:mod:`.phases`).
    ``accumulate``: batches per optimizer step (the schedule counts steps); ``class_weights="auto"``
    and ``balanced_sampler`` for skewed classes (:mod:`.balance`); ``tensorboard``: event files in
    ``out/tensorboard`` (:mod:`.tensorboard`).
    ``warmup_epochs`` defaults to 1 epoch (0 for one-epoch runs). ``weight_decay`` defaults to
    0.05 (adamw) or 1e-4 (sgd). Raises :class:`TrainInterrupted` (exit code 130) on Ctrl-C or
    SIGTERM after saving; every other problem with the input is a SurgeryError raised before
    anything is written.
    """
    for name in ("adapted", "data"):
        if name in keywords:
            raise TypeError(f"train() got an unexpected keyword argument {name!r}: pass the folders as "
                            f"train(adapted_dir, data, ...)")
    given = {k: v for k, v in (("adapted", adapted_dir), ("data", data)) if v is not None}
    opts = options_from(TrainOptions, options, {**keywords, **given}, "train")
    return run_training(opts, observer or (lambda event, info: None))


train.__signature__ = signature(train, TrainOptions, skip=("adapted", "data"))  # type: ignore[attr-defined]


def run_training(opts: TrainOptions, obs: Observer) -> TrainResult:
    """:func:`train` on options already built: resume's arguments, validation, the processes."""
    opts = opts.require("adapted", "data", "out")
    ckpt, resuming_here, restored = None, False, []
    if opts.resume:
        ckpt, resuming_here = open_resume(opts.resume, opts.out)
        opts, restored = restore_args(opts, ckpt.get("args") or {}, ckpt["path"])
    opts = opts.validated()
    dev = resolve_device(opts.device)
    dist = D.setup(dev.type)
    try:
        if dist.enabled and dev.type == "cuda":
            dev = torch.device("cuda", dist.local_rank)
        if opts.tensorboard and dist.is_main:
            obs = TensorBoardObserver(opts.out, obs)
        run = prepare(opts, ckpt, resuming_here, restored, dist, Placement.for_run(dev, opts.amp), obs)
        return _fit(run, obs)
    finally:
        D.teardown(dist)


def _fit(run: Run, obs: Observer) -> TrainResult:
    """The cache, the lr, the epochs, the outputs: a prepared run to its result."""
    feats = _feature_cache(run, obs)
    _find_lr(run, feats, obs)
    if run.ckpt is not None:
        set_rng_state(run.ckpt["rng"], {"train_loader": run.inputs.train_dl.generator})
    net = torch.compile(run.inputs.model) if run.opts.compile else run.inputs.model
    s = run.inputs.samples
    obs("start", {"epochs": run.opts.epochs, "start_epoch": run.progress.start_epoch,
                  "steps_per_epoch": len(run.inputs.train_dl), "train_images": len(s.train), "val_images": len(s.val),
                  "device": str(run.place.device), "cache": run.cache.use, "classes": s.classes,
                  "world_size": run.dist.world_size, "groups": [g["name"] for g in run.optim.opt.param_groups]})
    run_epochs(run, net, feats, obs)
    return _finish(run, feats, obs)


def _feature_cache(run: Run, obs: Observer) -> Features | None:
    """The backbone's features of every image, once, when the cache was chosen and the model
    splits cleanly at its head (checked on real images first)."""
    if not run.cache.use:
        if run.cache.reason and run.opts.cache_features == "auto":
            run.files.log(f"feature cache off: {run.cache.reason}")
        return None
    o, path = run.opts, run.cache.head_path
    x0, _ = next(iter(run.inputs.val_dl))
    why = verify_split(run.inputs.model, path, run.place.inputs(x0[:8]))
    if why is not None:
        run.cache.use, run.cache.reason = False, f"the split at {path!r} does not reproduce the model: {why}"
        if o.cache_features == "on":
            raise TrainError(f"--cache-features on: {run.cache.reason}; use --cache-features auto or off")
        run.files.log(f"feature cache off: {run.cache.reason}")
        return None
    views = o.cache_views if o.augment != "none" else 0
    transforms = (pipeline_transforms(run.inputs.pipe, train=False),
                  pipeline_transforms(run.inputs.pipe, train=True, augment=o.augment, flip=o.flip))
    feats = build_cache(run.inputs.model, path, run.inputs.samples, run.inputs.val_dl.dataset, transforms, views=views,
                        batch_size=o.batch_size, workers=o.workers, place=run.place, seed=o.seed,
                        failure_log=run.failure_log, on_images=lambda done, total: obs("cache", {"done": done,
                                                                                                  "total": total}))
    run.files.log(f"feature cache on: {len(run.inputs.samples.train)} train images x {max(views, 1)} "
                  f"{'augmented views' if views else 'view (no augmentation)'}, features "
                  f"{list(feats.train[0][0].shape[1:])} from the input of {path!r}")
    return feats


def _find_lr(run: Run, feats: Features | None, obs: Observer) -> None:
    """``--lr auto``: the range test picks the base lr (averaged over ranks). A resumed run keeps
    the lr its optimizer state holds."""
    if run.opts.lr != "auto":
        return
    if run.ckpt is not None:
        run.resolved["lr_find"] = (run.ckpt.get("args") or {}).get("lr_find")
        return
    o, place = run.opts, run.place
    found = lr_find.for_run(run.inputs.model, run.inputs.manifest, feats=vars(feats) if feats is not None else None,
                            head_path=run.cache.head_path, loader=run.inputs.train_dl, place=place,
                            optim=lr_find.SweepOptim.of(o), seed=o.seed, run_steps=run.optim.mult.total)
    lr = D.all_reduce_sum(run.dist, [found.suggestion], place.reduce_on)[0] / run.dist.world_size
    lr_find.use(found, lr, run.optim.opt, run.optim.sched, o.out, write=run.dist.is_main)
    run.resolved["lr_find"] = dict(found.summary(), lr=lr)
    obs("lr_find", dict(found.to_json(), lr=lr))
    run.files.log(lr_find.message(found, lr))


def _confusion(run: Run, feats: Features | None) -> list[list[int]]:
    """The validation confusion matrix of the model as it is now (summed over ranks)."""
    s = val_scores(run, run.inputs.model, feats, keep=True)
    cm = torch.tensor(confusion_matrix(s.predicted(), s.targets(), len(run.inputs.samples.classes)), dtype=torch.float64)
    cm = D.all_reduce_tensor(run.dist, cm.to(run.place.device) if run.place.cuda else cm)
    return cm.cpu().long().tolist()


def _finish(run: Run, feats: Features | None, obs: Observer) -> TrainResult:
    """The best epoch's weights back in the model, its confusion matrix, and OUT's outputs."""
    p, o = run.progress, run.opts
    best_state = p.best_state if p.best_state is not None else clean_state_dict(run.inputs.model, run.optim.moving)
    load_moving(run.inputs.model, best_state, run.optim.moving, "the best epoch's weights")
    weights = clean_state_dict(run.inputs.model)
    cm = _confusion(run, feats)
    result = TrainResult(out=str(o.out), best_epoch=int(p.best["epoch"]), best_val_acc=float(p.best["val_acc"]),
                         best_val_loss=float(p.best["val_loss"]), epochs_run=len(p.history),
                         stopped_early=p.stopped_early, class_names=list(run.inputs.samples.classes), metrics=p.history,
                         cache_used=feats is not None, cache_reason=run.cache.reason, skipped=list(run.inputs.skipped),
                         device=str(run.place.device), world_size=run.dist.world_size,
                         resumed_from=run.ckpt["path"] if run.ckpt is not None else None,
                         best_weights=p.best.get("weights", "raw"), unfreeze=list(run.resolved.get(phases.UNFREEZES, [])),
                         guard=list(run.resolved.get(phases.GUARD_EVENTS_KEY, [])))
    result.head_phase_best, result.after_unfreeze_best = phases.bests(run.inputs.manifest, p.history)
    per_class = per_class_accuracy(cm)
    counts = balance.class_counts([y for _, y in run.inputs.samples.train], len(run.inputs.samples.classes))
    if balance.is_skewed(counts):
        result.per_class_val_acc = dict(zip(run.inputs.samples.classes, per_class))
    if run.dist.is_main:
        plot_run_curves(p.history, o.out, run.inputs.manifest, o.epochs, result.best_epoch, p.stopped_early)
        plot_confusion(cm, run.inputs.samples.classes, o.out / "confusion.png",
                       title=f"Confusion matrix (validation, best epoch {result.best_epoch})")
        write_model(o.out, o.adapted, run.inputs.manifest, weights, run.inputs.samples.classes, result,
                    run.args, cm, per_class)
        if result.per_class_val_acc is not None:
            run.files.log(f"classes are skewed (train images {min(counts)} to {max(counts)} per class); val acc per "
                          f"class: " + ", ".join(f"{c} {a:.3f}" for c, a in result.per_class_val_acc.items()))
        run.files.log(f"best epoch {result.best_epoch}: val acc {result.best_val_acc:.4f} loss "
                      f"{result.best_val_loss:.4f}{' (ema weights)' if result.best_weights == 'ema' else ''}; "
                      f"wrote {o.out / 'model.safetensors'}")
    D.barrier(run.dist)
    obs("end", result.to_json())
    return result


__all__ = ["train", "TrainResult", "TrainOptions"]
