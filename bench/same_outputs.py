"""Byte-identical outputs of ``surgery adapt`` and ``surgery train`` across a refactor.

Runs adapt then train on three configurations (small local data: 5 digit classes as 16x16 PNGs
from scikit-learn's bundled digits, the seeded weights of the small CNN that the tests train,
``fixtures/factory.py``, given as a file factory; nothing is downloaded) and prints, as JSON, a
sha256 per output file. The code under test is the one on PYTHONPATH: every command is
``python -m surgery.cli.main`` in a subprocess that inherits it, so

    PYTHONPATH=/path/to/before python bench/same_outputs.py --out before.json
    PYTHONPATH=/path/to/after  python bench/same_outputs.py --out after.json

must write equal files when behaviour is unchanged.

1. head-only freeze, the feature cache on, a fixed --lr;
2. --unfreeze-at 1 (adapt), --lr auto, --mixup, --ema, --accumulate 2;
3. --val-split, sgd, onecycle, --augment randaugment, --balanced-sampler; then ``--find-lr --json``
   (stdout and OUT/lr_find.json) and ``--compare-scratch`` (compare.json and OUT/scratch).

What is left out, and why: the wall-clock fields ``seconds`` and ``images_per_s`` (in
metrics.jsonl, checkpoints, manifests, lr_find.json, compare.json) and run.log (its lines carry
timings), and in messages that the manifest and metrics keep, a duration such as ``(198 s)``
(the unfreeze's range test says how long it took); PNG plots (rendered by matplotlib, not
outputs the trainer computes). Compared by content rather than bytes: checkpoints (every tensor's
bytes and every other value: torch.save names the archive after the file) and model.safetensors
(the header parsed, the data bytes: adapt orders the header differently from run to run, so the
manifest's ``weights_sha256`` of the file's bytes is left out too).

The runs are written in one folder (``--work``), the same for the runs compared, one run after
the other: a checkpoint's fingerprint and the order of adapt's names depend on the paths, so the
paths must be equal too. ``<ROOT>`` stands for that folder in the digests of JSON files, and
``.scratch-init-XXXXXXXX`` for the temporary folder that --compare-scratch adapts its scratch
model into (a random name, recorded as the scratch run's source).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

TIMING = ("seconds", "images_per_s", "weights_sha256")
DURATION = re.compile(r"\(\d+(\.\d+)? s\)")
SCRATCH_INIT = re.compile(rb"\.scratch-init-[A-Za-z0-9_]{8}")  # tempfile.mkdtemp's random name
SKIP_SUFFIXES = (".png", ".log")


def _env() -> dict:
    """The commands' environment: no GPU, and one hash seed (adapt's new head depends on the
    order of a set of names: with another PYTHONHASHSEED, or another folder, it can come out
    another)."""
    return dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHONHASHSEED="0")


def _cli(*args: object, cwd: Path) -> str:
    cmd = [sys.executable, "-m", "surgery.cli.main", *map(str, args)]
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=_env())
    if r.returncode != 0:
        raise SystemExit(f"failed ({r.returncode}): {' '.join(cmd)}\n{r.stdout}\n{r.stderr}")
    return r.stdout


def _inputs(root: Path) -> tuple[Path, Path, str]:
    """The digits 5-9 (12 images each), the small CNN's file factory and its seeded weights, made
    in a subprocess under the same PYTHONPATH."""
    code = ("import sys, torch\n"
            "from fixtures.factory import SIZE, factory_and_digits\n"
            "arch, data, weights = factory_and_digits(__import__('pathlib').Path(sys.argv[1]), 12)\n"
            "torch.save(weights, sys.argv[1] + '/cnn.pt')\n"
            "print(arch)\n")
    repo = Path(__file__).resolve().parent.parent
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), str(repo)])))
    arch = subprocess.run([sys.executable, "-c", code, str(root)], check=True, capture_output=True, text=True,
                          env=env).stdout.strip()
    return root / "data", root / "cnn.pt", arch


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
            h.update(DURATION.sub("(N s)", repr(obj).replace(root, "<ROOT>")).encode())

    walk(torch.load(path, map_location="cpu", weights_only=False))
    return h.hexdigest().encode()


def _canonical_safetensors(path: Path) -> str:
    """The header (parsed, keys sorted) and the data bytes: adapt writes the same header in an
    order that can vary from run to run."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.dumps(json.loads(raw[8:8 + n]), sort_keys=True).encode()
    return hashlib.sha256(header + b"\0" + raw[8 + n:]).hexdigest()


def _digest(path: Path, root: str) -> str | None:
    if path.suffix in SKIP_SUFFIXES:
        return None
    if path.suffix == ".pt":
        return hashlib.sha256(_canonical_checkpoint(path, root)).hexdigest()
    if path.suffix == ".safetensors":
        return _canonical_safetensors(path)
    data = SCRATCH_INIT.sub(b".scratch-init-XXXXXXXX", path.read_bytes().replace(root.encode(), b"<ROOT>"))
    if path.suffix in (".json", ".jsonl"):
        text = data.decode("utf-8")
        if path.suffix == ".jsonl":
            text = "".join(json.dumps(_drop_timing(json.loads(line))) + "\n" for line in text.splitlines())
        else:
            text = json.dumps(_drop_timing(json.loads(text)), indent=1, sort_keys=False)
        data = DURATION.sub("(N s)", text).encode("utf-8")
    return hashlib.sha256(data).hexdigest()


def _tree(folder: Path, root: Path, into: dict) -> None:
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            d = _digest(p, str(root))
            if d is not None:
                into[str(p.relative_to(root))] = d


def run(root: Path) -> dict:
    data, ckpt, arch = _inputs(root)
    common = ("--arch", arch, "--num-classes", 5, "--input-size", 16)
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
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "surgery-same-outputs",
                    help="the folder the runs are written in, replaced (default: %(default)s); runs to be compared "
                         "use the same one, one after the other")
    a = ap.parse_args()
    work = a.work
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    try:
        digests = run(work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    text = json.dumps(digests, indent=2, sort_keys=True) + "\n"
    if a.out is not None:
        a.out.write_text(text)
    sys.stdout.write(text)


if __name__ == "__main__":
    main()
