"""Time the foundation (`surgery inspect`, `surgery remap`, `surgery --help`) against its baselines.

Every command runs as a whole child process, the way a user runs it: wall clock around the child
(``time.perf_counter`` from spawn to reap) and the child's own peak RSS (``ru_maxrss`` from
``os.wait4`` on its pid, never RUSAGE_CHILDREN, which accumulates over every child). Each command
runs once untimed first (page cache, .pyc files), then ``--repeat`` times; the table shows the
median wall time and the largest peak RSS seen.

    python bench/foundation.py                          # ~2 GB checkpoints, 3 repeats
    python bench/foundation.py --size-gb 0.1 --repeat 1 # a quick smoke run
    python bench/foundation.py --cases small            # only torch files of many small tensors
    python bench/foundation.py --cases small --counts 50000 --shapes flat  # one of them
    python bench/foundation.py --cases startup --repeat 9  # only start-up: --help, inspect of one tensor

Results go to stdout as a table and to ``WORKDIR/foundation.json``. The exit status is 0 when
every command ran, whether or not it met its goal (this is a report); 1 when a command failed.
See bench/README.md for what each case measures and why the goals are what they are.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import shlex
import shutil
import statistics
import struct
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parent.parent
ROWS, COLS = 2048, 6144
TENSOR_BYTES = ROWS * COLS * 4  # float32
PREFIX = "module."
MB = 1024 * 1024  # ru_maxrss is in KiB on Linux; goals are read as MiB

# Baselines: what a practitioner writes by hand. sys.argv[1] is the checkpoint.
LOAD_SAFETENSORS = (
    "import sys\n"
    "from safetensors.torch import load_file\n"
    "sd = load_file(sys.argv[1])\n"
    "print(len(sd), sum(t.numel() for t in sd.values()))\n"
)
LOAD_PT = (
    "import sys, torch\n"
    "sd = torch.load(sys.argv[1], weights_only=True)\n"
    "print(len(sd), sum(t.numel() for t in sd.values()))\n"
)
LOAD_RENAME_SAVE = (
    "import sys, torch\n"
    "from safetensors.torch import load_file, save_file\n"
    "src, dst, prefix = sys.argv[1:4]\n"
    "sd = load_file(src) if src.endswith('.safetensors') else torch.load(src, weights_only=True)\n"
    "sd = {(k[len(prefix):] if k.startswith(prefix) else k): v for k, v in sd.items()}\n"
    "save_file(sd, dst, metadata={'format': 'pt'})\n"
)
OPEN_PT = "import sys, surgery\nprint(len(surgery.open(sys.argv[1]).tensors))\n"
# torch files of many small tensors: what the reader's per-opcode checks and inspect's key analysis
# cost next to torch.load, for three ways checkpoints name their tensors
SMALL_COUNTS = (1000, 10_000, 50_000, 200_000)
SMALL_SHAPE = 4
NESTED_LEAVES = ("attn.q.weight", "attn.q.bias", "attn.k.weight", "attn.k.bias", "attn.v.weight", "attn.v.bias",
                 "mlp.fc1.weight", "mlp.fc1.bias", "norm.weight", "norm.bias")
KEY_SHAPES = {  # name -> the expression of tensor i's key in MAKE_SMALL
    "dotted": "f'layers.{i}.weight'",  # nn.ModuleList / Sequential: numbered after a dot
    "flat": "f'layer{i}.weight'",  # numbered in the name
    "nested": "f'model.encoder.layer.{i // 10}.{LEAVES[i % 10]}'",  # blocks of 10 tensors, 3 levels down
}
MAKE_SMALL = ("import sys, torch\n"
              f"LEAVES = {NESTED_LEAVES!r}\n"
              "torch.save({%%s: torch.full((%d,), float(i)) for i in range(int(sys.argv[2]))}, sys.argv[1])\n"
              % SMALL_SHAPE)
# cp, then fsync the copy: surgery writes through a temp file and fsyncs before renaming, cp does not
CP_FSYNC = 'cp -- "$1" "$2" && sync -- "$2"'


# ---------------------------------------------------------------- measuring


class BenchError(Exception):
    """A command failed or printed something wrong: the benchmark cannot vouch for its numbers."""


@dataclass
class Run:
    wall_s: float
    maxrss_kb: int
    rc: int
    stdout: str
    stderr: str
    cpu_s: float = 0.0  # the child's user + system time: steadier than wall on a shared machine


@dataclass
class Measure:
    name: str
    argv: list[str]
    walls: list[float] = field(default_factory=list)
    rss_kb: list[int] = field(default_factory=list)
    error: str | None = None
    cpus: list[float] = field(default_factory=list)

    @property
    def wall(self) -> float | None:
        return statistics.median(self.walls) if self.walls and self.error is None else None

    @property
    def cpu(self) -> float | None:
        return statistics.median(self.cpus) if self.cpus and self.error is None else None

    @property
    def rss_mb(self) -> float | None:
        return max(self.rss_kb) / 1024 if self.rss_kb and self.error is None else None

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "argv": self.argv, "median_wall_s": self.wall, "walls_s": self.walls,
                "peak_rss_mb": self.rss_mb, "rss_kb": self.rss_kb, "error": self.error,
                "median_cpu_s": self.cpu, "cpus_s": self.cpus}


def run_once(argv: list[str], logdir: Path) -> Run:
    """Spawn ``argv``, reap it with wait4, return its wall time and its own peak RSS."""
    out_p, err_p = logdir / "stdout.txt", logdir / "stderr.txt"
    with open(out_p, "wb") as out, open(err_p, "wb") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err, cwd=REPO)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
    rc = os.waitstatus_to_exitcode(status)
    proc.returncode = rc  # reaped by wait4: tell Popen, so it neither waits again nor warns
    return Run(wall, usage.ru_maxrss, rc, out_p.read_text(errors="replace"), err_p.read_text(errors="replace"),
               usage.ru_utime + usage.ru_stime)


@dataclass
class Spec:
    name: str
    argv: list[str]
    check: Callable[[Run], None] | None = None  # run on the warm-up's output


def _run_checked(spec: Spec, logdir: Path, before: Callable[[], None] | None) -> Run:
    if before:
        before()
    r = run_once(spec.argv, logdir)
    if r.rc != 0:
        tail = (r.stderr.strip().splitlines() or r.stdout.strip().splitlines() or ["(no output)"])[-1]
        raise BenchError(f"exit {r.rc}: {tail[:300]}")
    return r


def measure_group(specs: list[Spec], repeat: int, logdir: Path,
                  before: Callable[[], None] | None = None) -> list[Measure]:
    """Warm up and check each command once (untimed), then ``repeat`` rounds that run every
    command of the group in turn, so a slow spell of the disk lands on all of them alike.
    ``before`` runs untimed ahead of every run (delete outputs, flush dirty pages)."""
    ms = [Measure(s.name, s.argv) for s in specs]
    for s, m in zip(specs, ms):
        try:
            r = _run_checked(s, logdir, before)
            if s.check:
                s.check(r)
        except (BenchError, OSError) as e:
            m.error = f"warm-up: {e}"
    for _ in range(repeat):
        for s, m in zip(specs, ms):
            if m.error:
                continue
            try:
                r = _run_checked(s, logdir, before)
            except (BenchError, OSError) as e:
                m.error = str(e)
                continue
            m.walls.append(r.wall_s)
            m.rss_kb.append(r.maxrss_kb)
            m.cpus.append(r.cpu_s)
    for m in ms:
        if m.error:
            print(f"  {m.name:<40s} ERROR {m.error}")
        else:
            print(f"  {m.name:<40s} {m.wall:8.3f} s  {m.rss_mb:8.1f} MB  cpu {m.cpu:7.3f} s   "
                  f"runs: {', '.join(f'{w:.3f}' for w in m.walls)}")
    return ms


# ---------------------------------------------------------------- checkpoints


def n_tensors_for(size_gb: float) -> int:
    return max(1, round(size_gb * 1e9 / TENSOR_BYTES))


def ensure_checkpoint(path: Path, fmt: str, n: int) -> tuple[Path, bool]:
    """Generate ``path`` unless a previous run left one with the same layout and size."""
    sidecar = path.with_name(path.name + ".json")
    want = {"fmt": fmt, "n_tensors": n, "rows": ROWS, "cols": COLS, "prefix": PREFIX}
    try:
        meta = json.loads(sidecar.read_text())
        if {k: meta.get(k) for k in want} == want and path.stat().st_size == meta["size"]:
            return path, True
    except (OSError, ValueError, KeyError):
        pass
    sidecar.unlink(missing_ok=True)
    t0 = time.perf_counter()
    # in a child: importing torch here would raise this process's RSS, and every child we spawn
    # inherits it (Linux records the pre-exec address space's high-water mark in ru_maxrss)
    code = ("import sys; from fixtures.generate import make_large_checkpoint; "
            "make_large_checkpoint(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), "
            "prefix=sys.argv[6])")
    subprocess.run([sys.executable, "-c", code, str(path), fmt, str(n), str(ROWS), str(COLS), PREFIX],
                   cwd=REPO, check=True)
    print(f"  generated {path.name} ({path.stat().st_size / 1e9:.2f} GB) in {time.perf_counter() - t0:.1f} s")
    sidecar.write_text(json.dumps({**want, "size": path.stat().st_size}) + "\n")
    return path, False


def compile_checkout() -> None:
    """Byte-compile this checkout's packages, as ``pip install`` does for an installed project.
    With PYTHONDONTWRITEBYTECODE=1 (set on some machines) no run writes its .pyc files, so every
    timed run of ``python -m cli.main`` would compile surgery's sources again: a cost no user of
    the installed package pays, and one torch.load (whose .pyc files ship compiled) never pays."""
    import compileall

    for pkg in ("surgery", "cli"):
        compileall.compile_dir(str(REPO / pkg), quiet=1)


def warm_page_cache(path: Path) -> None:
    buf = bytearray(1 << 20)  # small: see floor_rss_mb
    with open(path, "rb") as f:
        while f.readinto(buf):
            pass


def safetensors_keys(path: Path) -> list[str]:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    return [k for k in header if k != "__metadata__"]


# ---------------------------------------------------------------- checks on warm-up output


def check_baseline_load(n: int) -> Callable[[Run], None]:
    def check(r: Run) -> None:
        got = r.stdout.split()
        want = [str(n), str(n * ROWS * COLS)]
        if got != want:
            raise BenchError(f"baseline printed {r.stdout.strip()!r}, expected {' '.join(want)!r}")
    return check


def check_inspect(n: int, as_json: bool) -> Callable[[Run], None]:
    """Loose on purpose: the output format is the inspect command's to change; a count is not."""
    def check(r: Run) -> None:
        if as_json:
            try:
                data = json.loads(r.stdout)
            except ValueError as e:
                raise BenchError(f"--json output is not JSON: {e}") from None
            if isinstance(data, dict) and "tensor_count" in data and data["tensor_count"] != n:
                raise BenchError(f"--json says tensor_count={data['tensor_count']}, the file has {n}")
        elif not re.search(rf"\b{n}\b", r.stdout):
            raise BenchError(f"output never mentions the file's {n} tensors")
    return check


