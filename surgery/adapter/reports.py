"""What adapt returns and writes: the load report (what loaded, what did not) and the adapt report
(the load report, the manifest and warnings) that the CLI renders and ``--json`` prints."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..keys import collapse_keys
from .align import Alignment
from .manifest import Manifest

ADAPT_SCHEMA = "surgery.adapt/1"  # of AdaptReport.to_json, what `surgery adapt --json` prints


@dataclass
class LoadReport:
    """What loaded. Model names unless said otherwise; ``mismatched`` rows are
    (checkpoint name, model name, checkpoint shape, model shape)."""

    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, str, tuple, tuple]] = field(default_factory=list)
    head_new: list[str] = field(default_factory=list)
    head_dropped: list[str] = field(default_factory=list)  # checkpoint names of the old head
    renamed: dict[str, str] = field(default_factory=dict)  # checkpoint name -> model name
    adapted: list[str] = field(default_factory=list)  # first conv reshaped for --in-chans
    resized: list[tuple[str, tuple, tuple]] = field(default_factory=list)  # interpolated pos embeds
    coverage: float = 0.0  # share of the model's parameter elements that came from the checkpoint
    backbone_coverage: float = 0.0  # the same, head excluded
    alignment: Alignment | None = None

    def to_json(self) -> dict:
        def part(keys: list[str]) -> dict:
            return {"count": len(keys), "grouped": collapse_keys(keys), "keys": list(keys)}

        return {
            "coverage": self.coverage,
            "backbone_coverage": self.backbone_coverage,
            "alignment": self.alignment.to_json() if self.alignment else None,
            "loaded": part(self.loaded),
            "missing": part(self.missing),
            "unexpected": part(self.unexpected),
            "mismatched": [{"name": m, "checkpoint_name": c, "checkpoint_shape": list(cs), "model_shape": list(ms)}
                           for c, m, cs, ms in self.mismatched],
            "head_new": part(self.head_new),
            "head_dropped": part(self.head_dropped),
            "renamed": dict(self.renamed),
            "adapted": list(self.adapted),
            "resized": [{"name": n, "checkpoint_shape": list(a), "model_shape": list(b)} for n, a, b in self.resized],
        }


@dataclass
class AdaptReport:
    load: LoadReport
    manifest: Manifest
    out: str | None = None
    warnings: list[str] = field(default_factory=list)

    @property
    def groups(self) -> list[dict]:
        return self.manifest.groups

    def to_json(self) -> dict:
        return {"schema": ADAPT_SCHEMA, "out": self.out, "warnings": list(self.warnings), "load_report": self.load.to_json(),
                "groups": self.manifest.groups, "head": self.manifest.head, "arch": self.manifest["arch"],
                "bn": {"policy": self.manifest["bn"]["policy"], "frozen_modules": len(self.frozen_bn())},
                "schedule": self.manifest["schedule"]}

    def frozen_bn(self) -> list[str]:
        groups = {g["name"]: g for g in self.manifest.groups}
        bn = self.manifest["bn"]
        if bn["policy"] != "frozen":
            return []
        return [m for m, g in bn["modules"].items() if not groups[g]["trainable"]]
