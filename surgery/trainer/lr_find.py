"""The learning-rate range test behind ``surgery train --lr auto`` (the default) and ``--find-lr``.

The idea of Smith's range test (and fastai's ``lr_find``), written here from the description:
train a *copy* of the model for a few hundred steps while the learning rate grows
exponentially from ``start`` to ``end``, record the loss at each step, smooth it, and read a
learning rate off the curve. The model given is never touched (its weights and buffers are
bit-identical afterwards), nor are the caller's random number generators: a run with ``--lr auto``
that finds ``x`` trains exactly as a run with ``--lr x``.

The rule (:func:`suggest`): the loss is smoothed by an exponential moving average
(``beta = 0.9``, bias-corrected); the sweep stops early once the smoothed loss exceeds four
times its minimum (it diverged). The minimum is looked for past the first tenth of the sweep (at
least 3 steps): the first smoothed values average only a batch or two, and a lucky first batch
once made the bottom of the sweep, 1e-6, the suggestion. Then it depends on what trains:

- **the head alone** (a linear or small head on frozen features, cached or not): the learning
  rate at the minimum of the smoothed loss divided by 10. Fitting a head on fixed features is
  close to a convex problem: its loss keeps falling until the rate is too high to be stable, so
  the minimum is sharp and a decade below it still learns fast (Smith's range test, fastai's
  ``minimum``).
- **backbone layers too**: 8 times the lr in the *middle of the descent*, at most the lr at the
  minimum. A network's curve is a plateau, a descent, then a flat, noisy floor: the training loss
  still falls (or holds) at rates that wreck the pretrained features, so the floor's minimum is a
  decade or two too high and moves by decades between sweeps (on the digits bench, 48-step
  sweeps of one model put it anywhere from 1.6e-2 to 2.3e-1). The descent is steadier, but a
  short sweep's losses jump by 2x from batch to batch, so reading the point where the smoothed
  loss crosses a level (half way down, as this rule did before) moved by up to 4x between seeds. A
  falling step ``a + b / (1 + 10^((log10 lr - c) / w))`` fitted by least squares to the raw losses
  up to the smoothed minimum uses every point: its middle ``10^c`` moved by 2x at most between
  seeds there. The descent's middle is where the sweep *starts* to learn, after the steps below
  it; the run trains at one lr from its first step, and on the bench the best lr of a grid sat 5
  to 20 times above the middle (``AHEAD = 8`` is the compromise; see docs/benchmarks.md for the figures).
  It is the idea of fastai's ``valley`` (the middle of the longest descent), fitted rather than
  counted. The whole-model sweep is as long as the run (40 to 100 steps): the descent moves to
  lower rates as the sweep gets longer (a 100-step sweep put it up to 2x lower), so a sweep as long as
  the run measures the rate at which *that* run learns.

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

from ..option_table import options_from, signature
from .options import TrainOptions

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn

SCHEMA = "surgery.lr_find/1"
_SWEEP = "EMA beta 0.9; the sweep stops when the smoothed loss exceeds 4x its minimum"
RULE_HEAD = f"the head alone: lr at the minimum of the smoothed loss / 10 ({_SWEEP})"
RULE_NET = (f"backbone layers train: 8 x the lr in the middle of the loss's descent (a falling step fitted to "
            f"the raw losses up to the smoothed minimum), at most the minimum ({_SWEEP})")
START, END = 1e-6, 1.0
BETA, DIVERGE, BACKOFF = 0.9, 4.0, 10.0
AHEAD = 8.0  # backbone layers train: the suggestion is this many times the middle of the descent
FIT_PER_DECADE, FIT_WIDTHS = 20, (0.2, 0.3, 0.45, 0.7, 1.0, 1.5)  # the descent fit's grid: middles, widths (decades)


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
    head_only: bool = False
    descent_lr: float | None = None  # the middle of the loss's descent (backbone layers train)
    ceiling_lr: float | None = None  # the unfreeze: where the probe's loss rises past RISE x its start
    probe: list[float] | None = None  # the unfreeze: the loss of fixed training images, before and after each step
    rose: bool | None = None  # the unfreeze: whether that loss passed the limit within the sweep
    rule: str = RULE_NET
    schema: str = SCHEMA

    def to_json(self) -> dict:
        return asdict(self)

    def summary(self) -> dict:
        """The record without the curve (for manifests and logs)."""
        return {k: v for k, v in self.to_json().items() if k not in ("lrs", "losses", "smoothed", "probe")}


@dataclass(frozen=True)
class SweepOptim:
    """How a sweep steps: the optimizer (``adamw`` or ``sgd``), its weight decay and momentum,
    and the loss (``loss_fn``, or cross-entropy with ``label_smoothing``)."""

    optimizer: str = "adamw"
    weight_decay: float = 0.0
    momentum: float = 0.9
    label_smoothing: float = 0.0
    loss_fn: Callable | None = None

    @classmethod
    def of(cls, opts: Any) -> "SweepOptim":
        """The sweep of a run with these :class:`~.options.TrainOptions`."""
        return cls(opts.optimizer, opts.decay, opts.momentum, opts.label_smoothing)

    def loss(self) -> Callable:
        import torch

        return self.loss_fn or torch.nn.CrossEntropyLoss(label_smoothing=self.label_smoothing)

    def build(self, groups: list[dict], start: float) -> Any:
        import torch

        if self.optimizer == "sgd":
            return torch.optim.SGD(groups, lr=start, momentum=self.momentum, weight_decay=self.weight_decay)
        return torch.optim.AdamW(groups, lr=start, weight_decay=self.weight_decay)


def smooth(losses: list[float], beta: float = BETA) -> list[float]:
    """Bias-corrected exponential moving average."""
    out, avg = [], 0.0
    for i, v in enumerate(losses, 1):
        avg = beta * avg + (1 - beta) * v
        out.append(avg / (1 - beta ** i))
    return out


def suggest(lrs: list[float], smoothed: list[float], start: float = START, end: float = END,
            head_only: bool = False, losses: list[float] | None = None) -> tuple[float, float, float | None]:
    """(suggestion, lr at the minimum, lr in the middle of the descent) by the rule of the module
    docstring; ``head_only`` selects the head's rule (no descent fit). ``losses``: the raw losses
    the descent is fitted to (default: ``smoothed``)."""
    finite = [(s, i) for i, s in enumerate(smoothed) if math.isfinite(s)]
    if not finite:
        return start, start, None
    # the first smoothed values average a batch or two: a lucky first batch must not be the minimum
    settled = [(s, i) for s, i in finite if i >= max(3, len(smoothed) // 10)]
    i_min = min(settled or finite)[1]
    lr_min = lrs[i_min]
    pick, mid = lr_min / BACKOFF, None
    if not head_only:
        mid = descent_middle(lrs, smoothed if losses is None else losses, i_min)
        if mid is not None:
            pick = min(mid * AHEAD, lr_min)
    return min(max(pick, start), end), lr_min, mid


def descent_middle(lrs: list[float], losses: list[float], i_min: int) -> float | None:
    """The lr in the middle of the loss's descent: a falling step ``a + b / (1 + 10^((x - c) / w))``
    in ``x = log10(lr)`` fitted by least squares to the losses up to the smoothed minimum at
    ``i_min``, and ``10^c`` returned. Every point weighs in, so the batch-to-batch noise of a
    short sweep moves the middle much less than it moves any single crossing of a level. None
    when fewer than 8 points are usable or nothing falls (the best step does not go down)."""
    pts = [(math.log10(lr), v) for lr, v in zip(lrs[:i_min + 1], losses[:i_min + 1]) if math.isfinite(v)]
    if len(pts) < 8:
        return None
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    if max(ys) - min(ys) <= 1e-9 * max(1.0, abs(ys[0])):
        return None  # flat: nothing fell
    n, sy = len(ys), sum(ys)
    best: tuple[float, float] | None = None
    lo, hi = xs[0], xs[-1]
    for k in range(int((hi - lo) * FIT_PER_DECADE) + 1):
        c = lo + k / FIT_PER_DECADE
        for w in FIT_WIDTHS:
            f = [1.0 / (1.0 + 10.0 ** min((x - c) / w, 300.0)) for x in xs]
            sf, sff = sum(f), sum(v * v for v in f)
            den = n * sff - sf * sf
            if den <= 1e-12:
                continue
            b = (n * sum(v * y for v, y in zip(f, ys)) - sf * sy) / den
            if b <= 0:  # a rise, not a descent
                continue
            a = (sy - b * sf) / n
            err = sum((a + b * v - y) ** 2 for v, y in zip(f, ys))
            if best is None or err < best[0]:
                best = (err, c)
    return None if best is None else 10.0 ** best[1]


def _cycle(batches: Callable[[], Iterable]) -> Iterable:
    while True:
        empty = True
        for b in batches():
            empty = False
            yield b
        if empty:
            raise ValueError("the range test got no batches")


def range_test(model: "nn.Module", batches: Callable[[], Iterable], *, groups: Callable[["nn.Module"], list[dict]] | None = None,
               optim: SweepOptim = SweepOptim(), steps: int = 200, start: float = START, end: float = END,
               place: Any = None, cached: bool = False, head_only: bool = False,
               probe: Callable[["nn.Module"], float] | None = None, rule: Callable[..., dict] | None = None) -> LrFind:
    """Sweep the lr from ``start`` to ``end`` over ``steps`` steps on a copy of ``model``.

    ``batches()``: a fresh iterable of ``(x, y)`` (re-called when it runs out). ``groups(copy)``:
    optimizer groups with ``lr_mult`` (default: every parameter that requires grad, ``lr_mult`` 1).
    ``optim``: the optimizer and loss. ``place``: a :class:`~.device.Placement` that moves each
    batch to the device and autocasts (default: batches as they come, no autocast). ``head_only``: only a head on fixed features
    trains, which selects the head's rule (see the module docstring). ``probe(model)``: the loss of
    fixed images, measured before the first step and after each one (the sweep then stops once it
    passes ``DIVERGE`` times its start); ``rule(sweep)`` reads the suggestion off a :class:`_Sweep`
    instead of this module's rules (the unfreeze's, :mod:`.lr_unfreeze`).
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
    opt = optim.build(pgroups, start)
    sweep = _Sweep(work, opt, optim.loss(), place.batch if place is not None else (lambda x, y: (x, y)),
                   place.autocast if place is not None else contextlib.nullcontext, probe)
    devices = [p.device for p in work.parameters() if p.device.type == "cuda"][:1]
    with torch.random.fork_rng(devices=devices):
        sweep.run(iter(_cycle(batches)), steps, start, end)
    del work, opt
    if rule is not None:
        kw = rule(sweep, start, end)
    else:
        suggestion, lr_min, mid = suggest(sweep.lrs, sweep.smoothed, start, end, head_only, sweep.losses)
        kw = dict(suggestion=suggestion, min_lr=lr_min, descent_lr=mid, rule=RULE_HEAD if head_only else RULE_NET)
    return LrFind(lrs=sweep.lrs, losses=sweep.losses, smoothed=sweep.smoothed, stopped=sweep.stopped,
                  steps=len(sweep.lrs), seconds=time.perf_counter() - t0, cached=cached, head_only=head_only, **kw)


