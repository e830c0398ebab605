"""`surgery adapt` (the library behind ``surgery.adapt()``): load a checkpoint into a target architecture, swap the head, freeze by policy.

Modules by responsibility: ``arch`` (ARCH -> model factory), ``align`` (checkpoint keys -> model
keys, pure functions over {name: shape}), ``heads`` (find and replace the classifier, MLP head,
input channels), ``freeze`` (policies, presets, groups, BatchNorm policy), ``manifest`` (the
versioned contract with ``surgery train``), ``core`` (``adapt``, ``load_adapted``,
``param_groups``). Importing this package does not import torch.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_EXPORTS = {
    "adapt": ("surgery.adapter.core", "adapt"),
    "load_adapted": ("surgery.adapter.core", "load_adapted"),
    "param_groups": ("surgery.adapter.core", "param_groups"),
    "build_from_manifest": ("surgery.adapter.core", "build_from_manifest"),
    "AdaptReport": ("surgery.adapter.core", "AdaptReport"),
    "apply_schedule": ("surgery.adapter.freeze", "apply_schedule"),
    "apply_bn_policy": ("surgery.adapter.freeze", "apply_bn_policy"),
    "PRESETS": ("surgery.adapter.freeze", "PRESETS"),
    "Manifest": ("surgery.adapter.manifest", "Manifest"),
    "read_manifest": ("surgery.adapter.manifest", "read_manifest"),
    "MANIFEST_SCHEMA": ("surgery.adapter.manifest", "SCHEMA"),
    "align_keys": ("surgery.adapter.align", "align_keys"),
    "resolve_arch": ("surgery.adapter.arch", "resolve_arch"),
    "AdaptError": ("surgery.adapter.errors", "AdaptError"),
    "ManifestError": ("surgery.adapter.errors", "ManifestError"),
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        mod, attr = _EXPORTS[name]
        value = getattr(import_module(mod), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'surgery.adapter' has no attribute {name!r}")
