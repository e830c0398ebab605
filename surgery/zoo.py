"""Inspect a model zoo in one process: many paths, folders (recursive) and glob patterns.

Every checkpoint gives one row: the ``surgery.inspect/1`` report of ``surgery.inspect``, or an
error row (``surgery.inspect-error/1``: path, error, kind) when it is refused or broken; one bad
file never ends the scan. Metadata only, like inspect: torch is not imported.

    >>> rows = list(surgery.scan(["zoo/", "extra/*.pt"]))  # doctest: +SKIP
    >>> [r.path for r in rows if not r.ok]
"""

from __future__ import annotations

import glob
import os
import re
import sys
from dataclasses import dataclass
from typing import Iterable, Iterator

from .errors import RuleError, SurgeryError

ERROR_SCHEMA = "surgery.inspect-error/1"
# Files a folder scan opens; anything else in the folder (images, configs, logs) is not a checkpoint
CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt", ".pth.tar")
# Below this many files, starting worker processes costs more than it saves
PARALLEL_MIN_FILES = 64


@dataclass
class Row:
    """One scanned checkpoint: ``data`` is the inspect report's JSON, or ``error`` says why not."""

    path: str
    data: dict | None = None
    error: str | None = None
    kind: str | None = None  # the error's class name

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_json(self) -> dict:
        if self.ok:
            return dict(self.data or {})
        return {"schema": ERROR_SCHEMA, "path": self.path, "error": self.error, "kind": self.kind}


def is_checkpoint_folder(path: str) -> bool:
    """A folder that is one checkpoint: torch DCP (``.metadata``) or sharded (``*.index.json``)."""
    try:
        return os.path.isfile(os.path.join(path, ".metadata")) or any(
            e.name.endswith(".index.json") and e.is_file() for e in os.scandir(path))
    except OSError:
        return False


def expand(inputs: Iterable[str | os.PathLike]) -> list[str]:
    """Paths to inspect, in order, without repeats: files and checkpoint folders as given, other
    folders walked (hidden ones skipped, symlinked folders not followed), glob patterns matched
    (``**`` recursive). A pattern that matches nothing and a missing path stay in the list: the
    scan reports them as error rows."""
    out: dict[str, None] = {}
    for item in inputs:
        text = os.fspath(item)
        matches = sorted(glob.glob(text, recursive=True)) if glob.has_magic(text) and not os.path.lexists(text) else [text]
        for path in matches or [text]:
            if os.path.isdir(path) and not is_checkpoint_folder(path):
                out.update(dict.fromkeys(_walk(path)))
            else:
                out[path] = None
    return list(out)


def _walk(folder: str) -> Iterator[str]:
    for root, dirs, files in os.walk(folder, onerror=None, followlinks=False):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        if root != folder and is_checkpoint_folder(root):
            dirs[:] = []
            yield root
            continue
        for name in sorted(files):
            if not name.startswith(".") and name.lower().endswith(CHECKPOINT_SUFFIXES):
                yield os.path.join(root, name)


def inspect_one(path: str, options: dict | None = None) -> Row:
    """One row for ``path``; every failure is caught so that the scan goes on."""
    from .report import inspect

    opts = dict(options or {})
    depth = opts.pop("depth", 2)
    try:
        report = inspect(path, depth=depth or None, **opts)
        data = report.to_json()
        if not depth:
            data["tree"] = []
        return Row(path, data=data)
    except SurgeryError as e:
        return Row(path, error=e.one_line(), kind=type(e).__name__)
    except (Exception, RecursionError) as e:  # noqa: BLE001 - a bug on one file must not end the scan
        return Row(path, error=f"unexpected {type(e).__name__} while reading: {' '.join(str(e).split())[:300]}",
                   kind="InternalError")


def _work(args: tuple[str, dict]) -> Row:
    return inspect_one(*args)


class Scan:
    """The rows of a scan, in input order; iterate once. ``paths``: what will be inspected.

    Worker processes start here, before any thread of the caller's (a progress bar) exists."""

    def __init__(self, paths: list[str], options: dict, workers: int):
        self.paths = paths
        jobs = [(p, options) for p in paths]
        self._pool = None
        if workers <= 1 or len(paths) < PARALLEL_MIN_FILES:
            self._rows: Iterator[Row] = map(_work, jobs)
            return
        import multiprocessing

        from . import archsig

        # fork: the workers share the already imported reader and the architecture table (read
        # here once, not once per worker), and import nothing from the disk
        try:
            archsig.list_archs()
        except SurgeryError:  # no table: each row says so
            pass
        ctx = multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")
        self._pool = ctx.Pool(min(workers, len(paths)))
        self._rows = self._pool.imap(_work, jobs, chunksize=8)

    def __len__(self) -> int:
        return len(self.paths)

    def __iter__(self) -> Iterator[Row]:
        try:
            yield from self._rows
        finally:
            self.close()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.terminate()
            self._pool.join()
            self._pool = None


def scan(inputs: Iterable[str | os.PathLike], *, workers: int | None = None, depth: int = 2,
         select: str | None = None, allow_globals: tuple[str, ...] = (), keys: bool = False,
         filter: str | None = None) -> Scan:
    """Inspect every checkpoint ``inputs`` name (see :func:`expand`); iterate for the rows.

    ``workers``: processes (default: one per CPU, for scans of more than a few dozen files).
    The options are those of :func:`surgery.inspect`, applied to every file."""
    if filter is not None:
        try:
            re.compile(filter)
        except re.error as e:
            raise RuleError(f"--filter {filter!r} is not a valid regular expression: {e}") from None
    options = {"depth": depth, "select": select, "allow_globals": tuple(allow_globals), "keys": keys, "filter": filter}
    return Scan(expand(inputs), options, workers if workers is not None else (os.cpu_count() or 1))
