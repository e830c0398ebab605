"""The report behind `surgery inspect`: plain data the CLI renders.

No torch here: a checkpoint is read as metadata.
"""

from __future__ import annotations

import functools
import math
import os
import re
from collections import Counter
from dataclasses import dataclass
from operator import attrgetter
from typing import Any

from ..checkpoint import PACKED_DTYPES, SUB_BYTE_DTYPES, Checkpoint, TensorInfo, gc_paused, itemsize
from ..errors import RuleError

SCHEMA = "surgery.inspect/1"


@dataclass
class InspectReport:
    ckpt: Checkpoint
    wrapper_prefixes: list[str]
    common_prefix: str | None
    remap_command: str | None
    tree: list[Any]
    guesses: list[Any]  # arch_guess.ArchGuess, best first; empty when no known architecture fits
    keys: list[str] | None = None  # the tensors to list (--keys / --filter), in checkpoint order
    depth: int | None = None

    @functools.cached_property
    def views(self) -> dict[tuple, list[str]]:
        """Names by the view of bytes they are (`TensorInfo.view_key`), in checkpoint order."""
        groups: dict[tuple, list[str]] = {}
        tensors = self.ckpt.tensors
        if all(t.kind == "dense" for t in tensors.values()):  # `view_key` of a dense tensor, in one C call each
            keys = map(attrgetter(*_DENSE_VIEW), tensors.values())
        else:
            keys = (t.view_key for t in tensors.values())
        for name, key in zip(tensors, keys):
            g = groups.get(key)
            if g is None:
                groups[key] = [name]
            else:
                g.append(name)
        return groups

    @functools.cached_property
    def _groups(self) -> tuple[list[list[str]], set[tuple], dict[str, dict[str, int]], dict[str, int]]:
        """`tied_groups`, the storages (file, offset) that two different views share,
        `dtype_summary` and `devices`. A checkpoint may hold hundreds of thousands of tensors:
        counted by C loops (`attrgetter`, `Counter`), and only when two names share a storage are
        the views worked out name by name."""
        infos = list(self.ckpt.tensors.values())
        layouts = Counter(map(attrgetter("kind", "dtype", "shape"), infos))
        storages = list(map(attrgetter("file", "data_offset"), infos))
        if all(kind == "dense" for kind, _, _ in layouts) and len(set(storages)) == len(storages):
            tied, shared, firsts = [], set(), infos  # each tensor has bytes of its own: each is its own view
        else:
            views = self.views.values()
            tied = [g for g in views if len(g) > 1]
            firsts = [self.ckpt.tensors[g[0]] for g in views]
            layouts = Counter(map(attrgetter("kind", "dtype", "shape"), firsts))
            shared = _shared_storages(firsts)
        devices = dict(Counter(map(attrgetter("device"), infos)))
        return tied, shared, _dtype_summary(firsts, layouts), devices

    @property
    def unique_tensors(self) -> list[TensorInfo]:
        """As `Checkpoint.unique_tensors`."""
        tensors = self.ckpt.tensors
        return [tensors[g[0]] for g in self.views.values()]

    @property
    def tied_groups(self) -> list[list[str]]:
        """As `Checkpoint.tied_groups`."""
        return self._groups[0]

    @property
    def dtype_summary(self) -> dict[str, dict[str, int]]:
        """dtype -> tensors, params, bytes, each view of bytes counted once."""
        return self._groups[2]

    @functools.cached_property
    def scaled_fp8(self) -> tuple[list[Any], str | None]:
        """FP8 weights with scales beside them (`remapping.fp8.Scaling`), and why config.json's block
        size could not be read (the default 128x128 is assumed then), else None."""
        from ..remapping import fp8

        if not fp8.SCALED_DTYPES & self.dtype_summary.keys():  # no FP8/FP4 tensor: no names to pair
            return [], None
        try:
            return list(fp8.scaled_in(self.ckpt).values()), None
        except RuleError as e:
            meta = {n: (t.dtype, t.shape) for n, t in self.ckpt.tensors.items()}
            return list(fp8.find_scaled(meta).values()), str(e)

    @functools.cached_property
    def scaled_fp4(self) -> list[Any]:
        """Packed FP4 weights with scales beside them (`remapping.fp4.Packed`)."""
        from ..remapping import fp4

        if not fp4.VALUES_PER_ELEMENT.keys() & self.dtype_summary.keys():  # no dtype FP4 is packed in: no names to pair
            return []
        return list(fp4.packed_in(self.ckpt).values())

    @property
    def num_params(self) -> int:
        return sum(d["params"] for d in self.dtype_summary.values())

    @property
    def nbytes(self) -> int:
        return sum(d["bytes"] for d in self.dtype_summary.values())

    @property
    def devices(self) -> dict[str, int]:
        return self._groups[3]

    def shared_storage(self) -> list[list[str]]:
        """Names that view one storage differently (e.g. a weight and its transpose)."""
        shared = self._groups[1]
        if not shared:
            return []
        by_storage: dict[tuple, list[str]] = {}
        for name, t in self.ckpt.tensors.items():
            if t.has_storage and (t.file, t.data_offset) in shared:
                by_storage.setdefault((t.file, t.data_offset), []).append(name)
        return list(by_storage.values())

    def to_json(self) -> dict:
        c = self.ckpt
        data = {
            "schema": SCHEMA,
            "path": str(c.path),
            "format": c.format,
            "file_size": c.file_size,
            "files": [str(f) for f in c.files],
            "container": c.container,
            "containers": c.containers,
            "file_kind": c.file_kind,
            "description": c.description,
            "extras": c.extras,
            "metadata": c.metadata,
            "tensor_count": len(c.tensors),
            "param_count": self.num_params,
            "bytes": self.nbytes,
            "dtypes": self.dtype_summary,
            "kinds": c.kinds,
            "certificate": c.certificate.to_json() if c.certificate is not None else None,
            "scaled_fp8": [s.to_json() for s in self.scaled_fp8[0]],
            "scaled_fp4": [p.to_json() for p in self.scaled_fp4],
            "devices": self.devices,
            "wrapper_prefixes": self.wrapper_prefixes,
            "common_prefix": self.common_prefix,
            "remap_command": self.remap_command,
            "tied": self.tied_groups,
            "shared_storage": self.shared_storage(),
            "tree": [r.to_json() for r in self.tree],
            "architecture": [g.to_json() for g in self.guesses],
        }
        if self.keys is not None:
            data["tensors"] = [{"name": n, "dtype": c.tensors[n].dtype, "shape": list(c.tensors[n].shape),
                                "params": c.tensors[n].numel, "kind": c.tensors[n].kind} for n in self.keys]
        return data


