"""The op table: every rule `surgery remap` knows, described once.

An `OpKind` row says how the op's argument is checked and written (its `ArgForm`: as a
command-line flag and in the rules file's JSON), what the op does to key names, and its help
text. `Op`, the rules file reader and writer, the plan and the CLI's options all read `OP_KINDS`:
adding an op kind is adding a row (and, for a tensor conversion, its transform).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable

from ..checkpoint import DTYPE_ALIASES
from ..errors import RuleError
from ..keys import detect_wrapper_prefixes, peel
from . import group_ops, tensor_ops

NameChange = tuple[list["str | None"], int]  # new name per input name (None: dropped), names touched


# ---------------------------------------------------------------- argument forms

def _no_arg(kind: str, arg: str, repl: str) -> str:
    return ""


def _prefix(kind: str, arg: str, repl: str) -> str:
    if not arg:
        raise RuleError(f"{kind.replace('_', '-')} needs a non-empty prefix")
    return arg


def _regex(kind: str, arg: str, repl: str) -> str:
    try:
        re.compile(arg)
    except (re.error, OverflowError, RecursionError) as e:  # also 'a{9999999999}', '(((...'
        raise RuleError(f"{kind} pattern {arg!r} is not a valid regular expression: {e}") from None
    return arg


def _rename(kind: str, arg: str, repl: str) -> str:
    _regex(kind, arg, repl)
    try:
        re.compile(arg).sub(repl, "")
    except (re.error, IndexError, OverflowError, RecursionError) as e:
        raise RuleError(f"rename replacement {repl!r} is invalid for {arg!r}: {e}") from None
    return arg


def parse_dtype(name: str) -> str:
    """'bf16' / 'bfloat16' / 'BF16' -> 'BF16', the safetensors name."""
    key = name.strip().lower()
    if key in DTYPE_ALIASES:
        return DTYPE_ALIASES[key]
    if name.upper() in ("F32", "F16", "BF16", "F64"):
        return name.upper()
    raise RuleError(f"unknown dtype {name!r}; use one of fp32, fp16, bf16")


def split_rename(spec: str) -> tuple[str, str]:
    """'REGEX=>REPLACEMENT' -> (REGEX, REPLACEMENT)."""
    if "=>" not in spec:
        raise RuleError(f"rename {spec!r} needs the form 'REGEX=>REPLACEMENT' (e.g. '^backbone\\.=>')")
    pattern, repl = spec.split("=>", 1)
    return pattern, repl


def _flag_json(value: Any) -> tuple[str, str] | None:
    return ("", "") if value in (True, None) else None


def _text_json(value: Any) -> tuple[str, str] | None:
    return (value, "") if isinstance(value, str) else None


def _rename_json(value: Any) -> tuple[str, str] | None:
    if isinstance(value, str):
        return split_rename(value)
    if isinstance(value, list) and len(value) == 2 and all(isinstance(a, str) for a in value):
        return value[0], value[1]
    return None


@dataclass(frozen=True)
class ArgForm:
    """How an op's argument is checked, given on the command line and written in a rules file."""

    metavar: str | None  # None: the op is a flag and takes no argument
    check: Callable[[str, str, str], str]  # (kind, arg, repl) -> arg as stored; raises RuleError
    from_cli: Callable[[str], tuple[str, str]]  # option value -> (arg, repl)
    from_json: Callable[[Any], "tuple[str, str] | None"]  # rules-file value -> (arg, repl); None: wrong form
    to_json: Callable[[str, str], Any]
    json_hint: str  # what the rules file takes, for the error message
    show: Callable[[str, str], str]  # (arg, repl) -> the text after the flag
    norm: Callable[[str, str], str] | None = None  # (kind, repl) -> repl as stored: its one spelling


def _as_arg(value: str) -> tuple[str, str]:
    return value, ""


def _arg(arg: str, repl: str) -> str:
    return arg


FLAG = ArgForm(metavar=None, check=_no_arg, from_cli=lambda v: ("", ""), from_json=_flag_json,
               to_json=lambda a, r: True, json_hint="true", show=lambda a, r: "")
