"""Time a model-zoo scan: metadata of many small checkpoints in one `surgery inspect` call, against
a shell loop of single `surgery inspect` calls and a Python loop that loads every file.

    python bench/zoo.py                    # 1,000 checkpoints; the shell loop timed on 50 of them
    python bench/zoo.py --files 200 --sample 20

The zoo mixes formats as a real one does: safetensors, torch zip, legacy (torch < 1.6) pickles,
and sharded folders (two safetensors shards + model.safetensors.index.json), of 8 to 60 tensors
each; some torch files named .th or .tar, and a config.json or train.log beside 3 in 4 of them,
which the scan sniffs from their first bytes and skips. It is written by a child process (the parent never imports torch) and reused by a later run
with the same --files.

Every case runs as a whole child process and is timed from spawn to exit (wall clock):
- `surgery inspect ZOO --json` once, with the default workers (one per CPU), and with --workers 1;
- a bash `for` loop of `surgery inspect PATH --json`, timed on an evenly spaced --sample of the
  paths and extrapolated to all of them (said so in the table: one start-up per file is the cost);
- one Python process that loads every file: `torch.load(weights_only=True)` for torch files,
  `safetensors.torch.load_file` for safetensors and for each shard (what a user writes by hand).
`surgery` runs as `python -m cli.main` from this checkout. Exit status 0 when every case ran.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from foundation import compile_checkout  # bench/ is this script's folder, first on sys.path

REPO = Path(__file__).resolve().parent.parent
SURGERY = [sys.executable, "-m", "cli.main"]
GOAL = 200.0  # files per second for the one-call scan

GENERATE = r"""
import json, random, sys, torch
from pathlib import Path
from safetensors.torch import save_file
root, n = Path(sys.argv[1]), int(sys.argv[2])
random.seed(0)
def state_dict(i):
    sd = {}
    for j in range((8, 20, 60)[i % 3] // 2):
        c = 8 + 8 * (j % 4)
        sd[f"layers.{j}.weight"] = torch.randn(c, c, 3, 3)
        sd[f"layers.{j}.bias"] = torch.zeros(c)
    return sd
for i in range(n):
    sd, kind = state_dict(i), ("safetensors", "zip", "legacy", "sharded", "safetensors", "zip")[i % 6]
    group = root / f"team{i % 10}" / f"run{i // 10:03d}"
    group.mkdir(parents=True, exist_ok=True)
    if i % 2 == 0:
        (group / "config.json").write_text(json.dumps({"arch": "convnet", "lr": 0.1, "seed": i}))
    if i % 4 == 1:
        (group / "train.log").write_text("".join(f"epoch {e} loss {1 / (e + 1):.4f}\n" for e in range(90)))
    if kind == "safetensors":
        save_file(sd, str(group / f"m{i:04d}.safetensors"))
    elif kind == "zip":  # one in four named as many zoos name them: .tar
        torch.save(sd, group / f"m{i:04d}.{'tar' if i % 12 == 1 else 'pt'}")
    elif kind == "legacy":  # every other one .th, as the CIFAR ResNets of 2018
        torch.save(sd, group / f"m{i:04d}.{'th' if i % 12 == 2 else 'pth'}", _use_new_zipfile_serialization=False)
    else:
        folder = group / f"m{i:04d}"
        folder.mkdir()
        names = list(sd)
        halves = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
                  "model-00002-of-00002.safetensors": names[len(names) // 2:]}
        for fname, keys in halves.items():
            save_file({k: sd[k] for k in keys}, str(folder / fname))
        wm = {k: f for f, keys in halves.items() for k in keys}
        (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))
"""

LOAD_ALL = r"""
import sys, time
from pathlib import Path
import torch
from safetensors.torch import load_file
n = 0
for line in open(sys.argv[1]):
    p = Path(line.strip())
    if p.is_dir():
        sd = {}
        for shard in sorted(p.glob("*.safetensors")):
            sd.update(load_file(str(shard)))
    elif p.suffix == ".safetensors":
        sd = load_file(str(p))
    else:
        sd = torch.load(p, weights_only=True, map_location="cpu")
    n += sum(t.numel() for t in sd.values()) > 0
print(n)
"""


def run(cmd: list[str], capture: bool = False) -> tuple[float, float, int, str, str]:
    """(wall s, CPU s of the child and of the children it reaped, exit code, stdout, stderr).

    The child is reaped with os.wait4 for its own rusage (RUSAGE_CHILDREN would add up every run)."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        t = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=out if capture else subprocess.DEVNULL, stderr=err)
        _, status, ru = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        return wall, ru.ru_utime + ru.ru_stime, proc.returncode, out.read(), err.read()


def make_zoo(zoo: Path, files: int) -> tuple[list[str], int]:
    """The checkpoints of the zoo (``files`` of them, by the scan's own walk) and how many other
    files it holds (configs and logs, which the scan sniffs and skips)."""
    stamp = zoo / ".files"
    version = f"{files} with configs and logs"
    if not (stamp.is_file() and stamp.read_text() == version):
        shutil.rmtree(zoo, ignore_errors=True)
        zoo.mkdir(parents=True)
        subprocess.run([sys.executable, "-c", GENERATE, str(zoo), str(files)], check=True)
        stamp.write_text(version)
    sys.path.insert(0, str(REPO))
    from surgery.inspection.zoo_scan import expand

    found = expand([zoo])
    others = (files + 1) // 2 + (files + 2) // 4  # config.json for even i, train.log for i % 4 == 1
    if len(found.paths) != files or len(found.skipped) != others:
        raise SystemExit(f"ERROR: the scan finds {len(found.paths)} checkpoints and skips {len(found.skipped)} files; "
                         f"the zoo holds {files} and {others}")
    return found.paths, others


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--files", type=int, default=1000)
    ap.add_argument("--sample", type=int, default=50, help="paths the shell loop is timed on")
    ap.add_argument("--workdir", type=Path, default=REPO / "bench" / "out")
    ap.add_argument("--keep", action="store_true", help="keep the generated zoo")
    args = ap.parse_args()
    zoo = args.workdir / "zoo"
    paths, others = make_zoo(zoo, args.files)
    n = len(paths)
    listing = args.workdir / "zoo-paths.txt"
    listing.write_text("".join(p + "\n" for p in paths))
    sample = paths[:: max(1, n // args.sample)][: args.sample]
    compile_checkout()  # the .pyc files, which PYTHONDONTWRITEBYTECODE=1 keeps a run from writing
    run([*SURGERY, "inspect", str(zoo), "--json"])  # warm the page cache
    rows: list[tuple[str, int, float, float, str]] = []
    for label, extra in (("surgery inspect ZOO --json (one call)", []),
                         ("surgery inspect ZOO --json --workers 1", ["--workers", "1"])):
        wall, cpu, rc, out, err = run([*SURGERY, "inspect", str(zoo), "--json", *extra], capture=True)
        lines = [json.loads(x) for x in out.splitlines()]
        bad = [x for x in lines if "error" in x]
        if rc != 0 or len(lines) != n or bad:
            print(f"ERROR: {label}: exit {rc}, {len(lines)} lines, {len(bad)} errors {err[-300:]}")
            return 1
        rows.append((label, n, wall, cpu, "measured"))
    loop = "for p in \"$@\"; do " + shlex.join(SURGERY) + " inspect \"$p\" --json >/dev/null || exit 1; done"
    wall, cpu, rc, _, err = run(["bash", "-c", loop, "loop", *sample])
    if rc:
        print(f"ERROR: shell loop: {err[-300:]}")
        return 1
    k = n / len(sample)
    rows.append(("bash loop of single surgery inspect --json", n, wall * k, cpu * k,
                 f"{len(sample)} timed, x{k:.0f}"))
    wall, cpu, rc, out, err = run([sys.executable, "-c", LOAD_ALL, str(listing)], capture=True)
    if rc or int(out.strip() or 0) != n:
        print(f"ERROR: load loop: {err[-300:]}")
        return 1
    rows.append(("python loop: torch.load(weights_only=True)/load_file", n, wall, cpu, "measured"))
    report(rows, n, others, args, zoo)
    if not args.keep:
        shutil.rmtree(zoo, ignore_errors=True)
    return 0


def report(rows, n: int, others: int, args, zoo: Path) -> None:
    one = rows[0][2]
    load = os.getloadavg()[0]
    print(f"{n} checkpoints and {others} other files (sniffed, skipped) in {zoo}; {platform.machine()}, "
          f"{os.cpu_count()} CPUs, load average {load:.1f}, Python {platform.python_version()}")
    print(f"{'case':52} {'files':>5} {'wall s':>8} {'files/s':>8} {'CPU s':>8} {'files/CPU-s':>11} {'vs one call':>11}  how")
    for label, files, wall, cpu, how in rows:
        print(f"{label:52} {files:5d} {wall:8.2f} {files / wall:8.1f} {cpu:8.2f} {files / cpu:11.1f} "
              f"{wall / one:10.1f}x  {how}")
    rate, busy = n / one, n / rows[0][3]
    print(f"goal >= {GOAL:.0f} files/s for the one-call scan on 2 cores: {rate:.0f} files/s measured here "
          f"({'met' if rate >= GOAL else 'not met'}); CPU time allows {busy:.0f} files/s per idle core")
    (args.workdir / "zoo.json").write_text(json.dumps({
        "files": n, "other_files": others, "cpus": os.cpu_count(), "loadavg": load, "argv": sys.argv,
        "rows": [dict(zip(("case", "files", "wall_s", "cpu_s", "how"), r)) for r in rows]}, indent=2))


if __name__ == "__main__":
    sys.exit(main())
