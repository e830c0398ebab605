"""What tiny hostile inputs cost `surgery inspect`: one file (or folder) per class, each under 1 MB,
and a larger one of each to check that the cost grows linearly with the input.

    .venv/bin/python bench/costs.py                 # every class, small and large
    .venv/bin/python bench/costs.py --only size-str,queue --timeout 60

Each input runs `surgery inspect` in its own child process; wall time is spawn to reap, peak RSS is
the child's own ``ru_maxrss`` (from ``os.wait4``). The goal: an input under 1 MB costs at most 2 s
and 300 MB, and the large one costs at most twice its share (size ratio) of the time above the
floor (the same command on a clean checkpoint). A class's builders are used by the tests too
(tests/hardening/test_costs.py), at smaller scales.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parent.parent
GOAL_S, GOAL_MB, SMALL_BYTES = 2.0, 300, 1 << 20


# ----------------------------------------------------------------------------- pickle pieces

def s(text: str | bytes) -> bytes:
    """BINUNICODE: a str in the pickle."""
    b = text.encode() if isinstance(text, str) else text
    return b"X" + struct.pack("<I", len(b)) + b


def tensor() -> bytes:
    """A protocol-2 tensor record over storage '0' (4 float32), as torch.save writes one."""
    pid = b"(" + s("storage") + b"ctorch\nFloatStorage\n" + s("0") + s("cpu") + b"K\x04tQ"
    return b"ctorch._utils\n_rebuild_tensor_v2\n(" + pid + b"K\x00K\x04\x85K\x01\x85\x89ccollections\nOrderedDict\n)RtR"


def ckpt(*entries: tuple[str, bytes]) -> bytes:
    """A state dict pickle: a tensor 'w' and small entries (so no dict is mostly tensors), then ``entries``."""
    base = (("w", tensor()), ("a", b"K\x01"), ("b", b"K\x02"))
    return b"\x80\x02}" + b"".join(s(k) + v + b"s" for k, v in (*base, *entries)) + b"."


def torch_zip(pkl: bytes, deflate: bool = False) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("archive/data.pkl", pkl, compress_type=zipfile.ZIP_DEFLATED if deflate else zipfile.ZIP_STORED)
        z.writestr("archive/byteorder", b"little")
        z.writestr("archive/data/0", bytes(16))
        z.writestr("archive/version", b"3\n")
    return buf.getvalue()


def put(i: int) -> bytes:
    """BINPUT / LONG_BINPUT: store the top of the stack in memo slot i."""
    return b"q" + bytes([i]) if i < 256 else b"r" + struct.pack("<I", i)


def get(i: int) -> bytes:
    """BINGET / LONG_BINGET: push memo slot i (two bytes for the first 256)."""
    return b"h" + bytes([i]) if i < 256 else b"j" + struct.pack("<I", i)


# ----------------------------------------------------------------------------- this section's classes

def size_of_str(n: int, calls: int = 30) -> bytes:
    """torch.Size(str) again and again: a tuple of n one-character strings per call."""
    first = b"ctorch\nSize\n" + s("x" * n) + put(200) + b"\x85R"
    return ckpt(*[(f"s{i}", first if i == 0 else b"ctorch\nSize\n" + get(200) + b"\x85R") for i in range(calls)])


def size_repeated(n: int, calls: int = 60) -> bytes:
    """torch.Size(list) of one n-int list, called again and again (torch accepts each call)."""
    ints = b"]" + put(200) + b"(" + b"K\x01" * n + b"e"
    first = b"ctorch\nSize\n" + ints + b"\x85R"
    return ckpt(*[(f"s{i}", first if i == 0 else b"ctorch\nSize\n" + get(200) + b"\x85R") for i in range(calls)])


def device_join(n: int, refs: int = 30) -> bytes:
    """torch.device(S, S, ...): one n-character string, joined ``refs`` times."""
    return ckpt(("d", b"ctorch\ndevice\n(" + s("y" * n) + put(200) + get(200) * (refs - 1) + b"tR"))


def queue(n: int) -> bytes:
    """A list of n references to one dict: the container search queues each."""
    return ckpt(("l", b"}" + put(200) + b"0](" + get(200) * n + b"e"))


def module_comb(n: int, depth: int = 15) -> bytes:
    """Pickled modules (``mylib.Net``, accepted as records) ``depth`` deep, each holding one shared
    module of n children: walking the modules from each module in turn costs depth * n."""
    net = b"cmylib\nNet\n" + put(201) + b"0"
    wide = get(201) + b")\x81}" + s("_modules") + b"}(" + b"".join(b"J" + struct.pack("<i", i) + b"N" for i in range(n))
    wide += b"usb" + put(203) + b"0"
    chain = get(203)  # the innermost module is the shared one; each level wraps the one below
    for _ in range(depth):
        chain = get(201) + b")\x81}" + s("_modules") + b"}(" + s("a") + get(203) + s("n") + chain + b"usb"
    return b"\x80\x02" + net + wide + ckpt(("model", chain))[2:]


def summaries(n: int, entries: int = 30) -> bytes:
    """``entries`` entries, each a list around one shared list of n items: each summary counts it."""
    shared = b"]" + put(200) + b"(" + b"N" * n + b"e0"
    return b"\x80\x02" + shared + ckpt(*[(f"e{i}", b"]" + get(200) + b"a") for i in range(entries)])[2:]


def memoize_zip(n: int) -> bytes:
    """A deflated data.pkl of n MEMOIZE opcodes: a few KB that inflate to n bytes."""
    return torch_zip(b"\x80\x04N" + b"\x94" * n + b"0" + ckpt()[2:], deflate=True)


# ----------------------------------------------------------------------------- earlier reviews' classes

def deep_nesting(n: int) -> bytes:
    return b"\x80\x02}" + b")" + b"\x85" * n + b"K\x01s."


def memo_bomb(n: int) -> bytes:
    """A dict key of 2**60 shared leaves (hashing it walks every one): fixed size."""
    return b"\x80\x02}K\x01\x85q\x00" + b"h\x00h\x00\x86q\x00" * 60 + b"K\x01s."


def big_int(n: int) -> bytes:
    """A protocol-0 LONG of n digits (int() of text is quadratic)."""
    return b"\x80\x02L" + b"9" * n + b"L\n."


def memo_index(n: int) -> bytes:
    """LONG_BINPUT 2**32-1: the C unpickler sizes its memo table by the index: fixed size."""
    return b"\x80\x02K\x01r\xff\xff\xff\xff."


def huge_length(n: int) -> bytes:
    """BINBYTES8 declaring 2**62 bytes: fixed size."""
    return b"\x80\x04\x8e" + (2**62).to_bytes(8, "little") + b"ab."


def codec(n: int) -> bytes:
    """_codecs.encode(S, 'punycode'): a codec other than latin1 (punycode takes seconds a KB)."""
    return ckpt(("b", b"c_codecs\nencode\n" + s("\u00e9x" * (n // 3)) + s("punycode") + b"\x86R"))


def global_payload(n: int) -> bytes:
    """os.system named by the pickle (refused, never run), with an n-byte argument."""
    return ckpt(("p", b"cos\nsystem\n" + s("true " + "#" * n) + b"\x85R"))


def many_dims(n: int) -> bytes:
    size = b"(" + b"K\x02" * n + b"t"
    stride = b"(" + b"K\x00" * n + b"t"
    rec = tensor().replace(b"K\x00K\x04\x85K\x01\x85", b"K\x00" + size + stride)
    return ckpt(("t", rec))


def dotted_key(n: int) -> bytes:
    """A tensor named by n dots (the module tree splits names on them)."""
    return ckpt(("." * n, tensor()))


def inflate_bomb(n: int) -> bytes:
    """A valid zip whose data.pkl (a tiny pickle, then n MB of zeros) deflates about 1000 to 1."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        info = zipfile.ZipInfo("archive/data.pkl")
        info.compress_type = zipfile.ZIP_DEFLATED
        with z.open(info, "w") as f:
            f.write(b"\x80\x02}.")
            for _ in range(n):
                f.write(bytes(1 << 20))
        z.writestr("archive/byteorder", b"little")
        z.writestr("archive/version", b"3\n")
    return buf.getvalue()


