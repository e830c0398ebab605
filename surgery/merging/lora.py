"""``surgery merge-lora BASE ADAPTER --out OUT``: a LoRA adapter folded into its base, as peft's
``merge_and_unload()`` does, without building the model.

Each target's delta is computed as peft's ``get_delta_weight``: ``scale * B @ A`` for a Linear
(transposed for GPT-2's Conv1D, ``fan_in_fan_out``, and for an Embedding), and for a conv
``scale * conv(A^T, B)^T`` (A carries the kernel, B is 1x1). It is added to the base tensor in
float32 (float64 for a float64 base) and cast back to the base's dtype. Plain tensors in the
adapter (``modules_to_save`` copies, biases trained with ``bias="all"``) replace theirs. Every
adapter key must land on a base tensor of the right shape: every problem is listed in one error
before anything is written. The output is written one tensor at a time: memory is about two
float32 copies of the largest tensor, whatever the model's size.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

from ..checkpoint import Checkpoint, tensor_bytes, torch_dtype
from ..errors import RuleError
from ..formats import open_checkpoint
from ..formats.writing import Entry
from ..io import check_source
from .inputs import MERGED, check_output, clean_names, copy_source, kind_problem, listed, write
from .lora_adapter import Adapter, open_adapter
from .lora_keys import BaseNames, Factors, classify

SCHEMA = "surgery.merge-lora/1"
FLOATING = MERGED


@dataclass
class Target:
    name: str  # the base tensor (wrapper prefixes stripped)
    module: str  # the module as the adapter names it
    layout: str  # "linear" (B @ A), "transposed" ((B @ A)^T: Conv1D), "embedding" (the same) or "conv"
    a: str
    b: str
    rank: int
    scale: float


@dataclass
class MergeLoraReport:
    base: str
    adapter: str
    out: str
    format: str
    prefix: str  # the wrapper prefix stripped from the base's names
    merged: list[Target] = field(default_factory=list)
    replaced: dict[str, str] = field(default_factory=dict)  # base name -> the adapter key that replaces it
    copied: int = 0
    files: list[str] = field(default_factory=list)
    bytes_written: int = 0

    def to_json(self) -> dict:
        return {"schema": SCHEMA, "base": self.base, "adapter": self.adapter, "out": self.out, "format": self.format,
                "stripped_prefix": self.prefix,
                "merged": [{"name": t.name, "module": t.module, "layout": t.layout, "rank": t.rank, "scale": t.scale}
                           for t in self.merged],
                "replaced": [{"name": k, "from": v} for k, v in self.replaced.items()], "copied": self.copied,
                "files": self.files, "bytes_written": self.bytes_written}


def merge_lora(base: str | os.PathLike, adapter: str | os.PathLike, out: str | os.PathLike, *, force: bool = False,
               allow_globals: Sequence[str] = ()) -> MergeLoraReport:
    """Write ``base`` with ``adapter`` merged to ``out`` (its suffix says the format, as for remap).

    >>> merge_lora("base.safetensors", "lora/", "merged.safetensors")  # doctest: +SKIP
    """
    base_p, out = Path(base), Path(out)
    check_source(base_p)
    ckpt = open_checkpoint(base_p, allow_globals=tuple(allow_globals))
    lora = open_adapter(adapter, tuple(allow_globals))
    names, prefix = clean_names(ckpt)
    targets, replaced = plan(ckpt, names, lora)
    fmt = check_output(out, [base_p, lora.path], [ckpt, lora.ckpt], force)
    report = MergeLoraReport(str(base_p), str(lora.path), str(out), fmt.name, prefix, list(targets.values()), replaced)
    entries = []
    for name, orig in names.items():
        info = ckpt.tensors[orig]
        if name in targets:
            src: Callable[[], Any] = _merged_source(ckpt, orig, lora.ckpt, targets[name], info.dtype)
        elif name in replaced:
            src = _replacement_source(lora.ckpt, replaced[name], info.dtype)
        else:
            report.copied += 1
            src = copy_source(ckpt, orig)
        entries.append(Entry(name, info.dtype, tuple(info.shape), src))
    report.files, report.bytes_written = write(out, fmt, entries, "surgery.merge-lora",
                                               {"adapter": lora.path.name, "merged": len(targets),
                                                "replaced": len(replaced)})
    return report


def plan(ckpt: Checkpoint, names: dict[str, str], lora: Adapter) -> tuple[dict[str, Target], dict[str, str]]:
    """Every adapter key placed on a base tensor: (base name -> target, base name -> replacing key).
    Raises one RuleError listing every key that does not fit."""
    modules, plain, foreign = classify(list(lora.ckpt.tensors))
    problems = lora.refusals()
    problems += [p for n, o in names.items() if (p := kind_problem(n, ckpt.tensors[o], ckpt.path)) is not None]
    if foreign:
        problems.append(f"{len(foreign)} key{'s' if len(foreign) > 1 else ''} of an adapter kind surgery does not "
                        f"merge (DoRA, LoHa, LoKr, IA3, ...), e.g. {foreign[0]!r}")
    if not modules and not problems:  # plain tensors alone would only write the base back (or another model)
        problems.append(f"{lora.path}: holds no LoRA tensors (no lora_A/lora_B, lora_down/lora_up keys)")
    base = BaseNames(list(names))
    targets: dict[str, Target] = {}
    for factors in modules.values():
        t = _target(factors, base, ckpt, names, lora, problems)
        if t is not None and t.name in targets:
            problems.append(f"{factors.module!r} and {targets[t.name].module!r} both land on {t.name!r}")
        elif t is not None:
            targets[t.name] = t
    replaced = {}
    for key in plain:
        name = base.plain(key)
        info = lora.ckpt.tensors[key]
        if name is None:
            problems.append(f"{key!r} replaces a tensor the base does not have")
        elif tuple(info.shape) != tuple(ckpt.tensors[names[name]].shape):
            problems.append(f"{key!r} is {list(info.shape)} but the base's {name!r} is "
                            f"{list(ckpt.tensors[names[name]].shape)}")
        else:
            replaced[name] = key
    problems += [f"{n!r} is both merged and replaced by the adapter" for n in targets if n in replaced]
    _follow_ties(ckpt, names, targets, replaced)
    if problems:
        raise RuleError(f"cannot merge {lora.path} into {ckpt.path}: {listed(problems)}. Nothing was written")
    return targets, replaced


def _follow_ties(ckpt: Checkpoint, names: dict[str, str], targets: dict[str, Target], replaced: dict[str, str]) -> None:
    """Names that share one tensor in the base (a tied lm_head and embedding) change together, as
    peft's in-place merge changes the one parameter they share."""
    clean = {orig: name for name, orig in names.items()}
    for group in ckpt.tied_groups():
        members = [clean[o] for o in group if o in clean]
        hit = next((m for m in members if m in targets), None)
        for m in members if hit is not None else ():
            targets.setdefault(m, replace(targets[hit], name=m))
        hit = next((m for m in members if m in replaced), None)
        for m in members if hit is not None else ():
            replaced.setdefault(m, replaced[hit])


