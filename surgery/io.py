"""Writing that never leaves a half-file behind and never touches an input."""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import stat
import tempfile
import threading
from pathlib import Path
from typing import Any, Iterable, Iterator

from .errors import OutputError


# What each command writes into a folder it owns: replacing such a folder removes only these
# (and surgery's own temp files); anything else there makes --force refuse, listing it.
OUTPUTS: dict[str, tuple[str, ...]] = {
    "adapt": (r"manifest\.json", r"model\.safetensors", r"load_report\.json"),
    "remap": (r"model\.safetensors\.index\.json", r"model-\d{5}-of-\d{5}\.safetensors", r"\.metadata", r"__0_0\.distcp"),
    "train": (r"(scratch/)?(manifest\.json|model\.safetensors|load_report\.json|metrics\.jsonl|run\.log|curves\.png|"
              r"confusion\.png|lr_find(_unfreeze)?\.png|lr_find\.json|failures\.jsonl|checkpoints/|checkpoints/(last|best)\.pt)",
              # --compare-scratch: the scratch run beside the pretrained one, the comparison, a killed run's init
              r"scratch/", r"compare\.json", r"compare\.png", r"\.scratch-init-[A-Za-z0-9_]{8}/.*",
              r"\.scratch-init-[A-Za-z0-9_]{8}/",
              # --tensorboard: torch.utils.tensorboard's event files
              r"(scratch/)?tensorboard/", r"(scratch/)?tensorboard/events\.out\.tfevents\.[^/]+"),
}
_TEMP = r"\..+\.[A-Za-z0-9_]{8}\.(tmp|old)/?"  # atomic_file / atomic_dir leftovers: ".NAME.<8 random chars>.tmp"
_SPECIAL = {stat.S_IFIFO: "a FIFO", stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device",
            stat.S_IFSOCK: "a socket"}


def special_kind(path: str | os.PathLike) -> str | None:
    """"a FIFO", "a character device", ... when ``path`` (through symlinks) is no regular file
    or folder; None otherwise (or when it does not exist)."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None
    return _SPECIAL.get(stat.S_IFMT(mode))


def check_source(path: str | os.PathLike) -> None:
    """Refuse a source that reading would hang on or that is no file (FIFO, device, socket)."""
    kind = special_kind(path)
    if kind is not None:
        raise OutputError(f"{path}: is {kind}, not a checkpoint file; surgery reads regular files and folders")


def foreign_entries(folder: Path, owned: Iterable[str]) -> list[str]:
    """Entries of ``folder`` (one level, and inside owned subfolders) that no pattern in ``owned``
    names: what replacing the folder must not delete. Subfolders are matched as ``name/``."""
    pats = [re.compile(p) for p in (*owned, _TEMP)]
    out = []
    for root, dirs, files in os.walk(folder):
        rel = os.path.relpath(root, folder)
        prefix = "" if rel == "." else rel + "/"
        for name in sorted(dirs) + sorted(files):
            full = os.path.join(root, name)
            entry = prefix + name + ("/" if name in dirs and not os.path.islink(full) else "")
            if not any(p.fullmatch(entry) for p in pats) or (name in files and special_kind(full)):
                out.append(entry)
        dirs[:] = [d for d in dirs if any(p.fullmatch(prefix + d + "/") for p in pats) and not os.path.islink(os.path.join(root, d))]
    return out


def check_replaceable(dst: Path, kind: str, owned: Iterable[str] = ()) -> None:
    """An existing ``dst`` that --force may replace: never a FIFO, device or socket; a file
    output never replaces a folder and a folder output never a file; a folder only when it holds
    nothing but what ``owned`` names (the patterns of the command that writes it)."""
    what = special_kind(dst)
    if what is not None:
        raise OutputError(f"{dst}: is {what}; surgery writes only regular files and folders, choose another destination")
    if kind == "file" and dst.is_dir():
        raise OutputError(f"{dst}: is a folder; surgery would write a file here: remove it or choose another name")
    if kind == "folder" and dst.exists() and not dst.is_dir():
        raise OutputError(f"{dst}: is a file, not a folder surgery wrote; remove it or choose another name")
    if kind == "folder" and dst.is_dir():
        foreign = foreign_entries(dst, owned)
        if foreign:
            more = f" and {len(foreign) - 8} more" if len(foreign) > 8 else ""
            raise OutputError(f"{dst}: holds files surgery did not write ({', '.join(foreign[:8])}{more}); "
                              f"--force replaces only its own outputs: move them or choose another folder")


def _relation(dst: Path, src: Path) -> str | None:
    """"same", "dst-inside" (DST lies inside SRC), "src-inside" (DST contains SRC), or None;
    paths compared after resolving every symlink."""
    rd, rs = Path(os.path.realpath(dst)), Path(os.path.realpath(src))
    same = rd == rs
    with contextlib.suppress(OSError):
        same = same or (dst.exists() and os.path.samefile(dst, src))
    if same:
        return "same"
    if rs in rd.parents:
        return "dst-inside"
    if rd in rs.parents:
        return "src-inside"
    return None


def same_path(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether ``a`` and ``b`` are one file or folder (through symlinks)."""
    return _relation(Path(a), Path(b)) == "same"