PREFIX = ArgForm(metavar="P", check=_prefix, from_cli=_as_arg, from_json=_text_json, to_json=_arg,
                 json_hint="a string", show=_arg)
REGEX = ArgForm(metavar="REGEX", check=_regex, from_cli=_as_arg, from_json=_text_json, to_json=_arg,
                json_hint="a string", show=_arg)
RENAME = ArgForm(metavar="'REGEX=>REPL'", check=_rename, from_cli=split_rename, from_json=_rename_json,
                 to_json=lambda a, r: [a, r], json_hint="'REGEX=>REPLACEMENT' or [REGEX, REPLACEMENT]",
                 show=lambda a, r: f"'{a}=>{r}'")
DTYPE = ArgForm(metavar="fp16|bf16|fp32", check=lambda kind, a, r: parse_dtype(a), from_cli=_as_arg,
                from_json=_text_json, to_json=_arg, json_hint="a string", show=_arg)



def _tensor_op(kind: str, arg: str, repl: str) -> str:
    _regex(kind, arg, repl)
    tensor_ops.parse_params(kind, repl)
    return arg


def _tensor_form(kind: str, metavar: str) -> ArgForm:
    """A tensor op's form: 'REGEX:ARGS' on the command line, a mapping in a rules file."""
    return ArgForm(metavar=metavar, check=_tensor_op, from_cli=lambda v: tensor_ops.split_cli(kind, v),
                   from_json=lambda v: tensor_ops.from_json(kind, v),
                   to_json=lambda a, r: tensor_ops.to_json(kind, a, r), json_hint=tensor_ops.JSON_HINTS[kind],
                   show=lambda a, r: f"'{a}:{r}'", norm=tensor_ops.canonical)


def _group_op(kind: str, arg: str, repl: str) -> str:
    group_ops.parse(kind, arg, repl)
    return arg


def _group_form(kind: str) -> ArgForm:
    """A group op's form: 'REGEX=>INTO:DIM' on the command line, a mapping in a rules file."""
    reads = kind in group_ops.READS_PARTS  # the placeholder is in the regex, else in the names written
    metavar = "'REGEX{a,b}=>NAME[:DIM]'" if reads else "'REGEX=>NAME{a,b}[:DIM]'"
    return ArgForm(metavar=metavar, check=_group_op, from_cli=lambda v: group_ops.split_cli(kind, v),
                   from_json=lambda v: group_ops.from_json(kind, v),
                   to_json=lambda a, r: group_ops.to_json(kind, a, r), json_hint=group_ops.JSON_HINTS[kind],
                   show=lambda a, r: f"'{a}=>{r}'", norm=group_ops.canonical)


# ---------------------------------------------------------------- what ops do to key names

def _auto(op: "Op", names: list[str]) -> NameChange:
    out = list(names)
    for p in detect_wrapper_prefixes(names):
        out = [peel(n, p) for n in out]
    return list(out), sum(a != b for a, b in zip(names, out))


def _strip_prefix(op: "Op", names: list[str]) -> NameChange:
    empty = [n for n in names if n == op.arg]
    if empty:
        raise RuleError(f"strip-prefix {op.arg!r} would leave key {empty[0]!r} with an empty name")
    return [n[len(op.arg):] if n.startswith(op.arg) else n for n in names], sum(n.startswith(op.arg) for n in names)


def _add_prefix(op: "Op", names: list[str]) -> NameChange:
    return [op.arg + n for n in names], len(names)


def _rename_names(op: "Op", names: list[str]) -> NameChange:
    rx = re.compile(op.arg)
    out: list[str | None] = []
    for n in names:
        new = rx.sub(op.repl, n)
        if not new:
            raise RuleError(f"rename {op.arg!r}=>{op.repl!r} turns key {n!r} into an empty name")
        out.append(new)
    return out, sum(a != b for a, b in zip(names, out))


def _drop(op: "Op", names: list[str]) -> NameChange:
    rx = re.compile(op.arg)
    out = [None if rx.search(n) else n for n in names]
    return out, sum(o is None for o in out)


def _keep(op: "Op", names: list[str]) -> NameChange:
    rx = re.compile(op.arg)
    out = [n if rx.search(n) else None for n in names]
    return out, sum(o is not None for o in out)