class _Sweep:
    """The steps of one range test on a model's copy: the lrs, raw and smoothed training losses,
    the probe's losses (before the first step, then after each), and why it stopped."""

    def __init__(self, work: Any, opt: Any, loss_fn: Callable, prepare: Callable, autocast: Callable,
                 probe: Callable[[Any], float] | None):
        self.work, self.opt, self.loss_fn, self.prepare, self.autocast = work, opt, loss_fn, prepare, autocast
        self.probe = probe
        self.lrs: list[float] = []
        self.losses: list[float] = []
        self.smoothed: list[float] = []
        self.probed: list[float] | None = [probe(work)] if probe is not None else None
        self.stopped = "end"
        self._avg, self._best = 0.0, math.inf

    def run(self, it: Iterable, steps: int, start: float, end: float) -> None:
        factor = (end / start) ** (1 / max(steps - 1, 1))
        for i in range(steps):
            if not self.step(next(it), start * factor ** i):
                self.stopped = "diverged"
                return

    def step(self, batch: tuple, lr: float) -> bool:
        """One step at ``lr``; False once the loss diverged (the smoothed training loss past
        ``DIVERGE`` times its minimum, or the probe's past ``DIVERGE`` times its start)."""
        for g in self.opt.param_groups:
            g["lr"] = lr * g["lr_mult"]
        x, y = self.prepare(*batch)
        self.opt.zero_grad(set_to_none=True)
        with self.autocast():
            out = self.work(x)
        loss = self.loss_fn(out.float(), y)
        v = float(loss.detach())
        self.lrs.append(lr)
        self.losses.append(v)
        self._avg = BETA * self._avg + (1 - BETA) * v
        self.smoothed.append(self._avg / (1 - BETA ** len(self.losses)))
        self._best = min(self._best, self.smoothed[-1])
        if self.probed is None and (not math.isfinite(v) or (len(self.losses) > 10 and self.smoothed[-1] > DIVERGE * self._best)):
            return False
        loss.backward()
        self.opt.step()
        if self.probed is not None:
            self.probed.append(self.probe(self.work))
            return math.isfinite(self.probed[-1]) and self.probed[-1] <= DIVERGE * self.probed[0]
        return True


