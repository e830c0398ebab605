"""The adapted folder: written once by adapt (weights, manifest, load report, atomically) and
read back by ``load_adapted``, which rebuilds the model from the manifest's names and checks the
weights against the manifest before it allocates anything.

The folder is data: torchvision and timm models are rebuilt by name; a factory is code and runs
only with ``trust_code`` (see :func:`~surgery.adapter.arch.check_trust`).
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from ..errors import ManifestError, OutputError
from ..io import atomic_dir, sha256_file
from .arch import ArchSpec, build, check_trust
from .build import build_model
from .freeze import apply_schedule
from .manifest import (MANIFEST_NAME, REPORT_NAME, SCHEMA, WEIGHTS_NAME, Manifest, as_manifest, inside, read_manifest,
                       write_json)
from .reports import LoadReport

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn


# ----------------------------------------------------------------------------- writing

def write_folder(out: Path, model: "nn.Module", manifest: Manifest, rep: LoadReport) -> None:
    """model.safetensors, manifest.json (with the weights' sha256) and load_report.json, all or
    nothing: they are written in a temp folder beside ``out`` and renamed into place."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    tensors = _unshared(model.state_dict())
    try:
        with atomic_dir(out) as tmp:
            save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt", "schema": SCHEMA})
            manifest.data["files"]["weights_sha256"] = sha256_file(tmp / WEIGHTS_NAME)
            write_json(tmp / MANIFEST_NAME, manifest.data)
            write_json(tmp / REPORT_NAME, rep.to_json())
    except (OSError, SafetensorError) as e:  # safetensors reports a full disk as its own error
        raise OutputError(f"{out}: cannot write: {' '.join(str(e).split())}; is the disk full? "
                          f"nothing was left at the destination") from None


def _unshared(state: Mapping[str, Any]) -> dict:
    """Detached, contiguous CPU tensors, tied ones cloned: safetensors refuses shared storage."""
    seen: set[int] = set()
    tensors = {}
    for k, v in state.items():
        t = v.detach().cpu().contiguous()
        if t.data_ptr() in seen and t.numel():
            t = t.clone()
        seen.add(t.data_ptr())
        tensors[k] = t
    return tensors


# ----------------------------------------------------------------------------- reading back

def build_from_manifest(manifest: Any, *, meta: bool = False, trust_code: bool = False) -> "nn.Module":
    """The adapted model's structure (freshly initialised) from the manifest's spec. A factory
    named there is code: it runs only with ``trust_code`` and only with its pinned sha256."""
    from .heads import HeadPlan  # heads defines nn.Modules: it imports torch

    m = as_manifest(manifest)
    spec = check_trust(ArchSpec.from_json(m["arch"]), m.path or "manifest", trust_code)
    _check_head_names(m, _module_kinds(spec, m.num_classes))
    plan = HeadPlan.from_json(m.head)
    return build_model(spec, m.num_classes, plan, int(m.data.get("seed") or 0), meta=meta)


def _module_kinds(spec: ArchSpec, num_classes: int) -> dict[str, str]:
    """Module path -> class name of the model ``spec`` builds before its head is changed (on the
    meta device; the last one is kept: load_adapted asks twice for the same folder)."""
    key = (json.dumps(spec.to_json(), sort_keys=True, default=str), num_classes)
    if _KINDS_CACHE.get("key") != key:
        import torch

        with torch.random.fork_rng(devices=[]):  # callers' random streams stay as they were
            model = build(spec, num_classes, meta=True)
        _KINDS_CACHE.update(key=key, kinds={n: type(mod).__name__ for n, mod in model.named_modules()})
    return _KINDS_CACHE["kinds"]


_KINDS_CACHE: dict[str, Any] = {}
_RESIZABLE = ("Linear", "Conv2d")


def _check_head_names(m: Manifest, kinds: Mapping[str, str]) -> None:
    """The modules the manifest's head names exist in the model its arch builds, of a kind the
    head can change: a wrong name would otherwise end in a traceback inside the head code."""
    head = m.head
    want: list[tuple[str, Any, tuple[str, ...]]] = [("head.first_conv", head.get("first_conv"), ("Conv2d",))]
    if head["kind"] == "mlp":
        want += [("head.pool", head["pool"], ()), ("head.block", head["block"], ())]
    else:
        want.append(("head.classifier", head["classifier"], _RESIZABLE if head.get("replace") else ()))
    want += [(f"head.aux[{i}]", a, ()) for i, a in enumerate(head.get("aux") or [])]
    problems = []
    for field, name, types in want:
        if name is None:
            continue
        if name not in kinds or name == "":
            problems.append(f"{field} {name!r} names no module of {m['arch']['name']}")
        elif types and kinds[name] not in types:
            problems.append(f"{field} {name!r} is a {kinds[name]}, not a {' or '.join(types)}")
    if problems:
        raise ManifestError(f"{m.path or 'manifest'}: invalid manifest: {'; '.join(problems)}")


def load_weights(model: "nn.Module", state: Mapping[str, Any], *, strict: bool = True) -> Any:
    """``model.load_state_dict(state)`` whatever ``state`` carries: a safetensors dict has no
    ``_metadata``, and modules with a versioned ``_load_from_state_dict`` (MNASNet) need the
    version. The weights were written from this same model code, so its own versions apply."""
    sd = OrderedDict(state)
    sd._metadata = getattr(model.state_dict(keep_vars=True), "_metadata", OrderedDict())  # type: ignore[attr-defined]
    return model.load_state_dict(sd, strict=strict)


def load_adapted(folder: str | os.PathLike, *, device: Any = None, epoch: int = 0, verify: bool = True,
                 trust_code: bool = False) -> "nn.Module":
    """The model written by ``surgery adapt``, ready to train: weights loaded strictly, in train
    mode, ``requires_grad`` and BatchNorm modes as the manifest's schedule says at ``epoch``.

    The folder is data: torchvision and timm models are rebuilt by name. A file or module
    factory in its manifest is code and runs only with ``trust_code=True`` (a file factory
    only while its sha256 is the one adapt pinned).

    >>> model = load_adapted("adapted/")  # doctest: +SKIP
    """
    from safetensors.torch import load_file

    m = read_manifest(folder)
    wpath = _weights_path(m, verify)
    _check_shapes(build_from_manifest(m, meta=True, trust_code=trust_code), m, wpath)  # before any allocation
    model = build_from_manifest(m, trust_code=trust_code)
    try:
        load_weights(model, load_file(str(wpath)), strict=True)
    except RuntimeError as e:
        raise ManifestError(f"{wpath}: does not fit the rebuilt model: {' '.join(str(e).split())[:300]}") from None
    if device is not None:
        model.to(device)
    model.train()
    apply_schedule(model, m, epoch)
    return model


def _weights_path(m: Manifest, verify: bool) -> Path:
    """The weights file the manifest names, there and (with ``verify``) with the pinned sha256."""
    wpath = inside(m.path, m["files"]["weights"], "files.weights")  # type: ignore[arg-type]
    if not wpath.is_file():
        raise ManifestError(f"{wpath}: weights file named by the manifest is missing")
    want = m["files"].get("weights_sha256")
    if verify and want and sha256_file(wpath) != want:
        raise ManifestError(f"{wpath}: sha256 differs from the manifest's; the weights were changed after adapt")
    return wpath


def _check_shapes(meta_model: "nn.Module", m: Manifest, wpath: Path) -> None:
    """The model the manifest describes, built on the meta device, against the manifest's
    parameters and the weights file's header: a manifest cannot make surgery allocate more than
    its weights file holds."""
    from safetensors import SafetensorError, safe_open

    names = {n: list(p.shape) for n, p in meta_model.named_parameters()}
    diff = sorted(set(names) ^ set(m.params))
    if diff:
        raise ManifestError(f"{wpath.parent}: the rebuilt model's parameters differ from the manifest's "
                            f"({', '.join(diff[:5])}); the architecture code changed since adapt")
    try:
        with safe_open(str(wpath), "pt", device="cpu") as f:  # the header only: get_slice reads no data
            stored = {k: list(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise ManifestError(f"{wpath}: not a readable safetensors file ({' '.join(str(e).split())[:200]})") from None
    wrong = [f"{k} {v} vs {stored.get(k)}" for k, v in {**names, **{k: list(t.shape) for k, t in
             meta_model.named_buffers() if k in stored}}.items() if stored.get(k) != v]
    if wrong:
        raise ManifestError(f"{wpath}: does not fit the model the manifest describes ({'; '.join(wrong[:3])})")
