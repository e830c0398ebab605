"""GPU speed check: ResNet-50 at 224 px, batch 128, training steps per second with bf16 autocast +
channels_last (what `surgery train` does on CUDA) against fp32 eager, in one process.

    .venv/bin/python bench/cuda.py [--steps 30] [--batch 128]

Goal: >= 2x images/s. Needs a CUDA device; prints the card's name with the figures. Also runs the
tests marked `cuda` first (`pytest -m cuda`), so one command covers the GPU checks.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def images_per_s(mode: str, steps: int, batch: int) -> float:
    import torch
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet50(num_classes=1000).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randn(batch, 3, 224, 224, device="cuda")
    y = torch.randint(0, 1000, (batch,), device="cuda")
    fast = mode == "bf16+channels_last"
    if fast:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    scaler = torch.amp.GradScaler("cuda") if fast and dtype == torch.float16 else None

    def step() -> None:
        with torch.autocast("cuda", dtype=dtype, enabled=fast):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            opt.step()

    for _ in range(5):  # warm-up: cuDNN autotuning, allocator
        step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    return steps * batch / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--skip-tests", action="store_true")
    args = ap.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("error: no CUDA device; this benchmark measures GPU training speed", file=sys.stderr)
        return 2
    print(f"reproduce: .venv/bin/python bench/cuda.py --steps {args.steps} --batch {args.batch}")
    print(f"device: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, bf16 {torch.cuda.is_bf16_supported()}")
    if not args.skip_tests:
        rc = subprocess.call([sys.executable, "-m", "pytest", "-q", "-m", "cuda", "tests"], cwd=REPO)
        print(f"pytest -m cuda: exit {rc}")
    torch.backends.cudnn.benchmark = True
    eager = images_per_s("fp32 eager", args.steps, args.batch)
    fast = images_per_s("bf16+channels_last", args.steps, args.batch)
    ratio = fast / eager
    print(f"fp32 eager            {eager:8.1f} images/s")
    print(f"bf16 + channels_last  {fast:8.1f} images/s")
    print(f"ratio {ratio:.2f}x (goal >= 2x) {'PASS' if ratio >= 2 else 'FAIL'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