def check_destination(dst: Path, inputs: list[Path], force: bool, in_place: bool | None = False, *,
                      kind: str = "file", owned: Iterable[str] = ()) -> None:
    """Refuse, before any work, a destination that would overwrite, contain or lie inside an
    input, replace a special file, or replace an existing file without ``force``.

    ``in_place``: True allows DST == the first input (a rewrite of SRC's own files); False
    refuses it and points at ``--in-place``; None refuses it for commands that have no such
    option. ``kind``: "file" or "folder"; ``owned``: patterns of what this command writes into
    a folder (see :data:`OUTPUTS`), the only entries --force may replace.
    """
    dst = Path(dst)
    inputs = [Path(p) for p in inputs]
    rewriting = False
    for i, src in enumerate(inputs):
        rel = _relation(dst, src)
        if rel is None or (rewriting and rel in ("same", "src-inside")):
            continue  # an in-place rewrite replaces SRC's own files
        if rel == "same":
            if dst.is_symlink():
                raise OutputError(f"{dst}: destination is a symlink to the source; refusing to write through it")
            if in_place and i == 0:
                rewriting = True
                continue
            hint = ", or pass --in-place to replace it" if in_place is False else ""
            raise OutputError(f"{dst}: destination is the source; write to a new path{hint}")
        if rel == "dst-inside":
            raise OutputError(f"{dst}: destination lies inside the source {src}; write outside it")
        raise OutputError(f"{dst}: destination contains the source {src}; replacing it would delete the source")
    if (dst.exists() or dst.is_symlink()) and not rewriting:
        if not force:
            raise OutputError(f"{dst}: already exists; pass --force to replace it")
        check_replaceable(dst, kind, owned)
    parent = dst.parent if str(dst.parent) else Path(".")
    if not parent.is_dir():
        raise OutputError(f"{dst}: folder {parent} does not exist; create it first")
    if not os.access(parent, os.W_OK):
        raise OutputError(f"{dst}: folder {parent} is not writable")


class Writeback:
    """Called after each write to a large output: every ``STEP`` bytes, asks the kernel to start
    writing what is new out (``posix_fadvise(DONTNEED)`` starts writeback without waiting, then
    drops the pages already clean), so the disk works while the next tensors are read and the
    closing fsync waits for the last step only."""

    STEP = 64 << 20

    def __init__(self, f: Any):
        self.f, self.done = f, f.tell()

    def __call__(self) -> None:
        pos = self.f.tell()
        if pos - self.done >= self.STEP and hasattr(os, "posix_fadvise"):
            self.f.flush()
            with contextlib.suppress(OSError):  # advice only: a filesystem may not take it
                os.posix_fadvise(self.f.fileno(), self.done, pos - self.done, os.POSIX_FADV_DONTNEED)
            self.done = pos


