"""Everything before the first epoch, as one unit: read the inputs (:mod:`.inputs`) and check the
run (nothing is written until all pass), claim OUT, seed, place the model, build the optimization
and the objective, restore a checkpoint. :func:`prepare` returns the :class:`Run` the epoch loop
works on; each part of it is built by the step that owns it."""

from __future__ import annotations

import json
import os
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ..deploy import SUFFIXES as EXPORT_SUFFIXES
from ..errors import OutputError, ResumeError, TrainError
from ..io import OUTPUTS, check_replaceable, remove_outputs, remove_temps
from . import balance, cache
from . import distributed as D
from .augment import DEFAULT_AUGMENT, batch_mixer
from .device import Placement
from .ema import WeightEma
from .inputs import RunInputs, read_inputs
from .optim import LENGTH_FIELDS, LrMultiplier, optimizer_groups
from .options import TrainOptions
from .outputs import RunFiles
from .resume import inside, load_moving
from .state import BEST, CHECKPOINT_DIR, changing_keys, check_fingerprint, fingerprint, load_checkpoint

Observer = Callable[[str, dict], None]


@dataclass
class Progress:
    """What the epochs have done so far; a checkpoint saves it and a resumed run starts from it."""

    start_epoch: int = 0
    best: dict = field(default_factory=lambda: {"epoch": 0, "val_acc": -1.0, "val_loss": float("inf")})
    bad_epochs: int = 0
    history: list[dict] = field(default_factory=list)
    best_state: dict | None = None
    stopped_early: bool = False


@dataclass
class CachePlan:
    """Whether the head trains on cached backbone features, why not, and the module the model
    splits at (the head's). The feature cache turns it off when the split fails its check."""

    use: bool
    reason: str
    head_path: str


@dataclass
class Optimization:
    """The optimizer over every manifest group, its per-group lr schedule (``mult``: the run's
    length and warmup), the fp16 gradient scaler, and the keys of the tensors that change."""

    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LambdaLR
    mult: LrMultiplier
    scaler: torch.amp.GradScaler | None
    moving: set[str]


@dataclass
class Objective:
    """The loss (class weights, label smoothing), the batch mixer and the weight average."""

    crit: nn.CrossEntropyLoss
    mixer: Callable | None
    ema: WeightEma | None


@dataclass
class Run:
    """A prepared run: its options, its inputs (:class:`.inputs.RunInputs`), the processes and
    device, OUT's files, the cache plan, the optimization and objective, and the progress restored
    from a checkpoint (if any). ``resolved``: what the run chose beyond its options (saved with them)."""

    opts: TrainOptions
    inputs: RunInputs
    dist: D.DistInfo
    place: Placement
    files: RunFiles
    fingerprint: dict
    cache: CachePlan
    optim: Optimization
    objective: Objective
    ckpt: dict | None = None
    restored: list[str] = field(default_factory=list)
    resolved: dict = field(default_factory=dict)
    progress: Progress = field(default_factory=Progress)

    @property
    def failure_log(self) -> Path:
        return failure_log(self.opts.out)

    @property
    def args(self) -> dict:
        """The run's arguments as checkpoints and the manifest record them."""
        return {**self.opts.hyper(), **self.resolved}


def failure_log(out: Path) -> Path:
    """Images that failed to decode: one JSON line each, appended by every worker and rank."""
    return out / "failures.jsonl"


def prepare(opts: TrainOptions, ckpt: dict | None, resuming_here: bool, restored: list[str], dist: D.DistInfo,
            place: Placement, obs: Observer) -> Run:
    """Check, claim OUT, seed, place, build: the steps in the order a run depends on."""
    inputs = read_inputs(opts, device=place.device, distributed=dist.enabled, failure_log=failure_log(opts.out))
    fp, plan = check_run(opts, inputs, ckpt, resuming_here, dist)
    files = RunFiles(opts.out, dist.is_main, obs)
    claim_out(opts, dist, files, resuming_here)
    seed_everything(opts.seed, dist.rank)
    place.place_model(inputs.model)
    run = Run(opts=opts, inputs=inputs, dist=dist, place=place, files=files, fingerprint=fp, cache=plan,
              optim=build_optimization(opts, inputs, place), objective=build_objective(opts, inputs, place),
              ckpt=ckpt, restored=restored, resolved=opts.resolved())
    log_setup(run)
    if ckpt is not None:
        restore(run)
    return run


