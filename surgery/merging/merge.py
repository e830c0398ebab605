"""``surgery merge --method M [--base B] A B ... --out OUT``: linear, task arithmetic, TIES, DARE or
SLERP merging of checkpoints of one architecture, streamed tensor by tensor.

Inputs are opened as ``average`` opens them (any format, wrapper prefixes stripped, every name,
shape and dtype checked in one error before anything is written). Each floating tensor is merged in
float64 (:mod:`.methods`) and cast back to its dtype; integer and bool buffers are the base's (or
the first input's). Every parameter is checked before anything is read.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from ..checkpoint import Checkpoint, tensor_bytes, torch_dtype
from ..errors import RuleError
from ..formats.writing import Entry
from . import methods
from ..option_table import options_from, signature
from .inputs import MERGED, copy_source, check_output, open_inputs, write
from .options import MergeOptions

SCHEMA = "surgery.merge/1"
METHODS = ("linear", "task-arithmetic", "ties", "dare", "slerp")
RESCALES = ("density", "l1", "none")
_NEEDS_BASE = ("task-arithmetic", "ties", "dare")
# which options each method reads; any other option given is refused rather than ignored
_TAKES = {"linear": {"weights", "normalize"},
          "task-arithmetic": {"weights", "lam", "normalize"},
          "ties": {"weights", "density", "lam", "normalize"},
          "dare": {"weights", "density", "lam", "normalize", "rescale", "seed"},
          "slerp": {"t"}}
_NORMALIZE = {"linear": True, "task-arithmetic": False, "ties": True, "dare": False}  # mergekit's defaults
_FLAG = {"weights": "--weights", "density": "--density", "lam": "--lambda", "normalize": "--normalize",
         "rescale": "--rescale", "seed": "--seed", "t": "--t"}


@dataclass
class MergeParams:
    """A method's parameters, defaults filled in; ``None`` where the method has no such parameter."""

    method: str
    weights: list[float] | None = None  # one per merged model (the base has none)
    density: float | None = None
    lam: float | None = None
    normalize: bool | None = None
    rescale: str | None = None
    seed: int | None = None
    t: float | None = None


@dataclass
class MergeReport:
    method: str
    params: MergeParams
    base: str | None
    models: list[str]
    out: str
    format: str
    prefixes: list[str]  # the wrapper prefix stripped from each input, base first ('' for none)
    merged: list[str] = field(default_factory=list)  # floating tensors, merged
    copied: list[str] = field(default_factory=list)  # integer and bool tensors, the base's (or first input's)
    files: list[str] = field(default_factory=list)
    bytes_written: int = 0

    def to_json(self) -> dict:
        params = {("lambda" if k == "lam" else k): v for k, v in asdict(self.params).items()
                  if v is not None and k != "method"}
        return {"schema": SCHEMA, "method": self.method, "params": params, "base": self.base,
                "models": self.models, "stripped_prefixes": self.prefixes, "out": self.out, "format": self.format,
                "tensors": len(self.merged) + len(self.copied), "merged": len(self.merged),
                "copied": self.copied, "files": self.files, "bytes_written": self.bytes_written}


def merge(models: Sequence[str | os.PathLike], out: str | os.PathLike, method: str,
          options: MergeOptions | None = None, **keywords: Any) -> MergeReport:
    """Merge ``models`` (onto ``base`` for task-arithmetic, ties and dare) into ``out``; the
    keywords are :class:`MergeOptions`' fields.

    >>> merge(["math.safetensors", "code.safetensors"], "ties.safetensors", "ties", base="base.safetensors",
    ...       density=0.2)  # doctest: +SKIP
    """
    o = options_from(MergeOptions, options, keywords, "merge")
    paths, out = [Path(p) for p in models], Path(out)
    params = check_params(method, len(paths), o)
    src = open_inputs(([o.base] if o.base else []) + paths, "merge", o.allow_globals)
    fmt = check_output(out, src.paths, src.ckpts, o.force)
    report = MergeReport(method, params, str(o.base) if o.base else None, [str(p) for p in paths], str(out),
                         fmt.name, list(src.prefixes))
    entries = []
    for clean, orig in src.names[0].items():
        info = src.ckpts[0].tensors[orig]
        if info.dtype in MERGED:
            report.merged.append(clean)
            read: Callable[[], Any] = _merged_source(clean, src.sources(clean), params, o.base is not None,
                                                     info.dtype)
        else:
            report.copied.append(clean)
            read = copy_source(src.ckpts[0], orig)
        entries.append(Entry(clean, info.dtype, tuple(info.shape), read))
    record = {"method": method, "base": o.base.name if o.base else None, "models": [p.name for p in paths],
              **report.to_json()["params"]}
    report.files, report.bytes_written = write(out, fmt, entries, "surgery.merge", record)
    return report


