"""`remap()`: open, plan, refuse, write, verify: each step in its own module."""

from __future__ import annotations

import os
from pathlib import Path

from ..checkpoint import Checkpoint
from ..errors import RuleError, SelectError
from ..formats import open_checkpoint, output_format
from ..io import OUTPUTS, check_destination, check_source, same_path
from ..option_table import options_from, signature
from .ops import Op
from .options import RemapOptions
from .output import write
from .plan import PlanRow, build_plan, parse_size, refuse_unsafetensorable
from .report import RemapReport
from .roundtrip import refuse_one_way, source_digests as roundtrip_digests, verify_roundtrip
from .rules import Rules
from .verify import source_digests, verify as verify_output


def remap(src: str | os.PathLike, dst: str | os.PathLike, rules: Rules | list[Op] | dict | str | os.PathLike | None = None,
          options: RemapOptions | None = None, **keywords: object) -> RemapReport:
    """Rewrite ``src`` to ``dst`` with ``rules``; the output format follows ``dst``'s suffix.

    ``rules``: a `Rules`, a list of `Op` (or of ``(kind, *args)`` tuples), a dict in the rules-file
    schema, or a rules file path. The keywords are the fields of :class:`RemapOptions` (``force``,
    ``in_place``, ``dry_run``, ``verify``, ``verify_roundtrip``, ``shard_size``, ``copy_tied``, ``allow_globals``).

    >>> remap("dp.pth", "clean.safetensors", [Op("auto")])  # doctest: +SKIP
    >>> remap("dp.pth", "clean.safetensors", [("auto",), ("drop", "^fc\\.")])  # doctest: +SKIP
    >>> remap("dp.pth", "clean.pt", {"ops": [{"auto": True}, {"dtype": "bf16"}]})  # doctest: +SKIP
    """
    o = options_from(RemapOptions, options, keywords, "remap")
    rules = Rules.coerce(_as_ops(rules))
    src_p, dst_p = Path(src), Path(dst)
    check_source(src_p)
    ckpt = open_checkpoint(src_p, select=rules.select, allow_globals=o.allow_globals)
    if ckpt.file_kind == "optimizer" and rules.select is None:
        raise SelectError(f"{src_p}: this is {ckpt.description}, not a model's weights; name the tensor dict to "
                          f"write with --select (one of: {', '.join(ckpt.containers[:6])}"
                          f"{' ...' if len(ckpt.containers) > 6 else ''})")
    fmt = output_format(dst_p, o.format)
    rows, counts = build_plan(ckpt, rules)
    if o.copy_tied:
        for r in rows:
            r.alias_of = None  # each name stores its own copy of the shared bytes
    if fmt.name != "torch-zip":
        refuse_unsafetensorable(str(src_p), rows)
    if o.verify_roundtrip:
        refuse_one_way(str(src_p), rows)
    shard_bytes = parse_size(o.shard_size)
    report = RemapReport(str(src_p), str(dst_p), ckpt.format, fmt.name, ckpt.container, rows, counts, o.dry_run,
                         certificate=ckpt.certificate.to_json() if ckpt.certificate is not None else None)
    if not any(r.new is not None for r in rows):
        raise RuleError(f"{src_p}: the rules drop every tensor; nothing would be written")
    if o.dry_run:
        return report
    check_destination(dst_p, [src_p, *map(Path, ckpt.files)], force=o.force, in_place=o.in_place,
                      kind="folder" if fmt.folder else "file", owned=OUTPUTS["remap"])
    # in place, the source is gone by the time the output is verified: its digests are taken first
    in_place = same_path(dst_p, src_p)
    before = source_digests(ckpt, rows) if o.verify and in_place else None
    sources = roundtrip_digests(ckpt, rows) if o.verify_roundtrip and in_place else None
    report.files, report.source_sha256 = write(ckpt, rows, rules, dst_p, fmt, shard_bytes)
    report.bytes_written = sum(os.path.getsize(f) for f in report.files)
    if ckpt.certificate is not None:
        report.certificate = ckpt.certificate.to_json()
    _check_output(o, ckpt, rows, dst_p, report, before, sources)
    return report


def _check_output(o: RemapOptions, ckpt: Checkpoint, rows: list[PlanRow], dst: Path, report: RemapReport,
                  before: dict[str, str] | None, sources: dict[str, str] | None) -> None:
    """--verify (the output against the plan) and --verify-roundtrip (the plan undone against the source)."""
    if o.verify:
        verify_output(ckpt, rows, dst, before)
        report.verified = True
    if o.verify_roundtrip:
        report.roundtrip = verify_roundtrip(ckpt, rows, dst, sources)


def _as_ops(rules: object) -> object:
    """A list whose items are ``Op`` or ``(kind, *args)`` tuples (``[("auto",), ("strip_prefix",
    "model.")]``) as a list of ``Op``; anything else as it was."""
    if not isinstance(rules, list):
        return rules
    ops = []
    for i, item in enumerate(rules):
        if isinstance(item, Op):
            ops.append(item)
            continue
        if (not isinstance(item, (tuple, list)) or not item or len(item) > 3
                or not all(isinstance(a, str) for a in item)):
            raise RuleError(f"rules[{i}] is {item!r}: pass Op(kind, arg) or a tuple (kind, *args), e.g. Op('auto') "
                            f"or ('strip_prefix', 'model.'), every part a string")
        ops.append(Op(*item))
    return ops


remap.__signature__ = signature(remap, RemapOptions)  # type: ignore[attr-defined]