def plot(found: LrFind, path: Any) -> Any:
    """``lr_find.png``: raw and smoothed loss against the lr (log axis), the suggestion marked."""
    from .plots import _figure, _save

    fig = _figure(6, 4)
    ax = fig.subplots()
    ax.plot(found.lrs, found.losses, color="0.75", linewidth=1, label="loss")
    ax.plot(found.lrs, found.smoothed, color="C0", linewidth=2, label="smoothed")
    if found.probe:
        ax.plot(found.lrs, found.probe[1:len(found.lrs) + 1], color="C2", linewidth=2, label="fixed images (eval)")
    ax.axvline(found.min_lr, color="0.5", linestyle=":", linewidth=1)
    if found.descent_lr is not None:
        ax.axvline(found.descent_lr, color="0.5", linestyle="-.", linewidth=1, label="middle of the descent")
    if found.ceiling_lr is not None:
        ax.axvline(found.ceiling_lr, color="0.5", linestyle="-.", linewidth=1, label="fixed images' loss past 1.5x")
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

def for_run(model: "nn.Module", manifest: Any, *, feats: dict | None, head_path: str, loader: Any, place: Any,
            optim: SweepOptim, seed: int, run_steps: int | None = None) -> LrFind:
    """The range test a train run does for ``--lr auto``: on the cached features (the head alone,
    200 steps) when the backbone is frozen, else on the whole model over the training images:
    100 steps, or as many as the run has when it is shorter (at least 40), so that the test never
    costs much more than the training it tunes."""
    import torch

    gen = torch.Generator().manual_seed(seed + 7919)  # the run's own generators are not touched
    if feats is not None:
        tx, ty = feats["train"][0]
        bs = min(loader.batch_size, len(ty))

        def batches():
            perm = torch.randperm(len(ty), generator=gen)
            return ((tx[perm[i:i + bs]], ty[perm[i:i + bs]]) for i in range(0, len(ty) - bs + 1, bs))

        head = model.get_submodule(head_path)
        return range_test(head, batches, groups=lambda m: [{"params": [p for p in m.parameters() if p.requires_grad]}],
                          optim=optim, steps=200, place=place, cached=True, head_only=True)
    head_only = all(n.startswith(head_path + ".") for n, p in model.named_parameters() if p.requires_grad)
    return on_images(model, manifest, loader, gen, steps=min(100, max(40, run_steps or 100)), place=place,
                     optim=optim, head_only=head_only)