def check_count(n: int) -> Callable[[Run], None]:
    def check(r: Run) -> None:
        if r.stdout.split()[:1] != [str(n)]:
            raise BenchError(f"printed {r.stdout.strip()[:80]!r}, expected {n} first")
    return check


def check_remap_output(dst: Path, n: int) -> Callable[[Run], None]:
    def check(r: Run) -> None:
        keys = safetensors_keys(dst)
        want = [f"layers.{i}.weight" for i in range(n)]
        if sorted(keys) != sorted(want):
            raise BenchError(f"{dst.name}: keys {keys[:3]}... are not the {n} stripped keys")
    return check


# ---------------------------------------------------------------- goals and table


@dataclass
class Row:
    case: str
    surgery: Measure
    baseline: Measure | None
    goals: dict[str, float]  # max_wall_s, max_ratio, max_rss_mb; empty: informational row
    goal_text: str

    @property
    def ratio(self) -> float | None:
        if self.baseline is None or self.surgery.wall is None or not self.baseline.wall:
            return None
        return self.surgery.wall / self.baseline.wall

    @property
    def cpu_ratio(self) -> float | None:
        """The same ratio of CPU times (user + system): what other processes on the machine
        change least."""
        if self.baseline is None or self.surgery.cpu is None or not self.baseline.cpu:
            return None
        return self.surgery.cpu / self.baseline.cpu

    def verdict(self) -> tuple[str, list[str]]:
        if self.surgery.error or (self.baseline and self.baseline.error):
            return "ERROR", []
        if not self.goals:
            return "info", []
        failed = []
        if "max_wall_s" in self.goals and self.surgery.wall > self.goals["max_wall_s"]:
            failed.append("wall")
        if "max_ratio" in self.goals and (self.ratio is None or self.ratio > self.goals["max_ratio"]):
            failed.append("ratio")
        if "max_cpu_ratio" in self.goals and (self.cpu_ratio is None or self.cpu_ratio > self.goals["max_cpu_ratio"]):
            failed.append("cpu ratio")
        if "max_rss_mb" in self.goals and self.surgery.rss_mb > self.goals["max_rss_mb"]:
            failed.append("rss")
        return ("FAIL" if failed else "PASS"), failed

    def to_json(self) -> dict[str, Any]:
        status, failed = self.verdict()
        return {"case": self.case, "surgery": self.surgery.to_json(),
                "baseline": self.baseline.to_json() if self.baseline else None,
                "ratio_surgery_over_baseline": self.ratio, "cpu_ratio_surgery_over_baseline": self.cpu_ratio,
                "goals": self.goals, "goal": self.goal_text,
                "status": status, "failed": failed}


