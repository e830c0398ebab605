"""Inspect a model zoo in one process: many paths, folders (recursive) and glob patterns.

Every checkpoint gives one row: the ``surgery.inspect/1`` report of ``surgery.inspect``, or an
error row (``surgery.inspect-error/1``: path, error, kind) when it is refused or broken; one bad
file never ends the scan. Metadata only, like inspect: torch is not imported.

    >>> rows = list(surgery.scan(["zoo/", "extra/*.pt"]))  # doctest: +SKIP
    >>> [r.path for r in rows if not r.ok]
"""

from __future__ import annotations

import fnmatch
import glob
import os
import re
import stat
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from ..errors import RuleError, SurgeryError
from ..formats import SNIFF_BYTES, sniff_bytes

ERROR_SCHEMA = "surgery.inspect-error/1"
# Files of a walked folder that are inspected whatever their bytes; any other file is inspected
# when its first bytes are a checkpoint's, and counted as skipped when not
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
    """A folder that is one checkpoint: torch DCP (``.metadata``, or the ranks' safetensors pieces of
    its Hugging Face layout), sharded (``*.index.json``), DeepSpeed ZeRO (``latest`` beside
    ``global_step*/``) or a sharded model's per-rank files (``model_world_size_N_rank_K.pt``)."""
    from ..formats.dcp_hf import SHARD_FILE
    from ..formats.per_rank import is_per_rank
    from ..formats.zero import is_zero_folder

    try:
        return os.path.isfile(os.path.join(path, ".metadata")) or any(
            (e.name.endswith(".index.json") or SHARD_FILE.match(e.name)) and e.is_file()
            for e in os.scandir(path)) or is_zero_folder(Path(path)) or is_per_rank(Path(path))
    except OSError:
        return False


@dataclass
class Found:
    """What the inputs name: the checkpoints to inspect, in order, and the files of walked
    folders that are not checkpoints by their first bytes."""

    paths: list[str]
    skipped: list[str]


def expand(inputs: Iterable[str | os.PathLike]) -> Found:
    """Paths to inspect, in order, without repeats: files and checkpoint folders as given, other
    folders walked (hidden ones skipped, symlinked folders not followed), glob patterns matched
    (``**`` recursive). A pattern that matches nothing and a missing path stay in the list: the
    scan reports them as error rows. In a walked folder every regular file is sniffed (see
    :func:`is_checkpoint_file`); the others are ``skipped``."""
    out: dict[str, None] = {}
    skipped: dict[str, None] = {}
    for item in inputs:
        text = os.fspath(item)
        matches = sorted(glob_paths(text)) if glob.has_magic(text) and not os.path.lexists(text) else [text]
        for path in matches or [text]:
            if os.path.isdir(path) and not is_checkpoint_folder(path):
                for found, ok in _walk(path):
                    (out if ok else skipped)[found] = None
            else:
                out[path] = None
    return Found(list(out), [p for p in skipped if p not in out])


def glob_paths(pattern: str) -> Iterator[str]:
    """What ``glob.glob(pattern, recursive=True)`` matches, except that no symlinked folder is
    entered once matching starts (glob follows them: two links to "." never end, and a folder
    reached twice is listed twice); a link itself still matches, and folders are walked as
    `expand` walks them. The literal folders before the first wildcard are taken as given."""
    parts = pattern.split(os.sep)
    first = next(i for i, p in enumerate(parts) if glob.has_magic(p))
    root = os.sep.join(parts[:first]) if first else ""
    if first == 1 and not parts[0]:
        root = os.sep  # an absolute pattern: "/*.pt"
    rest = [p for p in parts[first:] if p]  # "a//b" names what "a/b" names
    start = _closure(rest, {0})
    if root and len(rest) in start:  # "zoo/**" matches zoo/ itself too
        yield os.path.join(root, "")
    for path in _glob_in(root, rest, start):
        if not pattern.endswith(os.sep):
            yield path
        elif os.path.isdir(path):  # "zoo/*/" names folders only, written with the slash
            yield os.path.join(path, "")


def _closure(rest: list[str], states: set[int]) -> set[int]:
    """The pattern positions reachable without consuming a name: a "**" may match no folder."""
    out, todo = set(states), list(states)
    while todo:
        s = todo.pop()
        if s < len(rest) and rest[s] == "**" and s + 1 not in out:
            out.add(s + 1)
            todo.append(s + 1)
    return out


def _glob_in(root: str, rest: list[str], states: set[int]) -> Iterator[str]:
    """Matches under ``root`` for pattern positions ``states``: one os.scandir per folder that
    can still match, real folders only, so the walk ends on any tree (a loop, not recursion)."""
    todo = [(root, states)]
    while todo:
        folder, states = todo.pop()
        try:
            with os.scandir(folder or os.curdir) as it:
                entries = sorted((e.name, e.is_dir(follow_symlinks=False)) for e in it)
        except OSError:  # unreadable or vanished: glob skips it too
            continue
        for name, real_dir in entries:
            step = set()
            for s in states:
                if s < len(rest) and (rest[s] == "**" or fnmatch.fnmatchcase(name, rest[s])) \
                        and (not name.startswith(".") or rest[s].startswith(".")):  # glob hides dotfiles
                    step.add(s if rest[s] == "**" else s + 1)
            step = _closure(rest, step)
            path = os.path.join(folder, name)
            if len(rest) in step:
                yield path
            if real_dir and any(s < len(rest) for s in step):
                todo.append((path, step))


