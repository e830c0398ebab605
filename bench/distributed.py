"""Peak memory of consolidating a DCP checkpoint saved in ranks' chunks: `surgery.remap(dcp, out.safetensors)`
against torch's `dcp_to_torch_save(dcp, out.pt)`, at two model sizes in the same run.

    .venv/bin/python bench/distributed.py                        # 128 MB and 512 MB, 8 MB tensors, 4 ranks
    .venv/bin/python bench/distributed.py --sizes 64,1024 --tensor-mb 16 --keep /tmp/dcp-bench

Every measured step runs in its own child process (`sys.executable -c ...`) that prints its own
``ru_maxrss`` after its imports and at the end, and the seconds of the call itself. The parent never
imports torch before the last measured run: Linux folds the parent's RSS into a child's ``ru_maxrss``
at exec, so the folders are written by a child too. "Above import" is a child's peak minus its own
high-water mark after its imports (torch's converter imports torch.distributed, ~45 MB more than
``import torch``). After the runs the parent checks that each safetensors output equals torch's
output tensor by tensor. MB here is MiB. The exit status is 1 when a run fails or an output differs.
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

_REPORT = ("import json, resource, sys, time\n"
           "kb = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n")
FLOOR = _REPORT + "import torch, surgery.formats\nprint(json.dumps({'peak_kb': kb(), 'torch': torch.__version__}))\n"
SURGERY = _REPORT + (
    "import torch, surgery.formats\nfrom surgery import remap\n"
    "imp, t = kb(), time.perf_counter()\nremap(sys.argv[1], sys.argv[2])\n"
    "print(json.dumps({'import_kb': imp, 'peak_kb': kb(), 'seconds': time.perf_counter() - t}))\n")
BASELINE = _REPORT + (
    "import torch\nfrom torch.distributed.checkpoint.format_utils import dcp_to_torch_save\n"
    "imp, t = kb(), time.perf_counter()\ndcp_to_torch_save(sys.argv[1], sys.argv[2])\n"
    "print(json.dumps({'import_kb': imp, 'peak_kb': kb(), 'seconds': time.perf_counter() - t}))\n")


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


# ---------------------------------------------------------------- measuring


def child_env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def run_child(argv: list[str]) -> dict:
    """Run a child after flushing earlier writes (untimed); its last stdout line is its JSON report."""
    os.sync()
    p = subprocess.run(argv, cwd=REPO, env=child_env(), capture_output=True, text=True)
    if p.returncode != 0:
        tail = (p.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise RuntimeError(f"{' '.join(argv[:3])}...: exit {p.returncode}: {tail[:300]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def measure_size(work: Path, mb: int, args: argparse.Namespace) -> dict:
    src = work / f"dcp-{mb}"
    facts = run_child([sys.executable, __file__, "--build-into", str(src), "--total-mb", str(mb),
                       "--tensor-mb", str(args.tensor_mb), "--ranks", str(args.ranks)])
    on_disk = sum(f.stat().st_size for f in src.iterdir()) / MB
    print(f"  {mb} MB: built {facts['tensors']} tensors in {facts['chunks']} chunks ({on_disk:.0f} MB on disk)", flush=True)
    st, pt = work / f"out-{mb}.safetensors", work / f"out-{mb}.pt"
    res = {**facts, "src": str(src), "st": str(st), "pt": str(pt)}
    for key, code, dst in (("surgery", SURGERY, st), ("baseline", BASELINE, pt)):
        r = run_child([sys.executable, "-c", code, str(src), str(dst)])
        r["above_mb"] = (r["peak_kb"] - r["import_kb"]) / 1024
        res[key] = r
        print(f"  {mb} MB: {key:<8s} peak {r['peak_kb'] / 1024:7.1f} MB, {r['above_mb']:7.1f} MB above its imports, "
              f"{r['seconds']:.2f} s", flush=True)
    if not args.keep:
        shutil.rmtree(src)
    return res


def check_same(st: str, pt: str) -> str:
    """'yes (N)' when the safetensors output holds the same names, dtypes and values as torch's."""
    import torch
    from safetensors.torch import load_file

    ours, ref = load_file(st), torch.load(pt, weights_only=True, mmap=True)
    if set(ours) != set(ref):
        return f"NO: names differ ({sorted(set(ours) ^ set(ref))[:3]})"
    for k, t in ref.items():
        if ours[k].dtype != t.dtype or not torch.equal(ours[k], t):
            return f"NO: {k} differs"
    return f"yes ({len(ref)})"


