"""Group ops: split and unstack (one tensor into several), concat and stack (several into one).

A group op names its parts with one placeholder: ``{q,k,v}`` (these names, in this order) or
``{i}`` (0, 1, 2, ...). Split and unstack put it in the names they write
(``blocks.\\1.attn.{q,k,v}.weight``), concat and stack in the regex of the names they read
(``^experts\\.{i}\\.w1\\.weight$``); the other captures of the regex fill the other name. Each
pair undoes the other: split <-> concat, unstack <-> stack.

The parameters are kept as one text, ``INTO:DIM[:sizes=A,B,C|chunks=N]``, so that an `Op` stays a
plain frozen record. `expand` applies an op to key names, `plan_group` gives a written tensor's
shape from its sources' metadata (the refusals are worded there), `apply` makes the tensor and
`undo` gives the sources back from what was written, for ``--verify-roundtrip``.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from math import prod
from typing import TYPE_CHECKING, Any, Callable, Mapping

from ..checkpoint import SUB_BYTE_DTYPES, dense_nbytes
from ..errors import RuleError

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from .ops import Op

GROUP_KINDS = ("split", "concat", "stack", "unstack")
INVERSE = {"split": "concat", "concat": "split", "stack": "unstack", "unstack": "stack"}
READS_PARTS = ("concat", "stack")  # the placeholder is in the regex of the names read; else in the names written
# '{i}' or '{q,k,v}': names, never digits, so that a regex's '{2}' or '{2,3}' stays a quantifier
PLACEHOLDER = re.compile(r"\{(i|[A-Za-z_][A-Za-z0-9_]*(?:,[A-Za-z_][A-Za-z0-9_]*)+)\}")
MAX_PIECES = 4096  # one op on one tensor; more is a wrong dim, not a model
MAX_DIMS = 64
INDEX = "(?P<surgery_index>0|[1-9][0-9]{0,8})"


@dataclass(frozen=True)
class GroupSpec:
    """A group op's parameters: the name template written (``into``), the dim, and for split the
    sizes along it or the number of equal chunks (by default one per part)."""

    into: str
    dim: int = 0
    sizes: tuple[int, ...] | None = None
    chunks: int | None = None

    def text(self) -> str:
        extra = f":sizes={','.join(map(str, self.sizes))}" if self.sizes is not None else (
            f":chunks={self.chunks}" if self.chunks is not None else "")
        return f"{self.into}:{self.dim}{extra}"


def parts_of(text: str, kind: str = "") -> tuple[str, ...] | None:
    """The part names of the placeholder in ``text``; None for ``{i}``. RuleError when there is not exactly one."""
    found = PLACEHOLDER.findall(text)
    if len(found) != 1:
        raise RuleError(f"{kind}{': ' if kind else ''}{text!r} needs one placeholder, {{q,k,v}} (the parts, in order: "
                        f"names, not numbers) or {{i}} (0, 1, 2, ...), not {len(found)}")
    if found[0] == "i":
        return None
    parts = tuple(found[0].split(","))
    if len(set(parts)) != len(parts):
        raise RuleError(f"{kind}{': ' if kind else ''}{text!r} names a part twice")
    return parts


def parse(kind: str, regex: str, text: str) -> GroupSpec:
    """The op's parameters from their text, checked against its regex; RuleError when they cannot be right."""
    spec = _parse_text(kind, text)
    _check(kind, regex, spec)
    return spec


