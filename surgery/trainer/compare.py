"""``surgery train ... --compare-scratch``: the same run again from random weights, and a verdict.

Pretrained weights are worth their trouble only when they beat the same architecture trained
from scratch with the same budget. :func:`compare_scratch` trains the adapted model into OUT as
usual, then the same architecture, head and input pipeline from a seeded random initialisation
(everything trains, BatchNorm trains, one learning rate: the ``large-different`` setting) with
the same data, epochs, batch size, optimizer, schedule and ``--lr`` (``auto`` finds its own)
into ``OUT/scratch/``. It writes ``compare.json``, ``compare.png`` (both validation curves) and
adds ``scratch_*`` columns to each epoch of ``OUT/metrics.jsonl``. Interrupted, it is continued
as a whole (``--resume --compare-scratch``): each run resumes, or stands when it had finished, and
the scratch init is made again from the seed, the same.

The verdict compares best validation accuracies against their sampling noise: ``se =
sqrt((p1 (1 - p1) + p2 (1 - p2)) / n_val)``; a difference beyond ``2 se`` is a win for one side,
anything closer a tie ("no measurable transfer"). Scratch ahead means negative transfer.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ResumeError
from ..option_table import options_from, signature
from .options import TrainOptions

if TYPE_CHECKING:  # pragma: no cover
    from .outputs import TrainResult

SCHEMA = "surgery.compare/1"
_INIT_NAME = re.compile(r"\.scratch-init-[A-Za-z0-9_]{8}")  # tempfile.mkdtemp's names, as surgery.io lists them


@dataclass
class Verdict:
    pretrained_val_acc: float
    scratch_val_acc: float
    difference: float
    noise: float  # 2 standard errors of the difference
    val_images: int
    winner: str  # "pretrained", "scratch" or "tie"
    text: str


def verdict(pre: float, scratch: float, n_val: int) -> Verdict:
    """Who won, by how much, and whether that is more than noise on ``n_val`` images."""
    n = max(int(n_val), 1)
    noise = 2 * math.sqrt((pre * (1 - pre) + scratch * (1 - scratch)) / n)
    diff = pre - scratch
    if diff > noise:
        winner, text = "pretrained", f"pretrained wins by {100 * diff:.1f} points (noise +-{100 * noise:.1f})"
    elif -diff > noise:
        winner, text = "scratch", (f"negative transfer: scratch wins by {-100 * diff:.1f} points (noise "
                                   f"+-{100 * noise:.1f}); the pretrained features do not help this task")
    else:
        winner, text = "tie", (f"no measurable transfer: {100 * diff:+.1f} points is within the noise "
                               f"(+-{100 * noise:.1f} on {n} validation images)")
    return Verdict(pre, scratch, diff, noise, n, winner, text)


def scratch_init(adapted_dir: str | os.PathLike, dest: Path, seed: int, trust_code: bool = False) -> Path:
    """An adapted folder for the same architecture, head and input size from random weights, with
    everything training at one learning rate. Written to ``dest``."""
    from ..adapter.arch import ArchSpec
    from ..adapter.core import adapt, build_from_manifest
    from ..adapter.manifest import read_manifest

    import torch

    m = read_manifest(adapted_dir)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        state = build_from_manifest(m, trust_code=trust_code).state_dict()
    spec, head, inp = ArchSpec.from_json(m["arch"]), m.head, m["input"]
    adapt(state, arch=spec.display, arch_kwargs=spec.kwargs, num_classes=m.num_classes, out=dest, force=True,
          head=head.get("kind") or "linear", hidden=head.get("hidden") or 512,
          dropout=head.get("dropout") if head.get("dropout") is not None else 0.5,
          in_chans=int(head.get("in_chans") or inp.get("channels", 3)), input_size=int(inp["size"][0]),
          freeze="none", bn="train", backbone_lr_mult=1.0, class_names=m["class_names"], seed=seed)
    return dest


def compare_scratch(adapted_dir: str | os.PathLike | None = None, data: str | os.PathLike | None = None,
                    options: TrainOptions | None = None, *, observer: Any = None, **keywords: Any) -> dict:
    """Train ``adapted_dir`` into ``out`` and the scratch baseline into ``out/scratch``; returns
    the comparison (also written as ``out/compare.json``). The keywords are the fields of
    :class:`~.options.TrainOptions` (``options``: a TrainOptions, the keywords laid over it); both
    runs take them.

    ``resume=True`` finishes an interrupted comparison: the pretrained run continues
    ``out/checkpoints/last.pt`` (or stands, when it had finished), then the scratch run continues
    ``out/scratch/checkpoints/last.pt`` (or starts, from the same seeded init), both with the
    arguments the pretrained run saved; the comparison is then written as an uninterrupted one."""
    from .resume import continue_command, continued_by
    from .runner import train

    given = {k: v for k, v in (("adapted", adapted_dir), ("data", data)) if v is not None}
    opts = options_from(TrainOptions, options, {**keywords, **given}, "compare_scratch").require("adapted", "data",
                                                                                               "out")
    out, resume = opts.out, opts.resume
    if resume not in (None, False, True):
        raise ResumeError(f"resume={resume!r}: a comparison continues both of its runs from {out} (checkpoints/"
                          f"last.pt, then scratch/checkpoints/last.pt); pass resume=True")
    # an interruption of either run is continued by continuing the comparison
    with continued_by(continue_command(opts.adapted, opts.data, out, opts.trust_code, compare_scratch=True)):
        if resume:
            pre = _finished(out, opts.epochs)
            if pre is None:
                pre = train(options=replace(opts, resume=True), observer=observer)
            elif observer is not None:
                observer("log", {"message": f"the pretrained run in {out} had finished; it stands as it is"})
            scratch_opts = replace(opts, **_saved_options(opts))
        else:
            pre = train(options=replace(opts, resume=None), observer=observer)
            scratch_opts = opts
        scratch = _scratch_run(scratch_opts, observer, bool(resume))
    n_val = sum(sum(row) for row in json.loads((out / "manifest.json").read_text())["results"]["confusion"])
    v = verdict(pre.best_val_acc, scratch.best_val_acc, n_val)
    report = {"schema": SCHEMA, "pretrained": _summary(pre), "scratch": _summary(scratch), "verdict": asdict(v)}
    _write(out, pre.metrics, scratch.metrics, report)
    return report


compare_scratch.__signature__ = signature(compare_scratch, TrainOptions,  # type: ignore[attr-defined]
                                          skip=("adapted", "data"))


def _scratch_run(opts: TrainOptions, observer: Any, resume: bool) -> "TrainResult":
    """The scratch run in ``out/scratch`` from its seeded init (made again, the same, to resume it):
    afresh, or (``resume``) as it stands when it had finished, or continued from its last.pt."""
    from ..errors import TrainInterrupted
    from .resume import continue_command
    from .runner import train
    from .state import CHECKPOINT_DIR, LAST

    out = opts.out
    where = out / "scratch"
    run = dict(force=True, resume=None)
    if resume:
        _remove_stale_inits(out)
        done = _finished(where, opts.epochs)
        if done is not None:
            if observer is not None:
                observer("log", {"message": f"the scratch run in {where} had finished; it stands as it is"})
            return done
        if (where / CHECKPOINT_DIR / LAST).is_file():
            run.update(force=False, resume=True)
    tmp = Path(tempfile.mkdtemp(prefix=".scratch-init-", dir=out))
    try:
        init = scratch_init(opts.adapted, tmp / "adapted", opts.seed, trust_code=opts.trust_code)
        return train(options=replace(opts, adapted=init, out=where, **run), observer=_tagged(observer))
    except KeyboardInterrupt:  # outside the scratch run's epochs (those raise TrainInterrupted themselves)
        again = continue_command(opts.adapted, opts.data, out)  # the comparison's: see compare_scratch
        raise TrainInterrupted(f"interrupted while the scratch run was being set up or written; the pretrained run is "
                               f"done in {out}; continue with: {again}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _finished(out: Path, epochs: int | None) -> "TrainResult | None":
    """The run in ``out`` as it ended (a TrainResult), when it had: its manifest holds the results
    of as many epochs as its last.pt, and ``epochs`` does not ask for more. Otherwise None."""
    from .outputs import TrainResult
    from .state import CHECKPOINT_DIR, LAST, load_checkpoint

    last = out / CHECKPOINT_DIR / LAST
    try:
        manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    res = manifest.get("results") if isinstance(manifest, dict) else None
    if not isinstance(res, dict) or not last.is_file():
        return None
    ran = (res.get("train_args") or {}).get("epochs")
    ckpt = load_checkpoint(last)  # a run extended with --epochs and interrupted has saved more epochs
    if ckpt["epoch"] != res.get("epochs_run") or (ckpt.get("args") or {}).get("epochs") != ran \
            or epochs not in (None, ran):
        return None
    return TrainResult(out=str(out), best_epoch=int(res["best_epoch"]), best_val_acc=float(res["val_acc"]),
                       best_val_loss=float(res["val_loss"]), epochs_run=int(res["epochs_run"]),
                       stopped_early=bool(res.get("stopped_early")), class_names=list(manifest["class_names"]),
                       metrics=list(ckpt.get("history") or []), best_weights=res.get("weights") or "raw")


def _saved_options(opts: TrainOptions) -> dict:
    """The pretrained run's arguments as it saved them, for the scratch run: those left at their
    defaults take the saved values (the seed too: it makes the scratch init), one given
    differently is refused, as a resumed run refuses it (--epochs, --workers, --device may change)."""
    from ..adapter.manifest import MANIFEST_NAME
    from .options import HYPER
    from .resume import restore_args

    where = opts.out / MANIFEST_NAME
    saved = json.loads(where.read_text(encoding="utf-8"))["results"]["train_args"]
    restored, _ = restore_args(replace(opts, resume=None), {k: saved[k] for k in HYPER if k in saved}, str(where))
    return restored.hyper()


def _remove_stale_inits(out: Path) -> None:
    """The scratch inits a killed comparison left in OUT (a finished or interrupted one removes its own)."""
    for p in out.glob(".scratch-init-*"):
        if _INIT_NAME.fullmatch(p.name) and p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)


def _tagged(observer: Any) -> Any:
    if observer is None:
        return None
    return lambda event, info: observer(event, dict(info, run="scratch"))


def _summary(r: Any) -> dict:
    return {"out": r.out, "best_epoch": r.best_epoch, "best_val_acc": r.best_val_acc, "best_val_loss": r.best_val_loss,
            "epochs_run": r.epochs_run, "seconds": sum(m.get("seconds") or 0.0 for m in r.metrics)}


def _write(out: Path, pre: list[dict], scratch: list[dict], report: dict) -> None:
    from ..io import atomic_file
    from .plots import _figure, _save

    by_epoch = {m["epoch"]: m for m in scratch}
    lines = []
    for m in pre:
        s = by_epoch.get(m["epoch"], {})
        lines.append(dict(m, **{f"scratch_{k}": s.get(k) for k in ("train_loss", "val_loss", "val_acc")}))
    with atomic_file(out / "metrics.jsonl") as tmp:
        tmp.write_text("".join(json.dumps(m) + "\n" for m in lines), encoding="utf-8")
    with atomic_file(out / "compare.json") as tmp:
        tmp.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    fig = _figure(10, 4)
    axes = fig.subplots(1, 2)
    for ax, key, title in ((axes[0], "val_acc", "validation accuracy"), (axes[1], "val_loss", "validation loss")):
        for runs, label, style in ((pre, "pretrained", "-o"), (scratch, "scratch", "--s")):
            ax.plot([m["epoch"] for m in runs], [m[key] for m in runs], style, markersize=4, label=label)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(report["verdict"]["text"], fontsize=9)
    _save(fig, out / "compare.png")