# ---------------------------------------------------------------- report


def print_table(rows: list[dict], floor_mb: float) -> None:
    head = ("total MB", "largest MB", "tensors/chunks", "surgery above import MB", "dcp_to_torch_save above import MB",
            "ratio", "surgery s", "dcp_to_torch_save s", "same")
    body = [(f"{r['total_mb']:.1f}", f"{r['largest_mb']:.1f}", f"{r['tensors']}/{r['chunks']}",
             f"{r['surgery']['above_mb']:.1f}", f"{r['baseline']['above_mb']:.1f}",
             f"{r['surgery']['above_mb'] / r['baseline']['above_mb']:.3f}",
             f"{r['surgery']['seconds']:.2f}", f"{r['baseline']['seconds']:.2f}", r["same"]) for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(head)]
    print()
    for cells in (head, tuple("-" * w for w in widths), *body):
        print("| " + " | ".join(c.rjust(w) for c, w in zip(cells, widths)) + " |")
    print(f"\nimport floor (`import torch, surgery.formats`): {floor_mb:.1f} MB peak RSS; ratio = surgery / dcp_to_torch_save")
    for r in rows:
        bound = r["largest_mb"] * 4 + 64
        s = r["surgery"]["above_mb"]
        print(f"claim at {r['total_mb']:.0f} MB: surgery's peak above import {s:.1f} MB <= largest tensor x 4 + 64 MB = "
              f"{bound:.1f} MB: {'HOLDS' if s <= bound else 'FAILS'}; "
              f"{r['baseline']['above_mb'] / max(s, 0.1):.1f}x less than dcp_to_torch_save")
    if len(rows) > 1:
        a, b = rows[0], rows[-1]
        print(f"from {a['total_mb']:.0f} to {b['total_mb']:.0f} MB: surgery's peak above import moved "
              f"{b['surgery']['above_mb'] - a['surgery']['above_mb']:+.1f} MB, dcp_to_torch_save's "
              f"{b['baseline']['above_mb'] - a['baseline']['above_mb']:+.1f} MB")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", "--total-mb", default="128,512",
                   help="model sizes in MB, comma-separated, each a DCP folder of its own (default 128,512)")
    p.add_argument("--tensor-mb", type=int, default=8, help="size of each large float32 tensor (default 8)")
    p.add_argument("--ranks", type=int, default=4, help="ranks the tensors are sharded over, Shard(0) (default 4)")
    p.add_argument("--keep", metavar="DIR", help="work in DIR and keep the folders and outputs (default: a temp dir, removed)")
    p.add_argument("--build-into", metavar="DIR", help=argparse.SUPPRESS)  # the builder child
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.build_into:
        sys.path.insert(0, str(REPO))
        print(json.dumps(build_dcp(Path(args.build_into), int(args.sizes), args.tensor_mb, args.ranks)))
        return 0
    sizes = [int(s) for s in args.sizes.split(",")]
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="surgery-dcp-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"machine: {os.cpu_count()} cores, {platform.python_version()}, {work}", flush=True)
    try:
        floor = run_child([sys.executable, "-c", FLOOR])
        print(f"  import floor: {floor['peak_kb'] / 1024:.1f} MB (torch {floor['torch']})", flush=True)
        rows = [measure_size(work, mb, args) for mb in sizes]
        for r in rows:  # the parent imports torch only now, after every measured run
            r["same"] = check_same(r["st"], r["pt"])
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