def _parse_text(kind: str, text: str) -> GroupSpec:
    into, *rest = text.split(":")
    if not into or len(rest) > 2:
        raise RuleError(f"{kind} takes INTO[:DIM[:sizes=A,B,...|chunks=N]] after '=>', not {text!r} "
                        f"(a name written holds no ':')")
    dim = _int(kind, rest[0], "dim") if rest else 0
    sizes = chunks = None
    if len(rest) == 2:
        key, _, value = rest[1].partition("=")
        if kind != "split" or key not in ("sizes", "chunks"):
            raise RuleError(f"{kind}: only split takes sizes=A,B,... or chunks=N, not {rest[1]!r}")
        if key == "sizes" and value.count(",") >= MAX_PIECES:
            raise RuleError(f"{kind} into {value.count(',') + 1} pieces: at most {MAX_PIECES} from one tensor")
        if key == "sizes":
            sizes = tuple(_int(kind, v, "size") for v in value.split(","))
        else:
            chunks = _int(kind, value, "chunks")
    return GroupSpec(into, dim, sizes, chunks)


def _int(kind: str, text: str, what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise RuleError(f"{kind}: {what} must be an integer, not {text!r}") from None
    if what != "dim" and not 0 < value < 2**62:
        raise RuleError(f"{kind}: {what} must be from 1 to 2**62, not {text!r}")
    if what == "dim" and not -MAX_DIMS <= value <= MAX_DIMS:
        raise RuleError(f"{kind}: dim {value} is out of range for any tensor")
    return value


def _check(kind: str, regex: str, spec: GroupSpec) -> None:
    reads = kind in READS_PARTS
    parts = parts_of(regex if reads else spec.into, kind)
    if PLACEHOLDER.search(spec.into if reads else regex):
        where = "the names read (its regex)" if reads else "the names written (after '=>')"
        raise RuleError(f"{kind} takes its placeholder in {where} only")
    count = len(spec.sizes) if spec.sizes else spec.chunks or (len(parts) if parts else None)
    if kind == "split" and parts is None and count is None:
        raise RuleError("split into {i} needs sizes=A,B,... or chunks=N: how many pieces")
    if kind == "split" and parts is not None and count != len(parts):
        raise RuleError(f"split into {len(parts)} parts {{{','.join(parts)}}} takes {len(parts)} sizes, not {count}")
    if count is not None and count > MAX_PIECES:
        raise RuleError(f"{kind} into {count} pieces: at most {MAX_PIECES} from one tensor")
    example = (parts or ("0",))[0]
    pattern = PLACEHOLDER.sub(lambda m: re.escape(example), regex)
    try:
        rx = re.compile(pattern)
        rx.sub(PLACEHOLDER.sub(example, spec.into), "")
        if reads and parts is None:  # _members finds the index with this one
            re.compile(PLACEHOLDER.sub(lambda m: INDEX, regex))
    except (re.error, IndexError, OverflowError, RecursionError) as e:
        raise RuleError(f"{kind} {regex!r}=>{spec.into!r} is not a valid regex and name template: {e}") from None


# ---------------------------------------------------------------- names


@dataclass(frozen=True)
class Made:
    """A tensor a group op writes: the op, the source names it reads (in order), for split and
    unstack which of how many pieces it is, and the tensor ops later in the list that match it."""

    op: "Op"
    sources: tuple[str, ...]
    index: int = 0
    count: int = 1
    after: tuple["Op", ...] = ()  # the tensor ops that apply to it once made (a transpose of the stacked experts)

    @property
    def kind(self) -> str:
        return self.op.kind


Item = tuple[int, str]  # an item's place in the plan and its name there


def expand(op: "Op", items: list[Item], source: Callable[[int], "str | None"],
           shapes: Mapping[str, tuple[int, ...]] | None) -> list[tuple[list[int], list[tuple[str, Made]]]]:
    """What ``op`` does to the names: (the items it reads, the names it writes with how) per group.
    ``source(i)`` is the source tensor item ``i`` is (None: something a group op made)."""
    spec = op.params
    groups = (_pieces if op.kind not in READS_PARTS else _members)(op, spec, items, shapes)
    taken = [i for read, _ in groups for i in read if source(i) is None]
    if taken:
        name = dict(items)[taken[0]]
        raise RuleError(f"{op}: {name!r} is made by an earlier split, concat, stack or unstack; a name is captured "
                        f"by one group op: narrow the pattern; nothing was written")
    empty = next((dict(items)[read[0]] for read, made in groups for n, _ in made if not n), None)
    if empty is not None:
        raise RuleError(f"{op} turns key {empty!r} into an empty name; nothing was written")
    return [(read, [(n, Made(m.op, tuple(source(i) for i in read), m.index, m.count)) for n, m in made])
            for read, made in groups]


def _pieces(op: "Op", spec: GroupSpec, items: list[Item], shapes: Mapping[str, tuple[int, ...]] | None) -> list:
    rx, parts = re.compile(op.arg), parts_of(spec.into)
    out = []
    for i, name in items:
        m = rx.search(name)
        if m is None:
            continue
        count = len(spec.sizes) if spec.sizes else spec.chunks or (len(parts) if parts else 0)
        if not count:  # unstack into {i}: one piece per index of the dim
            count = _dim_size(op, name, spec.dim, shapes)
        labels = parts or tuple(map(str, range(count)))
        made = [(_sub(m, PLACEHOLDER.sub(label, spec.into)), Made(op, (), j, count)) for j, label in enumerate(labels)]
        out.append(([i], made))
    return out


def _sub(m: "re.Match[str]", template: str) -> str:
    """The name with its matched part replaced by ``template`` (``\\1`` expanded), as --rename's re.sub does."""
    return m.string[:m.start()] + m.expand(template) + m.string[m.end():]


def _dim_size(op: "Op", name: str, dim: int, shapes: Mapping[str, tuple[int, ...]] | None) -> int:
    shape = (shapes or {}).get(name)
    if shape is None:
        raise RuleError(f"{op}: unstack into {{i}} needs the shape of {name!r}")
    if not -len(shape) <= dim < len(shape):
        raise RuleError(f"{op}: dim {dim} is out of range for {name!r} of shape {list(shape)}; nothing was written")
    count = shape[dim]
    if not 0 < count <= MAX_PIECES:
        raise RuleError(f"{op}: unstacking {name!r} of shape {list(shape)} along dim {dim} gives {count} tensors; "
                        f"from 1 to {MAX_PIECES}: check the dim; nothing was written")
    return count


def _members(op: "Op", spec: GroupSpec, items: list[Item], shapes: Any) -> list:
    """The names each output reads, grouped by the name it writes, each part once and none missing."""
    parts = parts_of(op.arg)
    found: dict[str, dict[str, tuple[int, str]]] = {}  # name written -> part -> (item, name read)
    problems = []
    detect = re.compile(PLACEHOLDER.sub(lambda m: INDEX, op.arg)) if parts is None else None
    literal: dict[str, re.Pattern[str]] = {}  # part -> the regex with it in the placeholder's place

    def part_rx(part: str) -> re.Pattern[str]:
        if part not in literal:
            literal[part] = re.compile(PLACEHOLDER.sub(lambda m: re.escape(part), op.arg))
        return literal[part]

    for i, name in items:
        labels = [p for p in parts if part_rx(p).search(name)] if parts else []
        if detect is not None and (m := detect.search(name)):
            labels = [m.group("surgery_index")]
        if len(labels) > 1:
            problems.append(f"{name!r} matches parts {labels[0]} and {labels[1]}")
            continue
        if not labels:
            continue
        m = part_rx(labels[0]).search(name)
        into = _sub(m, spec.into) if m else ""
        group = found.setdefault(into, {})
        if labels[0] in group:
            clash = f"two groups write {into!r}: {group[labels[0]][1]!r} and {name!r} are both its part {labels[0]}"
            if not any(p.startswith(f"two groups write {into!r}") for p in problems):
                problems.append(clash + " (the name written needs the captures that tell them apart)")
            continue
        group[labels[0]] = (i, name)
    out = []
    for into, group in found.items():
        missing = _missing(parts, group)
        if missing:
            has = sorted(group, key=lambda p: parts.index(p) if parts else int(p))
            problems.append(f"{into!r} lacks part{'s' if len(missing) > 1 else ''} {', '.join(missing)} "
                            f"(has {', '.join(has[:6])}{' ...' if len(has) > 6 else ''})")
            continue
        order = parts or tuple(map(str, range(len(group))))
        out.append(([group[p][0] for p in order], [(into, Made(op, ()))]))
    if problems:
        more = f" (and {len(problems) - 4} more)" if len(problems) > 4 else ""
        raise RuleError(f"{op}: {'; '.join(problems[:4])}{more}; nothing was written")
    return out


def _missing(parts: tuple[str, ...] | None, group: dict[str, Any]) -> list[str]:
    """The first few parts a group lacks: of its names, or of 0 .. its largest index (never
    listing them all: one member named 99999999 is not a hundred million missing ones)."""
    if parts:
        return [p for p in parts if p not in group][:6]
    end = max(map(int, group)) + 1
    return list(itertools.islice((str(k) for k in range(end) if str(k) not in group), 6))


# ---------------------------------------------------------------- shapes, before any byte is read


@dataclass(frozen=True)
class Group:
    """A written tensor as a group op makes it, shapes known: the plan row's ``group``."""

    kind: str
    op: str  # the op's text, for messages
    sources: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]  # the sources'
    dim: int  # normalized: of the sources (split, unstack, concat) or of the output (stack)
    out_shape: tuple[int, ...]
    index: int = 0  # unstack: which slice; split: which piece
    start: int = 0  # split: where the piece starts along dim
    length: int = 0  # split: its size along dim
    count: int = 1  # split, unstack: how many pieces the source gives

    @property
    def contiguous_piece(self) -> bool:
        """A split or unstack piece that is one byte range of its source (every dim before ``dim`` is 1)."""
        return self.kind in ("split", "unstack") and prod(self.shapes[0][:self.dim]) == 1