def _fmt(x: float | None, spec: str, unit: str = "") -> str:
    return "-" if x is None else f"{x:{spec}}{unit}"


def print_grid(head: tuple, body: list[tuple], right: set[int]) -> None:
    """A plain-text table: columns padded to their widest cell, those in ``right`` right-aligned."""
    widths = [max(len(str(x[i])) for x in [head, *body]) for i in range(len(head))]

    def line(cells: tuple) -> str:
        return "  ".join(str(c).rjust(w) if i in right else str(c).ljust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    print(line(head))
    print("  ".join("-" * w for w in widths))
    for cells in body:
        print(line(cells))


def print_table(rows: list[Row]) -> None:
    head = ("case", "surgery", "baseline", "base time", "ratio", "cpu ratio", "surg RSS", "base RSS", "goal", "result")
    body = []
    for r in rows:
        status, failed = r.verdict()
        b = r.baseline
        body.append((
            r.case, _fmt(r.surgery.wall, ".3f", " s"), b.name if b else "-", _fmt(b.wall if b else None, ".3f", " s"),
            _fmt(r.ratio, ".3f", "x"), _fmt(r.cpu_ratio, ".3f", "x"), _fmt(r.surgery.rss_mb, ".0f", " MB"), _fmt(b.rss_mb if b else None, ".0f", " MB"),
            r.goal_text, status + (f" ({','.join(failed)})" if failed else ""),
        ))
    print_grid(head, body, right={1, 3, 4, 5, 6, 7})
    for r in rows:
        for m in (r.surgery, r.baseline):
            if m is not None and m.error:
                print(f"  ERROR {r.case} / {m.name}: {m.error}")


# ---------------------------------------------------------------- machine facts


def machine_facts() -> dict[str, Any]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gb = None
    try:
        mem_gb = round(int(Path("/proc/meminfo").read_text().split()[1]) / 1024 / 1024, 1)
    except (OSError, ValueError, IndexError):
        pass
    facts: dict[str, Any] = {
        "nproc": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "cpu": cpu, "mem_gb": mem_gb, "kernel": platform.release(),
        "python": platform.python_version(), "python_executable": sys.executable,
        # children inherit it: set, every run compiles the project's modules afresh (~25 ms for inspect)
        "PYTHONDONTWRITEBYTECODE": os.environ.get("PYTHONDONTWRITEBYTECODE", ""),
    }
    out = subprocess.run([sys.executable, "-c", "import torch, safetensors, typer, rich; "
                          "print(torch.__version__, safetensors.__version__, typer.__version__)"],
                         capture_output=True, text=True)
    versions = out.stdout.split() if out.returncode == 0 else []
    facts["torch"], facts["safetensors"], facts["typer"] = (versions + ["?"] * 3)[:3]
    git = lambda *a: subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True).stdout.strip()
    facts["git_head"] = git("rev-parse", "--short", "HEAD") or None
    facts["git_dirty_files"] = len(git("status", "--porcelain").splitlines())
    return facts


