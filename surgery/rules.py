"""Key rules as data, applied as a plan, written by streaming.

A rule list is computed over key *names* first (pure, instant, testable), giving a table of
old name -> new name or dropped. Only then are bytes moved: safetensors output copies each
tensor's byte range from the source, so peak memory does not grow with the file.
"""

from __future__ import annotations

import itertools
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

from .keys import detect_wrapper_prefixes, peel
from .checkpoint import DTYPE_ALIASES, FLOAT_DTYPES, SAFETENSORS_DTYPES, SPARSE_KINDS, Checkpoint, torch_dtype
from .errors import RuleError, SelectError

OP_KINDS = ("auto", "strip_prefix", "add_prefix", "rename", "drop", "keep", "dtype", "densify", "dequantize")
FLAG_OPS = ("auto", "densify", "dequantize")  # ops that take no argument


REMAP_SCHEMA = "surgery.remap/1"  # of RemapReport.to_json, what `surgery remap --json` prints


@dataclass(frozen=True)
class Op:
    """One rule. ``arg`` is the prefix, regex or dtype; ``repl`` the replacement for rename."""

    kind: str
    arg: str = ""
    repl: str = ""

    def __post_init__(self) -> None:
        if self.kind not in OP_KINDS:
            raise RuleError(f"unknown rule {self.kind!r}; known rules: {', '.join(OP_KINDS)}")
        if self.kind in ("rename", "drop", "keep"):
            try:
                re.compile(self.arg)
            except (re.error, OverflowError, RecursionError) as e:  # also 'a{9999999999}', '(((...'

                raise RuleError(f"{self.kind} pattern {self.arg!r} is not a valid regular expression: {e}") from None
        if self.kind == "rename":
            try:
                re.compile(self.arg).sub(self.repl, "")
            except (re.error, IndexError, OverflowError, RecursionError) as e:
                raise RuleError(f"rename replacement {self.repl!r} is invalid for {self.arg!r}: {e}") from None
        if self.kind in ("strip_prefix", "add_prefix") and not self.arg:
            raise RuleError(f"{self.kind.replace('_', '-')} needs a non-empty prefix")
        if self.kind == "dtype":
            object.__setattr__(self, "arg", parse_dtype(self.arg))

    def __str__(self) -> str:
        flag = "--" + self.kind.replace("_", "-")
        if self.kind in FLAG_OPS:
            return flag
        if self.kind == "rename":
            return f"{flag} '{self.arg}=>{self.repl}'"
        return f"{flag} {self.arg}"


def parse_dtype(name: str) -> str:
    key = name.strip().lower()
    if key in DTYPE_ALIASES:
        return DTYPE_ALIASES[key]
    if name.upper() in ("F32", "F16", "BF16", "F64"):
        return name.upper()
    raise RuleError(f"unknown dtype {name!r}; use one of fp32, fp16, bf16")


def parse_rename(spec: str) -> Op:
    """'REGEX=>REPLACEMENT' -> Op('rename', REGEX, REPLACEMENT)."""
    if "=>" not in spec:
        raise RuleError(f"rename {spec!r} needs the form 'REGEX=>REPLACEMENT' (e.g. '^backbone\\.=>')")
    pattern, repl = spec.split("=>", 1)
    return Op("rename", pattern, repl)


