"""Byte-identical outputs of ``surgery adapt`` and ``surgery train`` across a refactor.

Runs adapt then train on three configurations (small local data: 5 digit classes as 32x32 PNGs
from scikit-learn's bundled digits, a seeded torchvision resnet18 state dict; nothing is
downloaded) and prints, as JSON, a sha256 per output file. The code under test is the one on
PYTHONPATH: every command is ``python -m surgery.cli.main`` in a subprocess that inherits it, so

    PYTHONPATH=/path/to/before python bench/same_outputs.py --out before.json
    PYTHONPATH=/path/to/after  python bench/same_outputs.py --out after.json

must write equal files when behaviour is unchanged.

1. head-only freeze, the feature cache on, a fixed --lr;
2. --unfreeze-at 1 (adapt), --lr auto, --mixup, --ema, --accumulate 2;
3. --val-split, sgd, onecycle, --augment randaugment, --balanced-sampler; then ``--find-lr --json``
   (stdout and OUT/lr_find.json) and ``--compare-scratch`` (compare.json and OUT/scratch).

What is left out, and why: the wall-clock fields ``seconds`` and ``images_per_s`` (in
metrics.jsonl, checkpoints, manifests, lr_find.json, compare.json) and run.log (its lines carry
timings); PNG plots (rendered by matplotlib, not outputs the trainer computes); checkpoints are
compared by their loaded contents (every tensor's bytes and every other value), not the zip
bytes, since torch.save names the archive after the file. The temporary folder's path is
replaced by ``<ROOT>`` wherever a file records a path.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

TIMING = ("seconds", "images_per_s")
SKIP_SUFFIXES = (".png", ".log")


def _cli(*args: object, cwd: Path) -> str:
    cmd = [sys.executable, "-m", "surgery.cli.main", *map(str, args)]
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=dict(os.environ, CUDA_VISIBLE_DEVICES=""))
    if r.returncode != 0:
        raise SystemExit(f"failed ({r.returncode}): {' '.join(cmd)}\n{r.stdout}\n{r.stderr}")
    return r.stdout


def _inputs(root: Path) -> tuple[Path, Path]:
    """The digits 5-9 (12 images each) and a seeded resnet18 state dict, made in a subprocess
    under the same PYTHONPATH."""
    code = ("import sys, torch, torchvision\n"
            "from surgery.demo import digits_imagefolder\n"
            "root = sys.argv[1]\n"
            "digits_imagefolder(root + '/data', classes=range(5, 10), per_class=12, size=32)\n"
            "torch.manual_seed(0)\n"
            "m = torchvision.models.resnet18(weights=None, num_classes=10)\n"
            "torch.save(m.state_dict(), root + '/resnet18.pt')\n")
    subprocess.run([sys.executable, "-c", code, str(root)], check=True)
    return root / "data", root / "resnet18.pt"


def _drop_timing(obj: object) -> object:
    if isinstance(obj, dict):
        return {k: _drop_timing(v) for k, v in obj.items() if k not in TIMING}
    if isinstance(obj, (list, tuple)):
        return [_drop_timing(v) for v in obj]
    return obj


def _canonical_checkpoint(path: Path, root: str) -> bytes:
    import torch

    h = hashlib.sha256()

    def walk(obj: object) -> None:
        if isinstance(obj, torch.Tensor):
            t = obj.detach().cpu().contiguous()
            h.update(f"tensor {t.dtype} {list(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        elif isinstance(obj, dict):
            for k in obj:
                if k in TIMING:
                    continue
                h.update(f"key {k!r}".encode())
                walk(obj[k])
        elif isinstance(obj, (list, tuple)):
            h.update(f"seq {len(obj)}".encode())
            for v in obj:
                walk(v)
        else:
            h.update(repr(obj).replace(root, "<ROOT>").encode())

    walk(torch.load(path, map_location="cpu", weights_only=False))
    return h.hexdigest().encode()


def _digest(path: Path, root: str) -> str | None:
    if path.suffix in SKIP_SUFFIXES:
        return None
    if path.suffix == ".pt":
        return hashlib.sha256(_canonical_checkpoint(path, root)).hexdigest()
    data = path.read_bytes()
    if path.suffix in (".json", ".jsonl"):
        text = data.decode("utf-8").replace(root, "<ROOT>")
        if path.suffix == ".jsonl":
            text = "".join(json.dumps(_drop_timing(json.loads(line))) + "\n" for line in text.splitlines())
        else:
            text = json.dumps(_drop_timing(json.loads(text)), indent=1, sort_keys=False)
        data = text.encode("utf-8")
    return hashlib.sha256(data).hexdigest()


def _tree(folder: Path, root: Path, into: dict) -> None:
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            d = _digest(p, str(root))
            if d is not None:
                into[str(p.relative_to(root))] = d


def run(root: Path) -> dict:
    data, ckpt = _inputs(root)
    common = ("--arch", "resnet18", "--num-classes", 5, "--input-size", 32)
    tr = ("--trust-code", "--no-flip", "--batch-size", 16, "--device", "cpu", "--quiet")
    # 1. head-only, the feature cache, a fixed lr
    _cli("adapt", ckpt, *common, "--freeze", "head-only", "--out", root / "ad1", cwd=root)
    _cli("train", root / "ad1", "--data", data, "--out", root / "run1", "--epochs", 2, "--lr", "1e-3",
         "--cache-features", "on", *tr, cwd=root)
    # 2. unfreeze after epoch 1, lr auto, mixup, ema, accumulation
    _cli("adapt", ckpt, *common, "--freeze", "head-only", "--unfreeze-at", 1, "--out", root / "ad2", cwd=root)
    _cli("train", root / "ad2", "--data", data, "--out", root / "run2", "--epochs", 2, "--lr", "auto",
         "--mixup", 0.2, "--ema", 0.9, "--accumulate", 2, *tr, cwd=root)
    # 3. val split, sgd, onecycle, randaugment, balanced sampler; --find-lr and --compare-scratch
    _cli("adapt", ckpt, *common, "--out", root / "ad3", cwd=root)
    opts3 = ("--val-split", 0.25, "--optimizer", "sgd", "--schedule", "onecycle", "--augment", "randaugment",
             "--balanced-sampler", "--epochs", 2, *tr)
    _cli("train", root / "ad3", "--data", data / "train", "--out", root / "run3", "--lr", "0.01", *opts3, cwd=root)
    found = _cli("train", root / "ad3", "--data", data / "train", "--find-lr", "--json", "--out", root / "find3",
                 *opts3, cwd=root)
    _cli("train", root / "ad3", "--data", data / "train", "--compare-scratch", "--out", root / "cmp3",
         "--lr", "0.01", *opts3, cwd=root)
    digests: dict[str, str] = {}
    for name in ("ad1", "run1", "ad2", "run2", "ad3", "run3", "find3", "cmp3"):
        _tree(root / name, root, digests)
    stdout = json.dumps(_drop_timing(json.loads(found)), indent=1).replace(str(root), "<ROOT>")
    digests["find3 (stdout of --find-lr --json)"] = hashlib.sha256(stdout.encode()).hexdigest()
    return digests


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, help="write the JSON here (default: stdout only)")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="same-outputs-") as tmp:
        digests = run(Path(tmp))
    text = json.dumps(digests, indent=2, sort_keys=True) + "\n"
    if a.out is not None:
        a.out.write_text(text)
    sys.stdout.write(text)


if __name__ == "__main__":
    main()
