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
import math
import os
import stat
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
SCHEDULE_KINDS = ("fixed", "unfreeze_at", "gradual")
INTERPOLATIONS = ("nearest", "nearest-exact", "bilinear", "bicubic", "box", "hamming", "lanczos")
# manifest.json and load_report.json are kilobytes to a few MB (one line per parameter); a bigger
# file is not surgery's, and reading it whole would cost gigabytes
MAX_JSON_BYTES = 64 * 2**20
# torchvision.models.get_model / timm.create_model arguments that fetch weights (network, files,
# the Hub): a folder is data, so its manifest may not set them, whatever --trust-code says
FETCHING_KWARGS = frozenset({"weights", "weights_backbone", "pretrained", "pretrained_backbone", "pretrained_cfg",
                             "pretrained_cfg_overlay", "checkpoint_path", "cache_dir", "pretrained_file",
                             "hf_hub_id", "url", "file"})

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
    """Check the schema, every field's type and range; raise ManifestError naming every problem
    (the fields by their dotted path). Nothing reads a field before this has passed."""
    if not isinstance(data, dict):
        raise ManifestError(f"{where}: not a JSON object")
    schema = data.get("schema")
    if schema != SCHEMA:
        hint = (" (written by a newer surgery: upgrade)" if isinstance(schema, str) and schema.startswith("surgery.manifest/")
                else "; is this a surgery adapt output folder?")
        raise ManifestError(f"{where}: schema is {_shown(schema)}, expected {SCHEMA!r}{hint}")
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
        problems = _field_problems(data)
    if not problems:
        problems = _table_problems(data) + _fetching_kwargs(data["arch"])
    if problems:
        more = f" (and {len(problems) - 8} more)" if len(problems) > 8 else ""
        raise ManifestError(f"{where}: invalid manifest: {'; '.join(problems[:8])}{more}")
    return Manifest(data)


def _is_int(v: Any, lo: int = 0, hi: float = math.inf) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _is_text(v: Any) -> bool:
    return isinstance(v, str) and v.strip() != "" and "\0" not in v


def _is_texts(v: Any) -> bool:
    return isinstance(v, (list, tuple)) and all(_is_text(x) for x in v)


def _is_names(v: Any) -> bool:
    """Class names: folder names, so any non-empty string."""
    return isinstance(v, (list, tuple)) and all(isinstance(x, str) and x != "" and "\0" not in x for x in v)


def _is_numbers(v: Any, positive: bool = False) -> bool:
    return isinstance(v, (list, tuple)) and len(v) > 0 and all(_is_num(x) and (x > 0 or not positive) for x in v)


def _is_local_file(v: Any) -> bool:
    """A file name relative to the folder that stays inside it (no absolute path, no '..')."""
    return (_is_text(v) and not v.startswith(("/", "\\")) and ":" not in v[:2]
            and ".." not in v.replace("\\", "/").split("/"))