def plan_group(made: Made, shapes: Mapping[str, tuple[int, ...]], dtypes: Mapping[str, str]) -> Group:
    """The group a written tensor is; RuleError (one line) when its sources do not fit the op."""
    op, src = made.op, made.sources
    spec: GroupSpec = op.params
    shape = tuple(shapes[src[0]])
    _refuse_packed_values(made, spec, shape, dtypes[src[0]])
    if made.kind in READS_PARTS:
        _same_dtype(op, src, dtypes)
        ndim = len(shape) + (made.kind == "stack")
        dim = _norm(op, spec.dim, ndim, src[0], shape)
        if made.kind == "stack":
            _same_shape(op, src, shapes, None)
            return Group("stack", str(op), src, tuple(tuple(shapes[s]) for s in src), dim,
                         shape[:dim] + (len(src),) + shape[dim:])
        _same_shape(op, src, shapes, dim)
        total = sum(shapes[s][dim] for s in src)
        return Group("concat", str(op), src, tuple(tuple(shapes[s]) for s in src), dim,
                     shape[:dim] + (total,) + shape[dim + 1:])
    dim = _norm(op, spec.dim, len(shape), src[0], shape)
    if made.kind == "unstack":
        if shape[dim] != made.count:
            raise RuleError(f"{op}: unstacking {src[0]!r} of shape {list(shape)} along dim {dim} gives {shape[dim]} "
                            f"tensors, not the {made.count} parts named; nothing was written")
        return Group("unstack", str(op), src, (shape,), dim, shape[:dim] + shape[dim + 1:], made.index,
                     count=made.count)
    sizes = _split_sizes(op, spec, made.count, src[0], shape, dim)
    start = sum(sizes[:made.index])
    return Group("split", str(op), src, (shape,), dim, shape[:dim] + (sizes[made.index],) + shape[dim + 1:],
                 made.index, start, sizes[made.index], made.count)