# ----------------------------------------------------------------------------- checks

def check_run(opts: TrainOptions, inputs: RunInputs, ckpt: dict | None, resuming_here: bool,
              dist: D.DistInfo) -> tuple[dict, CachePlan]:
    """What a run checks beyond its inputs: the groups, the cache, the checkpoint and OUT; nothing
    is written. Returns the run's fingerprint and its cache plan."""
    manifest, model = inputs.manifest, inputs.model
    _check_groups(opts, manifest)
    use_cache, reason = cache.decide(model, manifest, opts.epochs, opts.cache_features, distributed=dist.enabled,
                                     compiled=opts.compile, mixing=opts.mixing)
    fp = fingerprint(manifest, model, inputs.samples.classes)
    if ckpt is not None:
        check_fingerprint(ckpt.get("fingerprint", {}), fp, str(ckpt["path"]))
        if int(ckpt["epoch"]) > opts.epochs:
            raise ResumeError(f"{ckpt['path']}: holds {ckpt['epoch']} finished epochs but --epochs is {opts.epochs}; "
                              f"pass --epochs {ckpt['epoch']} or more")
    check_out(opts.out, force=opts.force, resuming_here=resuming_here, inputs=[opts.adapted, opts.data])
    D.barrier(dist)
    return fp, CachePlan(use_cache, reason, cache.head_path(manifest))


def _check_groups(opts: TrainOptions, manifest: Any) -> None:
    groups = manifest.groups
    if not any(g["trainable"] for g in groups) and not any(
            g["unfreeze_at"] is not None and g["unfreeze_at"] < opts.epochs for g in groups):
        raise TrainError(f"{opts.adapted}: every parameter group is frozen for the whole run; re-run surgery adapt "
                         f"with a freeze policy that leaves something to train")
    if not any(g["trainable"] for g in groups):
        raise TrainError(f"{opts.adapted}: nothing trains in the first epoch (every group is frozen until later); "
                         f"re-run surgery adapt so the head trains from the start")


# what --force may replace in OUT: a run's files, and what `surgery export RUN` writes beside them
# (FILE and FILE.preprocess.json): surgery wrote those too
RUN_OUTPUTS = (*OUTPUTS["train"], *(rf"(scratch/)?model{re.escape(suffix)}(\.preprocess\.json)?"
                                    for suffix in EXPORT_SUFFIXES.values()))


