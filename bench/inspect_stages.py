"""Where `surgery inspect FILE` spends its CPU time, stage by stage, without a profiler's overhead.

Each stage's function is wrapped in a timer (``time.process_time``, this process's CPU time), then
the CLI runs in this process as ``surgery inspect FILE`` would; its output is swallowed. Stages
nest: ``read_zip`` holds the zip index, the pre-scan and the unpickling.

    python bench/inspect_stages.py FILE [FILE ...]
    python bench/inspect_stages.py --make flat --count 50000   # writes bench/out/small_flat_50000x4.pt first

The files --make writes are bench/foundation.py's 'small' files (same key shapes, same tensors).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import io
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
STAGES = (  # (module, function, what it does), in the order they run
    ("surgery.formats.zip_index", "ZipIndex", "zip central directory"),
    ("surgery.formats.pickle_scan", "scan", "pickle pre-scan (bounds)"),
    ("surgery.formats.torch_pickle", "_load", "unpickling, records checked"),
    ("surgery.formats.record_checks", "check_records", "  of which: record checks"),
    ("surgery.formats.torch_zip", "_storage_offsets", "storage offsets"),
    ("surgery.formats.torch_zip", "read_zip", "read_zip (all the above)"),
    ("surgery.formats.torch_zip", "checkpoint_from_pickle", "TensorInfo records"),
    ("surgery.inspection.key_analysis", "module_tree", "module tree"),
    ("surgery.inspection.arch_guess", "known_architectures", "architecture guess"),
    ("surgery.inspection.inspect_report", "_report", "report (tree, guess, prefixes)"),
    ("cli.inspect_cmd", "render", "rendering (totals, rich)"),
)


def _timed(spent: dict[str, float], label: str, fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        start = time.process_time()
        try:
            return fn(*args, **kwargs)
        finally:
            spent[label] = spent.get(label, 0.0) + time.process_time() - start
    return wrapper


def stages(path: str) -> tuple[float, dict[str, float], int]:
    """CPU seconds of the whole command, of each stage, and the lines it printed."""
    import cli.main

    spent: dict[str, float] = {}
    for mod_name, attr, _ in STAGES:
        importlib.import_module(mod_name)
    for mod_name, attr, label in STAGES:
        fn = getattr(sys.modules[mod_name], attr)
        timed = _timed(spent, label, fn)
        for mod in list(sys.modules.values()):  # and wherever `from X import fn` bound it
            if getattr(mod, "__name__", "").startswith(("surgery", "cli")) and getattr(mod, attr, None) is fn:
                setattr(mod, attr, timed)
    out = io.StringIO()
    start = time.process_time()
    with contextlib.redirect_stdout(out):
        try:
            cli.main.app(["inspect", path], standalone_mode=False)
        except SystemExit:
            pass
    return time.process_time() - start, spent, out.getvalue().count("\n")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("files", nargs="*")
    p.add_argument("--make", choices=("dotted", "flat", "nested"), help="write a bench/foundation.py 'small' file first")
    p.add_argument("--count", type=int, default=50_000)
    args = p.parse_args()
    files = list(args.files)
    if args.make:
        sys.path.insert(0, str(REPO / "bench"))
        import foundation

        path = REPO / "bench" / "out" / f"small_{args.make}_{args.count}x{foundation.SMALL_SHAPE}.pt"
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists():
            subprocess.run([sys.executable, "-c", foundation.MAKE_SMALL % foundation.KEY_SHAPES[args.make], str(path),
                            str(args.count)], check=True)
        files.append(str(path))
    if len(files) != 1:
        p.error("give one FILE (or --make); the stages of one process are one file's")
    start = time.process_time()
    total, spent, lines = stages(files[0])
    print(f"{files[0]}: {total:.3f} s CPU in the command ({lines} lines printed), "
          f"{time.process_time() - start - total:.3f} s importing the CLI before it")
    for _, _, label in STAGES:
        if label in spent:
            print(f"  {label:32s} {spent[label]:7.3f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