# ---------------------------------------------------------------- the table

@dataclass(frozen=True)
class OpKind:
    name: str  # as in `Op.kind` and the rules file; the flag is --name-with-dashes
    form: ArgForm
    help: str  # the command line's help for the flag
    names: Callable[["Op", list[str]], NameChange] | None = None  # None: names unchanged (a tensor conversion)
    tensor: bool = False  # a one-to-one tensor op (tensor_ops.py): applies to the keys its regex matches
    group: bool = False  # a many-to-one or one-to-many op (group_ops.py): reads some names, writes others

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


OP_KINDS: dict[str, OpKind] = {k.name: k for k in (
    OpKind("auto", FLAG, "Strip module./_orig_mod./_forward_module. (any order, repeatedly) where every key has them.", _auto),
    OpKind("strip_prefix", PREFIX, "Remove prefix P from keys that start with it.", _strip_prefix),
    OpKind("add_prefix", PREFIX, "Put prefix P in front of every key.", _add_prefix),
    OpKind("rename", RENAME, "re.sub on every key, e.g. '^fc\\.=>head.'.", _rename_names),
    OpKind("drop", REGEX, "Drop keys matching REGEX (re.search).", _drop),
    OpKind("keep", REGEX, "Keep only keys matching REGEX.", _keep),
    OpKind("dtype", DTYPE, "Cast floating tensors (FP8 weights with scales beside them need --dequantize)."),
    OpKind("densify", FLAG, "Write sparse tensors (COO, CSR, ...) as dense ones."),
    OpKind("dequantize", FLAG, "Write quantized tensors as float32 (t.dequantize()), and FP8 weights with their "
                               "scales (x.weight_scale_inv) applied, as bf16 or --dtype; the scales are dropped."),
    OpKind("transpose", _tensor_form("transpose", "'REGEX:D0,D1'"),
           "Swap two dims of the tensors whose keys match REGEX, e.g. 'c_attn\\.weight$:0,1'.", tensor=True),
    OpKind("permute", _tensor_form("permute", "'REGEX:ORDER'"),
           "Reorder the dims of matching tensors, e.g. '^w$:2,0,1' (torch.permute).", tensor=True),
    OpKind("reshape", _tensor_form("reshape", "'REGEX:SIZES'"),
           "Reshape matching tensors, e.g. '^pos$:1,-1,768' (at most one -1).", tensor=True),
    OpKind("rope_permute", _tensor_form("rope_permute", "'REGEX:HEADS,DIRECTION'"),
           "Reorder the rows of matching q or k projections between Hugging Face's and Meta's RoPE layouts: "
           "'q_proj\\.weight$:32,hf-to-meta' (DIRECTION hf-to-meta or meta-to-hf; k with its kv-heads).",
           tensor=True),
    OpKind("split", _group_form("split"),
           "Split matching tensors along DIM into the parts the name after '=>' lists: "
           "'qkv\\.weight$=>{q,k,v}.weight:0' (equal chunks; INTO:DIM:sizes=A,B,C for others, {i} with chunks=N).",
           group=True),
    OpKind("concat", _group_form("concat"),
           "Concatenate the tensors whose names differ in the regex's {q,k,v} (or {i}: 0, 1, ...), in that order, "
           "along DIM: '\\.{q,k,v}\\.weight$=>.qkv.weight:0'; the inverse of split.", group=True),
    OpKind("stack", _group_form("stack"),
           "Stack the tensors whose names differ in the regex's {i} (0, 1, ... all present) along a new DIM: "
           "'^experts\\.{i}\\.w1\\.weight$=>experts.w1.weight:0'.", group=True),
    OpKind("unstack", _group_form("unstack"),
           "One tensor per index of DIM of matching tensors, named with {i} (or {a,b,...}): "
           "'^experts\\.w1\\.weight$=>experts.{i}.w1.weight:0'; the inverse of stack.", group=True),
)}


def op_kind(name: str) -> OpKind:
    kind = OP_KINDS.get(name)
    if kind is None:
        raise RuleError(f"unknown rule {name!r}; known rules: {', '.join(OP_KINDS)}")
    return kind


