"""Writing that never leaves a half-file behind and never touches an input."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Iterator

from .errors import OutputError


def check_destination(dst: Path, inputs: list[Path], force: bool, in_place: bool | None = False) -> None:
    """Refuse, before any work, a destination that would overwrite an input or an existing file.

    ``in_place``: True allows DST == an input; False refuses it and points at ``--in-place``;
    None refuses it for commands that have no such option.
    """
    dst = Path(dst)
    for src in inputs:
        if dst.is_symlink() and dst.resolve() == Path(src).resolve():
            raise OutputError(f"{dst}: destination is a symlink to the source; refusing to write through it")
        same = False
        try:
            same = dst.exists() and os.path.samefile(dst, src)
        except OSError:
            pass
        if same or dst.resolve() == Path(src).resolve():
            if in_place:
                return
            hint = ", or pass --in-place to replace it" if in_place is False else ""
            raise OutputError(f"{dst}: destination is the source; write to a new path{hint}")
    if (dst.exists() or dst.is_symlink()) and not force:
        raise OutputError(f"{dst}: already exists; pass --force to replace it")
    parent = dst.parent if str(dst.parent) else Path(".")
    if not parent.is_dir():
        raise OutputError(f"{dst}: folder {parent} does not exist; create it first")
    if not os.access(parent, os.W_OK):
        raise OutputError(f"{dst}: folder {parent} is not writable")


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
def atomic_dir(dst: Path) -> Iterator[Path]:
    """Yield a temp folder beside ``dst``; on success it replaces ``dst`` in one rename."""
    dst = Path(dst)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent or "."))
    os.chmod(tmp, _default_mode(folder=True))  # mkdtemp makes 0700
    try:
        yield tmp
        for p in tmp.iterdir():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
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
