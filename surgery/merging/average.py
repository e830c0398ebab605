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

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from ..checkpoint import Checkpoint, tensor_bytes, torch_dtype
from ..errors import RuleError
from ..formats import open_checkpoint, output_format
from ..formats.writing import Entry, Payload
from ..io import OUTPUTS, check_destination, check_source
from ..keys import strip_wrappers

SCHEMA = "surgery.average/1"
AVERAGED = ("F64", "F32", "F16", "BF16")  # floating dtypes averaged; scaled FP8 needs its scales first


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
    for p in paths:
        check_source(p)
    ckpts = [open_checkpoint(p, allow_globals=tuple(allow_globals)) for p in paths]
    names, prefixes = zip(*(_clean_names(c) for c in ckpts))
    _refuse_disagreements(paths, ckpts, list(names))
    fmt = output_format(out)
    check_destination(out, [*paths, *(Path(f) for c in ckpts for f in c.files)], force=force, in_place=None,
                      kind="folder" if fmt.folder else "file", owned=OUTPUTS["remap"])
    report = AverageReport([str(p) for p in paths], w, str(out), fmt.name, list(prefixes))
    first = names[0]
    entries = []
    for clean, orig in first.items():
        info = ckpts[0].tensors[orig]
        if info.dtype in AVERAGED:
            report.averaged.append(clean)
            src: Callable[[], Any] = _mean_source(ckpts, [n[clean] for n in names], w, info.dtype)
        else:
            report.copied.append(clean)
            src = _first_source(ckpts[0], orig)
        entries.append(Entry(clean, info.dtype, tuple(info.shape), src))
    meta = {"format": "pt", "surgery.average": json.dumps({"inputs": [p.name for p in paths], "weights": w},
                                                          separators=(",", ":"))}
    payload = Payload(entries=entries, names=[e.name for e in entries], aliases={}, metadata=meta,
                      state_dict=lambda: {e.name: e.tensor() for e in entries})
    report.files = fmt.writer(out, payload)  # type: ignore[misc]
    report.bytes_written = sum(os.path.getsize(f) for f in report.files)
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


def _clean_names(ckpt: Checkpoint) -> tuple[dict[str, str], str]:
    """Name without wrapper prefixes -> the checkpoint's own name; and the prefix stripped."""
    keys = list(ckpt.tensors)
    clean, prefix = strip_wrappers(keys)
    return dict(zip(clean, keys)), prefix


def _refuse_disagreements(paths: list[Path], ckpts: list[Checkpoint], names: list[dict[str, str]]) -> None:
    """One error listing every name missing from an input, and every shape, dtype or kind that differs."""
    problems = []
    for p, n in zip(paths[1:], names[1:]):
        problems += [f"{k!r} is only in {paths[0].name}" for k in names[0] if k not in n]
        problems += [f"{k!r} is not in {paths[0].name} but in {p.name}" for k in n if k not in names[0]]
    for k, orig in names[0].items():
        a = ckpts[0].tensors[orig]
        if a.kind not in ("dense", "chunked"):
            problems.append(f"{k!r} is a {a.kind.replace('_', ' ')} tensor in {paths[0].name}; remap it to dense first")
        elif a.dtype.startswith("F8") or a.dtype.startswith("F4"):
            problems.append(f"{k!r} is {a.dtype}; average after `surgery remap --dequantize`")
        for p, c, n in zip(paths[1:], ckpts[1:], names[1:]):
            b = c.tensors.get(n.get(k, ""))
            if b is not None and (tuple(b.shape), b.dtype) != (tuple(a.shape), a.dtype):
                problems.append(f"{k!r} is {a.dtype} {list(a.shape)} in {paths[0].name} but {b.dtype} {list(b.shape)} "
                                f"in {p.name}")
    if problems:
        shown = "; ".join(problems[:6]) + (f"; ... {len(problems) - 6} more" if len(problems) > 6 else "")
        raise RuleError(f"cannot average: {len(problems)} disagreement{'s' if len(problems) > 1 else ''}: {shown}. "
                        f"Nothing was written; the checkpoints must hold one architecture's tensors")


def _mean_source(ckpts: list[Checkpoint], names: list[str], w: list[float], dtype: str) -> Callable[[], Any]:
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


def _first_source(ckpt: Checkpoint, name: str) -> Callable[[], Any]:
    return lambda: tensor_bytes(ckpt.tensor(name))
