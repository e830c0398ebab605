"""Does the default fine-tune come out best? ``--lr auto``, ``surgery advise`` and the scratch
baseline on the four data regimes, built from scikit-learn's digits (no download).

The backbone: torchvision ResNet-18 trained by a plain loop on digits 0-4
(``surgery.demo.pretrained_digits``), fine-tuned on digits 5-9 (5 new classes):

- **similar**: digits 5-9 as they are: the same strokes, scale and layout as digits 0-4.
- **different**: digits 5-9 with one fixed random permutation of their 8x8 pixels (before the
  upscaling). The labels, pixel statistics and image size stay, but the spatial structure the
  pretrained convolutions learned (strokes, edges, locality) is gone: a domain shift by
  construction, with a known answer (pretrained spatial features should not help).
- **small**: ``--small`` training images per class; **large**: ``--large`` per class (``all``:
  every one, about 145). Validation: ``--val`` images per class, never trained on.

For each regime and seed: the regime's own preset trained with ``--lr auto`` (the default run)
and with each lr of a five-point grid; every other preset with ``--lr auto``; the same
architecture from scratch (``--compare-scratch``'s baseline); ``surgery advise``'s preset; and
the seed's two-phase recipe (the head alone, then everything; ``two-phase``), judged per run
against its acceptance (:func:`two_phase_ok`). The table gives means and spreads (min-max) over
seeds.

    .venv/bin/python bench/outcome.py                   # 3 seeds, 32 px, 8 epochs
    .venv/bin/python bench/outcome.py --quick           # 1 seed, 16 px, 3 epochs, fewer images
    .venv/bin/python bench/outcome.py --quick --seeds 3 --parts grid   # the grid alone; later calls reuse it
    .venv/bin/python bench/outcome.py --table A.json B.json   # one table from runs split by --regimes
    .venv/bin/python bench/outcome.py --collect --workdir W   # the table of every run finished in W
    .venv/bin/python bench/outcome.py --timing          # advise's wall time against one training run
    .venv/bin/python bench/outcome.py --quick --seeds 3 --val 100 --epochs 8 --parts two-phase   # the recipe alone
"""

from __future__ import annotations

import argparse
import json
import shutil
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
        # a finished run is kept with its key: a second invocation (or one split by --parts) reuses it
        key = {"folder": str(folder), "data": str(data), "lr": lr, **{k: v for k, v in kw.items() if k != "force"}}
        done = work / "runs" / f"{name}.result.json"
        if done.is_file() and json.loads(done.read_text())["key"] == key:
            saved = json.loads(done.read_text())
            found.update(lr=saved["lr_found"])
            return saved["acc"]
        found.pop("lr", None)
        r = train(folder, data, lr=lr, out=work / "runs" / name, observer=lambda e, i: found.update(lr=i["lr"])
                  if e == "lr_find" else None, **kw)
        done.write_text(json.dumps({"key": key, "acc": r.best_val_acc, "lr_found": found.get("lr")}))
        # the run's resume checkpoints (the model and its optimizer state, 80 MB for a ResNet-18) are
        # not needed once the result is kept: a whole bench would otherwise leave 10 GB of them
        shutil.rmtree(work / "runs" / name / "checkpoints", ignore_errors=True)
        return r.best_val_acc

    parts = a.parts.split(",")
    if "grid" in parts:
        for lr in GRID:
            row["grid"][f"{lr:g}"] = run(adapted[preset], lr, f"{preset}-{lr:g}")
    if "default" in parts or "presets" in parts:  # the default run: the regime's own preset, --lr auto
        row["auto"] = row["presets"][preset] = run(adapted[preset], "auto", f"{preset}-auto")
        row["auto_lr"] = found.get("lr")
    if "presets" in parts:
        for p in PRESETS:
            row["presets"][p] = run(adapted[p], "auto", f"{p}-auto")
    if "two-phase" in parts:
        row["two_phase"] = two_phase(work, ckpt, data, seed, a, kw)
    if "scratch" in parts:
        init = scratch_init(adapted[preset], work / "scratch-init", seed)
        row["scratch"] = run(init, "auto", "scratch")
    if "advise" in parts:
        t = time.perf_counter()
        row["advise"] = advise(ckpt, arch="resnet18", data=data, input_size=a.size, flip=False, seed=seed,
                               device="cpu").preset
        row["advise_s"] = time.perf_counter() - t
        (work / "advise.json").write_text(json.dumps({"advise": row["advise"], "advise_s": row["advise_s"]}))
    return row


