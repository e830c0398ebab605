"""surgery adapt vs the hand-written fine-tune recipe, both as whole processes in one run.

The recipe is the one tutorials teach: torch.load, strip 'module.', build the model, drop the old
classifier, load_state_dict(strict=False), replace fc, freeze everything else, and save the
result (surgery adapt writes model.safetensors + manifest, so the baseline saves too).
Goal: surgery adapt <= 1.3x the recipe's wall time.

    .venv/bin/python bench/adapt.py [--arch resnet50] [--repeat 3] [--workdir bench/out]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from foundation import REPO, Spec, machine_facts, measure_group  # noqa: E402

RECIPE = """
import sys, torch, torchvision
from safetensors.torch import save_file
ckpt, arch, n, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
sd = torch.load(ckpt, map_location="cpu", weights_only=True)
sd = {k.removeprefix("module."): v for k, v in sd.items()}
sd = {k: v for k, v in sd.items() if not k.startswith("fc.")}
model = getattr(torchvision.models, arch)()
missing, unexpected = model.load_state_dict(sd, strict=False)
model.fc = torch.nn.Linear(model.fc.in_features, n)
for name, p in model.named_parameters():
    p.requires_grad = name.startswith("fc.")
save_file({k: v.contiguous() for k, v in model.state_dict().items()}, out)
print(len(missing), len(unexpected))
"""

# this checkout's CLI (run_once starts it in the repository root), not whatever `surgery` is installed
SURGERY = [sys.executable, "-m", "cli.main"]

MAKE = """
import sys, torch, torchvision
torch.manual_seed(0)
m = torch.nn.DataParallel(getattr(torchvision.models, sys.argv[1])())
torch.save(m.state_dict(), sys.argv[2])
"""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="resnet50")
    ap.add_argument("--num-classes", type=int, default=10)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--workdir", type=Path, default=REPO / "bench" / "out")
    args = ap.parse_args(argv)
    work = args.workdir.resolve() / "adapt"
    work.mkdir(parents=True, exist_ok=True)
    print(f"reproduce: .venv/bin/python bench/adapt.py --arch {args.arch} --repeat {args.repeat}")
    print("machine:  ", ", ".join(f"{k}={v}" for k, v in machine_facts().items()))
    ckpt = work / f"{args.arch}_dataparallel.pth"
    if not ckpt.exists():
        subprocess.run([sys.executable, "-c", MAKE, args.arch, str(ckpt)], check=True)
    print(f"checkpoint: {ckpt.name} ({ckpt.stat().st_size / 1e6:.0f} MB, keys 'module.')")
    out_dir, out_file = work / "adapted", work / "recipe.safetensors"

    def clean() -> None:
        shutil.rmtree(out_dir, ignore_errors=True)
        out_file.unlink(missing_ok=True)

    specs = [
        Spec("surgery adapt", [*SURGERY, "adapt", str(ckpt), "--arch", args.arch, "--num-classes",
                               str(args.num_classes), "--freeze", "head-only", "--out", str(out_dir)]),
        Spec("hand-written recipe", [sys.executable, "-c", RECIPE, str(ckpt), args.arch, str(args.num_classes), str(out_file)]),
        Spec("python -c 'import torch, torchvision'", [sys.executable, "-c", "import torch, torchvision"]),
    ]
    logdir = work / "logs"
    logdir.mkdir(exist_ok=True)
    ms = measure_group(specs, args.repeat, logdir, before=clean)
    surgery, recipe, imports = ms
    result = {"machine": machine_facts(), "arch": args.arch, "runs": [m.to_json() for m in ms]}
    if surgery.wall and recipe.wall:
        ratio = surgery.wall / recipe.wall
        verdict = "PASS" if ratio <= 1.3 else "FAIL"
        print(f"\nsurgery adapt {surgery.wall:.2f} s vs recipe {recipe.wall:.2f} s: {ratio:.2f}x (goal <= 1.3x) {verdict}")
        if imports.wall:
            print(f"both pay {imports.wall:.2f} s for importing torch and torchvision")
        result.update(ratio=ratio, goal=1.3, verdict=verdict)
    (work / "adapt.json").write_text(json.dumps(result, indent=2))
    clean()
    return 0


if __name__ == "__main__":
    sys.exit(main())
