"""``adapt()``: load a checkpoint into an architecture with a new head, freeze by policy, and
write the adapted folder. It reads as its steps; each step lives in its own module:

- ``options``: the validated :class:`AdaptOptions` (``adapt()``'s keywords, checked at once);
- ``source``: the checkpoint, of three kinds (torchvision weights, a state dict, a path);
- ``build``: what to build (spec, input pipeline, head plan) and the seeded build;
- ``match``: checkpoint names onto model names, coverage checks, the copy (``tensors``: the
  reshaping of position embeddings and of the first conv);
- ``freeze``: groups, schedule and BatchNorm policy; ``assemble``: the manifest;
- ``folder``: writing the folder and reading it back (``load_adapted``); ``groups``: optimizer
  parameter groups.

``load_adapted``, ``build_from_manifest``, ``load_weights`` and ``param_groups`` are also
importable from here, where the trainer and older code look for them.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from ..io import OUTPUTS, check_destination
from ..option_table import options_from, signature
from .arch import assumed_input, resolve_arch, torchvision_weights
from .assemble import assemble_manifest
from .build import blueprint, build_model
from .folder import build_from_manifest, load_adapted, load_weights, write_folder
from .freeze import apply_bn_policy, apply_schedule, plan_freeze
from .groups import param_groups
from .match import check_match, fit_warnings, load_matched, match_keys
from .options import AdaptOptions
from .reports import ADAPT_SCHEMA, AdaptReport, LoadReport
from .source import open_source

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn


def adapt(ckpt: Any = None, options: AdaptOptions | None = None, **keywords: Any) -> tuple["nn.Module", AdaptReport]:
    """Load ``ckpt`` (a path, a state dict, or None with ``weights``) into ``arch`` with a new
    ``num_classes`` head, freeze by policy, and (with ``out``) write model.safetensors,
    manifest.json and load_report.json there. Returns (model, report); nothing is written when
    anything fails. The keywords are the fields of :class:`AdaptOptions` (the freeze ones flat;
    each the flag of ``surgery adapt`` of the same name); ``options``: an AdaptOptions, the
    keywords laid over it;
    ``mean``/``std``: one value per input channel, recorded in the manifest (default: the
    weights' metadata, else ImageNet's, which the report then says it assumed).

    >>> model, report = adapt("resnet18.pth", arch="resnet18", num_classes=4,
    ...                       freeze="head-only", out="adapted/")  # doctest: +SKIP
    >>> report.load.coverage
    0.9956
    """
    return adapt_with(ckpt, options_from(AdaptOptions, options, keywords, "adapt"))


adapt.__signature__ = signature(adapt, AdaptOptions)  # type: ignore[attr-defined]


def adapt_with(ckpt: Any, o: AdaptOptions) -> tuple["nn.Module", AdaptReport]:
    """:func:`adapt` with its options already made: the steps, in order."""
    if o.out is not None:
        inputs = [Path(ckpt)] if ckpt is not None and not isinstance(ckpt, Mapping) else []
        check_destination(o.out, inputs, force=o.force, in_place=None, kind="folder", owned=OUTPUTS["adapt"])
    spec = resolve_arch(o.arch, o.arch_kwargs)
    src = open_source(ckpt, o.weights, spec, o.rules, o.select, o.allow_globals)
    bp = blueprint(spec, o, torchvision_weights(spec.name, o.weights) if o.weights else None)
    model = build_model(bp.spec, o.num_classes, bp.head, o.seed)
    m = match_keys(src, model, bp.head, o.interpolate)
    check_match(m, src, bp.spec, o.min_coverage, o.strict)  # before any tensor is read
    load_matched(model, src, m, o.in_chans)
    manifest = assemble_manifest(o, bp, src, m, plan_freeze(model, bp.head.modules, o.freezing))
    model.train()
    apply_schedule(model, manifest, 0)
    report = AdaptReport(m.report, manifest, str(o.out) if o.out else None, fit_warnings(m, src, bp.spec))
    if m.report.mismatched:
        report.warnings.append(f"{len(m.report.mismatched)} tensors skipped for their shape: "
                               + ", ".join(t for _, t, _, _ in m.report.mismatched[:5]))
    assumed = assumed_input(bp.spec, bp.input, o.input_size, o.mean, o.std)
    if assumed:
        report.warnings.append(assumed)
    if o.out is not None:
        write_folder(o.out, model, manifest, m.report)
    return model, report


__all__ = ["adapt", "adapt_with", "AdaptOptions", "AdaptReport", "LoadReport", "ADAPT_SCHEMA", "load_adapted",
           "build_from_manifest", "load_weights", "param_groups", "apply_bn_policy", "apply_schedule"]