def _walk(folder: str) -> Iterator[tuple[str, bool]]:
    """(path, is a checkpoint) for every non-hidden file and checkpoint folder under ``folder``."""
    for root, dirs, files in os.walk(folder, onerror=None, followlinks=False):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        ranks = _rank_members(root) if root != folder else set()
        if root != folder and is_checkpoint_folder(root) and not ranks:
            dirs[:] = []
            yield root, True
            continue
        if ranks:  # a sharded model's rank files are one checkpoint, the folder; the rest are their own
            yield root, True
            files = [f for f in files if Path(root, f) not in ranks]
        for name in sorted(files):
            if not name.startswith("."):
                path = os.path.join(root, name)
                yield path, is_checkpoint_file(path)


def _rank_members(root: str) -> set[Path]:
    """The per-rank files of a folder that is no other kind of checkpoint folder (DCP, sharded, ZeRO)."""
    from ..formats.per_rank import members
    from ..formats.zero import is_zero_folder

    p = Path(root)
    if (p / ".metadata").is_file() or is_zero_folder(p) or any(p.glob("*.index.json")):
        return set()
    return members(p)


def is_checkpoint_file(path: str) -> bool:
    """Whether a file in a walked folder is inspected: a name with a checkpoint suffix always is
    (a broken download named ``model.pt`` must show as an error row, not vanish); any other
    regular file is if its first bytes are a checkpoint's, whatever its name (``.th``, a torch zip
    named ``.tar``). A file that cannot be read is inspected too, so that its error is a row."""
    if path.lower().endswith(CHECKPOINT_SUFFIXES):
        return True
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):
            return False  # a FIFO or device: opening it could block or read forever
        if st.st_size == 0:
            return False
        with open(path, "rb") as f:
            head = f.read(SNIFF_BYTES)
            member = _tar_member(f, head)
    except OSError:
        return True
    return sniffs_as_checkpoint(head, st.st_size, member)


def _tar_member(f, head: bytes) -> bytes:
    """The header of a tar's first member. torch <= 0.1.10 wrote a pax header before it (Python's
    tarfile does for a float mtime), so that one is read past: one more read, for tars only."""
    if head[257:262] != b"ustar" or head[156:157] not in (b"x", b"g"):
        return head
    try:
        size = int(head[124:136].strip(b"\0 ") or b"0", 8)
    except ValueError:
        return b""
    if size > 1 << 16:  # a pax header of a few timestamps and names is far smaller
        return b""
    f.seek(512 + -(-size // 512) * 512)
    return f.read(512)


# The records torch's zip writer can put first, at the top or under the archive's folder (torch.save
# starts with data.pkl, torch.jit.save with data/0 or code/); a zip that starts otherwise (npz, a
# data set, an office file) is not a torch checkpoint.
_TORCH_ZIP_RECORDS = frozenset({"data.pkl", "constants.pkl", "version", ".format_version", "byteorder",
                                ".storage_alignment"})
_TORCH_ZIP_FOLDERS = ("data/", "code/", ".data/", "extra/", "constants/")


def _torch_record(name: str) -> bool:
    return name in _TORCH_ZIP_RECORDS or name.startswith(_TORCH_ZIP_FOLDERS)


def sniffs_as_checkpoint(head: bytes, size: int, tar_member: bytes = b"") -> bool:
    """The format registry's sniffer on the first ``SNIFF_BYTES`` of a file, narrowed for a file
    nobody named: zips and tars must start with torch's records (``tar_member``: the header of a
    tar's first member, when a pax header comes before it), a safetensors header must fit in the
    file, and a JSON file (a shard index alone, a config) is not a checkpoint."""
    try:
        fmt = sniff_bytes(head, size, Path("?"))
    except SurgeryError:
        return False
    if fmt == "torch-zip":
        n = int.from_bytes(head[26:28], "little") if head.startswith(b"PK\x03\x04") else 0
        name = head[30:30 + n].decode("utf-8", "replace")  # the first entry's: its local header leads the file
        return _torch_record(name) or ("/" in name and _torch_record(name.split("/", 1)[1]))
    if fmt == "torch-tar":
        from ..formats.torch_tar import MEMBERS  # the tar reader loads only for a tar file

        first = (tar_member or head)[:100].split(b"\0", 1)[0].decode("latin-1")
        return first in MEMBERS
    if fmt == "safetensors":
        return 2 <= int.from_bytes(head[:8], "little") <= size - 8 and head[9:10] in (b'"', b"}")
    return fmt == "torch-legacy"


def inspect_one(path: str, options: dict | None = None) -> Row:
    """One row for ``path``; every failure is caught so that the scan goes on."""
    from .inspect_report import inspect

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
    """The rows of a scan, in input order; iterate once. ``paths``: what will be inspected;
    ``skipped``: the files of walked folders left out, as their first bytes are no checkpoint's.

    Worker processes start here, before any thread of the caller's (a progress bar) exists."""

    def __init__(self, found: Found, options: dict, workers: int):
        self.paths = paths = found.paths
        self.skipped = found.skipped  # files of walked folders that are not checkpoints
        jobs = [(p, options) for p in paths]
        self._pool = None
        if workers <= 1 or len(paths) < PARALLEL_MIN_FILES:
            self._rows: Iterator[Row] = map(_work, jobs)
            return
        import multiprocessing

        from . import arch_guess as archsig

        # fork: the workers share the already imported reader and the architecture table (read
        # here once, not once per worker), and import nothing from the disk
        try:
            archsig.known_architectures({})  # both tables, torchvision's and timm's
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