def two_phase(work: Path, ckpt: Path, data: Path, seed: int, a: argparse.Namespace, kw: dict) -> dict:
    """The seed's recipe: the head alone for ``k`` epochs (about a third of the run), then
    everything at the backbone multiplier, ``--lr auto``. Kept: the head phase's best, the best
    after the unfreeze, the last epoch's val loss, the guard's events, and the verdict of
    :func:`two_phase_ok`."""
    from surgery import adapt, train

    k = max(1, round(a.epochs * 0.3))
    folder = ckpt.parent / f"adapted-{a.size}" / f"two-phase-{k}"
    if not (folder / "manifest.json").is_file():
        adapt(str(ckpt), arch="resnet18", num_classes=5, preset="small-similar", unfreeze_at=k, input_size=a.size,
              out=folder, force=True)
    key = {"folder": str(folder), "data": str(data), **{k2: v for k2, v in kw.items() if k2 != "force"}}
    done = work / "runs" / "two-phase.result.json"
    if done.is_file() and json.loads(done.read_text())["key"] == key:
        return json.loads(done.read_text())["row"]
    r = train(folder, data, lr="auto", out=work / "runs" / "two-phase", **kw)
    n_val = sum(1 for _ in (data / "val").rglob("*.png"))
    head = [m for m in r.metrics if m["epoch"] <= k]
    row = {"k": k, "n_val": n_val, "head_best": r.head_phase_best, "after_best": r.after_unfreeze_best,
           "head_min_loss": min(m["val_loss"] for m in head), "last_loss": r.metrics[-1]["val_loss"],
           "lrs": [u.get("lr") for u in r.unfreeze], "guard": [g["epoch"] for g in r.guard]}
    row["ok"], row["why"] = two_phase_ok(row)
    done.write_text(json.dumps({"key": key, "row": row}))
    shutil.rmtree(work / "runs" / "two-phase" / "checkpoints", ignore_errors=True)
    return row


def two_phase_ok(row: dict) -> tuple[bool, str]:
    """The recipe's acceptance: the best val acc after the unfreeze is at least the head phase's
    best minus the noise (2 standard errors of the difference of two accuracies on ``n_val``
    images), and the run ends healthy (its last val loss at most 1.5x the head phase's best)."""
    h, u = row["head_best"]["val_acc"], row["after_best"]["val_acc"]
    noise = 2 * ((h * (1 - h) + u * (1 - u)) / row["n_val"]) ** 0.5
    kept = u >= h - noise
    healthy = row["last_loss"] <= 1.5 * row["head_min_loss"]
    why = (f"after {u:.3f} vs head {h:.3f} (noise {noise:.3f}); last loss {row['last_loss']:.3f} = "
           f"{row['last_loss'] / row['head_min_loss']:.2f}x the head's best")
    return kept and healthy, why


def two_phase_table(results: dict) -> str:
    """One line per regime and seed: the two-phase recipe against its acceptance."""
    lines = ["| regime | seed | head phase best | after unfreeze best | last val loss / head best | unfreeze lr | "
             "guard | ok |", "|---|---|---|---|---|---|---|---|"]
    for regime, rows in results.items():
        for seed, r in enumerate(rows):
            t = r.get("two_phase")
            if not t:
                continue
            lrs = ", ".join(f"{lr:.1e}" for lr in t["lrs"] if lr is not None) or "-"
            lines.append(f"| {regime} | {seed} | {t['head_best']['val_acc']:.3f} (ep {t['head_best']['epoch']}) | "
                         f"{t['after_best']['val_acc']:.3f} (ep {t['after_best']['epoch']}) | "
                         f"{t['last_loss'] / t['head_min_loss']:.2f}x | {lrs} | "
                         f"{', '.join(map(str, t['guard'])) or '-'} | {'yes' if t['ok'] else 'NO: ' + t['why']} |")
    return "\n".join(lines)


