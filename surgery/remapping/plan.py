"""The plan: what each key becomes, computed over names and metadata before any byte moves.

`plan_names` applies ops to key names (pure, instant); `build_plan` adds what each tensor is
written as (dtype, kind, tied to which name) from the checkpoint's metadata; the refusals run on
the plan, so nothing is written when any of them fires.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field, replace
from typing import Iterable, Mapping

from ..checkpoint import FLOAT_DTYPES, SAFETENSORS_DTYPES, SPARSE_KINDS, Checkpoint, TensorInfo
from ..errors import RuleError
from .fp4 import Packed, scaled_weights_in
from .fp8 import DEQUANTIZED_DTYPE, Scaling, refuse_unsafe
from .group_ops import Group, Made, expand, plan_group
from .ops import OP_KINDS, Op
from .rules import Rules
from .tensor_ops import Step, plan_steps


@dataclass
class NamePlan:
    mapping: dict[str, str | None]  # old -> new (None: dropped), in source order
    op_counts: list[tuple[Op, int]]  # each op and how many names it touched
    tensor_ops: dict[str, list[Op]] = field(default_factory=dict)  # old name -> the tensor ops its names matched
    made: list[tuple[str | None, Made]] = field(default_factory=list)  # what group ops write: final name, how
    read_by: dict[str, list[int]] = field(default_factory=dict)  # old name -> what group ops make of it (in made)

    @property
    def kept(self) -> dict[str, str]:
        return {o: n for o, n in self.mapping.items() if n is not None}


def plan_names(names: Iterable[str], ops: list[Op], shapes: Mapping[str, tuple[int, ...]] | None = None) -> NamePlan:
    """Apply ``ops`` in order to key names. Raises RuleError on collisions, listing all of them.
    ``shapes`` (old name -> shape) names the pieces of an unstack into ``{i}``."""
    names = list(names)
    current: list[str | None] = list(names)
    origin: list[str | None] = list(names)  # the source tensor each name is; None: a group op makes it
    made: dict[int, Made] = {}
    read_by: dict[str, list[int]] = {}
    counts: list[tuple[Op, int]] = []
    tensor_ops: dict[str, list[Op]] = {}
    for k, op in enumerate(ops):
        alive = [i for i, n in enumerate(current) if n is not None]
        if op.kind == "keep" and k > 0 and ops[k - 1].kind == "keep":
            continue  # applied with the first of its run
        if op.kind == "keep":
            counts += _keep_run(list(itertools.takewhile(lambda o: o.kind == "keep", ops[k:])), current, alive)
            continue
        if OP_KINDS[op.kind].group:
            counts.append((op, _apply_group(op, alive, current, origin, made, read_by, shapes)))
            continue
        if OP_KINDS[op.kind].tensor:  # applies to the tensors whose names match now, in this op's place
            rx = re.compile(op.arg)
            hits = [i for i in alive if rx.search(current[i])]  # type: ignore[arg-type]
            for i in hits:
                if origin[i] is None:  # what a group op wrote: reordered once made
                    made[i] = replace(made[i], after=(*made[i].after, op))
                else:
                    tensor_ops.setdefault(names[i], []).append(op)
            counts.append((op, len(hits)))
            continue
        change = OP_KINDS[op.kind].names
        new, touched = change(op, [current[i] for i in alive]) if change else (None, 0)  # type: ignore[misc]
        for i, n in zip(alive, new or ()):
            current[i] = n
        counts.append((op, touched))
    both = next((n for n in read_by if n in tensor_ops), None)
    if both is not None:
        _refuse_mixed(tensor_ops[both][0], both)
    mapping = dict(zip(names, current))
    products = [(current[i], m) for i, m in sorted(made.items())]
    order = {i: j for j, i in enumerate(sorted(made))}
    _refuse_clashes({**mapping, **{_label(m): n for n, m in products}})
    return NamePlan(mapping, counts, tensor_ops, products, {o: [order[i] for i in v] for o, v in read_by.items()})


def _apply_group(op: Op, alive: list[int], current: list[str | None], origin: list[str | None],
                 made: dict[int, Made], read_by: dict[str, list[int]],
                 shapes: Mapping[str, tuple[int, ...]] | None) -> int:
    """A group op in its place: the names it reads leave, the names it writes join; how many it read."""
    by_name = {current[i]: shapes[o] for i in alive if (o := origin[i]) is not None and o in shapes} if shapes else None
    groups = expand(op, [(i, current[i]) for i in alive], lambda i: origin[i], by_name)  # type: ignore[misc]
    for read, written in groups:
        new = []
        for name, m in written:
            made[len(current)] = m
            new.append(len(current))
            current.append(name)
            origin.append(None)
        for i in read:
            current[i] = None
            read_by.setdefault(origin[i], []).extend(new)  # type: ignore[arg-type]
    return sum(len(read) for read, _ in groups)


def _refuse_mixed(op: Op, name: str) -> None:
    raise RuleError(f"{op}: {name!r} is read by a split, concat, stack or unstack later; a tensor op applies to what "
                    f"a group op writes (put it after the group op), not to what it reads; nothing was written")


def _label(m: Made) -> str:
    """What a group op writes, named for the clash refusal."""
    more = f" and {len(m.sources) - 1} more" if len(m.sources) > 1 else ""
    return f"the {m.kind} of {m.sources[0]}{more} (#{m.index})" if m.count > 1 else f"the {m.kind} of {m.sources[0]}{more}"


def _keep_run(run: list[Op], current: list[str | None], alive: list[int]) -> list[tuple[Op, int]]:
    """Adjacent --keep ops keep a name any of them matches: a union, applied to ``current``."""
    hits = [{i for i in alive if re.search(o.arg, current[i])} for o in run]  # type: ignore[arg-type]
    keep_any = set().union(*hits)
    for i in alive:
        if i not in keep_any:
            current[i] = None
    return [(o, len(h)) for o, h in zip(run, hits)]


def _refuse_clashes(mapping: dict[str, str | None]) -> None:
    by_new: dict[str, list[str]] = {}
    for old, new in mapping.items():
        if new is not None:
            by_new.setdefault(new, []).append(old)
    clashes = {n: olds for n, olds in by_new.items() if len(olds) > 1}
    if clashes:
        parts = [f"{' and '.join(repr(o) for o in olds)} -> {n!r}" for n, olds in list(clashes.items())[:5]]
        more = f" (and {len(clashes) - 5} more)" if len(clashes) > 5 else ""
        raise RuleError(f"rules map several keys to one name: {'; '.join(parts)}{more}; "
                        f"adjust the rename or drop one of them first; nothing was written")


@dataclass
class PlanRow:
    old: str
    new: str | None
    dtype: str
    new_dtype: str
    shape: tuple[int, ...]  # as written: after the tensor ops
    alias_of: str | None = None  # stored once: this name shares the bytes of alias_of
    kind: str = "dense"  # see TensorInfo.kind
    new_kind: str = "dense"  # "dense" where --densify / --dequantize converts it
    scaling: Scaling | Packed | None = None  # a weight --dequantize writes with its scales applied (fp8.py, fp4.py)
    steps: tuple[Step, ...] = ()  # the tensor ops (transpose, reshape, ...) applied, in order
    src_shape: tuple[int, ...] | None = None  # as stored, where tensor ops, a group op or FP4 unpacking change it
    group: Group | None = None  # written by a split, concat, stack or unstack (group_ops.py) from group.sources
    into: str | None = None  # a concat's or stack's member after the first: the name it is written into

    @property
    def converted(self) -> bool:
        return self.new_kind != self.kind or self.new_dtype != self.dtype or bool(self.steps) or self.group is not None

    @property
    def old_shape(self) -> tuple[int, ...]:
        return self.src_shape if self.src_shape is not None else self.shape


def _after_conversion(t: TensorInfo, kinds: set[str]) -> tuple[str, str]:
    """(kind, dtype) of a tensor once --densify / --dequantize have applied."""
    if "densify" in kinds and t.kind in SPARSE_KINDS:
        return "dense", t.dtype
    if "dequantize" in kinds and t.kind == "quantized":
        return "dense", "F32"
    if t.kind == "chunked":  # ranks' pieces of one tensor: always written whole
        return "dense", t.dtype
    return t.kind, t.dtype


def build_plan(ckpt: Checkpoint, rules: Rules) -> tuple[list[PlanRow], list[tuple[str, int]]]:
    """One row per source tensor, and each op's text with how many tensors it touched. FP8 weights
    with scales beside them are refused a cast without --dequantize; with it, the scales apply."""
    groups = any(OP_KINDS[o.kind].group for o in rules.ops)
    plan = plan_names(ckpt.tensors.keys(), rules.ops, {k: t.shape for k, t in ckpt.tensors.items()} if groups else None)
    kinds, target = {o.kind for o in rules.ops}, rules.dtype
    scaled = scaled_weights_in(ckpt) if kinds & {"dtype", "dequantize"} or plan.tensor_ops or plan.read_by else {}
    refuse_unsafe(str(ckpt.path), scaled, plan.mapping, kinds, target)
    applied = scaled if "dequantize" in kinds else {}
    scales = {n for s in applied.values() for n in s.scales}
    rows = []
    converted = {"dtype": 0, "densify": 0, "dequantize": 0}  # tensors each conversion op changes
    problems: list[str] = []
    for old, new in plan.mapping.items():
        if old in plan.read_by:
            made = _group_rows(ckpt, plan, old, target, scaled, problems)
            converted["dtype"] += sum(r.new is not None and r.new_dtype != r.dtype for r in made)
            rows += made
            continue
        t = ckpt.tensors[old]
        kind, dtype = _after_conversion(t, kinds)
        new_dtype = target if (target and dtype in FLOAT_DTYPES) else dtype
        if old in applied:
            new_dtype = target or DEQUANTIZED_DTYPE
        s = applied.get(old)
        row = PlanRow(old, None if old in scales else s.out_name(new) if s and new else new, t.dtype, new_dtype,
                      s.out_shape if s else t.shape, kind=t.kind, new_kind=kind, scaling=s,
                      src_shape=t.shape if s and s.out_shape != t.shape else None)  # unpacked FP4
        if row.new is not None and old in plan.tensor_ops:
            _plan_tensor_ops(row, plan.tensor_ops[old], scaled, "dequantize" in kinds)
        rows.append(row)
        if new is not None and old not in scales:
            converted["dtype"] += new_dtype != dtype and old not in applied
            converted["densify" if t.kind in SPARSE_KINDS else "dequantize"] += kind != t.kind and t.kind != "chunked"
            converted["dequantize"] += old in applied
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise RuleError("; ".join(problems[:3]) + more)
    _refuse_mixed_head_sizes(rows)
    _mark_aliases(ckpt, rows)
    return rows, [(str(op), converted.get(op.kind, n)) for op, n in plan.op_counts]


def _group_rows(ckpt: Checkpoint, plan: NamePlan, old: str, target: str | None, scaled: dict[str, Scaling | Packed],
                problems: list[str]) -> list[PlanRow]:
    """The rows of a tensor a group op reads: a split's pieces; a concat's or stack's output (for
    its first member) or the name it goes into (the others). Problems are added to ``problems``."""
    t = ckpt.tensors[old]
    new_dtype = target if (target and t.dtype in FLOAT_DTYPES) else t.dtype
    unfit = t.kind not in ("dense", "chunked") or old in scaled or old in {n for s in scaled.values() for n in s.scales}
    rows = []
    for j in plan.read_by[old]:
        new, made = plan.made[j]
        if made.kind in ("concat", "stack") and old != made.sources[0]:
            rows.append(PlanRow(old, None, t.dtype, new_dtype, t.shape, into=new))
            continue
        if unfit and not any(old in p for p in problems):
            what = f"a {t.kind} tensor" if t.kind not in ("dense", "chunked") else _scaled_what(old, scaled)
            problems.append(f"{made.op}: {old!r} is {what}, which group ops do not split or join: write it dense "
                            f"first (--densify, --dequantize) or narrow the pattern; nothing was written")
            continue
        try:
            group = plan_group(made, {s: ckpt.tensors[s].shape for s in made.sources},
                               {s: ckpt.tensors[s].dtype for s in made.sources})
        except RuleError as e:
            if str(e) not in problems:  # once for a split, not once per piece
                problems.append(str(e))
            continue
        row = PlanRow(old, new, t.dtype, new_dtype, group.out_shape, group=group)
        if made.after and new is not None:
            try:
                row.steps = plan_steps(new, group.out_shape, list(made.after))
            except RuleError as e:
                problems.append(str(e))
                continue
            row.shape = row.steps[-1].out_shape
        row.src_shape = t.shape if row.shape != t.shape else None
        rows.append(row)
    return rows


def _scaled_what(name: str, scaled: dict[str, Scaling | Packed]) -> str:
    fp4 = any(isinstance(s, Packed) and name in (s.weight, *s.scales) for s in scaled.values())
    return "a packed FP4 tensor with scales beside it" if fp4 else "an FP8 tensor with a scale beside it"


def _plan_tensor_ops(row: PlanRow, ops: list[Op], scaled: dict[str, Scaling | Packed], dequantize: bool) -> None:
    """The row's steps and output shape; a tensor they cannot apply to is a one-line refusal."""
    scales = {n for s in scaled.values() for n in s.scales}
    if row.new_kind != "dense" or ((row.old in scaled or row.old in scales) and not dequantize):
        what = f"a {row.new_kind} tensor" if row.new_kind != "dense" else _scaled_what(row.old, scaled)
        fix = {"quantized": "--dequantize", "dense": "--dequantize"}.get(row.new_kind, "--densify")
        raise RuleError(f"{ops[0]}: {row.old!r} is {what}, which tensor ops do not reorder; add {fix} "
                        f"first, or narrow the pattern; nothing was written")
    row.steps = plan_steps(row.old, row.shape, ops)
    if row.steps and row.steps[-1].out_shape != row.shape:
        row.src_shape, row.shape = row.src_shape or row.shape, row.steps[-1].out_shape