def safetensors_header(n: int) -> bytes:
    """A safetensors header claiming 2**63 bytes: fixed size."""
    return struct.pack("<Q", (1 << 63) - 1) + b"{}"


def glob_folder(folder: Path, n: int) -> list[str]:
    """n checkpoints in a folder with two symlinks to itself: `surgery inspect 'DIR/**/*.pt'`."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (folder / f"m{i}.pt").write_bytes(torch_zip(ckpt()))
    for link in ("l1", "l2"):
        os.symlink(".", folder / link)
    return [f"{folder}/**/*.pt"]


# ----------------------------------------------------------------------------- the run

# name: (how the bytes become an input, builder, scale of the small input, extra arguments).
# A scale of 0 marks a fixed-size input (no larger version).
CLASSES: dict[str, tuple[str, Callable, int, tuple[str, ...]]] = {
    "size-of-str": ("pt", size_of_str, 200_000, ()),
    "size-repeated": ("pt", size_repeated, 200_000, ()),
    "device-join": ("pt", device_join, 500_000, ()),
    "search-queue": ("pt", queue, 300_000, ()),
    "module-comb": ("pt", module_comb, 100_000, ("--allow-global", "mylib.Net")),
    "shared-summaries": ("pt", summaries, 300_000, ()),
    "memoize-zip": ("file", memoize_zip, 16_000_000, ()),
    "glob-symlink-loop": ("glob", glob_folder, 8, ()),
    "global-payload": ("pt", global_payload, 100_000, ()),
    "deep-nesting": ("pt", deep_nesting, 200_000, ()),
    "memo-bomb": ("pt", memo_bomb, 0, ()),
    "big-int-text": ("pt", big_int, 100_000, ()),
    "memo-index": ("pt", memo_index, 0, ()),
    "huge-length": ("pt", huge_length, 0, ()),
    "codec": ("pt", codec, 30_000, ()),
    "many-dims": ("pt", many_dims, 60_000, ()),
    "dotted-key": ("pt", dotted_key, 1000, ()),
    "inflate-bomb": ("file", inflate_bomb, 200, ()),
    "safetensors-header": ("safetensors", safetensors_header, 0, ()),
}


def make_input(name: str, scale: int, folder: Path) -> tuple[list[str], int]:
    """The arguments to `surgery inspect` for class ``name`` at ``scale``, and the input's bytes."""
    kind, build, _, extra = CLASSES[name]
    if kind == "glob":
        args = build(folder / f"{name}-{scale}", scale)
        return args + list(extra), sum(p.stat().st_size for p in (folder / f"{name}-{scale}").glob("*.pt"))
    data = build(scale)
    data = torch_zip(data) if kind == "pt" else data
    path = folder / f"{name}-{scale}.{'safetensors' if kind == 'safetensors' else 'pt'}"
    path.write_bytes(data)
    return [str(path), *extra], len(data)