def _target(f: Factors, base: BaseNames, ckpt: Checkpoint, names: dict[str, str], lora: Adapter,
            problems: list[str]) -> Target | None:
    """One module's factors checked against its base tensor (problems appended), or None."""
    emb = "emb_A" in f.keys or "emb_B" in f.keys
    a, b = f.keys.get("emb_A" if emb else "A"), f.keys.get("emb_B" if emb else "B")
    if a is None and b is None:
        problems.append(f"{f.module!r} has an alpha but no lora_A and no lora_B")
        return None
    if a is None or b is None:
        problems.append(f"{f.module!r} has {'lora_B' if a is None else 'lora_A'} but no {'lora_A' if a is None else 'lora_B'}")
        return None
    name = base.tensor(f.module)
    if name is None:
        problems.append(f"adapter module {f.module!r} ({a!r}) has no weight in the base")
        return None
    info = ckpt.tensors[names[name]]
    ta, tb = lora.ckpt.tensors[a], lora.ckpt.tensors[b]
    sa, sb, shape = tuple(ta.shape), tuple(tb.shape), tuple(info.shape)
    layout = "embedding" if emb else "conv" if len(shape) != 2 else _matrix_layout(sa, sb, shape, lora.fan_in_fan_out)
    if info.kind != "dense" or info.dtype not in FLOATING:
        problems.append(f"{name!r} is {info.dtype} {info.kind.replace('_', ' ')}; merge into a float checkpoint "
                        f"(`surgery remap --dequantize` first)")
        return None
    if ta.dtype not in FLOATING or tb.dtype not in FLOATING:
        problems.append(f"{a!r} / {b!r} are {ta.dtype} / {tb.dtype}, not floating")
        return None
    delta = _delta_shape(layout, sa, sb)
    if delta is None or delta != shape:
        problems.append(f"{f.module!r}: lora_A {list(sa)} and lora_B {list(sb)} make a {layout} delta "
                        f"{list(delta) if delta else '(none: ranks or kernels disagree)'}, but {name!r} is {list(shape)}")
        return None
    scale, why = lora.scale(f.module, sa[0], f.keys.get("alpha"))
    if why is not None:
        problems.append(why)
        return None
    return Target(name, f.module, layout, a, b, sa[0], float(scale))