def check_out(out: Path, *, force: bool, resuming_here: bool, inputs: list[Path]) -> None:
    """Refuse, before any work, an OUT that exists (without --force/--resume), holds an input,
    or cannot be written."""
    for src in inputs:
        if inside(src, out) or inside(out, src):
            raise OutputError(f"{out}: the output folder overlaps the input {src}; write the run elsewhere")
    if resuming_here:
        if not out.is_dir():
            raise ResumeError(f"{out}: --resume continues a run in OUT, but there is no such folder")
        ckpts = out / CHECKPOINT_DIR
        if ckpts.is_symlink() or (ckpts.exists() and not ckpts.is_dir()):  # checkpoints are written into it
            raise ResumeError(f"{ckpts}: is {'a link' if ckpts.is_symlink() else 'not a folder'}; a run writes its "
                              f"checkpoints only into a real folder inside OUT: replace it with the folder it names")
    elif (out.exists() or out.is_symlink()) and not force:
        raise OutputError(f"{out}: already exists; pass --force to replace it, or --resume to continue its run")
    elif out.exists() or out.is_symlink():
        check_replaceable(out, "folder", RUN_OUTPUTS)
    probe = out if out.exists() else out.parent
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise OutputError(f"{out}: cannot create it: {probe} is not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise OutputError(f"{out}: cannot write there: {probe} is not writable")


# ----------------------------------------------------------------------------- from here on OUT is ours

def claim_out(opts: TrainOptions, dist: D.DistInfo, files: RunFiles, resuming_here: bool) -> None:
    """Replace (--force) or tidy (--resume) OUT on rank 0; every rank waits for it."""
    out = opts.out
    if dist.is_main:
        if out.exists() and not resuming_here and opts.force:
            remove_outputs(out, RUN_OUTPUTS) if out.is_dir() and not out.is_symlink() else out.unlink()
        if resuming_here:
            remove_temps(out)  # what a process killed mid-write left
        (out / CHECKPOINT_DIR).mkdir(parents=True, exist_ok=True)
    D.barrier(dist)
    if resuming_here:
        files.load_existing()


def seed_everything(seed: int, rank: int) -> None:
    """Python, numpy and torch; each rank its own torch seed."""
    random.seed(seed)
    try:
        import numpy as np

        np.random.seed(seed)
    except ImportError:  # pragma: no cover
        pass
    torch.manual_seed(seed + rank)


def build_optimization(opts: TrainOptions, inputs: RunInputs, place: Placement) -> Optimization:
    """Optimizer (every manifest group, decay split), lr schedule and gradient scaler."""
    o, model = opts, inputs.model
    lr = 1e-3 if o.lr == "auto" else o.lr  # "auto": a placeholder until the range test has run
    groups = optimizer_groups(model, inputs.manifest, lr, o.decay)
    if o.optimizer == "adamw":
        opt: torch.optim.Optimizer = torch.optim.AdamW(groups, lr=lr, weight_decay=o.decay)
    else:
        opt = torch.optim.SGD(groups, lr=lr, momentum=o.momentum, weight_decay=o.decay)
    steps = optimizer_steps(len(inputs.train_dl), o.accumulate)
    mult = LrMultiplier(o.schedule, steps * o.epochs, round(o.warmup * steps))
    # one multiplier per group: an unfreeze and the guard change some groups' lrs and not others
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, [LrMultiplier(o.schedule, mult.total, mult.warmup) for _ in opt.param_groups])
    scaler = torch.amp.GradScaler("cuda") if place.amp_dtype == torch.float16 else None
    return Optimization(opt, sched, mult, scaler, changing_keys(model, inputs.manifest))