def collect(workdir: Path, regimes: list[str], seeds: int) -> dict:
    """The rows of the runs that finished under ``workdir`` (a bench stopped early keeps them)."""
    results: dict = {}
    for regime in regimes:
        for seed in range(seeds):
            work = workdir / regime / f"seed{seed}"
            runs = {f.name[:-len(".result.json")]: json.loads(f.read_text())
                    for f in (work / "runs").glob("*.result.json")}
            row: dict = {"grid": {f"{lr:g}": runs[f"{regime}-{lr:g}"]["acc"] for lr in GRID
                                  if f"{regime}-{lr:g}" in runs},
                         "presets": {p: runs[f"{p}-auto"]["acc"] for p in PRESETS if f"{p}-auto" in runs}}
            if len(row["grid"]) < len(GRID):
                row["grid"] = {}
            if f"{regime}-auto" in runs:
                row["auto"], row["auto_lr"] = runs[f"{regime}-auto"]["acc"], runs[f"{regime}-auto"]["lr_found"]
            if "scratch" in runs:
                row["scratch"] = runs["scratch"]["acc"]
            if (work / "runs" / "two-phase.result.json").is_file():
                row["two_phase"] = json.loads((work / "runs" / "two-phase.result.json").read_text())["row"]
            if (work / "advise.json").is_file():
                row.update(json.loads((work / "advise.json").read_text()))
            if runs or "advise" in row:
                results.setdefault(regime, []).append(row)
    return results


def spread(xs: list[float]) -> str:
    """mean (min-max) [number of seeds]"""
    if not xs:
        return "-"
    m = statistics.mean(xs)
    return f"{m:.3f}" + (f" ({min(xs):.3f}-{max(xs):.3f})" if len(xs) > 1 else "") + f" [{len(xs)}]"


def scores(rows: list[dict], preset: str) -> list[float]:
    """One preset's accuracies over the seeds that ran it."""
    return [r["presets"][preset] for r in rows if preset in r.get("presets", {})]


def advised(rows: list[dict]) -> str:
    """advise's pick(s), each with the number of seeds that picked it, its preset's mean over every
    seed, and whether that mean lies within the min-max over seeds of the best preset (the one of
    highest mean)."""
    picks = [r["advise"] for r in rows if r.get("advise")]
    means = {p: statistics.mean(scores(rows, p)) for p in PRESETS if scores(rows, p)}
    if not picks or not means:
        return ", ".join(sorted(set(picks))) or "-"
    best = max(means, key=means.get)
    low, high = min(scores(rows, best)), max(scores(rows, best))
    cells = []
    for p in sorted(set(picks)):
        cell = f"{p} x{picks.count(p)}"
        if p in means:
            where = "within" if low <= means[p] <= high else "outside"
            cell += f" ({means[p]:.3f}: {where} the best's {low:.3f}-{high:.3f})"
        cells.append(cell)
    return ", ".join(cells)