def _refuse_mixed_head_sizes(rows: list[PlanRow]) -> None:
    """q and k of one attention module (the same name up to ``.q_proj.weight``) are dotted head by
    head, so their rope_permutes give one head size; two sizes mean a head count is wrong (a k
    projection given the q heads in grouped-query attention)."""
    sizes: dict[str, dict[int, tuple[str, Step]]] = {}
    for r in rows:
        for s in r.steps:
            if s.kind == "rope_permute":
                sizes.setdefault(r.old.rsplit(".", 2)[0], {}).setdefault(s.in_shape[0] // s.params[0], (r.old, s))
    for found in sizes.values():
        if len(found) > 1:
            (a, (na, sa)), (b, (nb, sb)) = list(found.items())[:2]
            raise RuleError(f"rope_permute gives {na!r} head size {a} ({sa.in_shape[0]} rows / {sa.params[0]} heads) "
                            f"but {nb!r} head size {b} ({sb.in_shape[0]} rows / {sb.params[0]} heads); q and k share "
                            f"one head size: check the heads and kv-heads (--heads, --kv-heads); nothing was written")


def _mark_aliases(ckpt: Checkpoint, rows: list[PlanRow]) -> None:
    """Tied tensors: the first kept name of each shared view stores the bytes, later ones alias it
    (those the same tensor ops apply to: a transposed name and a plain one are two tensors)."""
    first: dict[tuple, str] = {}
    for r in rows:
        if r.new is None or r.group is not None:
            continue
        key = (ckpt.tensors[r.old].view_key, tuple((s.kind, s.params) for s in r.steps))
        if key in first:
            r.alias_of = first[key]
        else:
            first[key] = r.new


def refuse_unsafetensorable(src: str, rows: list[PlanRow]) -> None:
    """Every kept tensor safetensors cannot hold, named with the options that resolve it, in one
    error raised before anything is written: a sparse or quantized tensor is never dropped or
    converted unless asked."""
    fixes = {"quantized": "--dequantize", "nested": None, "meta": None, **{k: "--densify" for k in SPARSE_KINDS}}
    problems = []
    for r in rows:
        if r.new is None or (r.new_kind == "dense" and r.new_dtype in SAFETENSORS_DTYPES):
            continue
        what = f"{r.new_kind} tensor" if r.new_kind != "dense" else f"dtype {r.new_dtype}"
        if r.new_kind == "meta":
            what = "meta tensor, which has no data"
        fix = fixes.get(r.new_kind)
        drop = f"--drop '^{re.escape(r.new)}$'"
        problems.append(f"{r.new!r} ({what}): {f'{fix} or ' if fix else ''}{drop}")
    if problems:
        more = f"; ... {len(problems) - 6} more" if len(problems) > 6 else ""
        raise RuleError(f"{src}: safetensors cannot hold {len(problems)} of the tensors: {'; '.join(problems[:6])}{more}. "
                        f"Nothing was written; resolve each one, or write a torch file (.pt), which keeps them")


_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str | int) -> int:
    """'5GB' -> 5_000_000_000, '512MiB' -> 536870912; an int is taken as bytes."""
    if not isinstance(text, str):
        return int(text)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
    if not m or m.group(2).upper() not in _SIZE_UNITS:
        raise RuleError(f"shard size {text!r} is not a size like 500MB, 2GB or 1GiB")
    n = int(float(m.group(1)) * _SIZE_UNITS[m.group(2).upper()])
    if n <= 0:
        raise RuleError(f"shard size {text!r} must be positive")
    return n