@dataclass
class Rules:
    """What to do to a checkpoint: the container to take, then ops in order."""

    ops: list[Op] = field(default_factory=list)
    select: str | None = None

    @property
    def dtype(self) -> str | None:
        casts = [o.arg for o in self.ops if o.kind == "dtype"]
        return casts[-1] if casts else None

    def to_json(self) -> dict:
        ops: list[dict] = []
        for o in self.ops:
            if o.kind in FLAG_OPS:
                ops.append({o.kind: True})
            elif o.kind == "rename":
                ops.append({"rename": [o.arg, o.repl]})
            else:
                ops.append({o.kind: o.arg})
        return {"select": self.select, "ops": ops}

    @classmethod
    def coerce(cls, rules: "Rules | list[Op] | dict | str | os.PathLike | None") -> "Rules":
        """A new `Rules` from what an API caller passes: Rules, a list of `Op`, a dict in the
        rules-file schema, a rules file path, or None. The caller's object is never modified."""
        if rules is None:
            return cls()
        if isinstance(rules, Rules):
            return cls(ops=list(rules.ops), select=rules.select)
        if isinstance(rules, list):
            return cls(ops=list(rules))
        if isinstance(rules, dict):
            return cls.from_json(rules)
        if isinstance(rules, (str, os.PathLike)):
            return cls.from_file(rules)
        raise RuleError(f"rules must be Rules, a list of Op, a dict or a rules file path, not {type(rules).__name__}")

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "Rules":
        """Read a rules file: JSON, or YAML when the suffix is .yml/.yaml. Schema::

            select: state_dict_ema          # optional
            ops:
              - auto: true
              - strip_prefix: "model."
              - rename: ["^fc\\\\.", "head."]   # or "REGEX=>REPLACEMENT"
              - drop: "num_batches_tracked$"
              - dtype: bf16
              - densify: true               # sparse tensors -> dense
              - dequantize: true            # quantized tensors -> float32
        """
        p = Path(path)
        try:
            text = p.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise RuleError(f"{p}: rules file not found") from None
        except (OSError, UnicodeDecodeError) as e:
            raise RuleError(f"{p}: cannot read rules file: {e}") from None
        if p.suffix.lower() == ".toml":
            raise RuleError(f"{p}: rules files are JSON or YAML (.yml/.yaml); TOML is not read: write the same "
                            f"'select' and 'ops' as JSON or YAML")
        if p.suffix.lower() in (".yml", ".yaml"):
            import yaml

            try:
                data = yaml.safe_load(text)
            except (yaml.YAMLError, RecursionError, ValueError) as e:
                raise RuleError(f"{p}: not valid YAML: {' '.join(str(e).split())[:300]}") from None
        else:
            try:
                data = json.loads(text)
            except (ValueError, RecursionError) as e:  # bad JSON, a 5000-digit number, [[[[... nested
                raise RuleError(f"{p}: not valid JSON: {str(e)[:300]}") from None
        return cls.from_json(data, str(p))

    @classmethod
    def from_json(cls, data: Any, source: str = "rules") -> "Rules":
        if isinstance(data, list):
            data = {"ops": data}
        if not isinstance(data, dict):
            raise RuleError(f"{source}: expected a mapping with 'ops' (and optional 'select') or a list of ops")
        unknown = set(data) - {"ops", "select"}
        if unknown:
            raise RuleError(f"{source}: unknown top-level keys {sorted(map(str, unknown))}; expected 'ops' and 'select'")
        select = data.get("select")
        if select is not None and not isinstance(select, str):
            raise RuleError(f"{source}: 'select' must be a string")
        ops: list[Op] = []
        for i, item in enumerate(data.get("ops") or []):
            if not isinstance(item, dict) or len(item) != 1:
                raise RuleError(f"{source}: op #{i + 1} must be a mapping with one key, e.g. {{strip_prefix: 'module.'}}")
            (kind, arg), = item.items()
            kind = str(kind).replace("-", "_")
            if kind in FLAG_OPS:
                if arg not in (True, None):
                    raise RuleError(f"{source}: op #{i + 1}: '{kind}' takes true")
                ops.append(Op(kind))
            elif kind == "rename":
                if isinstance(arg, str):
                    ops.append(parse_rename(arg))
                elif isinstance(arg, list) and len(arg) == 2 and all(isinstance(a, str) for a in arg):
                    ops.append(Op("rename", arg[0], arg[1]))
                else:
                    raise RuleError(f"{source}: op #{i + 1}: rename takes 'REGEX=>REPLACEMENT' or [REGEX, REPLACEMENT]")
            elif kind in OP_KINDS:
                if not isinstance(arg, str):
                    raise RuleError(f"{source}: op #{i + 1}: {kind} takes a string")
                ops.append(Op(kind, arg))
            else:
                raise RuleError(f"{source}: op #{i + 1}: unknown rule {kind!r}; known: {', '.join(OP_KINDS)}")
        return cls(ops=ops, select=select)


# ---------------------------------------------------------------- pure functions over names

def apply_op(op: Op, names: list[str]) -> tuple[list[str | None], int]:
    """New name for each of ``names`` (None: dropped), and how many names the op touched."""
    if op.kind == "auto":
        out = list(names)
        for p in detect_wrapper_prefixes(names):
            out = [peel(n, p) for n in out]
        return list(out), sum(a != b for a, b in zip(names, out))
    if op.kind == "strip_prefix":
        out = [n[len(op.arg):] if n.startswith(op.arg) else n for n in names]
        empty = [n for n in names if n == op.arg]
        if empty:
            raise RuleError(f"strip-prefix {op.arg!r} would leave key {empty[0]!r} with an empty name")
        return list(out), sum(n.startswith(op.arg) for n in names)
    if op.kind == "add_prefix":
        return [op.arg + n for n in names], len(names)
    if op.kind == "rename":
        rx = re.compile(op.arg)
        out2: list[str | None] = []
        for n in names:
            new = rx.sub(op.repl, n)
            if not new:
                raise RuleError(f"rename {op.arg!r}=>{op.repl!r} turns key {n!r} into an empty name")
            out2.append(new)
        return out2, sum(a != b for a, b in zip(names, out2))
    if op.kind == "drop":
        rx = re.compile(op.arg)
        out3 = [None if rx.search(n) else n for n in names]
        return out3, sum(o is None for o in out3)
    if op.kind == "keep":
        rx = re.compile(op.arg)
        out4 = [n if rx.search(n) else None for n in names]
        return out4, sum(o is not None for o in out4)
    return list(names), 0  # dtype, densify, dequantize: names unchanged