def table(results: dict) -> str:
    """Means and (min-max) over seeds; '-' where a part was not run."""
    head = ("| regime | default (--lr auto) | lr found | best grid lr | " + " | ".join(PRESETS)
            + " | advise picks | scratch |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for regime, rows in results.items():
        def col(key: str) -> list:
            return [r[key] for r in rows if r.get(key) is not None]

        best = "-"
        grids = [r["grid"] for r in rows if r["grid"]]
        if grids:
            best_lr = max((f"{lr:g}" for lr in GRID), key=lambda lr: statistics.mean(g[lr] for g in grids))
            best = f"{spread([g[best_lr] for g in grids])} at {best_lr}"
        cells = [regime, spread(col("auto")), ", ".join(f"{x:.1e}" for x in col("auto_lr")) or "-", best]
        cells += [spread(scores(rows, p)) for p in PRESETS]
        cells += [advised(rows), spread(col("scratch"))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def timing(a: argparse.Namespace) -> None:
    """``surgery advise`` against one training run at the demo's scale: digits 5-9, 4 training and
    60 validation images per class at 32 px, the demo's two-phase run (batch 8, 20 epochs, the
    backbone unfrozen at epoch 6, lr 3e-3). advise runs before and after the training run; the
    ratio uses their mean, so a change in the machine's load during the bench shows as a spread."""
    from surgery import adapt, train
    from surgery.advice import advise
    from surgery.demo import Plan, digits_imagefolder, pretrained_digits

    ckpt, _ = pretrained_digits(a.workdir / "pretrained")
    data = a.workdir / "demo-data"
    if not (data / "val").is_dir():
        digits_imagefolder(data, classes=range(5, 10), size=32, per_class=4, val_per_class=60)
    plan = Plan.for_data(sum(1 for _ in (data / "train").rglob("*.png")))
    folder = a.workdir / "demo-adapted"
    adapt(str(ckpt), arch="resnet18", num_classes=5, preset="small-similar", unfreeze_at=plan.unfreeze_at,
          input_size=32, out=folder, force=True)

    def advise_s() -> float:
        t = time.perf_counter()
        advise(ckpt, arch="resnet18", data=data, input_size=32, flip=False, device="cpu")
        return time.perf_counter() - t

    first = advise_s()
    t = time.perf_counter()
    train(folder, data, epochs=plan.epochs, lr=3e-3, batch_size=plan.batch_size, flip=False, device="cpu",
          out=a.workdir / "demo-run", force=True)
    run_s = time.perf_counter() - t
    second = advise_s()
    mean = (first + second) / 2
    print(f"advise {first:.1f} s and {second:.1f} s; one training run ({plan.epochs} epochs, batch {plan.batch_size}, "
          f"{plan.train_images} images) {run_s:.1f} s; advise / run = {mean / run_s:.0%} "
          f"({min(first, second) / run_s:.0%}-{max(first, second) / run_s:.0%})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", type=Path, default=Path("bench-work/outcome"))
    ap.add_argument("--seeds", type=int)
    ap.add_argument("--size", type=int)
    ap.add_argument("--epochs", type=int)
    ap.add_argument("--small", type=int, default=6)
    ap.add_argument("--large")
    ap.add_argument("--val", type=int)
    ap.add_argument("--regimes", default="small-similar,small-different,large-similar,large-different")
    ap.add_argument("--parts", default="grid,presets,scratch,advise,two-phase",  # "default": the regime's own preset
                    help="what to run per regime and seed (finished runs are reused: split a long bench into calls); "
                         "two-phase: the head alone for 30%% of the epochs, then everything (--lr auto)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (1: the same figures on every machine, and no oversubscription)")
    ap.add_argument("--quick", action="store_true",
                    help="defaults of 1 seed, 16 px, 3 epochs, 50 train and 10 val images per class")
    ap.add_argument("--table", nargs="+", type=Path, help="only print the table of these outcome-*.json files")
    ap.add_argument("--collect", action="store_true", help="only print the table of the runs finished in --workdir")
    ap.add_argument("--timing", action="store_true", help="only time advise against one training run at the demo's scale")
    a = ap.parse_args()
    if a.collect:
        results = collect(a.workdir, a.regimes.split(","), a.seeds or 3)
        print(table(results))
        print(two_phase_table(results))
        return
    if a.table:
        merged: dict = {}
        for f in a.table:
            for regime, rows in json.loads(f.read_text())["results"].items():
                merged.setdefault(regime, []).extend(rows)
        print(table(merged))
        print(two_phase_table(merged))
        return
    full = dict(seeds=3, size=32, epochs=8, large="all", val=30)
    quick = dict(seeds=1, size=16, epochs=3, large="50", val=10)
    for k, v in (quick if a.quick else full).items():  # an option given on the command line wins
        if getattr(a, k) is None:
            setattr(a, k, v)
    import torch

    torch.set_num_threads(a.threads)
    if a.timing:
        timing(a)
        return
    from surgery.demo import pretrained_digits

    t0 = time.perf_counter()
    ckpt, info = pretrained_digits(a.workdir / "pretrained", classes=range(5), size=a.size, half=None)  # never saw 5-9
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
    out = a.workdir / f"outcome-{a.regimes.replace(',', '_')}-{a.parts.replace(',', '_')}.json"
    out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(a).items()}, "results": results}, indent=2))
    print(table(results))
    if any(r.get("two_phase") for rows in results.values() for r in rows):
        print(two_phase_table(results))
    print(f"({time.perf_counter() - t0:.0f}s; every run in {out})")


if __name__ == "__main__":
    main()
