"""Profiles: rules files shipped in the package (``profiles/*.yaml``) for today's conversions.

Each is an ordinary rules file a user can copy and edit (``--rules``). A profile's values may be
variables, ``'{heads}'`` and ``'{kv_heads}'``: the attention heads and key/value heads, read from
``config.json`` (Hugging Face) or ``params.json`` (Meta) beside the weights, or given as
``--heads N --kv-heads M``, which win.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..errors import RuleError
from .rules import Rules

PROFILE_DIR = Path(__file__).with_name("profiles")
# the configs beside the weights: file -> {variable: (its key, the key it defaults to)}
_CONFIG_KEYS = {
    "config.json": {"heads": ("num_attention_heads", None), "kv_heads": ("num_key_value_heads", "num_attention_heads")},
    "params.json": {"heads": ("n_heads", None), "kv_heads": ("n_kv_heads", "n_heads")},
}


def profile_names() -> list[str]:
    return sorted(p.stem for p in PROFILE_DIR.glob("*.yaml"))


def profile_path(name: str) -> Path:
    """The shipped file of profile ``name``; RuleError naming the shipped ones when there is none."""
    if name not in profile_names():
        raise RuleError(f"unknown profile {name!r}; shipped: {', '.join(profile_names())} "
                        f"(surgery remap --list-profiles)")
    return PROFILE_DIR / f"{name}.yaml"


def list_profiles() -> list[tuple[str, str]]:
    """(name, its description line) of every shipped profile."""
    import yaml

    out = []
    for name in profile_names():
        data = yaml.safe_load(profile_path(name).read_text(encoding="utf-8")) or {}
        out.append((name, str(data.get("description", "")).strip()))
    return out


def variables_beside(src: str | os.PathLike | None) -> dict[str, int]:
    """``heads`` / ``kv_heads`` from config.json or params.json in the weights' folder, where it gives them."""
    if src is None:
        return {}
    p = Path(src)
    folder = p if p.is_dir() else p.parent
    for file, keys in _CONFIG_KEYS.items():
        config = _read_json(folder / file)
        found = {}
        for var, (key, fallback) in keys.items():
            value = config.get(key, config.get(fallback) if fallback else None)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                found[var] = value
        if found:
            return found
    return {}


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def variables(src: str | os.PathLike | None = None, heads: int | None = None,
              kv_heads: int | None = None) -> dict[str, int]:
    """The profile variables for ``src``: the configs beside it, overridden by what is given."""
    found = variables_beside(src)
    for name, value in (("heads", heads), ("kv_heads", kv_heads)):
        if value is not None:
            if value <= 0:
                raise RuleError(f"--{name.replace('_', '-')} must be a positive number of heads, not {value}")
            found[name] = value
    return found


def profile_rules(name: str, src: str | os.PathLike | None = None, heads: int | None = None,
                  kv_heads: int | None = None) -> Rules:
    """The rules of shipped profile ``name``, its variables filled for the checkpoint ``src``:
    ``profile_rules("llama-hf-to-meta", "hf/model.safetensors")`` reads hf/config.json."""
    return Rules.from_file(profile_path(name), variables(src, heads, kv_heads))
