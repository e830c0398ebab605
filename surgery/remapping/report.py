"""`RemapReport`: what a remap did (or, dry, would do), the data behind its table and ``--json``."""

from __future__ import annotations

from dataclasses import dataclass, field

from .plan import PlanRow

REMAP_SCHEMA = "surgery.remap/1"  # of RemapReport.to_json, what `surgery remap --json` prints


@dataclass
class RemapReport:
    src: str
    dst: str
    src_format: str
    dst_format: str
    container: str
    rows: list[PlanRow]
    op_counts: list[tuple[str, int]]
    dry_run: bool
    bytes_written: int = 0
    files: list[str] = field(default_factory=list)
    verified: bool | None = None
    roundtrip: int | None = None  # --verify-roundtrip: the tensors proved to come back bit for bit
    source_sha256: str | None = None
    certificate: dict | None = None  # a source in ranks' chunks: formats/chunks.py's Certificate, with digests once written

    @property
    def renamed(self) -> int:
        return sum(1 for r in self.rows if r.new is not None and r.new != r.old)

    @property
    def dropped(self) -> int:
        return sum(1 for r in self.rows if r.new is None and r.into is None)

    @property
    def kept(self) -> int:
        return sum(1 for r in self.rows if r.new is not None)

    def to_json(self) -> dict:
        return {
            "schema": REMAP_SCHEMA, "src": self.src, "dst": self.dst, "src_format": self.src_format, "dst_format": self.dst_format,
            "container": self.container, "dry_run": self.dry_run,
            "ops": [{"op": o, "matched": n} for o, n in self.op_counts],
            "kept": self.kept, "renamed": self.renamed, "dropped": self.dropped,
            "bytes_written": self.bytes_written, "files": self.files, "verified": self.verified,
            "roundtrip_verified": self.roundtrip,
            "source_sha256": self.source_sha256, "certificate": self.certificate,
            "tensors": [{"old": r.old, "new": r.new, "dtype": r.new_dtype, "shape": list(r.shape),
                         **({"from_dtype": r.dtype} if r.dtype != r.new_dtype else {}),
                         **({"kind": r.new_kind} if r.new_kind != "dense" or r.kind != "dense" else {}),
                         **({"from_kind": r.kind} if r.kind != r.new_kind else {}),
                         **({"from_shape": list(r.src_shape)} if r.src_shape is not None else {}),
                         **({"tensor_ops": [s.kind for s in r.steps]} if r.steps else {}),
                         **({"group": {"op": r.group.kind, "sources": list(r.group.sources), "dim": r.group.dim}}
                            if r.group is not None else {}),
                         **({"into": r.into} if r.into is not None else {}),
                         **({"alias_of": r.alias_of} if r.alias_of else {})} for r in self.rows],
        }
