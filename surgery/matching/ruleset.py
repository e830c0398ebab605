"""A pairing as a rules file `surgery remap --rules` reads: drop what B has no place for, rename
the rest onto B's names (a subtree at a time where a whole subtree moves), then reorder the dims
the values showed reordered. The ops are checked by running remap's own name planner over A."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Iterable

from ..errors import OutputError, RuleError
from ..io import atomic_file, check_destination
from ..remapping import Op, Rules, plan_names
from .pairing import Pair

_TEMP = "match_tmp_"  # the first pass's prefix when one rename would feed the next


def propose_rules(names: Iterable[str], pairs: list[Pair], drop: list[str]) -> Rules:
    """Ops that take ``names`` (A's keys, in order) to each pair's B name, dropping ``drop``."""
    names = list(names)
    want = {p.a: p.b for p in pairs}
    want.update({k: None for k in drop})
    moves = [p for p in pairs if p.a != p.b]
    drops = _drops(names, drop)
    reorders = _reorders([want.get(k, k) for k in names if want.get(k, k) is not None], pairs)
    kept = [k for k in names if k not in want or want[k] is not None]
    for renames in (_renames(kept, moves), _two_pass(kept, moves)):
        rules = Rules(ops=drops + renames + reorders)
        if _does(rules, names, want, {p.a for p in pairs if p.dims is not None}):
            return rules
    raise OutputError("the proposed rules do not reproduce the match; please report this with the two key lists")


def _does(rules: Rules, names: list[str], want: dict[str, str | None], reordered: set[str]) -> bool:
    """Whether remap's planner takes every name where ``want`` says, reordering exactly ``reordered``."""
    try:
        plan = plan_names(names, rules.ops)
    except RuleError:  # two keys onto one name
        return False
    return all(plan.mapping[k] == want.get(k, k) for k in names) and set(plan.tensor_ops) == reordered


def _renames(names: list[str], moves: list[Pair], prefix: str = "") -> list[Op]:
    """One rename per subtree that moves whole: the shortest module path of a key whose every key
    moves under one other path, the rest of each name kept (``module.`` stripped is one rename)."""
    want = {p.a: p.b for p in moves}
    under: dict[str, list[str]] = {"": list(names)}
    for k in names:
        parts = k.split(".")
        for i in range(1, len(parts)):
            under.setdefault(".".join(parts[:i]) + ".", []).append(k)
    valid: dict[tuple[str, str], bool] = {}

    def moves_whole(src: str, dst: str) -> bool:
        if (src, dst) not in valid:
            valid[(src, dst)] = src != dst and all(want.get(k, k) == dst + k[len(src):] for k in under[src])
        return valid[(src, dst)]

    ops: dict[tuple[str, str, bool], None] = {}
    for p in moves:
        ops[_subtree(p, moves_whole)] = None
    return [Op("rename", f"^{re.escape(src)}" + ("$" if whole else ""), _literal(prefix + dst))
            for src, dst, whole in ops]


def _subtree(p: Pair, moves_whole) -> tuple[str, str, bool]:
    """(``Pa.``, ``Pb.``, False) for the shortest such paths of ``p``; (a, b, True) when none moves whole."""
    pa, pb = p.a.split("."), p.b.split(".")
    for i in range(len(pa)):
        rest = pa[i:]
        cut = len(pb) - len(rest)
        if cut < 0 or pb[cut:] != rest:
            continue
        src = "".join(c + "." for c in pa[:i])
        if moves_whole(src, "".join(c + "." for c in pb[:cut])):
            return src, "".join(c + "." for c in pb[:cut]), False
    return p.a, p.b, True


def _drops(names: list[str], drop: list[str]) -> list[Op]:
    """One drop per leaf name every key of which goes (``num_batches_tracked``), one per key otherwise."""
    gone = set(drop)
    leaves: dict[str, list[str]] = {}
    for k in names:
        leaves.setdefault(k.rpartition(".")[2], []).append(k)
    whole = {leaf for leaf, keys in leaves.items() if len(keys) > 1 and gone.issuperset(keys)}
    ops = [Op("drop", f"(^|\\.){re.escape(leaf)}$") for leaf in dict.fromkeys(k.rpartition(".")[2] for k in drop)
           if leaf in whole]
    return ops + [Op("drop", f"^{re.escape(k)}$") for k in drop if k.rpartition(".")[2] not in whole]


def _two_pass(names: list[str], moves: list[Pair]) -> list[Op]:
    """Every move under a prefix no key has, then the prefix removed: no rename sees another's output."""
    prefix = _TEMP
    while any(k.startswith(prefix) for k in names):
        prefix += "_"
    return _renames(names, moves, prefix) + [Op("rename", f"^{re.escape(prefix)}", "")]


def _literal(text: str) -> str:
    return text.replace("\\", "\\\\")


def _reorders(final: list[str], pairs: list[Pair]) -> list[Op]:
    """One op per dim order and name pattern (numbered components as ``\\d+``) where the pattern
    matches exactly the keys in that order, as the names are after the renames; one per key otherwise."""
    by_dims: dict[tuple[int, ...], list[str]] = {}
    for p in pairs:
        if p.dims is not None:
            by_dims.setdefault(p.dims, []).append(p.b)
    ops = []
    for dims, keys in by_dims.items():
        patterns = dict.fromkeys(_numbered(k) for k in keys)
        if {k for k in final if any(re.search(pat, k) for pat in patterns)} != set(keys):
            patterns = dict.fromkeys(f"^{re.escape(k)}$" for k in keys)
        ops += [_reorder(pat, dims) for pat in patterns]
    return ops


def _numbered(key: str) -> str:
    return "^" + r"\.".join(r"\d+" if c.isdigit() else re.escape(c) for c in key.split(".")) + "$"


def _reorder(match: str, dims: tuple[int, ...]) -> Op:
    if _is_swap(dims):
        i, j = [d for d, x in enumerate(dims) if d != x]
        return Op("transpose", match, (i, j))
    return Op("permute", match, dims)


def _is_swap(dims: tuple[int, ...]) -> bool:
    return sum(d != x for d, x in enumerate(dims)) == 2


def _readable(op: Op) -> dict:
    """A rename as one 'REGEX=>REPLACEMENT' string where that reads back the same."""
    data = op.to_json()
    if op.kind == "rename" and "=>" not in op.arg + op.repl:
        return {"rename": f"{op.arg}=>{op.repl}"}
    return data


def _yaml(yaml, data: dict) -> str:
    """One line per op, as the docs write them: ``- rename: ...``, ``- transpose: {match: ..., dims: [0, 1]}``."""
    def flow(v) -> str:
        return yaml.safe_dump(v, default_flow_style=True, sort_keys=False, width=1 << 30).removesuffix("...\n").strip()

    ops = "".join(f"- {kind}: {flow(v)}\n" for op in data["ops"] for kind, v in op.items())
    text = f"description: {flow(data['description'])}\n" + ("ops:\n" + ops if ops else "ops: []\n")
    if yaml.safe_load(text) != data:  # the rules file must read back as the ops it was made from
        raise OutputError("the rules could not be written as YAML that reads back the same; write JSON (--out X.json)")
    return text


def write_rules(rules: Rules, dst: str | Path, inputs: list[Path], force: bool, header: list[str]) -> None:
    """``rules`` as YAML (``.yml``/``.yaml``) or JSON (any other name), as ``Rules.from_file`` reads them."""
    dst = Path(dst)
    check_destination(dst, inputs, force, None)
    data = {"description": header[0], "ops": [_readable(op) for op in rules.ops]}
    if dst.suffix.lower() in (".yml", ".yaml"):
        import yaml

        text = "".join(f"# {line}\n" for line in header[1:]) + _yaml(yaml, data)
    else:
        text = json.dumps(data, indent=2) + "\n"
    try:
        with atomic_file(dst) as tmp:
            tmp.write_text(text, encoding="utf-8")
    except OSError as e:
        raise OutputError(f"{dst}: cannot write: {e.strerror or e}; nothing was written") from None