# ---------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python bench/foundation.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", type=Path, default=REPO / "bench" / "out",
                   help="where checkpoints, outputs and foundation.json go (default: bench/out)")
    p.add_argument("--size-gb", type=float, default=2.0,
                   help=f"checkpoint size in GB (1e9 bytes): float32 [{ROWS}, {COLS}] tensors, 40 for 2.0")
    p.add_argument("--repeat", type=int, default=3, help="timed runs per command; the median is reported")
    p.add_argument("--keep", action="store_true", help="keep the generated checkpoints (reused next run)")
    p.add_argument("--cases", default="large,small,startup",
                   help="comma-separated: 'large' (inspect/remap of --size-gb files), 'small' (torch files of "
                        "--counts small tensors named --shapes ways: inspect and surgery.open vs torch.load), "
                        "'startup' (--help, train --help, inspect of a one-tensor file)")
    p.add_argument("--counts", default=",".join(map(str, SMALL_COUNTS)),
                   help="comma-separated tensor counts of the 'small' files (default: %(default)s)")
    p.add_argument("--shapes", default=",".join(KEY_SHAPES),
                   help="comma-separated key shapes of the 'small' files: 'dotted' (layers.0.weight), 'flat' "
                        "(layer0.weight), 'nested' (model.encoder.layer.0.attn.q.weight ...) (default: %(default)s)")
    args = p.parse_args(argv)
    try:
        args.counts = tuple(int(c) for c in args.counts.split(",") if c.strip())
    except ValueError:
        p.error(f"--counts {args.counts!r} is not a list of integers")
    args.shapes = tuple(c.strip() for c in args.shapes.split(",") if c.strip())
    if not args.counts or min(args.counts) < 10 or not args.shapes or set(args.shapes) - set(KEY_SHAPES):
        p.error(f"--counts must list integers of 10 or more, --shapes names among {', '.join(KEY_SHAPES)}")
    args.cases = {c.strip() for c in args.cases.split(",") if c.strip()}
    if args.size_gb <= 0 or args.repeat < 1 or not args.cases or args.cases - {"large", "small", "startup"}:
        p.error("--size-gb must be > 0, --repeat >= 1, --cases a list of 'large', 'small' and 'startup'")
    return args


