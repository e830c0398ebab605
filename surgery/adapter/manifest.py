"""manifest.json: the versioned contract between ``surgery adapt`` and ``surgery train``.

Train reads only the manifest and ``model.safetensors``; whatever it needs is here. The schema
is checked on read and every problem is reported at once.

    {"schema": "surgery.manifest/1",
     "source": {"path", "sha256", "format", "container", "wrappers_stripped", "ckpt_prefix",
                "model_prefix", "rules", "weights"},
     "arch": {"kind", "name", "kwargs", "num_classes_kwarg", "sha256", "relative"},
     "num_classes": 7, "class_names": null,
     "head": {"kind", "module", "classifier", "aux", "replace", "pool", "block", "in_features",
              "out_features", "hidden", "dropout", "first_conv", "in_chans", "num_classes", "class_names"},
     "input": {"size", "resize", "channels", "mean", "std", "interpolation", "source"},
     "freeze": {options as given, preset folded in}, "stages": [...],
     "schedule": {"kind": "fixed|unfreeze_at|gradual", "unfreeze_at", "order"},
     "groups": [{"name", "stage", "index", "trainable", "lr_mult", "unfreeze_at", "params", "numel"}],
     "params": {"layer4.1.conv2.weight": {"shape", "trainable", "group", "lr_mult"}},
     "bn": {"policy": "frozen|train", "modules": {"bn1": "bn1"}},
     "files": {"weights": "model.safetensors", "weights_sha256", "load_report": "load_report.json"},
     "coverage": 0.99, "seed": 0, "created_by": "surgery 0.1.0"}
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ManifestError

SCHEMA = "surgery.manifest/1"
MANIFEST_NAME = "manifest.json"
WEIGHTS_NAME = "model.safetensors"
REPORT_NAME = "load_report.json"
ARCH_KINDS = ("torchvision", "timm", "file", "module")  # file and module are code: see arch.check_trust
HEAD_KINDS = ("linear", "mlp")
BN_POLICIES = ("frozen", "train")

# key -> (type or types, required keys inside when a dict)
_SECTIONS: dict[str, tuple[Any, tuple[str, ...]]] = {
    "source": (dict, ()),
    "arch": (dict, ("kind", "name", "kwargs")),
    "num_classes": (int, ()),
    "head": (dict, ("kind", "module", "classifier", "in_features", "out_features", "num_classes")),
    "input": (dict, ("size", "channels", "mean", "std")),
    "schedule": (dict, ("kind",)),
    "groups": (list, ()),
    "params": (dict, ()),
    "bn": (dict, ("policy", "modules")),
    "files": (dict, ("weights",)),
}


@dataclass
class Manifest:
    """A validated manifest; ``data`` is the JSON object. ``path``: the folder it was read from."""

    data: dict
    path: Path | None = None

    @property
    def num_classes(self) -> int:
        return int(self.data["num_classes"])

    @property
    def groups(self) -> list[dict]:
        return self.data["groups"]

    @property
    def params(self) -> dict[str, dict]:
        return self.data["params"]

    @property
    def head(self) -> dict:
        return self.data["head"]

    def __getitem__(self, key: str) -> Any:
        return self.data[key]

    def to_json(self) -> dict:
        return self.data


def validate(data: Any, where: str = "manifest") -> Manifest:
    """Check the schema; raise ManifestError naming every problem."""
    if not isinstance(data, dict):
        raise ManifestError(f"{where}: not a JSON object")
    schema = data.get("schema")
    if schema != SCHEMA:
        hint = (" (written by a newer surgery: upgrade)" if isinstance(schema, str) and schema.startswith("surgery.manifest/")
                else "; is this a surgery adapt output folder?")
        raise ManifestError(f"{where}: schema is {schema!r}, expected {SCHEMA!r}{hint}")
    problems = []
    for key, (typ, required) in _SECTIONS.items():
        if key not in data:
            problems.append(f"missing {key!r}")
            continue
        val = data[key]
        if not isinstance(val, typ) or isinstance(val, bool):
            problems.append(f"{key!r} must be a {typ.__name__}, got {type(val).__name__}")
            continue
        for r in required:
            if r not in val:
                problems.append(f"{key}.{r} is missing")
    if not problems:
        arch = data["arch"]
        if arch["kind"] not in ARCH_KINDS:
            problems.append(f"arch.kind {arch['kind']!r} is not one of {', '.join(ARCH_KINDS)}")
        if not isinstance(arch["name"], str) or not isinstance(arch["kwargs"], dict):
            problems.append("arch.name must be a string and arch.kwargs an object")
        if data["num_classes"] < 1:
            problems.append(f"num_classes must be >= 1, got {data['num_classes']}")
        if data["head"]["kind"] not in HEAD_KINDS:
            problems.append(f"head.kind {data['head']['kind']!r} is not linear or mlp")
        if data["bn"]["policy"] not in BN_POLICIES:
            problems.append(f"bn.policy {data['bn']['policy']!r} is not frozen or train")
        names = set()
        for i, g in enumerate(data["groups"]):
            if not isinstance(g, dict) or not {"name", "trainable", "lr_mult", "unfreeze_at"} <= set(g):
                problems.append(f"groups[{i}] needs name, trainable, lr_mult, unfreeze_at")
                continue
            names.add(g["name"])
        for n, p in data["params"].items():
            if not isinstance(p, dict) or not {"shape", "trainable", "group", "lr_mult"} <= set(p):
                problems.append(f"params[{n!r}] needs shape, trainable, group, lr_mult")
            elif p["group"] not in names:
                problems.append(f"params[{n!r}] is in group {p['group']!r}, which is not in 'groups'")
            if len(problems) > 8:
                break
        for mod, g in data["bn"]["modules"].items():
            if g not in names:
                problems.append(f"bn.modules[{mod!r}] names unknown group {g!r}")
                break
    if problems:
        more = f" (and {len(problems) - 8} more)" if len(problems) > 8 else ""
        raise ManifestError(f"{where}: invalid manifest: {'; '.join(problems[:8])}{more}")
    return Manifest(data)


def read_manifest(folder: str | os.PathLike) -> Manifest:
    """Read and validate ``folder/manifest.json`` (or a manifest file given directly)."""
    p = Path(folder)
    f = p if p.is_file() else p / MANIFEST_NAME
    if not f.is_file():
        raise ManifestError(f"{f}: no manifest here; point at a folder written by `surgery adapt`")
    try:
        data = json.loads(f.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ManifestError(f"{f}: not valid JSON ({e})") from None
    m = validate(data, str(f))
    m.path = f.parent
    return m


def as_manifest(m: Any) -> Manifest:
    """A :class:`Manifest` from a Manifest, its JSON dict, or a folder (or manifest file) to read."""
    if isinstance(m, Manifest):
        return m
    if isinstance(m, dict):
        return validate(m)
    return read_manifest(m)


def write_json(path: Path, data: Any) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=2, sort_keys=False)
        fh.write("\n")
