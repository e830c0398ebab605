"""Does the default fine-tune come out best? ``--lr auto``, ``surgery advise`` and the scratch
baseline on the four data regimes, built from scikit-learn's digits (no download).

The backbone: torchvision ResNet-18 trained by a plain loop on digits 0-4
(``fixtures.pretrained.pretrained_digits``), fine-tuned on digits 5-9 (5 new classes):

- **similar**: digits 5-9 as they are: the same strokes, scale and layout as digits 0-4.
- **different**: digits 5-9 with one fixed random permutation of their 8x8 pixels (before the
  upscaling). The labels, pixel statistics and image size stay, but the spatial structure the
  pretrained convolutions learned (strokes, edges, locality) is gone: a domain shift by
  construction, with a known answer (pretrained spatial features should not help).
- **small**: ``--small`` training images per class; **large**: ``--large`` per class (``all``:
  every one, about 145). Validation: ``--val`` images per class, never trained on.

For each regime and seed: the regime's own preset trained with ``--lr auto`` (the default run)
and with each lr of a five-point grid; every other preset with ``--lr auto``; the same
architecture from scratch (``--compare-scratch``'s baseline); and ``surgery advise``'s preset.
The table gives means and spreads (min-max) over seeds.

    .venv/bin/python bench/outcome.py                   # 3 seeds, 32 px, 8 epochs
    .venv/bin/python bench/outcome.py --quick           # 1 seed, 16 px, 3 epochs, fewer images
    .venv/bin/python bench/outcome.py --table A.json B.json   # one table from runs split by --regimes
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PRESETS = ("small-similar", "small-different", "large-similar", "large-different")
GRID = (1e-4, 1e-3, 3e-3, 1e-2, 1e-1)


def make_data(root: Path, per_class: int | None, val: int, size: int, permute: bool) -> Path:
    """digits 5-9 as an ImageFolder: ``per_class`` train images (None: all but ``val``), ``val`` val images."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    if (root / "val").is_dir():
        return root
    d = load_digits()
    pixels = np.clip(np.rint(d.images * (255 / 16)), 0, 255).astype(np.uint8)
    perm = np.random.default_rng(1234).permutation(64)
    for c in range(5, 10):
        idx = np.flatnonzero(d.target == c)
        idx = idx[np.random.default_rng(c).permutation(len(idx))]
        parts = {"val": idx[:val], "train": idx[val:] if per_class is None else idx[val:val + per_class]}
        for split, part in parts.items():
            (root / split / str(c)).mkdir(parents=True, exist_ok=True)
            for i in part:
                img = pixels[i].reshape(-1)[perm].reshape(8, 8) if permute else pixels[i]
                Image.fromarray(img).resize((size, size), Image.Resampling.BILINEAR).convert("RGB").save(
                    root / split / str(c) / f"{i}.png")
    return root


def one_regime(work: Path, ckpt: Path, data: Path, preset: str, seed: int, a: argparse.Namespace) -> dict:
    from surgery import adapt, train
    from surgery.advice import advise
    from surgery.trainer.compare import scratch_init

    kw = dict(epochs=a.epochs, batch_size=16, flip=False, seed=seed, force=True, device="cpu")
    adapted = {}
    for p in PRESETS:
        adapted[p] = ckpt.parent / f"adapted-{a.size}" / p  # the same for every regime and seed
        adapted[p].parent.mkdir(parents=True, exist_ok=True)
        (work / "runs").mkdir(parents=True, exist_ok=True)
        if not (adapted[p] / "manifest.json").is_file():
            adapt(str(ckpt), arch="resnet18", num_classes=5, preset=p, input_size=a.size, out=adapted[p], force=True)
    row: dict = {"grid": {}, "presets": {}}
    found = {}

    def run(folder: Path, lr, name: str) -> float:
        r = train(folder, data, lr=lr, out=work / "runs" / name, observer=lambda e, i: found.update(lr=i["lr"])
                  if e == "lr_find" else None, **kw)
        return r.best_val_acc

    for p in PRESETS:
        row["presets"][p] = run(adapted[p], "auto", f"{p}-auto")
        if p == preset:
            row["auto"], row["auto_lr"] = row["presets"][p], found.get("lr")
    for lr in GRID:
        row["grid"][f"{lr:g}"] = run(adapted[preset], lr, f"{preset}-{lr:g}")
    init = scratch_init(adapted[preset], work / "scratch-init", seed)
    row["scratch"] = run(init, "auto", "scratch")
    t = time.perf_counter()
    row["advise"] = advise(ckpt, arch="resnet18", data=data, input_size=a.size, flip=False, seed=seed,
                           device="cpu").preset
    row["advise_s"] = time.perf_counter() - t
    return row


def spread(xs: list[float]) -> str:
    m = statistics.mean(xs)
    return f"{m:.3f}" + (f" ({min(xs):.3f}-{max(xs):.3f})" if len(xs) > 1 else "")


def table(results: dict) -> str:
    head = ("| regime | default (--lr auto) | lr found | best grid lr | " + " | ".join(PRESETS)
            + " | advise picks | scratch |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for regime, rows in results.items():
        best_lr = max((f"{lr:g}" for lr in GRID), key=lambda lr: statistics.mean(r["grid"][lr] for r in rows))
        picks = sorted({r["advise"] for r in rows})
        cells = [regime, spread([r["auto"] for r in rows]),
                 ", ".join(f"{r['auto_lr']:.1e}" for r in rows),
                 f"{spread([r['grid'][best_lr] for r in rows])} at {best_lr}"]
        cells += [spread([r["presets"][p] for r in rows]) for p in PRESETS]
        cells += [", ".join(picks), spread([r["scratch"] for r in rows])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", type=Path, default=Path("bench-work/outcome"))
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--small", type=int, default=6)
    ap.add_argument("--large", default="all")
    ap.add_argument("--val", type=int, default=30)
    ap.add_argument("--regimes", default="small-similar,small-different,large-similar,large-different")
    ap.add_argument("--quick", action="store_true", help="1 seed, 16 px, 3 epochs, 50 train and 10 val images per class")
    ap.add_argument("--table", nargs="+", type=Path, help="only print the table of these outcome-*.json files")
    a = ap.parse_args()
    if a.table:
        merged: dict = {}
        for f in a.table:
            for regime, rows in json.loads(f.read_text())["results"].items():
                merged.setdefault(regime, []).extend(rows)
        print(table(merged))
        return
    if a.quick:
        a.seeds, a.size, a.epochs, a.large, a.val = 1, 16, 3, "50", 10
    from fixtures.pretrained import pretrained_digits

    t0 = time.perf_counter()
    ckpt, info = pretrained_digits(a.workdir / "pretrained", size=a.size)
    print(f"backbone: resnet18 on digits 0-4 at {a.size} px, val acc {info['val_acc']:.3f}", flush=True)
    results: dict = {}
    for regime in a.regimes.split(","):
        size, domain = regime.split("-")
        per = a.small if size == "small" else (None if a.large == "all" else int(a.large))
        data = make_data(a.workdir / "data" / f"{regime}-{a.size}", per, a.val, a.size, domain == "different")
        for seed in range(a.seeds):
            row = one_regime(a.workdir / regime / f"seed{seed}", ckpt, data, regime, seed, a)
            results.setdefault(regime, []).append(row)
            print(regime, seed, json.dumps(row), flush=True)
    out = a.workdir / f"outcome-{a.regimes.replace(',', '_')}.json"
    out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(a).items()}, "results": results}, indent=2))
    print(table(results))
    print(f"({time.perf_counter() - t0:.0f}s; every run in {out})")


if __name__ == "__main__":
    main()
