"""Hostile inputs of the reliability bench for checkpoints saved by ranks, beside ``dcp-chunks``:

  zero-parts  DeepSpeed ZeRO-2/3 folders (``fixtures.zero_save.write_zero``) whose records lie: a
              param shape enlarged, shrunk, huge or dropped, a flat partition shortened, lengthened or
              recast, partition_count or zero_stage changed, a rank's file deleted, repeated, a
              symlink (to a sibling, outside the folder, /dev/zero, a FIFO), ``latest`` pointing
              elsewhere, or a file's bytes mutated
  rank-files  per-rank ``torch.save`` files of DTensors (``fixtures.per_rank_save``): a rank's file
              deleted, duplicated under another rank, renamed to another world size, a symlink,
              truncated, or its bytes mutated

A folder that lost data (a rank's file deleted, a partition shortened, a shape enlarged) must be
refused: opening it is "partial". ``bench/reliability.py`` runs them as its other classes.
"""

from __future__ import annotations

import functools
import math
import os
import random
import shutil
from pathlib import Path
from typing import Any, Callable

ZERO_OPTIM = "zero_pp_rank_{}_mp_rank_00_optim_states.pt"


@functools.lru_cache(maxsize=None)
def zero_seed(workdir: Path, stage: int) -> Path:
    """A 2-rank ZeRO folder of ``stage`` with two param groups, a frozen and a shared parameter and a buffer."""
    import torch

    from fixtures.zero_save import write_zero

    g = torch.Generator().manual_seed(stage)
    groups = [{"a.weight": torch.randn(5, 3, generator=g), "b.weight": torch.randn(7, generator=g)},
              {"c.bias": torch.randn(3, generator=g)}]
    frozen = {"f.weight": torch.randn(4, 2, generator=g)}
    return write_zero(workdir / f"zero_seed{stage}", stage, groups, {"n.running": torch.randn(3, generator=g)}, ranks=2,
                      frozen=frozen, shared={"d.weight": "a.weight"})


@functools.lru_cache(maxsize=None)
def rank_seed(workdir: Path) -> Path:
    """3 ranks' files of DTensors (Shard(0) with an uneven last rank, one Replicate) and a plain tensor."""
    import torch

    from fixtures.per_rank_save import write_per_rank

    g = torch.Generator().manual_seed(0)
    sd = {"a.weight": torch.randn(7, 4, generator=g), "b.bias": torch.randn(5, generator=g),
          "c.weight": torch.randn(2, 3, generator=g), "step": torch.tensor(9)}
    return write_per_rank(workdir / "rank_seed", sd, ranks=3, replicate=frozenset({"c.weight"}), plain=frozenset({"step"}))


def _copy(seed: Path, dst: Path) -> Path:
    shutil.copytree(seed, dst, dirs_exist_ok=True)
    return dst


def _edit(path: Path, change: Callable[[dict], Any]) -> None:
    """Load a fixture-written file (plain dicts of tensors), change it, save it back."""
    import torch

    obj = torch.load(path, weights_only=True)
    change(obj)
    torch.save(obj, path)


def _dims(rng: random.Random, interesting: tuple) -> list[int]:
    return [rng.choice(interesting + (1, 2, 3, 5, 7)) for _ in range(rng.randint(0, 3))]


def _link_target(rng: random.Random, env: Any, sibling: Path) -> str:
    outside = env.dir / "outside.pt"
    if not outside.exists():
        shutil.copy(sibling, outside)
    return rng.choice((str(sibling), str(outside), "/dev/zero", str(env.fifo), str(sibling.parent / "missing")))