def _short(p: Path) -> str:
    """``p`` relative to the repo root (where the reproduce line is meant to run) when inside it."""
    try:
        return str(p.relative_to(REPO))
    except ValueError:
        return str(p)


def small_tensor_rows(workdir: Path, logdir: Path, repeat: int, counts: tuple[int, ...],
                      shapes: tuple[str, ...], keep: bool = False) -> list[Row]:
    """torch files of many small tensors: the pickle, not the data, is the whole read. Times
    `surgery inspect` (the CLI, run as ``python -m cli.main`` from this checkout) and
    ``surgery.open`` against ``torch.load(weights_only=True)`` of the same file, in one group,
    for each key shape and count."""
    py = sys.executable
    rows: list[Row] = []
    for shape in shapes:
        cpus: dict[str, list[tuple[int, float]]] = {}
        for n in counts:
            path = workdir / f"small_{shape}_{n}x{SMALL_SHAPE}.pt"
            if not path.exists():  # written under another name first: a run killed here leaves no empty file
                part = path.with_name(path.stem + "_part.pt")
                subprocess.run([py, "-c", MAKE_SMALL % KEY_SHAPES[shape], str(part), str(n)], cwd=REPO, check=True)
                os.replace(part, path)
            warm_page_cache(path)
            try:
                base, insp, opened = measure_group([
                    Spec(f"torch.load {shape} {n}", [py, "-c", LOAD_PT, str(path)], check_count(n)),
                    Spec(f"surgery inspect {shape} {n}", [py, "-m", "cli.main", "inspect", str(path)],
                         check_inspect(n, False)),
                    Spec(f"surgery.open {shape} {n}", [py, "-c", OPEN_PT, str(path)], check_count(n)),
                ], repeat, logdir)
            finally:
                if not keep:  # with --keep, a later run (or bench/inspect_stages.py) reuses it
                    path.unlink(missing_ok=True)
            goal = {"max_ratio": 0.25, "max_cpu_ratio": 0.25}
            rows.append(Row(f"inspect pt, {n} {shape} keys", insp, base, goal, "ratio<=0.25"))
            rows.append(Row(f"surgery.open pt, {n} {shape} keys", opened, base, goal, "ratio<=0.25"))
            if base.cpu and insp.cpu and opened.cpu:
                print(f"  ratios at {n} {shape}: inspect wall {insp.wall / base.wall:.3f}x, cpu {insp.cpu / base.cpu:.3f}x; "
                      f"surgery.open wall {opened.wall / base.wall:.3f}x, cpu {opened.cpu / base.cpu:.3f}x of torch.load")
                for m in (base, insp, opened):
                    cpus.setdefault(m.name.split(f" {shape} ")[0] + f" ({shape} keys)", []).append((n, m.cpu))
        print_growth(cpus)
    return rows