def _matrix_layout(a: tuple[int, ...], b: tuple[int, ...], shape: tuple[int, ...], fan_in_fan_out: bool) -> str:
    """"linear" or "transposed" (Conv1D). peft picks it per layer kind and rewrites the config's
    fan_in_fan_out as it goes, so the saved value may be either: the shape decides where only one
    layout fits, the config only a square weight, which either would fit."""
    fits = [layout for layout in ("linear", "transposed") if _delta_shape(layout, a, b) == shape]
    if len(fits) == 1:
        return fits[0]
    return "transposed" if fan_in_fan_out else "linear"


def _delta_shape(layout: str, a: tuple[int, ...], b: tuple[int, ...]) -> tuple[int, ...] | None:
    if len(a) < 2 or len(b) < 2 or a[0] != b[1]:
        return None
    if layout == "conv":  # B is a 1x1 conv; A has the base's kernel and all its input channels (groups=1)
        return (b[0], a[1], *a[2:]) if len(a) == len(b) and all(k == 1 for k in b[2:]) else None
    if len(a) != 2 or len(b) != 2:
        return None
    return (b[0], a[1]) if layout == "linear" else (a[1], b[0])  # transposed, embedding


def delta(layout: str, a: "Any", b: "Any", scale: float) -> "Any":
    """peft's get_delta_weight for each layout (a and b in the dtype to compute in)."""
    import torch.nn.functional as F

    if layout == "linear":
        return (b @ a).mul_(scale)
    if layout in ("transposed", "embedding"):
        return (b @ a).T.mul_(scale)
    conv = (F.conv1d, F.conv2d, F.conv3d)[a.dim() - 3]
    if all(k == 1 for k in a.shape[2:]):  # peft's 1x1 path: a matmul
        return (b.flatten(1) @ a.flatten(1)).reshape(b.shape[0], a.shape[1], *a.shape[2:]).mul_(scale)
    return conv(a.transpose(0, 1), b).transpose(0, 1).mul_(scale)


def _merged_source(ckpt: Checkpoint, name: str, adapter: Checkpoint, t: Target, dtype: str) -> Callable[[], Any]:
    def read() -> memoryview:
        import torch

        work = torch.float64 if dtype == "F64" else torch.float32
        d = delta(t.layout, adapter.tensor(t.a).to(work), adapter.tensor(t.b).to(work), t.scale)
        w = ckpt.tensor(name)
        if t.layout == "embedding":  # peft's Embedding.merge casts the delta to the weight's dtype first
            return tensor_bytes(w.add_(d.to(w.dtype)))
        merged = d.add_(w.to(work)) if w.dtype != work else w.add_(d)  # in place: the base and one delta in memory
        del w, d
        return tensor_bytes(merged.to(torch_dtype(dtype)).contiguous())
    return read


def _replacement_source(adapter: Checkpoint, key: str, dtype: str) -> Callable[[], Any]:
    return lambda: tensor_bytes(adapter.tensor(key).to(torch_dtype(dtype)).contiguous())