def run(args: list[str], timeout: float) -> dict:
    """`surgery inspect ARGS` in a child: wall time (spawn to reap), its own peak RSS, how it ended."""
    exe = REPO / ".venv" / "bin" / "surgery"
    argv = [str(exe), "inspect", *args] if exe.exists() else [sys.executable, "-m", "cli.main", "inspect", *args]
    with tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.DEVNULL, stderr=err)
        timer = threading.Timer(timeout, proc.kill)
        timer.start()
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        timer.cancel()
        proc.returncode = os.waitstatus_to_exitcode(status)
        err.seek(0)
        first = (err.read().decode(errors="replace").splitlines() or [""])[0]
    outcome = "TIMEOUT" if wall >= timeout else {0: "read", 2: "refused"}.get(proc.returncode, f"exit {proc.returncode}")
    return {"wall": wall, "mb": usage.ru_maxrss / 1024, "outcome": outcome, "message": first}


def scales_linearly(small: dict, large: dict, size_ratio: float, floor: float) -> bool:
    """The large input's time above the floor is at most twice its share (plus 0.3 s of noise)."""
    extra_small, extra_large = max(0.0, small["wall"] - floor), max(0.0, large["wall"] - floor)
    return extra_large <= 2 * size_ratio * extra_small + 0.3 and large["outcome"] != "TIMEOUT"