_POSITIVE = ("an integer >= 1", lambda v: _is_int(v, 1))
_PIXELS = ("an integer from 1 to 16384", lambda v: _is_int(v, 1, 16384))
_NAME = ("a module path (a non-empty string)", _is_text)
# field -> (what it must be, test, may it be null or absent): read by build, heads, preprocess and
# the trainer as these types; a wrong one would otherwise end in a traceback deep inside them
_FIELDS: dict[str, tuple[str, Any, bool]] = {
    "arch.name": ("a non-empty string", _is_text, False),
    "arch.sha256": ("a string", lambda v: isinstance(v, str), True),
    "arch.relative": ("a string", lambda v: isinstance(v, str), True),
    "num_classes": (*_POSITIVE, False),
    "class_names": ("a list of non-empty strings, one per class", _is_names, True),
    "seed": ("an integer >= 0", _is_int, True),
    "coverage": ("a number", _is_num, True),
    "head.kind": (" or ".join(HEAD_KINDS), lambda v: v in HEAD_KINDS, False),
    "head.module": _NAME + (False,),
    "head.classifier": _NAME + (False,),
    "head.aux": ("a list of module paths", _is_texts, True),
    "head.replace": ("true or false", lambda v: isinstance(v, bool), True),
    "head.pool": _NAME + (True,),
    "head.block": _NAME + (True,),
    "head.first_conv": _NAME + (True,),
    "head.in_features": (*_POSITIVE, False),
    "head.out_features": (*_POSITIVE, False),
    "head.hidden": (*_POSITIVE, True),
    "head.dropout": ("a number from 0 to below 1", lambda v: _is_num(v) and 0 <= v < 1, True),
    "head.in_chans": ("an integer from 1 to 4096", lambda v: _is_int(v, 1, 4096), True),
    "head.num_classes": (*_POSITIVE, False),
    "head.class_names": ("a list of non-empty strings, one per class", _is_names, True),
    "head.original_classes": (*_POSITIVE, True),
    "input.size": ("[height, width], integers from 1 to 16384",
                   lambda v: isinstance(v, (list, tuple)) and len(v) == 2 and all(_PIXELS[1](x) for x in v), False),
    "input.resize": (*_PIXELS, True),
    "input.channels": ("an integer from 1 to 4096", lambda v: _is_int(v, 1, 4096), False),
    "input.mean": ("a list of numbers, one per channel", _is_numbers, False),
    "input.std": ("a list of positive numbers, one per channel", lambda v: _is_numbers(v, positive=True), False),
    "input.interpolation": (", ".join(INTERPOLATIONS), lambda v: v in INTERPOLATIONS, True),
    "schedule.kind": (", ".join(SCHEDULE_KINDS), lambda v: v in SCHEDULE_KINDS, False),
    "schedule.unfreeze_at": ("an integer >= 0", _is_int, True),
    "bn.policy": (" or ".join(BN_POLICIES), lambda v: v in BN_POLICIES, False),
    "bn.modules": ("an object of module path -> group name",
                   lambda v: isinstance(v, dict) and all(isinstance(g, str) for g in v.values()), False),
    "files.weights": ("a file name inside the folder (no absolute path, no '..')", _is_local_file, False),
    "files.load_report": ("a file name inside the folder (no absolute path, no '..')", _is_local_file, True),
    "files.weights_sha256": ("a sha256 hex digest", lambda v: isinstance(v, str) and len(v) == 64, True),
}


def _shown(v: Any) -> str:
    """A value for a one-line message: repr escapes control characters; long ones are cut."""
    text = repr(v)
    return text if len(text) <= 40 else text[:37] + "..."


def _field_problems(data: dict) -> list[str]:
    """Every field of :data:`_FIELDS` against its type and range, then what fields imply of each
    other (an mlp head has a pool and a block; one class name per class; mean/std per channel)."""
    problems = []
    if data["arch"]["kind"] not in ARCH_KINDS:
        problems.append(f"arch.kind {_shown(data['arch']['kind'])} is not one of {', '.join(ARCH_KINDS)}")
    if not isinstance(data["arch"]["kwargs"], dict):
        problems.append("arch.kwargs must be an object")
    for path, (what, test, optional) in _FIELDS.items():
        section, _, key = path.rpartition(".")
        holder = data[section] if section else data
        value = holder.get(key)
        if value is None and optional:
            continue
        if not test(value):
            problems.append(f"{path} must be {what}, got {'nothing' if key not in holder else _shown(value)}")
    if problems:
        return problems
    head, inp, n = data["head"], data["input"], data["num_classes"]
    if head["kind"] == "mlp" and (head.get("pool") is None or head.get("block") is None):
        problems.append("head.pool and head.block must name modules when head.kind is mlp")
    for path, names in (("class_names", data.get("class_names")), ("head.class_names", head.get("class_names"))):
        if names is not None and len(names) != n:
            problems.append(f"{path} has {len(names)} names but num_classes is {n}")
    for key in ("mean", "std"):
        if len(inp[key]) != inp["channels"]:
            problems.append(f"input.{key} has {len(inp[key])} values but input.channels is {inp['channels']}")
    return problems


