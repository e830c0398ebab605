"""Peak memory and time of consolidating checkpoints saved by ranks: `surgery.remap(SRC, out.safetensors)`
against the framework's own converter in the same run: torch's `dcp_to_torch_save` for DCP folders,
DeepSpeed's `convert_zero_checkpoint_to_fp32_state_dict` (zero_to_fp32) for ZeRO folders.

    .venv/bin/python bench/distributed.py                  # the default cases below, ~10 min on 2 cores
    .venv/bin/python bench/distributed.py --cases dcp:512:4,zero3:256:2 --tensor-mb 16 --keep /tmp/dcp-bench

A case is KIND:MB:RANKS, KIND one of `dcp` (FSDP2's Shard(0) pieces in torch's FileSystemWriter
layout), `zero2` and `zero3` (DeepSpeed's ZeRO-2/3 folder, as `fixtures/zero_save.py` writes it; the
zero cases need deepspeed installed, else they are skipped). Every measured step runs in its own
child process (`sys.executable -c ...`) that prints its own ``ru_maxrss`` after its imports and at
the end, and the seconds of the call itself. The parent never imports torch before the last measured
run: Linux folds the parent's RSS into a child's ``ru_maxrss`` at exec, so the folders are written by
a child too. "Above import" is a child's peak minus its own high-water mark after its imports. After
the runs the parent checks that each surgery output equals the reference's output tensor by tensor.
MB is MiB. The exit status is 1 when a run fails or an output differs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MB = 1024 * 1024
COLS = 1024  # float32 columns of every large tensor: 8 MB is [2048, 1024]
DEFAULT_CASES = "dcp:1024:2,dcp:1024:4,dcp:4096:2,dcp:4096:4,zero2:1024:2,zero3:1024:2"

_REPORT = ("import json, resource, sys, time\n"
           "kb = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n")
_TIMED = ("imp, t = kb(), time.perf_counter()\n{call}\nseconds = time.perf_counter() - t\n"
          "import os\nos.sync()\n"  # until the output is on disk: surgery fsyncs its own, the references do not
          "print(json.dumps({{'import_kb': imp, 'peak_kb': kb(), 'seconds': seconds, "
          "'on_disk': time.perf_counter() - t}}))\n")
FLOOR = _REPORT + "import torch, surgery.formats\nprint(json.dumps({'peak_kb': kb(), 'torch': torch.__version__}))\n"
SURGERY = _REPORT + "import torch, surgery.formats\nfrom surgery import remap\n" + _TIMED.format(
    call="remap(sys.argv[1], sys.argv[2])")
DCP_BASELINE = _REPORT + "import torch\nfrom torch.distributed.checkpoint.format_utils import dcp_to_torch_save\n" + \
    _TIMED.format(call="dcp_to_torch_save(sys.argv[1], sys.argv[2])")
ZERO_BASELINE = _REPORT + ("import torch\nfrom deepspeed.utils.zero_to_fp32 import convert_zero_checkpoint_to_fp32_state_dict\n"
                           + _TIMED.format(call="convert_zero_checkpoint_to_fp32_state_dict(sys.argv[1], sys.argv[2], "
                                                "max_shard_size=None, safe_serialization=True)"))
REFERENCE = {"dcp": ("dcp_to_torch_save", DCP_BASELINE), "zero2": ("zero_to_fp32", ZERO_BASELINE),
             "zero3": ("zero_to_fp32", ZERO_BASELINE)}


# ---------------------------------------------------------------- the DCP folder (built in a child)


def layout(total_mb: int, tensor_mb: int, ranks: int) -> list[tuple[str, tuple[int, ...]]]:
    """Names and shapes: ``total_mb / tensor_mb`` large weights (every other one a few rows short, so
    its last rank's chunk is short), a bias per layer, and small tensors with an odd row count (one
    whose last rank holds nothing)."""
    rows = max(ranks, round(tensor_mb * MB / 4 / COLS))
    out = []
    for i in range(max(1, round(total_mb / tensor_mb))):
        out.append((f"layers.{i}.weight", (rows - (3 if i % 2 else 0), COLS)))
        out.append((f"layers.{i}.bias", (COLS,)))
    out += [("norm.weight", (1001,)), ("head.weight", (ranks + 1, COLS))]
    return out


def build_dcp(folder: Path, total_mb: int, tensor_mb: int, ranks: int) -> dict:
    """Write the folder as torch's FileSystemWriter lays it out (``fixtures.distributed``'s layout,
    streamed): chunk i of each ``Shard(0)`` tensor ``torch.save``d into rank i's ``__i_0.distcp``,
    one tensor in memory at a time, and ``.metadata`` pickled from torch's own classes."""
    import pickle

    import torch
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import (ChunkStorageMetadata, Metadata, MetadataIndex,
                                                       TensorProperties, TensorStorageMetadata)

    from fixtures.distributed import shard_boxes

    folder.mkdir(parents=True)
    files = [open(folder / f"__{r}_0.distcp", "wb") for r in range(ranks)]
    gen = torch.Generator().manual_seed(total_mb)
    sd_meta, storage, planner = {}, {}, {}
    total = largest = chunks = 0
    for name, shape in layout(total_mb, tensor_mb, ranks):
        t = torch.randn(shape, generator=gen)
        metas = []
        for i, (offsets, sizes) in enumerate(shard_boxes(shape, ranks)):
            f = files[i % ranks]
            start = f.tell()
            torch.save(t[tuple(slice(o, o + s) for o, s in zip(offsets, sizes))].clone(), f)
            storage[MetadataIndex(name, torch.Size(offsets), 0)] = _StorageInfo(f"__{i % ranks}_0.distcp", start,
                                                                                f.tell() - start)
            metas.append(ChunkStorageMetadata(torch.Size(offsets), torch.Size(sizes)))
        sd_meta[name] = TensorStorageMetadata(TensorProperties(dtype=t.dtype), t.shape, metas)
        planner[name] = (name,)
        total, largest, chunks = total + t.nbytes, max(largest, t.nbytes), chunks + len(metas)
    for f in files:
        f.close()
    md = Metadata(state_dict_metadata=sd_meta, planner_data=planner, storage_data=storage)
    (folder / ".metadata").write_bytes(pickle.dumps(md))
    return {"total_mb": total / MB, "largest_mb": largest / MB, "tensors": len(sd_meta), "chunks": chunks}


