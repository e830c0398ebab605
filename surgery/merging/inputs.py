"""What every merging command shares: open the inputs with wrapper prefixes stripped, refuse every
disagreement in one error, and write the result one tensor at a time.

A merged tensor is an :class:`~surgery.formats.writing.Entry` whose source reads the inputs only
when the writer asks for it, so memory is bounded by the largest tensor, not by the model.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from ..checkpoint import SPARSE_KINDS, Checkpoint, tensor_bytes
from ..errors import RuleError
from ..formats import open_checkpoint, output_format
from ..formats.writing import Entry, Payload
from ..io import OUTPUTS, check_destination, check_source
from ..keys import strip_wrappers

MERGED = ("F64", "F32", "F16", "BF16")  # floating dtypes combined; scaled FP8 needs its scales first


@dataclass
class Inputs:
    """Opened checkpoints of one architecture; ``names[i]`` maps a clean name to input i's own name."""

    paths: list[Path]
    ckpts: list[Checkpoint]
    names: list[dict[str, str]]
    prefixes: list[str]  # the wrapper prefix stripped from each input ('' for none)

    def sources(self, clean: str) -> list[tuple[Checkpoint, str]]:
        """(checkpoint, its own name) of ``clean`` in every input, in order."""
        return [(c, n[clean]) for c, n in zip(self.ckpts, self.names)]


def open_inputs(paths: Sequence[Path], verb: str, allow_globals: Sequence[str] = ()) -> Inputs:
    """Open ``paths``, strip wrapper prefixes, and refuse (in one error) any name, shape or dtype
    that is not the same in all of them. ``verb`` names the command in the message."""
    paths = [Path(p) for p in paths]
    for p in paths:
        check_source(p)
    ckpts = [open_checkpoint(p, allow_globals=tuple(allow_globals)) for p in paths]
    names, prefixes = zip(*(clean_names(c) for c in ckpts))
    inputs = Inputs(paths, ckpts, list(names), list(prefixes))
    _refuse_disagreements(inputs, verb)
    return inputs


def check_output(out: Path, paths: Sequence[Path], ckpts: Sequence[Checkpoint], force: bool) -> Any:
    """The output format of ``out``, after refusing a destination that is an input (or one of the
    files it was read from) or not ours."""
    fmt = output_format(out)
    check_destination(out, [*paths, *(Path(f) for c in ckpts for f in c.files)], force=force,
                      in_place=None, kind="folder" if fmt.folder else "file", owned=OUTPUTS["remap"])
    return fmt


def write(out: Path, fmt: Any, entries: list[Entry], key: str, record: dict) -> tuple[list[str], int]:
    """Write ``entries`` (streamed) with ``record`` stored as JSON under metadata ``key``; the files
    written and their total size."""
    meta = {"format": "pt", key: json.dumps(record, separators=(",", ":"))}
    payload = Payload(entries=entries, names=[e.name for e in entries], aliases={}, metadata=meta,
                      state_dict=lambda: {e.name: e.tensor() for e in entries})
    files = fmt.writer(out, payload)
    return files, sum(os.path.getsize(f) for f in files)


def copy_source(ckpt: Checkpoint, name: str) -> Callable[[], Any]:
    """The tensor as stored (integer and bool buffers are taken, not combined)."""
    return lambda: tensor_bytes(ckpt.tensor(name))


def kind_problem(name: str, info: Any, path: Path) -> str | None:
    """Why a tensor has no plain values to read (sparse, quantized, nested, meta), with the remap
    flag that gives it some; None for a dense (or chunked) one."""
    if info.kind in ("dense", "chunked"):
        return None
    fix = ("`surgery remap --densify` first" if info.kind in SPARSE_KINDS
           else "`surgery remap --dequantize` first" if info.kind == "quantized"
           else "`surgery remap --drop` it first")  # nested, meta: nothing to combine
    return f"{name!r} is a {info.kind.replace('_', ' ')} tensor in {path.name}; {fix}"


def clean_names(ckpt: Checkpoint) -> tuple[dict[str, str], str]:
    """Name without wrapper prefixes -> the checkpoint's own name; and the prefix stripped."""
    keys = list(ckpt.tensors)
    clean, prefix = strip_wrappers(keys)
    return dict(zip(clean, keys)), prefix


def disagreements(paths: list[Path], ckpts: list[Checkpoint], names: list[dict[str, str]]) -> list[str]:
    """Every clean name missing from an input, and every tensor whose shape or dtype is not the
    first input's, or that has no plain values (sparse, quantized) in any input."""
    problems = []
    for p, n in zip(paths[1:], names[1:]):
        problems += [f"{k!r} is only in {paths[0].name}" for k in names[0] if k not in n]
        problems += [f"{k!r} is not in {paths[0].name} but in {p.name}" for k in n if k not in names[0]]
    for k, orig in names[0].items():
        a = ckpts[0].tensors[orig]
        for p, c, n in zip(paths, ckpts, names):
            b = c.tensors.get(n.get(k, ""))
            kind = None if b is None else kind_problem(k, b, p)
            if kind is not None:
                problems.append(kind)
                break
            if b is not None and (tuple(b.shape), b.dtype) != (tuple(a.shape), a.dtype):
                cast = tuple(b.shape) == tuple(a.shape) and {a.dtype, b.dtype} <= set(MERGED)
                problems.append(f"{k!r} is {a.dtype} {list(a.shape)} in {paths[0].name} but {b.dtype} {list(b.shape)} "
                                f"in {p.name}" + (" (`surgery remap --dtype` casts one to the other's)" if cast else ""))
    return problems


def listed(problems: list[str], shown: int = 6) -> str:
    """The first ``shown`` problems, and how many more."""
    more = len(problems) - shown
    return "; ".join(problems[:shown]) + (f"; ... {more} more" if more > 0 else "")


def _refuse_disagreements(inputs: Inputs, verb: str) -> None:
    """One error listing every name missing from an input, and every shape, dtype or kind that differs."""
    paths, ckpts, names = inputs.paths, inputs.ckpts, inputs.names
    problems = disagreements(paths, ckpts, names)
    for k, orig in names[0].items():
        dtype = ckpts[0].tensors[orig].dtype
        if dtype.startswith("F8") or dtype.startswith("F4"):
            problems.append(f"{k!r} is {dtype}; {verb} after `surgery remap --dequantize`")
    if problems:
        raise RuleError(f"cannot {verb}: {len(problems)} disagreement{'s' if len(problems) > 1 else ''}: "
                        f"{listed(problems)}. Nothing was written; the checkpoints must hold one architecture's tensors")