def _table_problems(data: dict) -> list[str]:
    """Groups, parameters and BatchNorm modules: every entry's fields, and the groups they name."""
    problems = []
    names = set()
    for i, g in enumerate(data["groups"]):
        if not isinstance(g, dict) or not {"name", "trainable", "lr_mult", "unfreeze_at"} <= set(g):
            problems.append(f"groups[{i}] needs name, trainable, lr_mult, unfreeze_at")
        elif not (isinstance(g["name"], str) and isinstance(g["trainable"], bool) and _is_num(g["lr_mult"])
                  and g["lr_mult"] >= 0 and (g["unfreeze_at"] is None or _is_int(g["unfreeze_at"]))):
            problems.append(f"groups[{i}]: name is a string, trainable true or false, lr_mult a number >= 0 "
                            f"and unfreeze_at an integer >= 0 or null")
        else:
            names.add(g["name"])
        if len(problems) > 8:
            return problems
    for n, p in data["params"].items():
        if not isinstance(p, dict) or not {"shape", "trainable", "group", "lr_mult"} <= set(p):
            problems.append(f"params[{_shown(n)}] needs shape, trainable, group, lr_mult")
        elif not (isinstance(p["shape"], (list, tuple)) and all(_is_int(d) for d in p["shape"])
                  and isinstance(p["trainable"], bool) and _is_num(p["lr_mult"])):
            problems.append(f"params[{_shown(n)}]: shape is a list of integers >= 0, trainable true or false, "
                            f"lr_mult a number")
        elif not isinstance(p["group"], str) or p["group"] not in names:
            problems.append(f"params[{_shown(n)}] is in group {_shown(p['group'])}, which is not in 'groups'")
        if len(problems) > 8:
            return problems
    for mod, g in data["bn"]["modules"].items():
        if not isinstance(g, str) or g not in names:
            problems.append(f"bn.modules[{_shown(mod)}] names unknown group {_shown(g)}")
            break
    return problems


def _fetching_kwargs(arch: dict) -> list[str]:
    """torchvision and timm arguments that would fetch weights (the network, a file, the Hub):
    refused in any folder, with or without --trust-code; a factory's kwargs are its own."""
    if arch["kind"] not in ("torchvision", "timm"):
        return []
    shown = f"timm:{arch['name']}" if arch["kind"] == "timm" else arch["name"]
    return [f"arch.kwargs.{k} would make {shown} load weights or files from outside the folder (a folder is data: "
            f"surgery reaches no network and no other file for it, with or without --trust-code); remove it"
            for k, v in arch["kwargs"].items() if k in FETCHING_KWARGS and v not in (None, False)]


def read_manifest(folder: str | os.PathLike) -> Manifest:
    """Read and validate ``folder/manifest.json`` (or a manifest file given directly)."""
    p = Path(folder)
    f = p if p.is_file() else p / MANIFEST_NAME
    if not f.is_file():
        raise ManifestError(f"{f}: no manifest here; point at a folder written by `surgery adapt`")
    if f is not p:
        inside(p, MANIFEST_NAME, "the manifest")
    try:
        data = json.loads(read_capped(f, MAX_JSON_BYTES, "a manifest"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise ManifestError(f"{f}: not valid JSON ({' '.join(str(e).split())[:200]})") from None
    m = validate(data, str(f))
    m.path = f.parent
    for key in ("weights", "load_report"):
        if m["files"].get(key) is not None:
            inside(m.path, m["files"][key], f"files.{key}")
    return m


def read_capped(path: Path, cap: int, what: str) -> bytes:
    """The bytes of a small metadata file, refused (before reading, naming the cap) when larger
    than ``cap``; read through one handle at most ``cap + 1`` bytes, so a file that grows or
    lies about its size (``/proc``) costs no more."""
    try:
        with open(path, "rb") as fh:
            st = os.fstat(fh.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise ManifestError(f"{path}: not a regular file; {what} is a plain file")
            data = fh.read(cap + 1) if st.st_size <= cap else b""
    except OSError as e:
        raise ManifestError(f"{path}: cannot read it ({e.strerror or e})") from None
    if st.st_size > cap or len(data) > cap:
        raise ManifestError(f"{path}: {max(st.st_size, len(data))} bytes, over the {cap // 2**20} MB cap for {what}; "
                            f"this is not a file surgery wrote")
    return data


def inside(folder: str | os.PathLike, name: str, field: str) -> Path:
    """``folder/name``, refused unless it stays inside ``folder`` (a symlink may not lead out)
    and, where it exists, is a regular file: a folder is data and names nothing beyond itself."""
    root = Path(folder).resolve()
    path = Path(folder) / name
    target = path.resolve()
    if target != root and root not in target.parents:
        raise ManifestError(f"{path}: {field} leads outside the folder {folder}; a folder may name only its own files")
    if path.exists() and not path.is_file():
        raise ManifestError(f"{path}: {field} is not a regular file")
    return path


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