def build_zero(folder: Path, stage: int, total_mb: int, tensor_mb: int, ranks: int) -> dict:
    """The folder DeepSpeed's ``engine.save_checkpoint`` writes at ZeRO ``stage`` for the same
    layout of fp32 weights (``fixtures.zero_save.write_zero``, one param group) and one buffer."""
    import torch

    from fixtures.zero_save import write_zero

    gen = torch.Generator().manual_seed(total_mb)
    weights = {name: torch.randn(shape, generator=gen) for name, shape in layout(total_mb, tensor_mb, ranks)}
    write_zero(folder, stage, weights, {"norm.running": torch.randn(1001, generator=gen)}, ranks=ranks)
    total = sum(t.nbytes for t in weights.values())
    return {"total_mb": total / MB, "largest_mb": max(t.nbytes for t in weights.values()) / MB,
            "tensors": len(weights) + 1, "chunks": (len(weights) if stage == 3 else 1) * ranks}


# ---------------------------------------------------------------- measuring


def child_env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "DS_ACCELERATOR": "cpu"}


def run_child(argv: list[str]) -> dict:
    """Run a child after flushing earlier writes (untimed); its last stdout line is its JSON report."""
    os.sync()
    p = subprocess.run(argv, cwd=REPO, env=child_env(), capture_output=True, text=True)
    if p.returncode != 0:
        tail = (p.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise RuntimeError(f"{' '.join(argv[:3])}...: exit {p.returncode}: {tail[:300]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def measure_case(work: Path, case: str, args: argparse.Namespace) -> dict:
    kind, mb, ranks = case.split(":")
    src = work / f"{kind}-{mb}-{ranks}"
    facts = run_child([sys.executable, __file__, "--build-into", str(src), "--cases", case, "--tensor-mb", str(args.tensor_mb)])
    on_disk = sum(f.stat().st_size for f in src.rglob("*") if f.is_file()) / MB
    print(f"  {case}: built {facts['tensors']} tensors in {facts['chunks']} pieces ({on_disk:.0f} MB on disk)", flush=True)
    ref_name, ref_code = REFERENCE[kind]
    st, ref = work / f"out-{case.replace(':', '-')}.safetensors", work / f"ref-{case.replace(':', '-')}"
    if kind == "dcp":
        ref = ref.with_suffix(".pt")
    res = {**facts, "case": case, "reference": ref_name, "src": str(src), "st": str(st), "ref": str(ref)}
    for key, code, dst in (("surgery", SURGERY, st), ("baseline", ref_code, ref)):
        r = run_child([sys.executable, "-c", code, str(src), str(dst)])
        r["above_mb"] = (r["peak_kb"] - r["import_kb"]) / 1024
        res[key] = r
        name = "surgery" if key == "surgery" else ref_name
        print(f"  {case}: {name:<17s} peak {r['peak_kb'] / 1024:7.1f} MB, {r['above_mb']:7.1f} MB above its imports, "
              f"{r['seconds']:.2f} s ({r['on_disk']:.2f} s with its output on disk)", flush=True)
    if not args.keep:
        shutil.rmtree(src)
    return res


def check_same(st: str, ref_path: str) -> str:
    """'yes (N)' when the safetensors output holds the same names, dtypes and values as the reference's."""
    import torch
    from safetensors.torch import load_file

    p = Path(ref_path)
    ours = load_file(st)
    ref = load_file(p / "model.safetensors") if p.is_dir() else torch.load(p, weights_only=True, mmap=True)
    if set(ours) != set(ref):
        return f"NO: names differ ({sorted(set(ours) ^ set(ref))[:3]})"
    for k, t in ref.items():
        if ours[k].dtype != t.dtype or not torch.equal(ours[k], t):
            return f"NO: {k} differs"
    return f"yes ({len(ref)})"


# ---------------------------------------------------------------- report


def print_table(rows: list[dict], floor_mb: float) -> None:
    head = ("case", "total MB", "largest MB", "tensors/pieces", "reference", "surgery above import MB",
            "reference above import MB", "RSS ratio", "surgery s", "reference s", "time ratio",
            "time ratio on disk", "same")
    body = [(r["case"], f"{r['total_mb']:.1f}", f"{r['largest_mb']:.1f}", f"{r['tensors']}/{r['chunks']}", r["reference"],
             f"{r['surgery']['above_mb']:.1f}", f"{r['baseline']['above_mb']:.1f}",
             f"{r['surgery']['above_mb'] / r['baseline']['above_mb']:.3f}",
             f"{r['surgery']['seconds']:.2f}", f"{r['baseline']['seconds']:.2f}",
             f"{r['surgery']['seconds'] / r['baseline']['seconds']:.2f}",
             f"{r['surgery']['on_disk'] / r['baseline']['on_disk']:.2f}", r["same"]) for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(head)]
    print()
    for cells in (head, tuple("-" * w for w in widths), *body):
        print("| " + " | ".join(c.rjust(w) for c, w in zip(cells, widths)) + " |")
    print(f"\nimport floor (`import torch, surgery.formats`): {floor_mb:.1f} MB peak RSS; ratios = surgery / reference; "
          f"'on disk': each call followed by os.sync() (surgery fsyncs its output before it returns, the references do not)")
    for r in rows:
        bound = r["largest_mb"] * 4 + 64
        s, ref = r["surgery"]["above_mb"], r["baseline"]["above_mb"]
        t = r["surgery"]["seconds"] / r["baseline"]["seconds"]
        print(f"{r['case']}: peak above import {s:.1f} MB <= largest tensor x 4 + 64 MB = {bound:.1f} MB: "
              f"{'HOLDS' if s <= bound else 'FAILS'}; RSS {s / ref:.3f}x of {r['reference']} (goal 0.35x): "
              f"{'HOLDS' if s <= 0.35 * ref else 'FAILS'}; time {t:.2f}x (goal 1.2x): {'HOLDS' if t <= 1.2 else 'FAILS'}")
    for a in rows:  # flat as the model grows: the same kind and ranks at a larger size
        for b in rows:
            if a["case"].split(":")[::2] == b["case"].split(":")[::2] and b["total_mb"] > a["total_mb"]:
                print(f"{a['case']} -> {b['case']}: surgery's peak above import moved "
                      f"{b['surgery']['above_mb'] - a['surgery']['above_mb']:+.1f} MB, {a['reference']}'s "
                      f"{b['baseline']['above_mb'] - a['baseline']['above_mb']:+.1f} MB")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", default=DEFAULT_CASES,
                   help=f"KIND:MB:RANKS, comma-separated; KIND dcp, zero2 or zero3 (default {DEFAULT_CASES})")
    p.add_argument("--tensor-mb", type=int, default=8, help="size of each large float32 tensor (default 8)")
    p.add_argument("--keep", metavar="DIR", help="work in DIR and keep the folders and outputs (default: a temp dir, removed)")
    p.add_argument("--build-into", metavar="DIR", help=argparse.SUPPRESS)  # the builder child
    return p.parse_args(argv)


def build(folder: Path, case: str, tensor_mb: int) -> dict:
    kind, mb, ranks = case.split(":")
    if kind == "dcp":
        return build_dcp(folder, int(mb), tensor_mb, int(ranks))
    return build_zero(folder, int(kind[-1]), int(mb), tensor_mb, int(ranks))


def usable(cases: list[str]) -> list[str]:
    """The cases this machine can run: a zero case needs deepspeed (its converter is the reference)."""
    import importlib.util

    bad = [c for c in cases if len(c.split(":")) != 3 or c.split(":")[0] not in REFERENCE
           or not all(x.isdigit() for x in c.split(":")[1:])]
    if bad:
        raise SystemExit(f"bench/distributed.py: bad case {bad[0]!r}: expected KIND:MB:RANKS, KIND one of {sorted(REFERENCE)}")
    if importlib.util.find_spec("deepspeed") is None:
        print("  deepspeed is not installed: the zero cases are skipped (pip install deepspeed)")
        return [c for c in cases if not c.startswith("zero")]
    return cases


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.build_into:
        sys.path.insert(0, str(REPO))
        print(json.dumps(build(Path(args.build_into), args.cases, args.tensor_mb)))
        return 0
    cases = usable(args.cases.split(","))
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="surgery-dcp-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"machine: {os.cpu_count()} cores, {platform.python_version()}, {work}", flush=True)
    try:
        floor = run_child([sys.executable, "-c", FLOOR])
        print(f"  import floor: {floor['peak_kb'] / 1024:.1f} MB (torch {floor['torch']})", flush=True)
        rows = []
        for case in cases:
            rows.append(measure_case(work, case, args))
        for r in rows:  # the parent imports torch only now, after every measured run
            r["same"] = check_same(r["st"], r["ref"])
        print_table(rows, floor["peak_kb"] / 1024)
        return 0 if all(r["same"].startswith("yes") for r in rows) else 1
    except RuntimeError as e:
        print(f"ERROR {e}")
        return 1
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