def on_images(model: "nn.Module", manifest: Any, loader: Any, gen: Any, *, steps: int, optim: SweepOptim,
              **kw: Any) -> LrFind:
    """A sweep of the whole model over the training images, in an order of its own (``gen``)."""
    from torch.utils.data import DataLoader

    from .optim import optimizer_groups

    dl = DataLoader(loader.dataset, batch_size=loader.batch_size, shuffle=True, generator=gen,
                    num_workers=loader.num_workers, drop_last=len(loader.dataset) > loader.batch_size,
                    collate_fn=loader.collate_fn)
    return range_test(model, lambda: dl, groups=lambda m: optimizer_groups(m, manifest, 1.0, optim.weight_decay),
                      optim=optim, steps=steps, **kw)


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


def why(found: LrFind) -> str:
    """Which part of the rule gave the suggestion, with its numbers."""
    low = f"lowest at lr {fmt_lr(found.min_lr)}"
    if found.descent_lr is not None:
        return f"the loss's descent is centred at lr {fmt_lr(found.descent_lr)}, smoothed loss {low}"
    return f"smoothed loss {low}"


def rule_text(found: LrFind) -> str:
    """The part of the rule that gave the suggestion, in a few words."""
    if found.descent_lr is not None:
        if found.suggestion >= found.min_lr:
            return f"{AHEAD:g} x the middle of the descent would pass the lowest point: the lowest point"
        return f"{AHEAD:g} x the middle of the descent"
    return "the lowest point / 10"


