"""`Rules`: the container to take and the ops to apply, from the API, a dict or a rules file."""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from ..errors import RuleError
from .ops import Op


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
        return {"select": self.select, "ops": [o.to_json() for o in self.ops]}

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
    def from_file(cls, path: str | os.PathLike, variables: Mapping[str, Any] | None = None) -> "Rules":
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
              - transpose: {match: 'c_fc\\.weight$', dims: [0, 1]}
              - rope_permute: {match: 'q_proj\\.weight$', heads: '{heads}', direction: hf-to-meta}
              - split: {match: 'qkv\\.weight$', into: '{q,k,v}.weight', dim: 0}
              - stack: {match: '^experts\\.{i}\\.w1\\.weight$', into: experts.w1.weight}

        A value written ``'{name}'`` is the variable ``name`` of ``variables`` (``heads``, ``kv_heads``:
        see profiles.py); ``description`` is a line for people (and ``--list-profiles``).
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
        data = _parse_yaml(p, text) if p.suffix.lower() in (".yml", ".yaml") else _parse_json(p, text)
        return cls.from_json(data, str(p), variables)

    @classmethod
    def from_json(cls, data: Any, source: str = "rules", variables: Mapping[str, Any] | None = None) -> "Rules":
        if isinstance(data, list):
            data = {"ops": data}
        if not isinstance(data, dict):
            raise RuleError(f"{source}: expected a mapping with 'ops' (and optional 'select') or a list of ops")
        unknown = set(data) - {"ops", "select", "description"}
        if unknown:
            raise RuleError(f"{source}: unknown top-level keys {sorted(map(str, unknown))}; expected 'ops' and 'select' "
                            f"(and 'description')")
        select = data.get("select")
        if select is not None and not isinstance(select, str):
            raise RuleError(f"{source}: 'select' must be a string")
        items = data.get("ops") or []
        if not isinstance(items, list):
            raise RuleError(f"{source}: 'ops' must be a list of ops")
        ops = [Op.from_json(substitute(item, variables or {}, f"{source}: op #{i + 1}"), f"{source}: op #{i + 1}")
               for i, item in enumerate(items)]
        return cls(ops=ops, select=select)


_VARIABLE = re.compile(r"\{([A-Za-z_]\w*)\}")  # '{heads}'; never a regex's '{2}' or '{2,3}'
VARIABLE_SOURCES = {  # where each variable a profile uses can come from, for the refusal
    "heads": "pass --heads N, or keep config.json (num_attention_heads) or params.json (n_heads) beside SRC",
    "kv_heads": "pass --kv-heads M, or keep config.json (num_key_value_heads) or params.json (n_kv_heads) beside SRC",
}


def substitute(value: Any, variables: Mapping[str, Any], where: str, depth: int = 3) -> Any:
    """``value`` with every string that is exactly ``'{name}'`` replaced by ``variables[name]``, down
    to the depth an op has (``{op: {field: [item]}}``): a YAML alias can make a list its own member."""
    if depth and isinstance(value, dict):
        return {k: substitute(v, variables, where, depth - 1) for k, v in value.items()}
    if depth and isinstance(value, list):
        return [substitute(v, variables, where, depth - 1) for v in value]
    m = _VARIABLE.fullmatch(value) if isinstance(value, str) else None
    if m is None:
        return value
    name = m.group(1)
    if name == "i" and name not in variables:  # the group ops' index placeholder (group_ops.py), never a variable
        return value
    if name not in variables:
        how = VARIABLE_SOURCES.get(name, f"known variables: {', '.join(VARIABLE_SOURCES)}")
        raise RuleError(f"{where} needs {{{name}}}, which is not known: {how}")
    return variables[name]


def _parse_yaml(p: Path, text: str) -> Any:
    import yaml  # only rules files need it

    # libyaml's scanner when PyYAML was built with it: the pure-Python one takes seconds on a few
    # KB of nested brackets before the recursion limit refuses them
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    try:
        _check_depth(p, yaml, yaml.parse(text, Loader=loader))
        return yaml.load(text, Loader=loader)  # noqa: S506 - a safe loader
    except (yaml.YAMLError, RecursionError, ValueError) as e:
        raise RuleError(f"{p}: not valid YAML: {' '.join(str(e).split())[:300]}") from None


MAX_YAML_DEPTH = 100  # a rules file nests three or four levels


def _check_depth(p: Path, yaml: Any, events: Any) -> None:
    """Refuse collections nested deeper than MAX_YAML_DEPTH, from the parser's events (a loop, no
    recursion), before the loader builds them: libyaml's composer recurses in C once per level, and
    on Python 3.12 50,000 '[' ended in a segmentation fault instead of a RecursionError."""
    depth = 0
    opens, closes = (yaml.SequenceStartEvent, yaml.MappingStartEvent), (yaml.SequenceEndEvent, yaml.MappingEndEvent)
    for event in events:
        if isinstance(event, opens):
            depth += 1
            if depth > MAX_YAML_DEPTH:
                raise RuleError(f"{p}: collections nested more than {MAX_YAML_DEPTH} deep; a rules file needs a few levels")
        elif isinstance(event, closes):
            depth -= 1


def _parse_json(p: Path, text: str) -> Any:
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as e:  # bad JSON, a 5000-digit number, [[[[... nested
        raise RuleError(f"{p}: not valid JSON: {str(e)[:300]}") from None
