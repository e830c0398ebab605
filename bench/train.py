"""`surgery train` against the hand-written training loops it replaces, as whole processes in one run.

Two cases, on scikit-learn's digits written as an ImageFolder (``fixtures.generate.digits_imagefolder``)
and a ResNet-18 "pretrained" by this script for a few epochs on digits 0-4 (saved through
``nn.DataParallel``, so adapt strips ``module.``), adapted to all 10 digits:

1. head-only, ``--epochs`` epochs: ``surgery train --cache-features on --no-augment`` against the
   tutorial loop (backbone ``requires_grad=False``, a full forward every step). Goal: surgery
   >= 5x faster (whole-process wall time) at equal best val accuracy (within 1 point).
2. full fine-tune, ``--ft-epochs`` epochs, no cache, no augmentation: training throughput
   (images/s) of the runner against a minimal loop. Goal: >= 0.95x the loop's images/s.

Both sides use the same data, weights (adapt's model.safetensors), eval transform, optimizer
(AdamW), learning rate, weight decay, constant schedule, batch size, epochs and seed (the same
shuffling generator), so they run the same training; see bench/README.md.

    .venv/bin/python bench/train.py                                  # the real configuration
    .venv/bin/python bench/train.py --epochs 2 --ft-epochs 1 --per-class 10 --repeat 1   # smoke run

Each command runs once untimed first (it checks the output and warms the page cache), then
``--repeat`` rounds in which the commands take turns. The table shows medians; every run's numbers
go to ``WORKDIR/train/train.json``. Exit status 0 when every command ran (goals may fail: this is a
report), 1 when one failed.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
from foundation import (REPO, BenchError, Measure, Run, Spec, _short, machine_facts, print_grid,  # noqa: E402
                        run_once)

# ---------------------------------------------------------------- child scripts (the parent never imports torch)

# argv: CHECKOUT ARGS...: the CLI of the source folder CHECKOUT, as the console script runs it
CHECKOUT_CLI = ("import os, runpy, sys\n"
                "root = os.path.realpath(sys.argv[1])\n"
                "here = os.path.realpath(os.getcwd())\n"
                "sys.path[:] = [root] + [p for p in sys.path if p and os.path.realpath(p) not in (here, root)]\n"
                "sys.argv = ['surgery', *sys.argv[2:]]\n"
                "runpy.run_module('cli.main', run_name='__main__', alter_sys=True)\n")

MAKE_DATA = """
import sys
from fixtures.generate import digits_imagefolder
classes = [int(c) for c in sys.argv[2].split(",")]
per_class = None if sys.argv[3] == "all" else int(sys.argv[3])
digits_imagefolder(sys.argv[1], classes=classes, per_class=per_class, size=int(sys.argv[4]))
"""

# "Pretrained": ResNet-18 trained from scratch on digits 0-4 for a few epochs, saved the way a
# DataParallel user saves it. It gives the frozen backbone features worth training a head on.
PRETRAIN = """
import json, sys, torch, torchvision
from torchvision import datasets, transforms
cfg = json.loads(sys.argv[1])
torch.manual_seed(0)
tf = transforms.Compose([transforms.Resize(cfg["resize"]), transforms.CenterCrop(cfg["size"]), transforms.ToTensor(),
                         transforms.Normalize(cfg["mean"], cfg["std"])])
ds = datasets.ImageFolder(cfg["data"] + "/train", tf)
dl = torch.utils.data.DataLoader(ds, batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(0))
model = torchvision.models.resnet18(num_classes=len(ds.classes))
opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
model.train()
for epoch in range(cfg["epochs"]):
    correct = 0
    for x, y in dl:
        opt.zero_grad()
        out = model(x)
        torch.nn.functional.cross_entropy(out, y).backward()
        opt.step()
        correct += int((out.argmax(1) == y).sum())
    print(f"pretrain epoch {epoch + 1}: train acc {correct / len(ds):.3f}", flush=True)
torch.save(torch.nn.DataParallel(model).state_dict(), cfg["out"])
"""

# The loops a practitioner writes from the tutorials. argv[1]: JSON config. mode "head": the
# backbone is frozen (requires_grad=False) and every step runs the whole model; it stays in eval
# mode, as surgery's frozen BatchNorm policy does (model.train() would let BatchNorm update its
# running statistics, a different training). mode "full": everything trains, model.train().
# Prints one JSON line: accuracies and the training loop's own images/s (data loading included,
# evaluation excluded), measured as the runner measures its images_per_s.
LOOP = """
import copy, json, sys, time, torch, torchvision
from torch import nn
from torchvision import datasets, transforms
from safetensors.torch import load_file
cfg = json.loads(sys.argv[1])
torch.manual_seed(cfg["seed"])
tf = transforms.Compose([transforms.Resize(cfg["resize"]), transforms.CenterCrop(cfg["size"]), transforms.ToTensor(),
                         transforms.Normalize(cfg["mean"], cfg["std"])])