def message(found: LrFind, lr: float) -> str:
    return (f"lr {fmt_lr(lr)} (found): range test of {found.steps} steps{' on cached features' if found.cached else ''}, "
            f"{why(found)}; wrote lr_find.png")


# ----------------------------------------------------------------------------- the test alone

def find_lr(adapted_dir: Any = None, data: Any = None, options: TrainOptions | None = None, **keywords: Any) -> LrFind:
    """``surgery train --find-lr``: only the range test a run with ``--lr auto`` would do first, on
    the same inputs (``epochs`` and ``accumulate`` give the run's length, which sets a whole-model
    sweep's). The keywords are the fields of :class:`~.options.TrainOptions`; ``options``: a
    TrainOptions, the keywords laid over it. ``out`` is optional: with it, writes ``lr_find.json``
    and ``lr_find.png`` there (a new folder, or ``force``)."""
    import torch

    from ..errors import OutputError
    from .cache import head_path
    from .device import Placement, resolve_device
    from .inputs import read_inputs
    from .prepare import optimizer_steps
    from .state import TrainError

    given = {k: v for k, v in (("adapted", adapted_dir), ("data", data)) if v is not None}
    opts = options_from(TrainOptions, options, {**keywords, **given}, "find_lr").require("adapted", "data")
    if opts.optimizer not in ("adamw", "sgd"):
        raise TrainError(f"--optimizer {opts.optimizer!r}: choose one of adamw, sgd")
    if opts.out is not None and opts.out.exists() and not opts.force:
        raise OutputError(f"{opts.out}: already exists; pass --force to write lr_find.png there")
    dev = resolve_device(opts.device)
    inputs = read_inputs(opts, device=dev, need_val=False)
    model = inputs.model.to(dev)
    torch.manual_seed(opts.seed)
    feats = _cached_features(opts, inputs, dev)
    runs = None if opts.epochs is None else opts.epochs * optimizer_steps(len(inputs.train_dl), opts.accumulate)
    found = for_run(model, inputs.manifest, feats=feats, head_path=head_path(inputs.manifest), loader=inputs.train_dl,
                    place=Placement(dev), optim=SweepOptim.of(opts), seed=opts.seed, run_steps=runs)
    if opts.out is not None:
        opts.out.mkdir(parents=True, exist_ok=True)
        use_files(found, opts.out)
    return found


def _cached_features(opts: TrainOptions, inputs: Any, dev: Any) -> dict | None:
    """The head's inputs for every training image (evaluation transform) when the cache can serve
    the range test, as a train run's cache would; None when it cannot or is off."""
    from torch.utils.data import DataLoader

    from . import cache as cache_mod
    from .data import ImageDataset, pipeline_transforms
    from .state import TrainError

    ok, why = cache_mod.eligibility(inputs.model, inputs.manifest, 1)
    if opts.cache_features == "on" and not ok:
        raise TrainError(f"--cache-features on: not possible here: {why}")
    if not ok or opts.cache_features == "off":
        return None
    plain = DataLoader(ImageDataset(inputs.samples.train, pipeline_transforms(inputs.pipe, train=False)),
                       batch_size=max(opts.batch_size, 64))
    return {"train": [cache_mod.extract(inputs.model, cache_mod.head_path(inputs.manifest), plain, dev, lambda x: x.to(dev),
                                        contextlib.nullcontext)]}


find_lr.__signature__ = signature(find_lr, TrainOptions, skip=("adapted", "data"))  # type: ignore[attr-defined]