@dataclass
class NamePlan:
    mapping: dict[str, str | None]  # old -> new (None: dropped), in source order
    op_counts: list[tuple[str, int]]

    @property
    def kept(self) -> dict[str, str]:
        return {o: n for o, n in self.mapping.items() if n is not None}


def plan_names(names: Iterable[str], ops: list[Op]) -> NamePlan:
    """Apply ``ops`` in order to key names. Raises RuleError on collisions, listing all of them."""
    names = list(names)
    current: list[str | None] = list(names)
    counts = []
    for k, op in enumerate(ops):
        alive = [i for i, n in enumerate(current) if n is not None]
        if op.kind == "keep" and k > 0 and ops[k - 1].kind == "keep":
            continue  # applied with the first of its run
        if op.kind == "keep":  # adjacent --keep ops keep a name any of them matches: a union
            run = list(itertools.takewhile(lambda o: o.kind == "keep", ops[k:]))
            hits = [{i for i in alive if re.search(o.arg, current[i])} for o in run]  # type: ignore[arg-type]
            keep_any = set().union(*hits)
            for i in alive:
                if i not in keep_any:
                    current[i] = None
            counts += [(str(o), len(h)) for o, h in zip(run, hits)]
            continue
        new, touched = apply_op(op, [current[i] for i in alive])  # type: ignore[misc]
        for i, n in zip(alive, new):
            current[i] = n
        counts.append((str(op), touched))
    mapping = dict(zip(names, current))
    by_new: dict[str, list[str]] = {}
    for old, new in mapping.items():
        if new is not None:
            by_new.setdefault(new, []).append(old)
    clashes = {n: olds for n, olds in by_new.items() if len(olds) > 1}
    if clashes:
        parts = [f"{' and '.join(repr(o) for o in olds)} -> {n!r}" for n, olds in list(clashes.items())[:5]]
        more = f" (and {len(clashes) - 5} more)" if len(clashes) > 5 else ""
        raise RuleError(f"rules map several keys to one name: {'; '.join(parts)}{more}; "
                        f"adjust the rename or drop one of them first")
    return NamePlan(mapping, counts)


# ------------------------------------------------------------- pure functions over state dicts

def apply_rules(sd: Mapping[str, Any], ops: list[Op]) -> dict[str, Any]:
    """``dict[str, Tensor] -> dict[str, Tensor]``: names by ``ops``, then the cast if any."""
    plan = plan_names(sd.keys(), ops)
    out = {new: sd[old] for old, new in plan.kept.items()}
    kinds = {o.kind for o in ops}
    if "densify" in kinds:
        out = densify(out)
    if "dequantize" in kinds:
        out = dequantize(out)
    casts = [o.arg for o in ops if o.kind == "dtype"]
    return cast(out, casts[-1]) if casts else out