def optimizer_steps(batches: int, accumulate: int) -> int:
    """Optimizer steps in an epoch of ``batches``: one per ``accumulate`` batches, the last one
    taking what is left. The schedule and the warmup count these."""
    return -(-batches // accumulate)


def build_objective(opts: TrainOptions, inputs: RunInputs, place: Placement) -> Objective:
    """The loss (class weights), the batch mixer (--mixup/--cutmix) and the weight average (--ema)."""
    o, n = opts, len(inputs.samples.classes)
    weight = None
    if o.class_weights == "auto":
        w = balance.balanced_weights(balance.class_counts([y for _, y in inputs.samples.train], n))
        weight = torch.tensor(w, dtype=torch.float32, device=place.device)
    return Objective(nn.CrossEntropyLoss(weight=weight, label_smoothing=o.label_smoothing),
                     batch_mixer(n, o.mixup, o.cutmix), WeightEma(inputs.model, o.ema) if o.ema is not None else None)


def log_setup(run: Run) -> None:
    o, s, log = run.opts, run.inputs.samples, run.files.log
    counts = s.counts()
    log(f"surgery train: {o.adapted} on {s.root} ({s.source}) -> {o.out}")
    log(f"classes ({len(s.classes)}): {', '.join(s.classes)}")
    log(f"images: {len(s.train)} train, {len(s.val)} val; per class train "
        f"{json.dumps(counts['train'])}, val {json.dumps(counts['val'])}")
    if run.inputs.skipped:
        log(f"skipped {len(run.inputs.skipped)} unreadable images:")
        for p, r in run.inputs.skipped:
            log(f"  skipped {p}: {r}")
    amp = run.place.amp_dtype if run.place.amp_dtype is not None else "off"
    log(f"device {run.place.device}{' x' + str(run.dist.world_size) + ' processes' if run.dist.enabled else ''}; "
        f"amp {amp}; optimizer {o.optimizer} lr {o.lr} weight decay {o.decay:g}; schedule {o.schedule} over "
        f"{run.optim.mult.total} steps, warmup {run.optim.mult.warmup} steps")
    extras = _extras(run)
    if extras:
        log("; ".join(extras))
    for warning in o.warnings():
        log(f"warning: {warning}")


def _extras(run: Run) -> list[str]:
    """The options beyond the defaults that change what a step computes, for run.log."""
    o, said = run.opts, []
    if o.augment != DEFAULT_AUGMENT:
        said.append(f"augment {o.augment}")
    said += [f"{k} {getattr(o, k):g}" for k in ("mixup", "cutmix") if getattr(o, k)]
    if o.accumulate > 1:
        said.append(f"accumulate {o.accumulate} batches per step (effective batch {o.accumulate * o.batch_size})")
    if o.ema is not None:
        said.append(f"ema decay {o.ema:g}")
    if o.class_weights == "auto":
        weights = zip(run.inputs.samples.classes, run.objective.crit.weight.tolist())
        said.append("class weights " + ", ".join(f"{c} {w:.2f}" for c, w in weights))
    if o.balanced_sampler:
        said.append("balanced sampler")
    return said


def best_weights(best: dict, which: str, moving: set[str]) -> dict:
    """The best epoch's tensors as the run kept them from ``best.pt``: the averaged ones when
    ``--ema``'s weights won that epoch (the checkpoint's ``ema`` holds them as ``module.NAME``)."""
    ema = best.get("ema")
    if which == "ema" and isinstance(ema, dict):
        cut = len("module.")
        return {k[cut:]: v for k, v in ema.items() if k.startswith("module.") and k[cut:] in moving}
    return best["model"]


def restore(run: Run) -> None:
    """The checkpoint's weights, optimizer, schedule (stretched to this run's length), scaler and
    progress; its best weights when best.pt is beside it."""
    ckpt, p = run.ckpt, run.progress
    load_moving(run.inputs.model, ckpt["model"], run.optim.moving, str(ckpt["path"]))
    run.optim.opt.load_state_dict(ckpt["optimizer"])
    length = {k: getattr(run.optim.mult, k) for k in LENGTH_FIELDS}
    run.optim.sched.load_state_dict(ckpt["scheduler"])
    for f in run.optim.sched.lr_lambdas:  # LambdaLR restores the saved length; another --epochs changes it
        f.__dict__.update(length)
    if run.optim.scaler is not None and ckpt.get("scaler"):
        run.optim.scaler.load_state_dict(ckpt["scaler"])
    if run.objective.ema is not None and ckpt.get("ema"):
        run.objective.ema.load_state_dict(ckpt["ema"])
    p.start_epoch, p.best, p.bad_epochs = int(ckpt["epoch"]), dict(ckpt["best"]), int(ckpt["bad_epochs"])
    p.history = list(ckpt.get("history") or [])
    saved = ckpt.get("args") or {}
    for k in ("unfreezes", "guard_events"):  # what the phases did so far (phases.UNFREEZES, GUARD_EVENTS_KEY)
        if isinstance(saved.get(k), list):
            run.resolved[k] = list(saved[k])
    best_file = Path(ckpt["path"]).parent / BEST
    if best_file.is_file() and p.best["epoch"] > 0:
        p.best_state = best_weights(load_checkpoint(best_file), p.best.get("weights", "raw"), run.optim.moving)
    run.files.log(f"resumed from {ckpt['path']} after epoch {p.start_epoch}"
                  + (f"; from the checkpoint: {', '.join(run.restored)}" if run.restored else ""))
    saved_epochs = (ckpt.get("args") or {}).get("epochs")
    if saved_epochs is not None and saved_epochs != run.opts.epochs:
        run.files.log(f"--epochs {run.opts.epochs} (the run was started with {saved_epochs}): the schedule now "
                      f"runs over {run.optim.mult.total} steps")