def build_all(names: list[str], folder: Path) -> dict:
    """Every input (small, and large where it has a scale) of ``names`` written under ``folder``:
    {name: {"small": [args, bytes], "large": [args, bytes]}}, and the clean checkpoint."""
    clean = folder / "clean.pt"
    clean.write_bytes(torch_zip(ckpt()))
    out: dict = {"clean": [str(clean)]}
    for name in names:
        scale = CLASSES[name][2]
        out[name] = {"small": make_input(name, scale, folder)}
        if scale:
            out[name]["large"] = make_input(name, scale * 4, folder)
    return out


def measure(names: list[str], timeout: float, folder: Path) -> tuple[float, list[dict]]:
    # built in a child: Linux folds the parent's peak RSS into each child's at exec, so the
    # parent never holds an input
    built = subprocess.run([sys.executable, __file__, "--build", str(folder), "--only", ",".join(names)],
                           capture_output=True, text=True, check=True)
    inputs = json.loads(built.stdout)
    floor = min(run(inputs["clean"], timeout)["wall"] for _ in range(3))
    rows = []
    for name in names:
        args, size = inputs[name]["small"]
        row = {"class": name, "bytes": size, **run(args, timeout)}
        row["goal"] = size >= SMALL_BYTES or (row["wall"] <= GOAL_S and row["mb"] <= GOAL_MB and row["outcome"] != "TIMEOUT")
        if "large" in inputs[name]:
            args, big = inputs[name]["large"]
            large = run(args, timeout)
            row["large"] = {"bytes": big, **large}
            row["linear"] = scales_linearly(row, large, big / size, floor)
        rows.append(row)
        print(_line(row), flush=True)
    return floor, rows


def _line(r: dict) -> str:
    big = r.get("large")
    tail = (f"{big['bytes'] / 1e3:9.0f} KB {big['wall']:7.2f} s {big['mb']:7.0f} MB  {'yes' if r['linear'] else 'NO':6s}"
            if big else f"{'(fixed size)':>40s}")
    return (f"{r['class']:20s} {r['bytes'] / 1e3:8.0f} KB {r['wall']:7.2f} s {r['mb']:7.0f} MB  {r['outcome']:8s} "
            f"{'PASS' if r['goal'] else 'FAIL':5s} {tail}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", help="comma-separated classes (default: all): " + ", ".join(CLASSES))
    ap.add_argument("--timeout", type=float, default=120, help="seconds before an input is killed (counted TIMEOUT)")
    ap.add_argument("--verbose", action="store_true", help="print each input's first stderr line")
    ap.add_argument("--build", metavar="DIR", help=argparse.SUPPRESS)  # the child that writes the inputs
    opts = ap.parse_args(argv)
    names = opts.only.split(",") if opts.only else list(CLASSES)
    if opts.build:
        print(json.dumps(build_all(names, Path(opts.build))))
        return 0
    print(f"{'class':20s} {'input':>11s} {'wall':>9s} {'peak RSS':>10s}  {'outcome':8s} {'goal':5s} "
          f"{'large input':>12s} {'wall':>9s} {'peak RSS':>10s}  linear")
    with tempfile.TemporaryDirectory() as tmp:
        floor, rows = measure(names, opts.timeout, Path(tmp))
    if opts.verbose:
        for r in rows:
            print(f"  {r['class']}: {r['message'][:160]}")
    failed = [r["class"] for r in rows if not r["goal"] or not r.get("linear", True)]
    print(f"\nfloor (inspect of a clean 1 KB checkpoint): {floor:.2f} s. goal: every input under 1 MB at most "
          f"{GOAL_S:.0f} s and {GOAL_MB} MB; the large input (4x) at most twice its share of the time above the floor.")
    print(f"{len(rows) - len(failed)} of {len(rows)} classes meet it" + (f"; not: {', '.join(failed)}" if failed else ""))
    print(f"repeat: .venv/bin/python bench/costs.py{' --only ' + opts.only if opts.only else ''}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