train_ds = datasets.ImageFolder(cfg["data"] + "/train", tf)
val_ds = datasets.ImageFolder(cfg["data"] + "/val", tf)
bs = cfg["batch_size"]
train_dl = torch.utils.data.DataLoader(train_ds, batch_size=bs, shuffle=True,
                                       generator=torch.Generator().manual_seed(cfg["seed"]),
                                       drop_last=len(train_ds) > bs and len(train_ds) % bs == 1)  # BatchNorm needs 2
val_dl = torch.utils.data.DataLoader(val_ds, batch_size=bs)

model = torchvision.models.resnet18(num_classes=len(train_ds.classes))
model.load_state_dict(load_file(cfg["adapted"] + "/model.safetensors"))
if cfg["mode"] == "head":
    for p in model.parameters():
        p.requires_grad = False
    for p in model.fc.parameters():
        p.requires_grad = True
    params = model.fc.parameters()
else:
    params = model.parameters()
opt = torch.optim.AdamW(params, lr=cfg["lr"], weight_decay=cfg["weight_decay"])
criterion = nn.CrossEntropyLoss()

best = (-1.0, float("inf"), 0)
best_weights = None
history = []
train_seconds = train_images = 0
for epoch in range(cfg["epochs"]):
    t0 = time.perf_counter()
    model.eval() if cfg["mode"] == "head" else model.train()
    running_loss, correct, seen = 0.0, 0, 0
    for x, y in train_dl:
        opt.zero_grad()
        out = model(x)
        loss = criterion(out, y)
        loss.backward()
        opt.step()
        running_loss += loss.item() * len(y)
        correct += int((out.argmax(1) == y).sum())
        seen += len(y)
    secs = time.perf_counter() - t0
    train_seconds += secs
    train_images += seen
    model.eval()
    val_loss, val_correct = 0.0, 0
    with torch.no_grad():
        for x, y in val_dl:
            out = model(x)
            val_loss += float(nn.functional.cross_entropy(out, y, reduction="sum"))
            val_correct += int((out.argmax(1) == y).sum())
    acc, vloss = val_correct / len(val_ds), val_loss / len(val_ds)
    history.append({"epoch": epoch + 1, "train_loss": running_loss / seen, "train_acc": correct / seen,
                    "val_acc": acc, "val_loss": vloss, "images_per_s": seen / secs})
    print(f"epoch {epoch + 1}: train loss {running_loss / seen:.4f} val acc {acc:.4f} {seen / secs:.0f} img/s",
          file=sys.stderr, flush=True)
    if acc > best[0] or (acc == best[0] and vloss < best[1]):
        best = (acc, vloss, epoch + 1)
        best_weights = copy.deepcopy(model.state_dict())
torch.save(best_weights, cfg["save"])
print(json.dumps({"best_val_acc": best[0], "best_epoch": best[2], "final_val_acc": history[-1]["val_acc"],
                  "train_images": train_images, "train_seconds": train_seconds,
                  "images_per_s": train_images / train_seconds, "history": history}))