def strip_prefix(sd: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    """Remove ``prefix`` from every key that has it: ``strip_prefix(sd, "module.")``."""
    return apply_rules(sd, [Op("strip_prefix", prefix)])


def add_prefix(sd: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    return apply_rules(sd, [Op("add_prefix", prefix)])


def rename(sd: Mapping[str, Any], pattern: str, replacement: str) -> dict[str, Any]:
    """``re.sub(pattern, replacement, key)`` on every key: ``rename(sd, r"^fc\\.", "head.")``."""
    return apply_rules(sd, [Op("rename", pattern, replacement)])


def drop(sd: Mapping[str, Any], pattern: str) -> dict[str, Any]:
    return apply_rules(sd, [Op("drop", pattern)])


def keep(sd: Mapping[str, Any], pattern: str) -> dict[str, Any]:
    return apply_rules(sd, [Op("keep", pattern)])


def auto_strip(sd: Mapping[str, Any]) -> dict[str, Any]:
    """Peel ``module.`` / ``_orig_mod.`` (in any order, repeatedly) where every key has them."""
    return apply_rules(sd, [Op("auto")])


def cast(sd: Mapping[str, Any], dtype: str) -> dict[str, Any]:
    """Cast floating tensors to ``dtype`` ('fp16', 'bf16', 'fp32'); other tensors unchanged.
    Tensors that were shared stay shared."""
    target = torch_dtype(parse_dtype(dtype))
    done: dict[int, Any] = {}
    out = {}
    for k, t in sd.items():
        if id(t) not in done:
            done[id(t)] = t.to(target) if t.is_floating_point() else t
        out[k] = done[id(t)]
    return out


def densify(sd: Mapping[str, Any]) -> dict[str, Any]:
    """Sparse tensors (COO, CSR, CSC, BSR, BSC) as dense ones; other tensors unchanged.
    Tensors that were shared stay shared."""
    return _convert_each(sd, lambda t: t.to_dense() if t.layout != _strided() else t)


def dequantize(sd: Mapping[str, Any]) -> dict[str, Any]:
    """Quantized tensors as float32 (``t.dequantize()``); other tensors unchanged."""
    return _convert_each(sd, lambda t: t.dequantize() if t.is_quantized else t)


def _strided() -> Any:
    import torch

    return torch.strided


def _convert_each(sd: Mapping[str, Any], fn: Any) -> dict[str, Any]:
    done: dict[int, Any] = {}
    out = {}
    for k, t in sd.items():
        if id(t) not in done:
            done[id(t)] = fn(t)
        out[k] = done[id(t)]
    return out


# ------------------------------------------------------------------------- file-level remap

@dataclass
class PlanRow:
    old: str
    new: str | None
    dtype: str
    new_dtype: str
    shape: tuple[int, ...]
    alias_of: str | None = None  # stored once: this name shares the bytes of alias_of
    kind: str = "dense"  # see TensorInfo.kind
    new_kind: str = "dense"  # "dense" where --densify / --dequantize converts it

    @property
    def converted(self) -> bool:
        return self.new_kind != self.kind or self.new_dtype != self.dtype


@dataclass
class RemapReport:
    src: str
    dst: str
    src_format: str
    dst_format: str
    container: str
    rows: list[PlanRow]
    op_counts: list[tuple[str, int]]
    dry_run: bool
    bytes_written: int = 0
    files: list[str] = field(default_factory=list)
    verified: bool | None = None
    source_sha256: str | None = None

    @property
    def renamed(self) -> int:
        return sum(1 for r in self.rows if r.new is not None and r.new != r.old)

    @property
    def dropped(self) -> int:
        return sum(1 for r in self.rows if r.new is None)

    @property
    def kept(self) -> int:
        return sum(1 for r in self.rows if r.new is not None)

    def to_json(self) -> dict:
        return {
            "schema": REMAP_SCHEMA, "src": self.src, "dst": self.dst, "src_format": self.src_format, "dst_format": self.dst_format,
            "container": self.container, "dry_run": self.dry_run,
            "ops": [{"op": o, "matched": n} for o, n in self.op_counts],
            "kept": self.kept, "renamed": self.renamed, "dropped": self.dropped,
            "bytes_written": self.bytes_written, "files": self.files, "verified": self.verified,
            "source_sha256": self.source_sha256,
            "tensors": [{"old": r.old, "new": r.new, "dtype": r.new_dtype, "shape": list(r.shape),
                         **({"from_dtype": r.dtype} if r.dtype != r.new_dtype else {}),
                         **({"kind": r.new_kind} if r.new_kind != "dense" or r.kind != "dense" else {}),
                         **({"from_kind": r.kind} if r.kind != r.new_kind else {}),
                         **({"alias_of": r.alias_of} if r.alias_of else {})} for r in self.rows],
        }


TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")


def output_format(dst: Path) -> str:
    """From DST: .safetensors, a torch suffix, or a folder (sharded safetensors with an index)."""
    suffix = dst.suffix.lower()
    if suffix == ".safetensors":
        return "safetensors"
    if suffix in TORCH_SUFFIXES:
        return "torch-zip"
    if dst.is_dir() or not suffix or str(dst).endswith(os.sep):
        return "safetensors-index"
    raise RuleError(f"{dst}: cannot tell the output format from the suffix {suffix!r}; use .safetensors, "
                    f"{', '.join(TORCH_SUFFIXES)}, or a folder name for sharded safetensors")


_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str) -> int:
    """'5GB' -> 5_000_000_000, '512MiB' -> 536870912."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
    if not m or m.group(2).upper() not in _SIZE_UNITS:
        raise RuleError(f"shard size {text!r} is not a size like 500MB, 2GB or 1GiB")
    n = int(float(m.group(1)) * _SIZE_UNITS[m.group(2).upper()])
    if n <= 0:
        raise RuleError(f"shard size {text!r} must be positive")
    return n


def _after_conversion(t: Any, ops: set[str]) -> tuple[str, str]:
    """(kind, dtype) of a tensor once --densify / --dequantize have applied."""
    if "densify" in ops and t.kind in SPARSE_KINDS:
        return "dense", t.dtype
    if "dequantize" in ops and t.kind == "quantized":
        return "dense", "F32"
    return t.kind, t.dtype


def build_plan(ckpt: Checkpoint, rules: Rules) -> tuple[list[PlanRow], list[tuple[str, int]]]:
    plan = plan_names(ckpt.tensors.keys(), rules.ops)
    target = rules.dtype
    ops = {o.kind for o in rules.ops}
    rows = []
    matched = {"--dtype": 0, "--densify": 0, "--dequantize": 0}
    for old, new in plan.mapping.items():
        t = ckpt.tensors[old]
        kind, dtype = _after_conversion(t, ops)
        nd = target if (target and dtype in FLOAT_DTYPES) else dtype
        rows.append(PlanRow(old, new, t.dtype, nd, t.shape, kind=t.kind, new_kind=kind))
        if new is not None:
            matched["--dtype"] += nd != dtype
            matched["--densify" if t.kind in SPARSE_KINDS else "--dequantize"] += kind != t.kind
    counts = [(op, matched.get(op.split(" ")[0], n)) for op, n in plan.op_counts]
    # tied tensors: the first kept name of each shared view stores the bytes, later ones alias it
    first: dict[tuple, str] = {}
    for r in rows:
        if r.new is None:
            continue
        key = ckpt.tensors[r.old].view_key
        if key in first:
            r.alias_of = first[key]
        else:
            first[key] = r.new
    return rows, counts


def refuse_unsafetensorable(src: Path, rows: list[PlanRow]) -> None:
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


def remap(src: str | os.PathLike, dst: str | os.PathLike, rules: Rules | list[Op] | dict | str | os.PathLike | None = None, *,
          force: bool = False, in_place: bool = False, dry_run: bool = False, verify: bool = False,
          shard_size: str | int = "5GB", allow_globals: Iterable[str] = ()) -> RemapReport:
    """Rewrite ``src`` to ``dst`` with ``rules``; the output format follows ``dst``'s suffix.

    ``rules``: a `Rules`, a list of `Op`, a dict in the rules-file schema, or a rules file path.

    >>> remap("dp.pth", "clean.safetensors", [Op("auto")])  # doctest: +SKIP
    >>> remap("dp.pth", "clean.pt", {"ops": [{"auto": True}, {"dtype": "bf16"}]})  # doctest: +SKIP
    """
    from .formats import open_checkpoint
    from .io import OUTPUTS, check_destination, check_source

    rules = Rules.coerce(rules)
    src_p, dst_p = Path(src), Path(dst)
    check_source(src_p)
    ckpt = open_checkpoint(src_p, select=rules.select, allow_globals=tuple(allow_globals))
    if ckpt.file_kind == "optimizer" and rules.select is None:
        raise SelectError(f"{src_p}: this is {ckpt.description}, not a model's weights; name the tensor dict to "
                          f"write with --select (one of: {', '.join(ckpt.containers[:6])}"
                          f"{' ...' if len(ckpt.containers) > 6 else ''})")
    fmt = output_format(dst_p)
    rows, counts = build_plan(ckpt, rules)
    if fmt != "torch-zip":
        refuse_unsafetensorable(src_p, rows)
    shard_bytes = parse_size(shard_size) if isinstance(shard_size, str) else int(shard_size)
    report = RemapReport(str(src_p), str(dst_p), ckpt.format, fmt, ckpt.container, rows, counts, dry_run)
    if not any(r.new is not None for r in rows):
        raise RuleError(f"{src_p}: the rules drop every tensor; nothing would be written")
    if dry_run:
        return report
    inputs = [src_p, *map(Path, ckpt.files)]
    check_destination(dst_p, inputs, force=force, in_place=in_place,
                      kind="folder" if fmt == "safetensors-index" else "file", owned=OUTPUTS["remap"])
    from . import _writers

    _writers.write(ckpt, rows, rules, dst_p, fmt, shard_bytes, report)
    if verify:
        _writers.verify(ckpt, rows, rules, dst_p, report)
    return report


