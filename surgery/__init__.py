"""surgery: inspect, clean, adapt and fine-tune PyTorch checkpoints.

Importing the package is cheap: torch is imported only by functions that need tensors.

The API functions (``surgery.inspect``, ``surgery.remap``, ``surgery.adapt``, ...) live in modules
whose names differ from theirs (``inspection``, ``remapping``, ``adapter``, ``trainer``): a submodule named
like a function would replace that function on this package as soon as it is imported.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "open": ("surgery.formats", "open_checkpoint"),
    "open_checkpoint": ("surgery.formats", "open_checkpoint"),
    "Checkpoint": ("surgery.checkpoint", "Checkpoint"),
    "TensorInfo": ("surgery.checkpoint", "TensorInfo"),
    "SurgeryError": ("surgery.errors", "SurgeryError"),
    "inspect": ("surgery.inspection.inspect_report", "inspect"),
    "scan": ("surgery.inspection.zoo_scan", "scan"),
    "diff": ("surgery.inspection.diff_report", "diff"),
    "match": ("surgery.matching", "match"),
    "average": ("surgery.merging.average", "average"),
    "merge": ("surgery.merging.merge", "merge"),
    "merge_lora": ("surgery.merging.lora", "merge_lora"),
    "extract_lora": ("surgery.merging.lora_extract", "extract_lora"),
    "soup": ("surgery.merging.soup", "soup"),
    "remap": ("surgery.remapping", "remap"),
    "Rules": ("surgery.remapping", "Rules"),
    "RemapOptions": ("surgery.remapping.options", "RemapOptions"),
    "Op": ("surgery.remapping", "Op"),
    "strip_prefix": ("surgery.remapping", "strip_prefix"),
    "add_prefix": ("surgery.remapping", "add_prefix"),
    "rename": ("surgery.remapping", "rename"),
    "drop": ("surgery.remapping", "drop"),
    "keep": ("surgery.remapping", "keep"),
    "auto_strip": ("surgery.remapping", "auto_strip"),
    "cast": ("surgery.remapping", "cast"),
    "adapt": ("surgery.adapter.core", "adapt"),
    "AdaptOptions": ("surgery.adapter.options", "AdaptOptions"),
    "load_adapted": ("surgery.adapter.core", "load_adapted"),
    "param_groups": ("surgery.adapter.core", "param_groups"),
    "apply_schedule": ("surgery.adapter.freeze", "apply_schedule"),
    "apply_bn_policy": ("surgery.adapter.freeze", "apply_bn_policy"),
    "read_manifest": ("surgery.adapter.manifest", "read_manifest"),
    "train": ("surgery.trainer.runner", "train"),
    "TrainResult": ("surgery.trainer.runner", "TrainResult"),
    "TrainOptions": ("surgery.trainer.options", "TrainOptions"),
    "find_lr": ("surgery.trainer.lr_find", "find_lr"),
    "compare_scratch": ("surgery.trainer.compare", "compare_scratch"),
    "advise": ("surgery.advice", "advise"),
    "evaluate": ("surgery.trainer.evaluate", "evaluate"),
    "predict": ("surgery.trainer.evaluate", "predict"),
    "export": ("surgery.deploy", "export"),
    "review_factory": ("surgery.trust", "review_factory"),
    "repin_factory": ("surgery.trust", "repin_factory"),
    "sanitize": ("surgery.sanitizing", "sanitize"),
    "SanitizeOptions": ("surgery.sanitizing.options", "SanitizeOptions"),
}

__all__ = sorted(_EXPORTS) + ["__version__"]
# their errors name the caller's keywords (num_classes), not the command line's flags (--num-classes)
_KEYWORD_ERRORS = ("remap", "sanitize", "adapt", "train", "find_lr", "compare_scratch", "evaluate", "predict", "soup")


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        mod, attr = _EXPORTS[name]
        value = getattr(import_module(mod), attr)
        if name in _KEYWORD_ERRORS:
            from .flag_names import keyword_errors

            value = keyword_errors(value)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'surgery' has no attribute {name!r}")
