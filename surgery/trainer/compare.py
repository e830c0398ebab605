"""``surgery train ... --compare-scratch``: the same run again from random weights, and a verdict.

Pretrained weights are worth their trouble only when they beat the same architecture trained
from scratch with the same budget. :func:`compare_scratch` trains the adapted model into OUT as
usual, then the same architecture, head and input pipeline from a seeded random initialisation
(everything trains, BatchNorm trains, one learning rate: the ``large-different`` setting) with
the same data, epochs, batch size, optimizer, schedule and ``--lr`` (``auto`` finds its own)
into ``OUT/scratch/``. It writes ``compare.json``, ``compare.png`` (both validation curves) and
adds ``scratch_*`` columns to each epoch of ``OUT/metrics.jsonl``.

The verdict compares best validation accuracies against their sampling noise: ``se =
sqrt((p1 (1 - p1) + p2 (1 - p2)) / n_val)``; a difference beyond ``2 se`` is a win for one side,
anything closer a tie ("no measurable transfer"). Scratch ahead means negative transfer.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

SCHEMA = "surgery.compare/1"


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


def compare_scratch(adapted_dir: str | os.PathLike, data: str | os.PathLike, *, out: str | os.PathLike,
                    seed: int = 0, observer: Any = None, **train_kwargs: Any) -> dict:
    """Train ``adapted_dir`` into ``out`` and the scratch baseline into ``out/scratch``; returns
    the comparison (also written as ``out/compare.json``). ``train_kwargs`` go to both runs."""
    from .runner import train

    out_p = Path(out)
    pre = train(adapted_dir, data, out=out_p, seed=seed, observer=observer, **train_kwargs)
    tmp = Path(tempfile.mkdtemp(prefix=".scratch-init-", dir=out_p))
    try:
        init = scratch_init(adapted_dir, tmp / "adapted", seed, trust_code=bool(train_kwargs.get("trust_code")))
        kw = dict(train_kwargs, force=True, resume=None)
        scratch = train(init, data, out=out_p / "scratch", seed=seed, observer=_tagged(observer), **kw)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    n_val = sum(sum(row) for row in json.loads((out_p / "manifest.json").read_text())["results"]["confusion"])
    v = verdict(pre.best_val_acc, scratch.best_val_acc, n_val)
    report = {"schema": SCHEMA, "pretrained": _summary(pre), "scratch": _summary(scratch), "verdict": asdict(v)}
    _write(out_p, pre.metrics, scratch.metrics, report)
    return report


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
