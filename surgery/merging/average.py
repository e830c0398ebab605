"""``surgery average A B C ... --out OUT``: the (weighted) mean of checkpoints of one architecture.

Each floating tensor is accumulated in float64, ``sum(w_i * t_i) / sum(w_i)`` (with equal weights
``sum(t_i) / n``, as timm's ``avg_checkpoints.py`` computes it), and cast back to its dtype;
integer and bool tensors (``num_batches_tracked``) are the first input's. Wrapper prefixes
(DataParallel's ``module.``, ``_orig_mod.``, Lightning's ``_forward_module.``) are stripped from
each input as adapt strips them, so a DataParallel ``.pth`` averages with a clean safetensors file.
Names, shapes and dtypes must agree: every disagreement is listed in one error before anything is
written. The output is written one tensor at a time: memory is about two float64 copies of the
largest tensor, whatever the number or size of the inputs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from ..checkpoint import Checkpoint, tensor_bytes, torch_dtype
from ..errors import RuleError
from ..formats.writing import Entry
from .inputs import MERGED, check_output, copy_source, open_inputs, write

SCHEMA = "surgery.average/1"


@dataclass
class AverageReport:
    inputs: list[str]
    weights: list[float]
    out: str
    format: str
    prefixes: list[str]  # the wrapper prefix stripped from each input ('' for none)
    averaged: list[str] = field(default_factory=list)  # floating tensors, averaged
    copied: list[str] = field(default_factory=list)  # integer and bool tensors, the first input's
    files: list[str] = field(default_factory=list)
    bytes_written: int = 0

    def to_json(self) -> dict:
        return {"schema": SCHEMA, "inputs": [{"path": p, "weight": w, "stripped_prefix": s}
                                             for p, w, s in zip(self.inputs, self.weights, self.prefixes)],
                "out": self.out, "format": self.format, "tensors": len(self.averaged) + len(self.copied),
                "averaged": len(self.averaged), "copied_from_first": self.copied, "files": self.files,
                "bytes_written": self.bytes_written}


def average(inputs: Sequence[str | os.PathLike], out: str | os.PathLike, weights: Sequence[float] | None = None, *,
            force: bool = False, allow_globals: Sequence[str] = ()) -> AverageReport:
    """Write the weighted mean of ``inputs`` to ``out`` (its suffix says the format, as for remap).

    >>> average(["run1/model.safetensors", "run2/model.safetensors"], "mean.safetensors")  # doctest: +SKIP
    """
    paths, out = [Path(p) for p in inputs], Path(out)
    if len(paths) < 2:
        raise RuleError(f"average needs two checkpoints or more; got {len(paths)}")
    w = _weights(weights, len(paths))
    src = open_inputs(paths, "average", allow_globals)
    fmt = check_output(out, src.paths, src.ckpts, force)
    report = AverageReport([str(p) for p in paths], w, str(out), fmt.name, list(src.prefixes))
    entries = []
    for clean, orig in src.names[0].items():
        info = src.ckpts[0].tensors[orig]
        if info.dtype in MERGED:
            report.averaged.append(clean)
            read: Callable[[], Any] = mean_source(src.ckpts, [n[clean] for n in src.names], w, info.dtype)
        else:
            report.copied.append(clean)
            read = copy_source(src.ckpts[0], orig)
        entries.append(Entry(clean, info.dtype, tuple(info.shape), read))
    report.files, report.bytes_written = write(out, fmt, entries, "surgery.average",
                                               {"inputs": [p.name for p in paths], "weights": w})
    return report


def _weights(weights: Sequence[float] | None, n: int) -> list[float]:
    if weights is None:
        return [1.0] * n
    w = [float(x) for x in weights]
    if len(w) != n:
        raise RuleError(f"--weights gives {len(w)} weights for {n} checkpoints; give one per checkpoint")
    if any(not (x >= 0 and x < float("inf")) for x in w) or sum(w) <= 0:
        raise RuleError(f"--weights {','.join(map(str, w))}: weights must be finite, non-negative and not all zero")
    return w


def mean_source(ckpts: list[Checkpoint], names: list[str], w: list[float], dtype: str) -> Callable[[], Any]:
    """Reads the weighted mean of ``names`` (one per checkpoint), accumulated in float64, as ``dtype``."""
    def read() -> memoryview:
        import torch

        acc = None
        for c, name, x in zip(ckpts, names, w):  # in place: the sum and one input's float64 copy in memory
            t = c.tensor(name).to(torch.float64)
            if x != 1.0:
                t.mul_(x)
            if acc is None:
                acc = t
            else:
                acc.add_(t)
            del t
        total = sum(w)
        mean = acc if total == 1.0 else acc.div_(total)
        return tensor_bytes(mean.to(torch_dtype(dtype)))
    return read