merge.__signature__ = signature(merge, MergeOptions)  # type: ignore[attr-defined]


def check_params(method: str, n_models: int, o: MergeOptions) -> MergeParams:
    """The parameters with defaults filled in, or one error listing every problem."""
    has_base = o.base is not None
    given = {k: getattr(o, k) for k in _FLAG}
    if method not in METHODS:
        raise RuleError(f"--method {method!r}: choose one of {', '.join(METHODS)}")
    takes = _TAKES[method]
    problems = [f"{_FLAG[k]} does not apply to {method}" for k, v in given.items() if v is not None and k not in takes]
    problems += _count_problems(method, n_models, has_base)
    p = MergeParams(method)
    if "weights" in takes:
        p.weights = [float(x) for x in given["weights"]] if given["weights"] is not None else [1.0] * n_models
        problems += _weight_problems(method, p.weights, n_models)
    if "density" in takes:
        p.density = given["density"]
        if p.density is None:
            problems.append(f"{method} needs --density, the fraction of each task vector kept (the TIES paper keeps "
                            f"0.2, DARE's drops 90%: 0.1)")
        elif not 0 < p.density <= 1:
            problems.append(f"--density {p.density:g} is outside (0, 1]")
    if "lam" in takes:
        p.lam = 1.0 if given["lam"] is None else float(given["lam"])
        if not math.isfinite(p.lam):
            problems.append(f"--lambda {p.lam}: give a finite number")
    if "normalize" in takes:
        p.normalize = _NORMALIZE[method] if given["normalize"] is None else bool(given["normalize"])
    if "rescale" in takes:
        p.rescale = given["rescale"] or "density"
        if p.rescale not in RESCALES:
            problems.append(f"--rescale {p.rescale!r}: choose one of {', '.join(RESCALES)}")
    if "seed" in takes:
        p.seed = 0 if given["seed"] is None else int(given["seed"])
        if p.seed < 0:
            problems.append(f"--seed {p.seed}: give a non-negative integer")
    if "t" in takes:
        p.t = 0.5 if given["t"] is None else float(given["t"])
        if not 0 <= p.t <= 1:
            problems.append(f"--t {p.t:g} is outside [0, 1]")
    if problems:
        raise RuleError(f"cannot merge with {method}: " + "; ".join(problems) + ". Nothing was read or written")
    return p


def _count_problems(method: str, n: int, has_base: bool) -> list[str]:
    if method in _NEEDS_BASE:
        if not has_base:
            return [f"{method} needs --base, the checkpoint the models were fine-tuned from"]
        return [] if n >= 1 else [f"{method} needs one model or more besides --base"]
    if method == "linear":
        problems = ["linear takes no --base (task-arithmetic adds weighted differences to a base)"] if has_base else []
        return problems + ([] if n >= 2 else [f"linear needs two checkpoints or more; got {n}"])
    total = n + has_base
    return [] if total == 2 else [f"slerp interpolates exactly two checkpoints (--base, or the first, at t=0); "
                                  f"got {total}"]


def _weight_problems(method: str, w: list[float], n: int) -> list[str]:
    if len(w) != n:
        return [f"--weights gives {len(w)} weights for {n} models; give one per model" +
                (" (the base has none)" if method != "linear" else "")]
    if not all(math.isfinite(x) for x in w):
        return [f"--weights {','.join(map(str, w))}: weights must be finite"]
    if method == "linear" and abs(sum(w)) < 1e-8:
        return [f"--weights {','.join(map(str, w))}: weights must not sum to zero"]
    return []


def _merged_source(name: str, sources: list[tuple[Checkpoint, str]], p: MergeParams, has_base: bool,
                   dtype: str) -> Callable[[], memoryview]:
    def reader(ckpt: Checkpoint, own: str) -> methods.Read:
        import torch

        return lambda: ckpt.tensor(own).to(torch.float64)

    def read() -> memoryview:
        reads = [reader(c, own) for c, own in sources]
        base, models = (reads[0], reads[1:]) if has_base else (None, reads)
        if p.method == "linear":
            out = methods.linear(models, p.weights, p.normalize)
        elif p.method == "task-arithmetic":
            out = methods.task_arithmetic(base, models, p.weights, p.lam, p.normalize)
        elif p.method == "ties":
            out = methods.ties(base, models, p.weights, p.density, p.lam, p.normalize)
        elif p.method == "dare":
            def drop(i: int, tau: Any) -> Any:
                return methods.dare(tau, p.density, p.rescale, methods.dare_generator(p.seed, i, name))
            out = methods.task_arithmetic(base, models, p.weights, p.lam, p.normalize, sparsify=drop)
        else:
            out = methods.slerp(reads[0], reads[1], p.t)
        return tensor_bytes(out.to(torch_dtype(dtype)))
    return read