def print_growth(cpus: dict[str, list[tuple[int, float]]]) -> None:
    """CPU time each further tensor costs between consecutive sizes: about equal steps mean
    linear growth (the fixed start-up cost cancels out)."""
    for name, points in cpus.items():
        steps = [f"{(c2 - c1) / (n2 - n1) * 1e6:.1f} us/tensor from {n1} to {n2}"
                 for (n1, c1), (n2, c2) in zip(points, points[1:])]
        if steps:
            print(f"  growth of {name}: {', '.join(steps)}")


def startup_rows(surgery: str, py: str, workdir: Path, logdir: Path, repeat: int) -> list[Row]:
    """What a command costs before its work: ``surgery --help``, a command's help, and an
    inspect of a one-tensor file, each against ``python -c pass`` timed in the same rounds."""
    tiny = workdir / "startup_one_tensor.safetensors"
    header = json.dumps({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}).encode()
    tiny.write_bytes(len(header).to_bytes(8, "little") + header + bytes(4))
    specs = [Spec("surgery --help", [surgery, "--help"]), Spec("surgery train --help", [surgery, "train", "--help"]),
             Spec("surgery inspect (1 tensor)", [surgery, "inspect", str(tiny)]),
             Spec("python -c pass", [py, "-c", "pass"])]
    try:
        *ms, base = measure_group(specs, repeat, logdir)
    finally:
        tiny.unlink(missing_ok=True)
    return [Row("--help", ms[0], base, {"max_wall_s": 0.3}, "<=0.3s"),
            Row("train --help", ms[1], base, {"max_wall_s": 0.5}, "<=0.5s"),
            Row("inspect, start to end", ms[2], base, {"max_wall_s": 0.5}, "<=0.5s")]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    workdir: Path = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    logdir = workdir / "logs"
    logdir.mkdir(exist_ok=True)
    n = n_tensors_for(args.size_gb)

    cmd = [_short(Path(sys.executable)), "bench/foundation.py", "--workdir", _short(workdir), "--size-gb", f"{args.size_gb:g}",
           "--repeat", str(args.repeat), "--cases", ",".join(sorted(args.cases)),
           "--counts", ",".join(map(str, args.counts)), "--shapes", ",".join(args.shapes)] + (["--keep"] if args.keep else [])
    print("reproduce: " + shlex.join(cmd))
    facts = machine_facts()
    print("machine:   " + ", ".join(f"{k}={facts[k]}" for k in ("nproc", "cpu", "mem_gb", "kernel", "python", "torch",
                                                                  "safetensors", "typer", "git_head", "git_dirty_files",
                                                                  "PYTHONDONTWRITEBYTECODE")))

    py = sys.executable
    surgery = str(Path(sys.executable).parent / "surgery")  # the venv's console script, not the resolved python
    if not Path(surgery).exists():
        print(f"error: {surgery} not found; install the project first: {Path(py).parent / 'pip'} install -e .",
              file=sys.stderr)
        return 1

    st = workdir / f"large_{n}x{ROWS}x{COLS}.safetensors"
    pt = workdir / f"large_{n}x{ROWS}x{COLS}.pt"
    outputs = [workdir / "remap_out.safetensors", workdir / "cp_out.bin", workdir / "cp_fsync_out.bin",
               workdir / "lrs_out.safetensors"]
    generated = [st, st.with_name(st.name + ".json"), pt, pt.with_name(pt.name + ".json")]

    def clear_outputs() -> None:
        for o in outputs:
            o.unlink(missing_ok=True)
        for stray in workdir.glob(".remap_out.safetensors.*"):  # a temp file left by a killed remap
            stray.unlink(missing_ok=True)
        os.sync()  # no dirty pages from the previous run get flushed during this one

    compile_checkout()
    rows: list[Row] = []
    floor_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if "small" in args.cases:
        print(f"\nsmall tensors: torch files of {', '.join(map(str, args.counts))} float32 [{SMALL_SHAPE}] tensors, "
              f"keys {', '.join(args.shapes)} "
              f"(1 untimed warm-up each, then {args.repeat} interleaved rounds):")
        try:
            rows += small_tensor_rows(workdir, logdir, args.repeat, args.counts, args.shapes, args.keep)
        except subprocess.CalledProcessError as e:
            print(f"error: generating a small-tensor file failed (exit {e.returncode})", file=sys.stderr)
            return 1
    try:
        if "large" in args.cases:
            print(f"\ncheckpoints: {n} x float32 [{ROWS}, {COLS}] = {n * TENSOR_BYTES / 1e9:.2f} GB each, keys '{PREFIX}layers.i.weight'")
            for path, fmt in ((st, "safetensors"), (pt, "pt")):
                try:
                    _, reused = ensure_checkpoint(path, fmt, n)
                except subprocess.CalledProcessError as e:
                    print(f"error: generating {path.name} failed (exit {e.returncode}); see the traceback above",
                          file=sys.stderr)
                    return 1
                if reused:
                    print(f"  reused {path.name} ({path.stat().st_size / 1e9:.2f} GB)")
            clear_outputs()
            for path in (st, pt):
                warm_page_cache(path)

            print(f"\ntiming (1 untimed warm-up each, then {args.repeat} interleaved rounds; median wall, max peak RSS):")
            floor_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            print(f"  (a child's peak RSS includes this process's, {floor_mb:.0f} MB, inherited before exec)")
            inspect_goal = {"max_wall_s": 0.5, "max_ratio": 0.1, "max_rss_mb": 150}
            inspect_text = "<=0.5s, ratio<=0.1, RSS<=150MB"
            for path, label, script in ((st, "safetensors", LOAD_SAFETENSORS), (pt, "pt", LOAD_PT)):
                base, text, js = measure_group([
                    Spec(f"baseline load {label}", [py, "-c", script, str(path)], check_baseline_load(n)),
                    Spec(f"surgery inspect {label}", [surgery, "inspect", str(path)], check_inspect(n, False)),
                    Spec(f"surgery inspect {label} --json", [surgery, "inspect", str(path), "--json"], check_inspect(n, True)),
                ], args.repeat, logdir)
                for m in (text, js):
                    rows.append(Row(m.name.removeprefix("surgery "), m, base, inspect_goal, inspect_text))

            dst, cp_dst, cps_dst, lrs_dst = outputs
            remap_goal = {"max_ratio": 1.5, "max_rss_mb": 200}
            remap_text = "ratio<=1.5, RSS<=200MB"
            for path, label in ((st, "safetensors->safetensors"), (pt, "pt->safetensors")):
                m, cp, cps, lrs = measure_group([
                    Spec(f"surgery remap {label}", [surgery, "remap", str(path), str(dst), "--strip-prefix", PREFIX, "--force"],
                         check_remap_output(dst, n)),
                    Spec(f"cp {path.suffix}", ["cp", "--", str(path), str(cp_dst)]),
                    Spec(f"cp+fsync {path.suffix}", ["sh", "-c", CP_FSYNC, "sh", str(path), str(cps_dst)]),
                    Spec(f"load-rename-save {path.suffix}", [py, "-c", LOAD_RENAME_SAVE, str(path), str(lrs_dst), PREFIX],
                         check_remap_output(lrs_dst, n)),
                ], args.repeat, logdir, before=clear_outputs)
                case = f"remap {label}"
                rows.append(Row(case, m, cp, remap_goal, remap_text))
                rows.append(Row(case, m, cps, {}, "(info)"))
                rows.append(Row(case, m, lrs, {}, "(info)"))
            clear_outputs()

        if "startup" in args.cases:
            print("\nstart-up: the console script, against a bare interpreter")
            rows += startup_rows(surgery, py, workdir, logdir, args.repeat)
    finally:
        for o in outputs:
            o.unlink(missing_ok=True)
        shutil.rmtree(logdir, ignore_errors=True)
        if not args.keep:
            for g in generated:
                g.unlink(missing_ok=True)

    print()
    print_table(rows)
    result = {"command": shlex.join(cmd), "argv": sys.argv, "machine": facts,
              "params": {"size_gb": args.size_gb, "n_tensors": n, "rows": ROWS, "cols": COLS,
                         "bytes_per_file_payload": n * TENSOR_BYTES, "repeat": args.repeat},
              "rss_floor_mb": floor_mb,
              "rows": [r.to_json() for r in rows]}
    out = workdir / "foundation.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nresults: {out}")
    errors = [r for r in rows if r.verdict()[0] == "ERROR"]
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