def _refuse_packed_values(made: Made, spec: GroupSpec, shape: tuple[int, ...], dtype: str) -> None:
    """F4 packs two values to a byte along the last dim: cutting or joining along it would split bytes."""
    last = len(shape) - (made.kind != "stack")
    if dtype in SUB_BYTE_DTYPES and -(last + 1) <= spec.dim <= last and spec.dim % (last + 1) == last:
        raise RuleError(f"{made.op}: {made.sources[0]!r} is {dtype}{list(shape)}, two values to a byte along its "
                        f"last dim, which a {made.kind} cannot cut or join there: use another dim, or --dequantize "
                        f"it first where it has scales; nothing was written")


def _norm(op: "Op", dim: int, ndim: int, name: str, shape: tuple[int, ...]) -> int:
    if not -ndim <= dim < ndim:
        raise RuleError(f"{op}: dim {dim} is out of range for {name!r} of shape {list(shape)}; nothing was written")
    return dim % ndim


def _split_sizes(op: "Op", spec: GroupSpec, count: int, name: str, shape: tuple[int, ...], dim: int) -> tuple[int, ...]:
    if spec.sizes:
        if sum(spec.sizes) != shape[dim]:
            raise RuleError(f"{op}: sizes {list(spec.sizes)} add up to {sum(spec.sizes)}, but {name!r} of shape "
                            f"{list(shape)} has {shape[dim]} along dim {dim}; nothing was written")
        return spec.sizes
    if shape[dim] % count:
        raise RuleError(f"{op}: {name!r} of shape {list(shape)} has {shape[dim]} along dim {dim}, which does not "
                        f"split into {count} equal chunks; give sizes=A,B,...; nothing was written")
    return (shape[dim] // count,) * count


def _same_dtype(op: "Op", src: tuple[str, ...], dtypes: Mapping[str, str]) -> None:
    other = next((s for s in src if dtypes[s] != dtypes[src[0]]), None)
    if other is not None:
        raise RuleError(f"{op}: {src[0]!r} is {dtypes[src[0]]} but {other!r} is {dtypes[other]}; the tensors of one "
                        f"group share a dtype; nothing was written")


def _same_shape(op: "Op", src: tuple[str, ...], shapes: Mapping[str, tuple[int, ...]], dim: int | None) -> None:
    """Stack: every shape equal; concat: equal but along ``dim``."""
    first = tuple(shapes[src[0]])
    for s in src[1:]:
        shape = tuple(shapes[s])
        same = shape == first if dim is None else (len(shape) == len(first) and all(
            a == b for d, (a, b) in enumerate(zip(shape, first)) if d != dim))
        if not same:
            but = "" if dim is None else f" but along dim {dim}"
            raise RuleError(f"{op}: {src[0]!r} has shape {list(first)} but {s!r} {list(shape)}; the tensors of one "
                            f"{op.kind} need one shape{but}; nothing was written")


# ---------------------------------------------------------------- tensors


def apply(g: Group, tensors: "list[torch.Tensor]") -> "torch.Tensor":
    """The written tensor from its sources (a view for a piece; the writer makes it contiguous)."""
    import torch

    if tensors and _packed(tensors[0]):  # torch cannot cat float4 along most dims; its bytes it can
        return apply(g, [t.view(torch.uint8) for t in tensors]).view(tensors[0].dtype)
    if g.kind == "concat":
        return torch.cat(tensors, g.dim)
    if g.kind == "stack":
        return torch.stack(tensors, g.dim)
    if g.kind == "unstack":
        return tensors[0].select(g.dim, g.index)
    return tensors[0].narrow(g.dim, g.start, g.length)


def undo(g: Group, written: "list[torch.Tensor]") -> "list[torch.Tensor]":
    """The sources from what was written: a concat's or stack's one tensor, or every piece of a split or unstack."""
    import torch

    if written and _packed(written[0]):
        return [t.view(written[0].dtype) for t in undo(g, [w.view(torch.uint8) for w in written])]
    if g.kind == "concat":
        return list(torch.split(written[0], [s[g.dim] for s in g.shapes], g.dim))
    if g.kind == "stack":
        return list(written[0].unbind(g.dim))
    if g.kind == "unstack":
        return [torch.stack(written, g.dim)]
    return [torch.cat(written, g.dim)]


def _packed(t: "torch.Tensor") -> bool:
    return str(t.dtype) == "torch.float4_e2m1fn_x2"


def piece_range(g: Group, start: int, dtype: str) -> tuple[int, int]:
    """A contiguous piece's byte range, from the source's first byte at ``start``."""
    inner = dense_nbytes(dtype, g.shapes[0][g.dim + 1:])  # F4's values two to a byte: never cut along their dim
    first = g.start if g.kind == "split" else g.index
    length = g.length if g.kind == "split" else 1
    return start + first * inner, start + (first + length) * inner


# ---------------------------------------------------------------- the op's forms


def split_cli(kind: str, spec: str) -> tuple[str, str]:
    """``'REGEX=>INTO[:DIM[:sizes=...]]'`` -> (REGEX, the rest)."""
    if "=>" not in spec:
        example = {"split": r"'qkv\.weight$=>{q,k,v}.weight:0'", "concat": r"'\.{q,k,v}\.weight$=>.qkv.weight:0'",
                   "stack": r"'^experts\.{i}\.w1\.weight$=>experts.w1.weight'",
                   "unstack": r"'^experts\.w1\.weight$=>experts.{i}.w1.weight'"}[kind]
        raise RuleError(f"{kind} {spec!r} needs the form 'REGEX=>INTO[:DIM]' (e.g. {example})")
    regex, rest = spec.split("=>", 1)
    return regex, rest


def from_json(kind: str, value: Any) -> tuple[str, str] | None:
    """``{match: REGEX, into: NAME, dim: D, sizes: [...] | chunks: N}`` or ``'REGEX=>INTO:DIM'``."""
    if isinstance(value, str):
        return split_cli(kind, value)
    fields = {"match", "into", "dim"} | ({"sizes", "chunks"} if kind == "split" else set())
    if (not isinstance(value, dict) or not set(value) <= fields or not isinstance(value.get("match"), str)
            or not isinstance(value.get("into"), str)):
        return None
    dim, sizes, chunks = value.get("dim", 0), value.get("sizes"), value.get("chunks")
    sizes_ok = sizes is None or (isinstance(sizes, list) and bool(sizes) and all(map(_is_int, sizes)))
    if not _is_int(dim) or not sizes_ok or not (chunks is None or _is_int(chunks)) or None not in (sizes, chunks):
        return None
    spec = GroupSpec(value["into"], dim, tuple(sizes) if sizes else None, chunks)
    return value["match"], spec.text()


def to_json(kind: str, regex: str, text: str) -> dict:
    spec = parse(kind, regex, text)
    extra = {"sizes": list(spec.sizes)} if spec.sizes else ({"chunks": spec.chunks} if spec.chunks else {})
    return {"match": regex, "into": spec.into, "dim": spec.dim, **extra}


def canonical(kind: str, text: str) -> str:
    """The one text of the parameters: ``'x.{a,b}'`` -> ``'x.{a,b}:0'``."""
    return _parse_text(kind, text).text()


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


JSON_HINTS = {
    "split": "{match: REGEX, into: 'NAME.{a,b,c}', dim: D, sizes: [...] or chunks: N} or 'REGEX=>INTO:DIM'",
    "concat": "{match: 'REGEX with {a,b,c} or {i}', into: NAME, dim: D} or 'REGEX=>INTO:DIM'",
    "stack": "{match: 'REGEX with {i} or {a,b,c}', into: NAME, dim: D} or 'REGEX=>INTO:DIM'",
    "unstack": "{match: REGEX, into: 'NAME.{i}' or 'NAME.{a,b,c}', dim: D} or 'REGEX=>INTO:DIM'",
}
