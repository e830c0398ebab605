"""Several processes: torchrun's environment, the process group, DDP wrapping, reductions.

Under ``torchrun --nproc-per-node N`` (WORLD_SIZE, RANK, LOCAL_RANK set) :func:`setup` starts
the process group (gloo on the CPU, nccl on CUDA). Rank 0 alone logs and writes files.
:func:`relaunch` is what ``surgery train --nproc N`` does: it starts the caller's entry point
(a module, given by the caller) under torchrun.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

from ..errors import TrainError
from ..launch import import_root, module_command

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torch import nn


@dataclass
class DistInfo:
    world_size: int = 1
    rank: int = 0
    local_rank: int = 0
    started: bool = False  # this module started the group (and tears it down)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def is_main_process() -> bool:
    """Rank 0, or no torchrun at all: the process that reports (from the environment only)."""
    return env().is_main


def env() -> DistInfo:
    """World size, rank and local rank from torchrun's environment (1, 0, 0 when absent)."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError:
        world, rank, local = 1, 0, 0
    return DistInfo(world, rank, local)


def setup(device_type: str) -> DistInfo:
    """Start the process group when launched by torchrun with more than one process."""
    import torch
    import torch.distributed as dist

    info = env()
    if not info.enabled:
        return info
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_world_size(), dist.get_rank(), info.local_rank, False)
    backend = "nccl" if device_type == "cuda" else "gloo"
    if device_type == "cuda":
        torch.cuda.set_device(info.local_rank)
    dist.init_process_group(backend)
    info.started = True
    return info


def teardown(info: DistInfo) -> None:
    import torch.distributed as dist

    if info.started and dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.enabled:
        import torch.distributed as dist

        dist.barrier()


def all_reduce_sum(info: DistInfo, values: Sequence[float], device: Any = "cpu") -> list[float]:
    """Sum of ``values`` over ranks (float64), one collective for the lot."""
    if not info.enabled:
        return [float(v) for v in values]
    import torch
    import torch.distributed as dist

    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def all_reduce_tensor(info: DistInfo, t: "torch.Tensor") -> "torch.Tensor":
    if info.enabled:
        import torch.distributed as dist

        dist.all_reduce(t)
    return t


def wrap(model: "nn.Module", info: DistInfo, device: "torch.device") -> "nn.Module":
    """DDP around ``model`` (only the parameters that train now are synchronised: call again
    after unfreezing)."""
    if not info.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids, broadcast_buffers=True)


def launch_command(nproc: int, argv: Sequence[str], module: str) -> list[str]:
    """A one-node torchrun launch of ``module`` (the caller's entry point, e.g. its ``train``
    command) with ``argv``: torchrun and every worker start through
    :func:`surgery.launch.module_command`, so nothing is imported from the working directory."""
    root = import_root(module)
    worker = module_command(module, argv, root=root)
    return module_command("torch.distributed.run", ["--standalone", f"--nproc-per-node={nproc}", "--no-python",
                                                    *worker], root=import_root("torch"))


def strip_nproc(argv: Sequence[str]) -> list[str]:
    """``argv`` without ``--nproc N`` / ``--nproc=N``."""
    out: list[str] = []
    skip = False
    for a in argv:
        if skip:
            skip = False
            continue
        if a == "--nproc":
            skip = True
            continue
        if a.startswith("--nproc="):
            continue
        out.append(a)
    return out


def relaunch(nproc: int, argv: Sequence[str], entry: str) -> int:
    """Run ``entry`` (the caller's module, e.g. its ``train`` command) in ``nproc`` processes under
    torchrun, with ``argv`` less its ``--nproc``; the launcher's exit status. One thread per
    process unless OMP_NUM_THREADS says otherwise."""
    if nproc < 1:
        raise TrainError(f"--nproc must be at least 1, got {nproc}")
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    return subprocess.run(launch_command(nproc, strip_nproc(argv), module=entry), env=env).returncode