def _mutate_zero(root: Path, rng: random.Random, env: Any, interesting: tuple, mutate_bytes: Callable) -> bool:
    """One lie in a ZeRO folder; True when the folder lost data and must be refused."""
    import torch

    step = root / "global_step1"
    model = sorted(step.glob("*model_states.pt"))
    optim = sorted(step.glob("*optim_states.pt"))
    kind = rng.randrange(8)
    if kind == 0:  # a param's recorded shape
        name = rng.choice(("a.weight", "b.weight", "c.bias"))
        new = [min(d, 2**63 - 1) for d in _dims(rng, interesting)]
        grow = math.prod(new) > {"a.weight": 15, "b.weight": 7, "c.bias": 3}[name]

        def shape(d: dict) -> None:
            for group in d["param_shapes"]:
                if name in group:
                    group[name] = torch.Size(new)
        for f in model:
            _edit(f, shape)
        return grow
    if kind == 1:  # a param dropped from, or added to, the recorded shapes
        def drop(d: dict) -> None:
            group = rng.choice(d["param_shapes"])
            if rng.random() < 0.5 and group:
                group.pop(rng.choice(list(group)))
            else:
                group["extra.weight"] = torch.Size(_dims(rng, interesting) or [4])
        for f in model:
            _edit(f, drop)
        return False  # a dropped name loses data too, but its elements may fall inside the padding
    if kind == 2:  # a flat partition shortened, lengthened or recast
        f = rng.choice(optim)
        how = rng.randrange(3)

        def part(d: dict) -> None:
            osd = d["optimizer_state_dict"]
            key = "fp32_flat_groups" if "fp32_flat_groups" in osd else "single_partition_of_fp32_groups"
            i = rng.randrange(len(osd[key]))
            t = osd[key][i]
            osd[key][i] = t[: rng.randrange(max(t.numel(), 1))] if how == 0 else (
                torch.cat([t, t[:rng.randint(1, 9)]]) if how == 1 else t.half())
        _edit(f, part)
        return how == 0
    if kind == 3:  # partition_count or zero_stage
        field, value = rng.choice((("partition_count", rng.choice(interesting)), ("partition_count", [1]),
                                   ("zero_stage", rng.choice((0, 1, 2, 3, 4, -1, 2**40)))))

        def count(d: dict) -> None:
            d["optimizer_state_dict"][field] = value
        _edit(rng.choice(optim), count)
        return False
    if kind == 4:  # a rank's file deleted or repeated under another rank
        f = rng.choice(optim + model)
        if rng.random() < 0.5:
            f.unlink()
            return f in optim or len(model) > 1
        shutil.copy(f, step / f.name.replace("rank_1", "rank_2").replace("rank_0", "rank_2"))
        return False
    if kind == 5:  # a symlink where a rank's file was
        f = rng.choice(optim + model)
        target = _link_target(rng, env, optim[0] if f != optim[0] else optim[-1])
        f.unlink()
        os.symlink(target, f)
        return False
    if kind == 6:  # latest names another tag
        (root / "latest").write_text(rng.choice(("", "global_step2", "../global_step1", "/etc", "global_step1\0",
                                                 "x" * 5000, "global_step1/../global_step1", ".")))
        return False
    f = rng.choice(optim + model)  # the bytes of one file
    f.write_bytes(mutate_bytes(f.read_bytes()))
    return False


def _mutate_ranks(root: Path, rng: random.Random, env: Any, mutate_bytes: Callable) -> bool:
    """One lie in a folder of per-rank files; True when it lost data and must be refused."""
    files = sorted(root.glob("*.pt"))
    f = rng.choice(files)
    kind = rng.randrange(6)
    if kind == 0:
        f.unlink()
        return True
    if kind == 1:  # a copy under another rank's number (or a rank past the world)
        other = rng.choice([g for g in files if g != f] + [root / "model_world_size_3_rank_3.pt"])
        shutil.copy(f, other)
        return False
    if kind == 2:  # renamed to another world size
        f.rename(root / f.name.replace("world_size_3", rng.choice(("world_size_2", "world_size_4", "world_size_0"))))
        return True
    if kind == 3:
        target = _link_target(rng, env, rng.choice([g for g in files if g != f]))
        f.unlink()
        os.symlink(target, f)
        return False
    if kind == 4:
        data = f.read_bytes()
        f.write_bytes(data[: rng.randrange(len(data))])
        return False
    f.write_bytes(mutate_bytes(f.read_bytes()))
    return False


def gen_zero_parts(rng: random.Random, env: Any, interesting: tuple, mutate_bytes: Callable, open_deep: Callable) -> tuple[str, str]:
    root = _copy(zero_seed(env.dir, rng.choice((2, 3))), env.fresh("zero"))
    return _judged(_mutate_zero(root, rng, env, interesting, mutate_bytes), open_deep(root, env, rng.random() < 0.3))


def gen_rank_files(rng: random.Random, env: Any, mutate_bytes: Callable, open_deep: Callable) -> tuple[str, str]:
    root = _copy(rank_seed(env.dir), env.fresh("ranks"))
    return _judged(_mutate_ranks(root, rng, env, mutate_bytes), open_deep(root, env, rng.random() < 0.3))


def _judged(lost: bool, result: tuple[str, str]) -> tuple[str, str]:
    if lost and result[0] == "ok":
        return "partial", "a folder that lost data opened without a refusal"
    return result
