"""The learning-rate range test behind ``surgery train --lr auto`` (the default) and ``--find-lr``.

The idea of Smith's range test (and fastai's ``lr_find``), written here from the description:
train a *copy* of the model for a few hundred steps while the learning rate grows
exponentially from ``start`` to ``end``, record the loss at each step, smooth it, and read a
learning rate off the curve. The model given is never touched (its weights and buffers are
bit-identical afterwards), nor are the caller's random number generators: a run with ``--lr auto``
that finds ``x`` trains exactly as a run with ``--lr x``.

The rule (:func:`suggest`): the loss is smoothed by an exponential moving average
(``beta = 0.9``, bias-corrected); the sweep stops early once the smoothed loss exceeds four
times its minimum (it diverged). The suggestion is the learning rate at the minimum of the
smoothed loss divided by 10 (at the minimum the rate is already at the edge of stability; a
decade lower still learns fast), clamped into the swept range.

The lr found is the *head's* (``lr_mult`` 1); groups with another multiplier sweep at
``lr x lr_mult``, exactly as they will train. Only parameters that train in the first epoch move.

    >>> found = range_test(model, lambda: loader, steps=100)  # doctest: +SKIP
    >>> found.suggestion
    0.0032
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn

SCHEMA = "surgery.lr_find/1"
RULE = "lr at the minimum of the smoothed loss / 10 (EMA beta 0.9; sweep stops when the smoothed loss exceeds 4x its minimum)"
START, END = 1e-6, 1.0
BETA, DIVERGE, BACKOFF = 0.9, 4.0, 10.0


@dataclass
class LrFind:
    """One range test: the swept lrs, raw and smoothed losses, and the suggestion."""

    lrs: list[float]
    losses: list[float]
    smoothed: list[float]
    suggestion: float
    min_lr: float
    stopped: str  # "diverged" or "end"
    steps: int
    seconds: float
    cached: bool = False
    rule: str = RULE
    schema: str = SCHEMA

    def to_json(self) -> dict:
        return asdict(self)

    def summary(self) -> dict:
        """The record without the curve (for manifests and logs)."""
        return {k: v for k, v in self.to_json().items() if k not in ("lrs", "losses", "smoothed")}


def smooth(losses: list[float], beta: float = BETA) -> list[float]:
    """Bias-corrected exponential moving average."""
    out, avg = [], 0.0
    for i, v in enumerate(losses, 1):
        avg = beta * avg + (1 - beta) * v
        out.append(avg / (1 - beta ** i))
    return out


def suggest(lrs: list[float], smoothed: list[float], start: float = START, end: float = END) -> tuple[float, float]:
    """(suggestion, lr at the minimum) by the documented rule."""
    finite = [(s, i) for i, s in enumerate(smoothed) if math.isfinite(s)]
    if not finite:
        return start, start
    i_min = min(finite)[1]
    lr_min = lrs[i_min]
    return min(max(lr_min / BACKOFF, start), end), lr_min


def _cycle(batches: Callable[[], Iterable]) -> Iterable:
    while True:
        empty = True
        for b in batches():
            empty = False
            yield b
        if empty:
            raise ValueError("the range test got no batches")


def range_test(model: "nn.Module", batches: Callable[[], Iterable], *, groups: Callable[["nn.Module"], list[dict]] | None = None,
               optimizer: str = "adamw", weight_decay: float = 0.0, momentum: float = 0.9,
               loss_fn: Callable | None = None, steps: int = 200, start: float = START, end: float = END,
               prepare: Callable[[Any, Any], tuple] | None = None, autocast: Callable[[], Any] | None = None,
               cached: bool = False) -> LrFind:
    """Sweep the lr from ``start`` to ``end`` over ``steps`` steps on a copy of ``model``.

    ``batches()``: a fresh iterable of ``(x, y)`` (re-called when it runs out). ``groups(copy)``:
    optimizer groups with ``lr_mult`` (default: every parameter that requires grad, ``lr_mult`` 1).
    ``prepare(x, y)`` moves a batch to the device.
    """
    import torch

    t0 = time.perf_counter()
    work = copy.deepcopy(model)
    work.train()
    pgroups = groups(work) if groups is not None else [{"params": [p for p in work.parameters() if p.requires_grad],
                                                        "lr_mult": 1.0}]
    for g in pgroups:
        g.setdefault("lr_mult", 1.0)
        g["lr"] = start * g["lr_mult"]
    if optimizer == "sgd":
        opt = torch.optim.SGD(pgroups, lr=start, momentum=momentum, weight_decay=weight_decay)
    else:
        opt = torch.optim.AdamW(pgroups, lr=start, weight_decay=weight_decay)
    loss_fn = loss_fn or torch.nn.functional.cross_entropy
    prepare = prepare or (lambda x, y: (x, y))
    autocast = autocast or contextlib.nullcontext
    factor = (end / start) ** (1 / max(steps - 1, 1))
    lrs, losses, smoothed = [], [], []
    stopped, best, avg = "end", math.inf, 0.0
    devices = [p.device for p in work.parameters() if p.device.type == "cuda"][:1]
    with torch.random.fork_rng(devices=devices):
        it = iter(_cycle(batches))
        for i in range(steps):
            lr = start * factor ** i
            for g in opt.param_groups:
                g["lr"] = lr * g["lr_mult"]
            x, y = prepare(*next(it))
            opt.zero_grad(set_to_none=True)
            with autocast():
                out = work(x)
            loss = loss_fn(out.float(), y)
            v = float(loss.detach())
            lrs.append(lr)
            losses.append(v)
            avg = BETA * avg + (1 - BETA) * v
            smoothed.append(avg / (1 - BETA ** (i + 1)))
            best = min(best, smoothed[-1])
            if not math.isfinite(v) or (i >= 10 and smoothed[-1] > DIVERGE * best):
                stopped = "diverged"
                break
            loss.backward()
            opt.step()
    del work, opt
    suggestion, lr_min = suggest(lrs, smoothed, start, end)
    return LrFind(lrs=lrs, losses=losses, smoothed=smoothed, suggestion=suggestion, min_lr=lr_min, stopped=stopped,
                  steps=len(lrs), seconds=time.perf_counter() - t0, cached=cached)


def plot(found: LrFind, path: Any) -> Any:
    """``lr_find.png``: raw and smoothed loss against the lr (log axis), the suggestion marked."""
    from .plots import _figure, _save

    fig = _figure(6, 4)
    ax = fig.subplots()
    ax.plot(found.lrs, found.losses, color="0.75", linewidth=1, label="loss")
    ax.plot(found.lrs, found.smoothed, color="C0", linewidth=2, label="smoothed")
    ax.axvline(found.min_lr, color="0.5", linestyle=":", linewidth=1)
    ax.axvline(found.suggestion, color="C3", linestyle="--", linewidth=1.5)
    y = _interp(found.lrs, found.smoothed, found.suggestion)
    ax.plot([found.suggestion], [y], "o", color="C3", label=f"chosen lr {found.suggestion:.2g}")
    finite = [s for s in found.smoothed if math.isfinite(s)]
    if finite:
        lo, hi = min(finite), finite[0]
        ax.set_ylim(lo - 0.1 * abs(hi - lo) - 1e-3, max(hi, lo) + 0.6 * abs(hi - lo) + 1e-3)
    ax.set_xscale("log")
    ax.set_xlabel("learning rate (head)")
    ax.set_ylabel("training loss")
    ax.set_title(f"lr range test: {found.steps} steps{' on cached features' if found.cached else ''}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def _interp(xs: list[float], ys: list[float], x: float) -> float:
    if not xs:
        return 0.0
    i = min(range(len(xs)), key=lambda k: abs(math.log(xs[k]) - math.log(x)))
    return ys[i] if math.isfinite(ys[i]) else 0.0


def curve_text(found: LrFind, points: int = 12) -> list[str]:
    """A few rows of the curve for a terminal: lr, smoothed loss, a bar."""
    if not found.lrs:
        return []
    idx = sorted({round(k * (len(found.lrs) - 1) / max(points - 1, 1)) for k in range(points)})
    vals = [found.smoothed[i] for i in idx if math.isfinite(found.smoothed[i])]
    lo, hi = (min(vals), max(vals)) if vals else (0.0, 1.0)
    rows = []
    for i in idx:
        s = found.smoothed[i]
        bar = "#" * (1 + round(30 * (s - lo) / (hi - lo))) if math.isfinite(s) and hi > lo else ""
        rows.append(f"  lr {found.lrs[i]:8.2e}  loss {s:8.4f}  {bar}")
    return rows


# ----------------------------------------------------------------------------- inside a train run

def for_run(model: "nn.Module", manifest: Any, *, feats: dict | None, head_path: str, loader: Any, prepare: Callable,
            autocast: Callable, optimizer: str, weight_decay: float, momentum: float, label_smoothing: float,
            seed: int, run_steps: int | None = None) -> LrFind:
    """The range test a train run does for ``--lr auto``: on the cached features (the head alone,
    200 steps) when the backbone is frozen, else on the whole model over the training images:
    100 steps, or as many as the run has when it is shorter (at least 40), so that the test never
    costs much more than the training it tunes."""
    import torch
    from torch.utils.data import DataLoader

    from .optim import optimizer_groups

    gen = torch.Generator().manual_seed(seed + 7919)  # the run's own generators are not touched
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=label_smoothing)
    if feats is not None:
        tx, ty = feats["train"][0]
        bs = min(loader.batch_size, len(ty))

        def batches():
            perm = torch.randperm(len(ty), generator=gen)
            return ((tx[perm[i:i + bs]], ty[perm[i:i + bs]]) for i in range(0, len(ty) - bs + 1, bs))

        head = model.get_submodule(head_path)
        return range_test(head, batches, groups=lambda m: [{"params": [p for p in m.parameters() if p.requires_grad]}],
                          optimizer=optimizer, weight_decay=weight_decay, momentum=momentum, loss_fn=loss_fn,
                          steps=200, prepare=prepare, autocast=autocast, cached=True)
    dl = DataLoader(loader.dataset, batch_size=loader.batch_size, shuffle=True, generator=gen,
                    num_workers=loader.num_workers, drop_last=len(loader.dataset) > loader.batch_size,
                    collate_fn=loader.collate_fn)
    return range_test(model, lambda: dl, groups=lambda m: optimizer_groups(m, manifest, 1.0, weight_decay),
                      optimizer=optimizer, weight_decay=weight_decay, momentum=momentum, loss_fn=loss_fn,
                      steps=min(100, max(40, run_steps or 100)), prepare=prepare, autocast=autocast)


def use(found: LrFind, lr: float, opt: Any, sched: Any, out: Any, write: bool) -> None:
    """Make ``lr`` the run's base lr (the optimizer was built before the test, with a placeholder)
    and write ``lr_find.json`` and ``lr_find.png`` into the run folder ``out``."""
    for g, fn in zip(opt.param_groups, sched.lr_lambdas):
        g["initial_lr"] = lr * g.get("lr_mult", 1.0)
        g["lr"] = g["initial_lr"] * fn(sched.last_epoch)
    sched.base_lrs = [g["initial_lr"] for g in opt.param_groups]
    sched._last_lr = [g["lr"] for g in opt.param_groups]
    if write:
        use_files(found, Path(out))


def use_files(found: LrFind, out: Any) -> None:
    """``lr_find.json`` (the whole curve) and ``lr_find.png`` in the folder ``out``."""
    import json

    from ..io import atomic_file

    with atomic_file(out / "lr_find.json") as tmp:
        tmp.write_text(json.dumps(found.to_json(), indent=2) + "\n", encoding="utf-8")
    plot(found, out / "lr_find.png")


def fmt_lr(lr: float) -> str:
    """3.2e-3 rather than 0.0032 or 3.2e-03."""
    mant, exp = f"{lr:.1e}".split("e")
    return f"{mant}e{int(exp)}"


def message(found: LrFind, lr: float) -> str:
    return (f"lr {fmt_lr(lr)} (found): range test of {found.steps} steps{' on cached features' if found.cached else ''}, "
            f"smoothed loss lowest at lr {fmt_lr(found.min_lr)}; wrote lr_find.png")


# ----------------------------------------------------------------------------- the test alone

def find_lr(adapted_dir: Any, data: Any, *, val_split: float | None = None, seed: int = 0, batch_size: int = 32,
            optimizer: str = "adamw", weight_decay: float | None = None, momentum: float = 0.9,
            label_smoothing: float = 0.0, image_size: int | None = None, augment: bool = True, flip: bool = True,
            device: str = "auto", cache_features: str = "auto", out: Any = None, force: bool = False,
            trust_code: bool = False) -> LrFind:
    """``surgery train --find-lr``: only the range test a run with ``--lr auto`` would do first.
    With ``out``, writes ``lr_find.json`` and ``lr_find.png`` there (a new folder, or ``force``)."""
    import torch
    from torch.utils.data import DataLoader

    from ..adapter.core import load_adapted
    from ..adapter.manifest import read_manifest
    from ..errors import OutputError
    from . import cache as cache_mod
    from .data import ImageDataset, check_num_classes, discover, make_loaders, scan_images
    from .device import resolve_device
    from .state import TrainError

    if optimizer not in ("adamw", "sgd"):
        raise TrainError(f"--optimizer {optimizer!r}: choose one of adamw, sgd")
    out_p = Path(out) if out is not None else None
    if out_p is not None and out_p.exists() and not force:
        raise OutputError(f"{out_p}: already exists; pass --force to write lr_find.png there")
    manifest = read_manifest(adapted_dir)
    samples = discover(data, val_split=val_split, seed=seed)
    check_num_classes(samples, manifest.num_classes)
    samples, _ = scan_images(samples)
    dev = resolve_device(device)
    model = load_adapted(adapted_dir, device=dev, trust_code=trust_code)
    inp = manifest["input"]
    size, resize = ((image_size, None) if image_size is not None else (list(inp["size"]), inp.get("resize")))
    train_dl, _ = make_loaders(samples, image_size=size, mean=inp["mean"], std=inp["std"],
                               channels=int(inp.get("channels", 3)), batch_size=batch_size, seed=seed,
                               augment=augment, flip=flip, device=dev, resize=resize,
                               interpolation=inp.get("interpolation") or "bilinear")
    torch.manual_seed(seed)
    path = cache_mod.head_path(manifest)
    feats = None
    ok, why = cache_mod.eligibility(model, manifest, 1)
    if cache_features == "on" and not ok:
        raise TrainError(f"--cache-features on: not possible here: {why}")
    if ok and cache_features != "off":
        plain = DataLoader(ImageDataset(samples.train, _plain(size, inp, resize)), batch_size=max(batch_size, 64))
        feats = {"train": [cache_mod.extract(model, path, plain, dev, lambda x: x.to(dev), contextlib.nullcontext)]}
    wd = weight_decay if weight_decay is not None else (0.05 if optimizer == "adamw" else 1e-4)
    found = for_run(model, manifest, feats=feats, head_path=path, loader=train_dl,
                    prepare=lambda x, y: (x.to(dev), y.to(dev)), autocast=contextlib.nullcontext,
                    optimizer=optimizer, weight_decay=wd, momentum=momentum, label_smoothing=label_smoothing, seed=seed)
    if out_p is not None:
        out_p.mkdir(parents=True, exist_ok=True)
        use_files(found, out_p)
    return found


def _plain(size: Any, inp: dict, resize: Any) -> Any:
    from .data import build_transforms

    return build_transforms(size, inp["mean"], inp["std"], int(inp.get("channels", 3)), train=False, resize=resize,
                            interpolation=inp.get("interpolation") or "bilinear")
