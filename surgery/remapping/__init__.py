"""Remap: key rules as data, applied as a plan, written by streaming.

A rule list is computed over key *names* first (pure, instant, testable), giving a table of
old name -> new name or dropped. Only then are bytes moved: safetensors output copies each
tensor's byte range from the source, so peak memory does not grow with the file.

- `ops`: the op table (`OP_KINDS`): each rule's argument, checks, flag, JSON form, effect on names.
- `rules`: `Rules`, the ops in order and the container, from the API, a dict or a rules file.
- `plan`: names first (`plan_names`), then per tensor (`build_plan`), and the refusals.
- `tensor_ops`: the one-to-one tensor ops (transpose, permute, reshape, rope_permute): shapes, inverses.
- `group_ops`: split, concat, stack, unstack (several tensors into one and back): names, shapes, inverses.
- `profiles`: the rules files shipped in ``profiles/`` and the variables they use (heads, kv-heads).
- `roundtrip`: ``--verify-roundtrip``, the plan's inverse applied to the output.
- `transforms`: the same ops as pure ``dict[str, Tensor] -> dict[str, Tensor]`` functions.
- `output`, `verify`: the plan as the output format's writer takes it; reading it back.
- `options`: `RemapOptions`, how remap writes (its flags); `run`: `remap()`, the orchestrator.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

# name -> submodule; loaded on first use, so the command line can read the op table without
# loading the writers (as ``surgery/__init__.py`` does for the whole API)
_EXPORTS = {
    "OP_KINDS": "ops", "Op": "ops", "OpKind": "ops", "parse_dtype": "ops", "parse_rename": "ops",
    "NamePlan": "plan", "PlanRow": "plan", "build_plan": "plan", "parse_size": "plan", "plan_names": "plan",
    "REMAP_SCHEMA": "report", "RemapReport": "report",
    "Rules": "rules", "RemapOptions": "options",
    "list_profiles": "profiles", "profile_rules": "profiles",
    "remap": "run",
    **{name: "transforms" for name in ("add_prefix", "apply_rules", "auto_strip", "cast", "densify", "dequantize",
                                       "drop", "keep", "rename", "strip_prefix")},
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(import_module(f"{__name__}.{_EXPORTS[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