@contextlib.contextmanager
def atomic_file(dst: Path) -> Iterator[Path]:
    """Yield a temp path beside ``dst``; on success fsync and rename it over ``dst``."""
    dst = Path(dst)
    fd, tmp = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent or ".")
    os.fchmod(fd, _default_mode())  # mkstemp makes 0600; outputs get the mode any new file would
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, dst)
        _fsync_dir(dst.parent)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_dir(dst: Path, keep: Iterable[str] = ()) -> Iterator[Path]:
    """Yield a temp folder beside ``dst``; on success it replaces ``dst`` in one rename.

    ``keep``: entries of the existing ``dst`` to carry into the new folder (hard links, or copies
    across devices) before the swap: the files an in-place rewrite must not lose.
    """
    dst = Path(dst)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent or "."))
    os.chmod(tmp, _default_mode(folder=True))  # mkdtemp makes 0700
    try:
        yield tmp
        for p in tmp.iterdir():
            if p.is_file():
                with open(p, "rb") as f:
                    os.fsync(f.fileno())
        for name in keep:
            _carry(dst / name, tmp / name)
        old = None
        if dst.exists() or dst.is_symlink():
            if dst.is_dir() and not dst.is_symlink():
                old = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", suffix=".old", dir=dst.parent or "."))
                os.rename(dst, old / "x")
            else:
                os.unlink(dst)
        os.rename(tmp, dst)
        _fsync_dir(dst.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _carry(src: Path, dst: Path) -> None:
    """Hard-link ``src`` (a file, symlink or folder tree) at ``dst``; copy where links fail."""
    if src.is_dir() and not src.is_symlink():
        shutil.copytree(src, dst, symlinks=True, copy_function=_link_or_copy)
    else:
        _link_or_copy(src, dst)


def _link_or_copy(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    try:
        os.link(src, dst, follow_symlinks=False)
    except OSError:
        shutil.copy2(src, dst, follow_symlinks=False)


def remove_temps(folder: Path) -> list[str]:
    """Delete the temp files and folders (``.NAME.<random>.tmp``/``.old``) that atomic_file and
    atomic_dir leave in ``folder`` and its subfolders when a process is killed mid-write;
    returns their paths relative to ``folder``. Call only on a folder this process owns."""
    pat = re.compile(_TEMP)
    gone = []
    for root, dirs, files in os.walk(folder):
        for name in [*files, *dirs]:
            full = os.path.join(root, name)
            if pat.fullmatch(name):
                shutil.rmtree(full) if name in dirs and not os.path.islink(full) else os.unlink(full)
                gone.append(os.path.relpath(full, folder))
        dirs[:] = [d for d in dirs if not pat.fullmatch(d)]
    return gone


def remove_outputs(folder: Path, owned: Iterable[str]) -> None:
    """Delete what ``owned`` names in ``folder`` (checked by :func:`check_replaceable` first),
    deepest first; the folder itself stays."""
    pats = [re.compile(p) for p in (*owned, _TEMP)]
    for root, dirs, files in os.walk(folder, topdown=False):
        rel = os.path.relpath(root, folder)
        prefix = "" if rel == "." else rel + "/"
        for name in files:
            if any(p.fullmatch(prefix + name) for p in pats):
                os.unlink(os.path.join(root, name))
        for name in dirs:
            full = os.path.join(root, name)
            if any(p.fullmatch(prefix + name + "/") for p in pats):
                if os.path.islink(full):
                    os.unlink(full)
                else:
                    with contextlib.suppress(OSError):  # not empty: something foreign, kept
                        os.rmdir(full)


def _default_mode(folder: bool = False) -> int:
    """The mode open()/mkdir() would give under the current umask."""
    mask = os.umask(0)
    os.umask(mask)
    return (0o777 if folder else 0o666) & ~mask


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder or ".", os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def sha256_file(path: str | os.PathLike, chunk: int = 8 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


class BackgroundHash:
    """sha256 of a file computed on another thread (hashlib releases the GIL) while we copy."""

    def __init__(self, path: str | os.PathLike):
        self.result: str | None = None
        self.error: BaseException | None = None
        self._t = threading.Thread(target=self._run, args=(path,), daemon=True)
        self._t.start()

    def _run(self, path) -> None:
        try:
            self.result = sha256_file(path)
        except BaseException as e:  # surfaced by get()
            self.error = e

    def get(self) -> str:
        self._t.join()
        if self.error is not None:
            raise OutputError(f"cannot hash the source: {self.error}")
        assert self.result is not None
        return self.result
