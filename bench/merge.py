"""Peak memory and time of `surgery.average` against the plain loop users write (timm's
``avg_checkpoints.py``: load each checkpoint whole, accumulate every tensor in float64, divide,
save), and of `surgery.merge_lora` against the plain LoRA merge loop (load the base whole, add
``scale * B @ A`` to each target as peft's get_delta_weight computes it, save), on the same
safetensors inputs in the same run.

    .venv/bin/python bench/merge.py                       # 3 inputs of 1 GB each, 8 MB tensors
    .venv/bin/python bench/merge.py --mb 256 --inputs 2 --keep /tmp/merge-bench
    .venv/bin/python bench/merge.py --only lora --rank 16 # a 1 GB base, a rank-16 adapter on every tensor

Each step runs in its own child process that prints its ``ru_maxrss`` after its imports and at the
end, and the seconds of the call (and until its output is on disk: surgery fsyncs, the loop does
not). The parent imports torch only after the measured runs and checks that both outputs hold the
same tensors. MB is MiB. Exit status 1 when a run fails or the outputs differ.
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
_REPORT = "import json, resource, sys, time\nkb = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
_TIMED = ("imp, t = kb(), time.perf_counter()\n{call}\nseconds = time.perf_counter() - t\nimport os\nos.sync()\n"
          "print(json.dumps({{'import_kb': imp, 'peak_kb': kb(), 'seconds': seconds, 'on_disk': time.perf_counter() - t}}))\n")
SURGERY = _REPORT + "import torch, surgery.formats, surgery.merging.average as a\n" + _TIMED.format(
    call="a.average(sys.argv[2:], sys.argv[1])")
LOOP = _REPORT + ("import torch\nfrom safetensors.torch import load_file, save_file\n"
                  "def run(out, paths):\n"
                  "    acc = {}\n"
                  "    for p in paths:\n"
                  "        for k, v in load_file(p).items():\n"
                  "            acc[k] = acc[k] + v.to(torch.float64) if k in acc else v.to(torch.float64)\n"
                  "    save_file({k: (v / len(paths)).to(torch.float32) for k, v in acc.items()}, out)\n"
                  + _TIMED.format(call="run(sys.argv[1], sys.argv[2:])"))
LORA = _REPORT + "import torch, surgery.formats, surgery.merging.lora as m\n" + _TIMED.format(
    call="m.merge_lora(sys.argv[2], sys.argv[3], sys.argv[1])")
LORA_LOOP = _REPORT + ("import json as js, torch\nfrom safetensors.torch import load_file, save_file\n"
                       "def run(out, base, adapter):\n"
                       "    sd, ad = load_file(base), load_file(adapter + '/adapter_model.safetensors')\n"
                       "    cfg = js.load(open(adapter + '/adapter_config.json'))\n"
                       "    scale = cfg['lora_alpha'] / cfg['r']\n"
                       "    for k in cfg['target_modules']:\n"
                       "        a, b = ad[f'base_model.model.{k}.lora_A.weight'], ad[f'base_model.model.{k}.lora_B.weight']\n"
                       "        sd[k + '.weight'] += (b @ a).mul_(scale)\n"
                       "    save_file(sd, out)\n"
                       + _TIMED.format(call="run(sys.argv[1], sys.argv[2], sys.argv[3])"))
BUILD_ADAPTER = ("import json, os, sys, torch\nfrom safetensors.torch import save_file\n"
                 "mb, tmb, rank, out = map(str, sys.argv[1:5])\n"
                 "g = torch.Generator().manual_seed(7)\nrows, r = int(tmb) * 1024 * 1024 // 4 // 1024, int(rank)\n"
                 "mods = [f'layers.{i}' for i in range(int(mb) // int(tmb))]\nos.makedirs(out, exist_ok=True)\n"
                 "sd = {}\nfor m in mods:\n"
                 "    sd[f'base_model.model.{m}.lora_A.weight'] = torch.randn(r, 1024, generator=g) / 32\n"
                 "    sd[f'base_model.model.{m}.lora_B.weight'] = torch.randn(rows, r, generator=g) / 32\n"
                 "save_file(sd, out + '/adapter_model.safetensors')\n"
                 "json.dump({'peft_type': 'LORA', 'r': r, 'lora_alpha': 2 * r, 'target_modules': mods}, "
                 "open(out + '/adapter_config.json', 'w'))\n")
BUILD = ("import sys, torch\nfrom safetensors.torch import save_file\n"
         "mb, tmb, seed, out = map(str, sys.argv[1:5])\n"
         "g = torch.Generator().manual_seed(int(seed))\nrows = int(tmb) * 1024 * 1024 // 4 // 1024\n"
         "save_file({f'layers.{i}.weight': torch.randn(rows, 1024, generator=g) for i in range(int(mb) // int(tmb))}, out)\n")


def child(argv: list[str]) -> dict:
    os.sync()
    p = subprocess.run(argv, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)},
                       capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"exit {p.returncode}: {(p.stderr.strip().splitlines() or ['?'])[-1][:300]}")
    return json.loads(p.stdout.strip().splitlines()[-1]) if p.stdout.strip() else {}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mb", type=int, default=1024, help="size of each input (default 1024)")
    ap.add_argument("--tensor-mb", type=int, default=8, help="size of each float32 tensor (default 8)")
    ap.add_argument("--inputs", type=int, default=3, help="checkpoints averaged (default 3)")
    ap.add_argument("--rank", type=int, default=16, help="the LoRA adapter's rank (default 16)")
    ap.add_argument("--only", choices=("average", "lora"), help="run one half (default: both)")
    ap.add_argument("--keep", metavar="DIR", help="work in DIR and keep the files (default: a temp dir, removed)")
    args = ap.parse_args()
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="surgery-merge-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"machine: {os.cpu_count()} cores, {platform.python_version()}, {work}", flush=True)
    try:
        inputs = [str(work / f"in{i}.safetensors") for i in range(args.inputs if args.only != "lora" else 1)]
        for i, p in enumerate(inputs):
            child([sys.executable, "-c", BUILD, str(args.mb), str(args.tensor_mb), str(i), p])
        print(f"  built {len(inputs)} input{'s' if len(inputs) > 1 else ''} of {args.mb} MB", flush=True)
        runs = []  # (what, results, exact): every child runs before this process imports torch, whose
        # memory a child's ru_maxrss would otherwise start from (Linux keeps the parent's high-water mark)
        if args.only != "lora":
            res = measure(work, (("surgery average", SURGERY), ("float64 loop", LOOP)), inputs)
            runs.append((f"{args.inputs} inputs x {args.mb} MB", res, True))
        if args.only != "average":
            adapter = str(work / "adapter")
            child([sys.executable, "-c", BUILD_ADAPTER, str(args.mb), str(args.tensor_mb), str(args.rank), adapter])
            res = measure(work, (("surgery merge-lora", LORA), ("merge loop", LORA_LOOP)), [inputs[0], adapter])
            runs.append((f"a {args.mb} MB base + a rank-{args.rank} adapter on each tensor", res, False))
        ok = all([report(res, what, exact) for what, res, exact in runs])
        return 0 if ok else 1
    except RuntimeError as e:
        print(f"ERROR {e}")
        return 1
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


def measure(work: Path, runs: tuple, argv: list[str]) -> dict:
    res = {}
    for name, code in runs:
        out = str(work / f"{name.replace(' ', '-')}.safetensors")
        r = res[name] = child([sys.executable, "-c", code, out, *argv])
        r["out"], r["above_mb"] = out, (r["peak_kb"] - r["import_kb"]) / 1024
        print(f"  {name:<18s} peak {r['peak_kb'] / 1024:8.1f} MB, {r['above_mb']:8.1f} MB above its imports, "
              f"{r['seconds']:.2f} s ({r['on_disk']:.2f} s with its output on disk)", flush=True)
    return res


def report(res: dict, what: str, exact: bool) -> bool:
    """The ratios against the goals; whether both outputs hold the same tensors (within 1e-5 unless exact)."""
    import torch
    from safetensors.torch import load_file

    (sname, s), (_, b) = res.items()
    ours, ref = load_file(s["out"]), load_file(b["out"])
    same = set(ours) == set(ref) and all(torch.equal(ours[k], ref[k]) if exact else
                                         torch.allclose(ours[k], ref[k], rtol=0, atol=1e-5) for k in ref)
    rss, t, disk = s["above_mb"] / b["above_mb"], s["seconds"] / b["seconds"], s["on_disk"] / b["on_disk"]
    print(f"\n{sname}, {what}: {s['above_mb']:.1f} MB above its imports against {b['above_mb']:.1f} MB: "
          f"RSS {rss:.3f}x (goal 0.35x: {'HOLDS' if rss <= 0.35 else 'FAILS'}); time {t:.2f}x (goal 1.2x: "
          f"{'HOLDS' if t <= 1.2 else 'FAILS'}), {disk:.2f}x with the outputs on disk; same tensors"
          f"{'' if exact else ' (1e-5)'}: {'yes' if same else 'NO'}\n", flush=True)
    return same


if __name__ == "__main__":
    sys.exit(main())
