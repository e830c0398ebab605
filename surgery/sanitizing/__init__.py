"""``surgery sanitize SRC DST``: a checkpoint that ``torch.load(weights_only=True)`` refuses (an
``argparse.Namespace``, an omegaconf config, numpy values inside) rewritten as one it loads.

SRC is read by surgery's restricted reader, every global an inert record: nothing the file names is
imported or called. The known records become plain data (`convert.RULES`), anything else is dropped;
each conversion and drop is noted in the report and, where the top level is a dict, in DST under
``"surgery.sanitize"``. Tensors are written byte for byte. Needs torch (to write DST).

>>> from surgery.sanitizing import sanitize
>>> report = sanitize("lightning.ckpt", "clean.ckpt", verify=True)  # doctest: +SKIP
>>> report.converted  # doctest: +SKIP
{'hyper_parameters': 'argparse.Namespace', 'epoch': 'numpy._core.multiarray.scalar'}
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import FormatError, OutputError
from ..io import atomic_file, check_destination, check_source
from ..option_table import options_from
from .options import SanitizeOptions

SCHEMA = "surgery.sanitize/1"
NOTES_KEY = "surgery.sanitize"


@dataclass
class SanitizeReport:
    src: str
    dst: str
    format: str
    converted: dict[str, str] = field(default_factory=dict)
    dropped: dict[str, str] = field(default_factory=dict)
    tensors: int = 0  # tensors written, numpy arrays included
    arrays: int = 0  # of which were numpy arrays
    bytes_written: int = 0
    verified: bool = False
    notes_in_file: bool = False

    def to_json(self) -> dict[str, Any]:
        return {"schema": SCHEMA, "src": self.src, "dst": self.dst, "format": self.format,
                "tensors": self.tensors, "arrays": self.arrays, "bytes_written": self.bytes_written,
                "verified": self.verified, "notes_in_file": self.notes_in_file,
                "converted": self.converted, "dropped": self.dropped}


def sanitize(src: str | os.PathLike, dst: str | os.PathLike, options: SanitizeOptions | None = None,
             **keywords: Any) -> SanitizeReport:
    """Rewrite ``src`` as a torch.save file at ``dst`` that ``torch.load(weights_only=True)`` loads.

    Keywords: ``verify``, ``force``, ``allow_globals`` (globals the pickle calls that may be dropped).
    """
    from .convert import convert
    from .read import read_source

    opts = options_from(SanitizeOptions, options, keywords, "sanitize")
    src, dst = Path(src), Path(dst)
    check_source(src)
    check_destination(dst, [src], opts.force, in_place=None)
    source = read_source(src, opts.allow_globals)
    try:
        tree, notes = convert(source.obj)
    except RecursionError:
        raise FormatError(f"{src}: pickle is nested too deeply to be a checkpoint") from None
    whole = notes.dropped.get("(the whole object)")
    if whole is not None:  # a whole pickled model (torch.save(model)): DST would hold None
        raise FormatError(f"{src}: nothing would be left to write: the whole object is {whole.split(', which')[0]}; "
                          f"for the tensors of a whole pickled model use surgery remap SRC out.safetensors with "
                          f"--allow-global for its classes (never imported or run)")
    report = SanitizeReport(str(src), str(dst), source.format, notes.converted, notes.dropped)
    if isinstance(tree, dict) and (notes.converted or notes.dropped):
        tree[NOTES_KEY] = _merged_notes(tree.get(NOTES_KEY), report)
        report.notes_in_file = True
    _write(tree, source, dst, opts, report)
    return report


def _merged_notes(old: Any, report: SanitizeReport) -> dict[str, Any]:
    """The notes stored in DST; a file sanitized before keeps its earlier notes beneath the new."""
    prior = old if isinstance(old, dict) else {}
    return {"schema": SCHEMA,
            "converted": {**(prior.get("converted") or {}), **report.converted},
            "dropped": {**(prior.get("dropped") or {}), **report.dropped}}


def _write(tree: Any, source: Any, dst: Path, opts: SanitizeOptions, report: SanitizeReport) -> None:
    from .output import Builder, save, verify

    builder = Builder(source)
    obj = builder.build(tree)
    report.tensors = len(builder.expected)
    report.arrays = len(_placeholders(tree))
    try:
        with atomic_file(dst) as tmp:
            save(obj, tmp)
            if opts.verify:  # before the rename: a failed check leaves no DST behind
                verify(tmp, builder.expected, str(dst))
                report.verified = True
            report.bytes_written = tmp.stat().st_size
    except OSError as e:
        raise OutputError(f"{dst}: cannot write: {e.strerror or e}; nothing was written") from None


def _placeholders(tree: Any) -> list[Any]:
    from ..formats.record_checks import reachable
    from .numpy_records import ArrayData

    return reachable(tree, ArrayData)


__all__ = ["sanitize", "SanitizeReport", "SanitizeOptions", "SCHEMA", "NOTES_KEY"]