_DENSE_VIEW = ("file", "data_offset", "storage_offset", "shape", "stride", "dtype")  # as `TensorInfo.view_key`


def _shared_storages(views: list[TensorInfo]) -> set[tuple]:
    """The storages (file, offset) that two of ``views`` (one tensor per view of bytes) view differently."""
    held = [(t.file, t.data_offset) for t in views if t.kind == "dense" or t.kind == "quantized"]  # `has_storage`
    if len(set(held)) == len(held):
        return set()
    seen: set[tuple] = set()
    return {s for s in held if s in seen or seen.add(s)}


def _dtype_summary(views: list[TensorInfo], layouts: Counter) -> dict[str, dict[str, int]]:
    """dtype -> tensors, params, bytes of ``views`` (one tensor per view of bytes), in the order
    the dtypes first appear; ``layouts`` counts their (kind, dtype, shape). A model repeats a few
    layouts: plain tensors are counted by layout, the others one by one."""
    summary: dict[str, dict[str, int]] = {}
    others = False
    for (kind, dtype, shape), n in layouts.items():
        d = summary.get(dtype)
        if d is None:
            d = summary[dtype] = {"tensors": 0, "params": 0, "bytes": 0}
        if kind == "dense" and dtype not in PACKED_DTYPES and dtype not in SUB_BYTE_DTYPES:
            numel = math.prod(shape)
            d["tensors"] += n
            d["params"] += n * numel
            d["bytes"] += n * numel * itemsize(dtype)
        else:
            others = True
    for t in views if others else ():
        if not (t.kind == "dense" and t.dtype not in PACKED_DTYPES and t.dtype not in SUB_BYTE_DTYPES):
            d = summary[t.dtype]
            d["tensors"] += 1
            d["params"] += t.numel
            d["bytes"] += t.nbytes
    return summary


def inspect(path: str | os.PathLike, *, select: str | None = None, allow_globals: tuple[str, ...] = (),
            keys: bool = False, filter: str | None = None, depth: int | None = 2, top: int = 3) -> InspectReport:
    """What is in a checkpoint, from metadata only (no tensor data is read, torch is not imported).

    >>> r = inspect("dp.pth"); r.wrapper_prefixes, r.guesses[0].arch  # doctest: +SKIP
    (['module.'], 'resnet18')
    """
    from ..formats import open_checkpoint

    rx = None
    if filter is not None:
        try:
            rx = re.compile(filter)
        except re.error as e:
            raise RuleError(f"--filter {filter!r} is not a valid regular expression: {e}") from None
    with gc_paused():
        ckpt = open_checkpoint(path, select=select, allow_globals=allow_globals)
        return _report(ckpt, str(path), keys or rx is not None, rx, depth, top)


def _report(ckpt: Checkpoint, path: str, listing: bool, rx: re.Pattern | None, depth: int | None,
            top: int) -> InspectReport:
    """The analyses of an opened checkpoint, each done once."""
    from . import arch_guess as archsig, key_analysis as analysis

    names = list(ckpt.tensors)
    listed = [n for n in names if rx is None or rx.search(n)] if listing else None
    wrappers = analysis.detect_wrapper_prefixes(names)
    guesses = archsig.known_architectures(ckpt.tensors, top=top)  # empty when nothing known fits
    common = _strippable_prefix(analysis.common_prefix(names), wrappers, guesses)
    opts = (["--auto"] if wrappers else []) + ([f"--strip-prefix {common}"] if common else [])
    return InspectReport(
        ckpt=ckpt,
        wrapper_prefixes=wrappers,
        common_prefix=common,
        remap_command=" ".join(["surgery", "remap", str(path), "clean.safetensors", *opts]) if opts else None,
        tree=analysis.module_tree(ckpt.tensors, depth=depth),
        guesses=guesses,
        keys=listed,
        depth=depth,
    )


# Names training code wraps a network in. A prefix every key shares is only worth stripping when
# it is one of these, or when the architecture guess fits better without it: a model whose only
# child is `layers` must keep that name.
CONTAINER_PREFIXES = ("model.", "net.", "network.", "backbone.", "encoder.", "base_model.", "student.",
                      "teacher.", "ema.", "model_ema.", "body.", "trunk.", "visual.", "image_encoder.")


def _strippable_prefix(common: str | None, wrappers: list[str], guesses: list) -> str | None:
    if common is None:
        return None
    if common in CONTAINER_PREFIXES:
        return common
    best = guesses[0] if guesses else None
    if best is not None and best.score >= 0.5 and best.prefix_stripped.endswith(common):
        return common
    return None