@dataclass(frozen=True)
class Op:
    """One rule. ``arg`` is the prefix, regex or dtype; ``repl`` the replacement for rename, or a
    tensor op's parameters (``"0,1"``, ``(0, 1)``, ``"32,hf-to-meta"``)."""

    kind: str
    arg: str = ""
    repl: str = ""

    def __post_init__(self) -> None:
        kind = op_kind(self.kind)
        form = kind.form
        if isinstance(self.repl, dict) and kind.group:  # Op("split", r"qkv$", {"into": "{q,k,v}", "dim": 0})
            args = form.from_json({"match": self.arg, **self.repl})
            if args is None:
                raise RuleError(f"{self.kind} takes {form.json_hint}, not {self.repl!r}")
            object.__setattr__(self, "repl", args[1])
        if isinstance(self.repl, (tuple, list)):  # Op("transpose", "w$", (0, 1))
            object.__setattr__(self, "repl", ",".join(map(str, self.repl)))
        object.__setattr__(self, "arg", form.check(self.kind, self.arg, self.repl))
        if form.norm is not None:
            object.__setattr__(self, "repl", form.norm(self.kind, self.repl))

    @property
    def params(self) -> tuple:
        """A tensor op's parameters: the dims, the sizes, or (heads, direction); a group op's `GroupSpec`."""
        if OP_KINDS[self.kind].group:
            return group_ops.parse(self.kind, self.arg, self.repl)
        return tensor_ops.parse_params(self.kind, self.repl)

    def inverse(self, shape: "tuple[int, ...] | None" = None) -> "Op":
        """The tensor op that undoes this one, matching the same keys; a reshape needs the ``shape``
        it was given. Name ops have no inverse of their own: the plan's mapping undoes them; nor
        group ops, which --verify-roundtrip undoes tensor by tensor (split <-> concat, stack <-> unstack)."""
        if OP_KINDS[self.kind].group:
            raise RuleError(f"{self} has no inverse op of its own: a {group_ops.INVERSE[self.kind]} of the names it "
                            f"wrote undoes it (vit-split-qkv and vit-fuse-qkv are such a pair): write that op in the inverse rules")
        if not OP_KINDS[self.kind].tensor:
            raise RuleError(f"{self} has no inverse op: a rename is undone by a rename back, written in the inverse "
                           f"rules; a drop, prefix or cast by none")
        if self.kind == "reshape" and shape is None:
            raise RuleError(f"{self}: the inverse of a reshape needs the shape it was given")
        kind, params = tensor_ops.inverse(self.kind, self.params, tuple(shape or ()))
        return Op(kind, self.arg, params)

    def __str__(self) -> str:
        kind = OP_KINDS[self.kind]
        shown = kind.form.show(self.arg, self.repl)
        return f"{kind.flag} {shown}" if shown else kind.flag

    def to_json(self) -> dict:
        return {self.kind: OP_KINDS[self.kind].form.to_json(self.arg, self.repl)}

    @classmethod
    def from_cli(cls, kind: str, value: str = "") -> "Op":
        return cls(kind, *op_kind(kind).form.from_cli(value))

    @classmethod
    def from_json(cls, item: Any, where: str) -> "Op":
        """One op of a rules file, ``{kind: value}``; ``where`` names it in errors."""
        if not isinstance(item, dict) or len(item) != 1:
            raise RuleError(f"{where} must be a mapping with one key, e.g. {{strip_prefix: 'module.'}}")
        (name, value), = item.items()
        name = str(name).replace("-", "_")
        kind = OP_KINDS.get(name)
        if kind is None:
            raise RuleError(f"{where}: unknown rule {name!r}; known: {', '.join(OP_KINDS)}")
        args = kind.form.from_json(value)
        if args is None:
            label = repr(name) if kind.form is FLAG else name
            raise RuleError(f"{where}: {label} takes {kind.form.json_hint}")
        return cls(name, *args)


def parse_rename(spec: str) -> Op:
    """'REGEX=>REPLACEMENT' -> Op('rename', REGEX, REPLACEMENT)."""
    return Op("rename", *split_rename(spec))
