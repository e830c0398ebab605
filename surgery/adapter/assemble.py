"""The manifest adapt writes, assembled from the decisions of every step: where the weights came
from and how their names were aligned, what was built, the head, the input pipeline, the freeze
plan and the coverage. Validated here, so adapt cannot write a manifest train would refuse."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .. import __version__
from .build import Blueprint
from .manifest import REPORT_NAME, SCHEMA, WEIGHTS_NAME, Manifest, validate
from .match import Match
from .source import Source

if TYPE_CHECKING:  # pragma: no cover
    from .options import AdaptOptions


def assemble_manifest(opts: "AdaptOptions", bp: Blueprint, src: Source, m: Match, freeze_plan: dict) -> Manifest:
    """The validated manifest; ``freeze_plan`` is :func:`~surgery.adapter.freeze.plan_freeze`'s."""
    align = m.report.alignment
    data = {
        "schema": SCHEMA,
        "created_by": f"surgery {__version__}",
        "source": {**src.info, **(align.to_json() if align else {})},
        "arch": {**bp.spec.to_json(opts.out), "num_classes_kwarg": bp.took_num_classes},
        "num_classes": opts.num_classes,
        "class_names": opts.class_names,
        "head": {**bp.head.to_json(), "num_classes": opts.num_classes, "class_names": opts.class_names},
        "input": input_section(bp.input, opts.in_chans),
        "freeze": freeze_plan["options"],
        "stages": freeze_plan["stages"],
        "schedule": freeze_plan["schedule"],
        "groups": freeze_plan["groups"],
        "params": freeze_plan["params"],
        "bn": freeze_plan["bn"],
        "files": {"weights": WEIGHTS_NAME, "weights_sha256": None, "load_report": REPORT_NAME},
        "coverage": m.report.coverage,
        "seed": opts.seed,
    }
    return validate(data)


def input_section(inp: dict, in_chans: int) -> dict:
    """The input pipeline for ``in_chans`` channels: mean and std follow the channels (one
    channel takes their average; more repeat them in order)."""
    return {**inp, "channels": in_chans, "mean": _per_channel(inp["mean"], in_chans),
            "std": _per_channel(inp["std"], in_chans)}


def _per_channel(values: list[float], c: int) -> list[float]:
    if c == len(values):
        return list(values)
    if c == 1:
        return [sum(values) / len(values)]
    return [values[i % len(values)] for i in range(c)]