"""


# ---------------------------------------------------------------- measuring


@dataclass
class Timed:
    """A Measure plus what each timed run reported (accuracy, images/s), parsed from its output."""

    measure: Measure
    results: list[dict] = field(default_factory=list)
    warmup: dict | None = None

    def median(self, key: str) -> float | None:
        vals = [r[key] for r in self.results if r.get(key) is not None]
        return statistics.median(vals) if vals and self.measure.error is None else None


def measure_runs(specs: list[Spec], parsers: list[Callable[[Run], dict]], repeat: int, logdir: Path,
                 before: Callable[[], None] | None = None) -> list[Timed]:
    """foundation.measure_group's protocol (one untimed, checked warm-up each, then ``repeat``
    rounds taking turns), keeping what each run printed: here the output is a result, not only a check."""
    ts = [Timed(Measure(s.name, s.argv)) for s in specs]

    def one(s: Spec, parse: Callable[[Run], dict]) -> tuple[Run, dict]:
        if before:
            before()
        r = run_once(s.argv, logdir)
        if r.rc != 0:
            tail = (r.stderr.strip().splitlines() or r.stdout.strip().splitlines() or ["(no output)"])[-1]
            raise BenchError(f"exit {r.rc}: {tail[:300]}")
        return r, parse(r)

    for s, p, t in zip(specs, parsers, ts):
        try:
            _, t.warmup = one(s, p)
        except (BenchError, OSError, ValueError, KeyError) as e:
            t.measure.error = f"warm-up: {e}"
    for _ in range(repeat):
        for s, p, t in zip(specs, parsers, ts):
            if t.measure.error:
                continue
            try:
                r, res = one(s, p)
            except (BenchError, OSError, ValueError, KeyError) as e:
                t.measure.error = str(e)
                continue
            t.measure.walls.append(r.wall_s)
            t.measure.rss_kb.append(r.maxrss_kb)
            t.results.append(res)
    for t in ts:
        m = t.measure
        if m.error:
            print(f"  {m.name:<44s} ERROR {m.error}")
        else:
            extra = "; ".join(f"acc {r.get('best_val_acc', 0):.4f} {r.get('images_per_s') or 0:.1f} img/s"
                              for r in t.results)
            print(f"  {m.name:<44s} {m.wall:8.2f} s {m.rss_mb:7.0f} MB   runs: "
                  f"{', '.join(f'{w:.2f}' for w in m.walls)}   ({extra})")
    return ts


def parse_surgery(r: Run) -> dict:
    """``surgery train --json``: the result object on stdout."""
    try:
        data = json.loads(r.stdout)
    except ValueError as e:
        raise BenchError(f"surgery train --json printed no JSON: {e}") from None
    ms = data["metrics"]
    # the runner's images_per_s is seen / (epoch start -> last step): per epoch; combine them as
    # total images / total training seconds, the way the loop reports its own
    imgs = [m["images_per_s"] for m in ms if m.get("images_per_s")]
    secs = sum(1 / v for v in imgs)  # seconds per image, summed; every epoch sees the same image count
    return {"best_val_acc": data["best_val_acc"], "best_epoch": data["best_epoch"],
            "final_val_acc": ms[-1]["val_acc"], "cache_used": data["cache_used"],
            "images_per_s": len(imgs) / secs if secs else None,
            "epoch_seconds": [m["seconds"] for m in ms]}


def parse_loop(r: Run) -> dict:
    lines = r.stdout.strip().splitlines()
    if not lines:
        raise BenchError("the loop printed nothing")
    return json.loads(lines[-1])


# ---------------------------------------------------------------- preparation (untimed, in children)


def run_child(argv: list[str], what: str) -> None:
    t0 = time.perf_counter()
    r = subprocess.run(argv, cwd=REPO, capture_output=True, text=True)
    if r.returncode != 0:
        raise BenchError(f"{what} failed (exit {r.returncode}): {(r.stderr or r.stdout).strip()[-800:]}")
    print(f"  {what}: {time.perf_counter() - t0:.1f} s")


def ensure_data(folder: Path, classes: str, per_class: str, size: int) -> Path:
    if not (folder / "val").is_dir():
        shutil.rmtree(folder, ignore_errors=True)
        run_child([sys.executable, "-c", MAKE_DATA, str(folder), classes, per_class, str(size)],
                  f"wrote {folder.name} (digits {classes}, per class {per_class}, {size} px)")
    return folder


def count_images(folder: Path) -> int:
    return sum(1 for _ in folder.rglob("*.png"))


# ---------------------------------------------------------------- table


@dataclass
class Row:
    case: str
    surgery: Timed
    baseline: Timed
    metric: str          # "wall" (speed-up = baseline wall / surgery wall) or "img/s" (surgery / baseline)
    goal_ratio: float
    goal_text: str
    acc_points: float | None = None  # max |accuracy difference| in points, when the goal has one

    def values(self) -> tuple[float | None, float | None, float | None]:
        if self.metric == "wall":
            s, b = self.surgery.measure.wall, self.baseline.measure.wall
            return s, b, (b / s if s and b else None)
        s, b = self.surgery.median("images_per_s"), self.baseline.median("images_per_s")
        return s, b, (s / b if s and b else None)

    def verdict(self) -> tuple[str, list[str]]:
        if self.surgery.measure.error or self.baseline.measure.error:
            return "ERROR", []
        _, _, ratio = self.values()
        failed = []
        if ratio is None or ratio < self.goal_ratio:
            failed.append("speed")
        if self.acc_points is not None:
            sa, ba = self.surgery.median("best_val_acc"), self.baseline.median("best_val_acc")
            if sa is None or ba is None or abs(sa - ba) * 100 > self.acc_points + 1e-9:
                failed.append("accuracy")
        return ("FAIL" if failed else "PASS"), failed

    def to_json(self) -> dict:
        s, b, ratio = self.values()
        status, failed = self.verdict()
        return {"case": self.case, "metric": self.metric, "surgery_value": s, "baseline_value": b, "ratio": ratio,
                "goal_ratio": self.goal_ratio, "goal": self.goal_text, "status": status, "failed": failed,
                "surgery": {**self.surgery.measure.to_json(), "results": self.surgery.results,
                            "warmup": self.surgery.warmup},
                "baseline": {**self.baseline.measure.to_json(), "results": self.baseline.results,
                             "warmup": self.baseline.warmup}}


def _f(x: float | None, spec: str, unit: str = "") -> str:
    return "-" if x is None else f"{x:{spec}}{unit}"


def print_table(rows: list[Row]) -> None:
    head = ("case", "surgery", "baseline", "ratio", "surg acc", "base acc", "surg wall", "base wall",
            "surg RSS", "base RSS", "goal", "result")
    body = []
    for r in rows:
        s, b, ratio = r.values()
        unit = " s" if r.metric == "wall" else " img/s"
        spec = ".2f" if r.metric == "wall" else ".1f"
        status, failed = r.verdict()
        sm, bm = r.surgery.measure, r.baseline.measure
        body.append((r.case, _f(s, spec, unit), _f(b, spec, unit), _f(ratio, ".2f", "x"),
                     _f(r.surgery.median("best_val_acc"), ".4f"), _f(r.baseline.median("best_val_acc"), ".4f"),
                     _f(sm.wall, ".2f", " s"), _f(bm.wall, ".2f", " s"), _f(sm.rss_mb, ".0f", " MB"),
                     _f(bm.rss_mb, ".0f", " MB"), r.goal_text, status + (f" ({','.join(failed)})" if failed else "")))
    print_grid(head, body, right=set(range(1, 10)))
    for r in rows:
        for t in (r.surgery, r.baseline):
            if t.measure.error:
                print(f"  ERROR {r.case} / {t.measure.name}: {t.measure.error}")


# ---------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python bench/train.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--repeat", type=int, default=2, help="timed runs per command after the warm-up (median)")
    p.add_argument("--epochs", type=int, default=30, help="epochs of the head-only case")
    p.add_argument("--ft-epochs", type=int, default=3, help="epochs of the full fine-tune case")
    p.add_argument("--size", type=int, default=32, help="image size in pixels (adapt --input-size)")
    p.add_argument("--per-class", type=int, default=60,
                   help="digits per class (80/20 train/val); 0: all of them (about 180 per class)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay, both sides")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pretrain-epochs", type=int, default=3, help="epochs of the 'pretraining' on digits 0-4")
    p.add_argument("--cases", default="head,full", help="comma list: head, full")
    p.add_argument("--profile", action="store_true",
                   help="after timing, run the head-only surgery command once under cProfile and print the top")
    p.add_argument("--workdir", type=Path, default=REPO / "bench" / "out")
    p.add_argument("--checkout", type=Path, default=None,
                   help="measure the surgery of this source folder (its cli/ and surgery/) instead of the "
                        "installed console script, e.g. a branch before it is installed; --profile needs the script")
    a = p.parse_args(argv)
    if a.repeat < 1 or a.epochs < 1 or a.ft_epochs < 1 or a.size < 8 or a.per_class < 0:
        p.error("--repeat, --epochs, --ft-epochs must be >= 1, --size >= 8, --per-class >= 0")
    a.cases = [c.strip() for c in a.cases.split(",") if c.strip()]
    if not set(a.cases) <= {"head", "full"}:
        p.error("--cases takes head and/or full")
    return a


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    work = args.workdir.resolve() / "train"
    work.mkdir(parents=True, exist_ok=True)
    logdir = work / "logs"
    logdir.mkdir(exist_ok=True)
    py = sys.executable
    surgery = str(Path(py).parent / "surgery")
    # the command line of `surgery`: the console script, or the CLI module of a source folder
    # imported from that folder (never from the working directory)
    cmd_of = [surgery] if args.checkout is None else [py, "-c", CHECKOUT_CLI, str(args.checkout.resolve())]
    cmd = [_short(Path(py)), "bench/train.py", "--repeat", str(args.repeat), "--epochs", str(args.epochs),
           "--ft-epochs", str(args.ft_epochs), "--size", str(args.size), "--per-class", str(args.per_class),
           "--batch-size", str(args.batch_size), "--lr", f"{args.lr:g}", "--weight-decay", f"{args.weight_decay:g}",
           "--seed", str(args.seed), "--pretrain-epochs", str(args.pretrain_epochs), "--cases", ",".join(args.cases),
           "--workdir", _short(args.workdir.resolve())] + (["--profile"] if args.profile else []) + (
               ["--checkout", _short(args.checkout.resolve())] if args.checkout is not None else [])
    print("reproduce: " + shlex.join(cmd))
    facts = machine_facts()
    print("machine:   " + ", ".join(f"{k}={facts[k]}" for k in ("nproc", "cpu", "mem_gb", "kernel", "python", "torch",
                                                                  "git_head", "git_dirty_files")))
    if args.checkout is None and not Path(surgery).exists():
        print(f"error: {surgery} not found; install the project first (pip install -e .)", file=sys.stderr)
        return 1

    # ---- data, "pretrained" checkpoint, adapted folders (untimed)
    print("\npreparing (untimed):")
    pc = "all" if args.per_class == 0 else str(args.per_class)
    try:
        data = ensure_data(work / f"digits_{args.size}px_{pc}", "0,1,2,3,4,5,6,7,8,9", pc, args.size)
        pre_data = ensure_data(work / f"digits04_{args.size}px_all", "0,1,2,3,4", "all", args.size)
        n_train, n_val = count_images(data / "train"), count_images(data / "val")
        print(f"  data: {n_train} train, {n_val} val images, 10 classes, {args.size}x{args.size} RGB PNG")
        ckpt = work / f"resnet18_digits04_{args.size}px_e{args.pretrain_epochs}_dataparallel.pth"
        adapted_head, adapted_full = work / "adapted_head", work / "adapted_full"
        for d, freeze in ((adapted_head, "head-only"), (adapted_full, "none")):
            if not ckpt.exists() and d is adapted_head:
                # adapt's input block (mean/std/resize) is the transform both sides use; the
                # pretraining uses it too, so the first adapt runs on a throwaway checkpoint
                tmp = work / "random_resnet18.pth"
                run_child([py, "-c", "import sys, torch, torchvision; torch.manual_seed(0); torch.save("
                           "torch.nn.DataParallel(torchvision.models.resnet18(num_classes=5)).state_dict(), sys.argv[1])",
                           str(tmp)], "random resnet18 (for adapt's input settings)")
                run_child([*cmd_of, "adapt", str(tmp), "--arch", "resnet18", "--num-classes", "10", "--freeze",
                           freeze, "--input-size", str(args.size), "--out", str(d), "--force"], "adapt (probe)")
                inp = json.loads((d / "manifest.json").read_text())["input"]
                cfg = {"data": str(pre_data), "size": args.size, "resize": inp.get("resize") or int(args.size / 0.875),
                       "mean": inp["mean"], "std": inp["std"], "epochs": args.pretrain_epochs, "out": str(ckpt)}
                run_child([py, "-c", PRETRAIN, json.dumps(cfg)],
                          f"pretrained resnet18 on digits 0-4 ({count_images(pre_data / 'train')} images, "
                          f"{args.pretrain_epochs} epochs, full training from random init)")
                tmp.unlink(missing_ok=True)
            # full fine-tune: the backbone at the head's lr (not adapt's default x0.1), as the loop's one
            # AdamW group does, so both sides run the same training and their accuracies compare
            extra = ["--backbone-lr-mult", "1"] if freeze == "none" else []
            run_child([*cmd_of, "adapt", str(ckpt), "--arch", "resnet18", "--num-classes", "10", "--freeze", freeze,
                       "--input-size", str(args.size), "--out", str(d), "--force", *extra],
                      f"surgery adapt --freeze {freeze}{' ' + ' '.join(extra) if extra else ''}")
    except BenchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    man = json.loads((adapted_head / "manifest.json").read_text())
    inp = man["input"]
    size = inp["size"][0] if isinstance(inp["size"], list) else inp["size"]
    resize = inp.get("resize") or int(size / 0.875)
    print(f"  checkpoint: {ckpt.name} ({ckpt.stat().st_size / 1e6:.0f} MB, 'module.' keys); "
          f"eval transform: Resize({resize}) CenterCrop({size}) Normalize(mean={inp['mean']}, std={inp['std']})")

    def loop_cfg(mode: str, adapted: Path, epochs: int) -> str:
        return json.dumps({"mode": mode, "adapted": str(adapted), "data": str(data), "size": size, "resize": resize,
                           "mean": inp["mean"], "std": inp["std"], "batch_size": args.batch_size, "lr": args.lr,
                           "weight_decay": args.weight_decay, "epochs": epochs, "seed": args.seed,
                           "save": str(work / f"loop_{mode}_best.pt")})

    def train_argv(adapted: Path, out: Path, epochs: int, cache: str) -> list[str]:
        return [*cmd_of, "train", str(adapted), "--data", str(data), "--out", str(out), "--force", "--json",
                "--epochs", str(epochs), "--lr", f"{args.lr:g}", "--batch-size", str(args.batch_size),
                "--seed", str(args.seed), "--optimizer", "adamw", "--weight-decay", f"{args.weight_decay:g}",
                "--schedule", "constant", "--warmup-epochs", "0", "--no-augment", "--cache-features", cache,
                "--device", "cpu"]

    outs = [work / "run_head", work / "run_full"]

    def clean() -> None:
        for o in outs:
            shutil.rmtree(o, ignore_errors=True)

    rows: list[Row] = []
    head_argv = train_argv(adapted_head, outs[0], args.epochs, "on")
    try:
        if "head" in args.cases:
            print(f"\nhead-only, {args.epochs} epochs (1 untimed warm-up each, then {args.repeat} rounds taking turns):")
            print("  surgery: " + shlex.join(head_argv))
            s, b = measure_runs([Spec("surgery train (feature cache on)", head_argv),
                                 Spec("tutorial loop (frozen backbone)", [py, "-c", LOOP, loop_cfg("head", adapted_head, args.epochs)])],
                                [parse_surgery, parse_loop], args.repeat, logdir, before=clean)
            if s.warmup is not None and not s.warmup.get("cache_used"):
                s.measure.error = "the feature cache was not used"
            rows.append(Row(f"head-only {args.epochs} ep, wall", s, b, "wall", 5.0, ">=5x faster, acc +-1 pt", 1.0))
        if "full" in args.cases:
            full_argv = train_argv(adapted_full, outs[1], args.ft_epochs, "off")
            print(f"\nfull fine-tune, {args.ft_epochs} epochs (1 untimed warm-up each, then {args.repeat} rounds):")
            print("  surgery: " + shlex.join(full_argv))
            s, b = measure_runs([Spec("surgery train (full, no cache)", full_argv),
                                 Spec("minimal loop (full)", [py, "-c", LOOP, loop_cfg("full", adapted_full, args.ft_epochs)])],
                                [parse_surgery, parse_loop], args.repeat, logdir, before=clean)
            rows.append(Row(f"full FT {args.ft_epochs} ep, train img/s", s, b, "img/s", 0.95, ">=0.95x images/s"))
        if args.profile:
            prof = work / "surgery_head.prof"
            clean()
            run_child([py, "-m", "cProfile", "-o", str(prof), surgery, *head_argv[len(cmd_of):]], "surgery train under cProfile")
            out = subprocess.run([py, "-c", "import pstats, sys; pstats.Stats(sys.argv[1]).sort_stats('cumulative')"
                                  ".print_stats(40)", str(prof)], capture_output=True, text=True).stdout
            print("\ncProfile of the head-only surgery run (cumulative, top 40):")
            print("\n".join(out.splitlines()[:80]))
    finally:
        clean()

    print()
    print_table(rows)
    print("\nratio: head-only = loop wall / surgery wall (whole processes: imports, data checks, cache, training,"
          "\n       checkpoints, plots); full FT = surgery img/s / loop img/s, where img/s = training images /"
          "\n       seconds from each epoch's start to its last optimizer step (data loading included; evaluation,"
          "\n       checkpoints and start-up excluded), summed over epochs; medians over the timed runs."
          "\nacc: best val accuracy over the epochs (surgery's best_val_acc; the loop picks its best the same way).")
    result = {"command": shlex.join(cmd), "argv": sys.argv, "machine": facts,
              "params": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "data": {"train_images": n_train, "val_images": n_val, "size": size, "resize": resize,
                       "mean": inp["mean"], "std": inp["std"], "pretrained": ckpt.name},
              "rows": [r.to_json() for r in rows]}
    (work / "train.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nresults: {work / 'train.json'}")
    return 1 if any(r.verdict()[0] == "ERROR" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
