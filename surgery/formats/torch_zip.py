"""torch.save's zip format (.pt/.pth/.bin/.ckpt since torch 1.6), read without torch.

Storages are stored uncompressed, so each one is a byte range of the file: we read ``data.pkl``
with the restricted unpickler and turn every tensor into a `TensorInfo` pointing into the zip.
"""

from __future__ import annotations

import errno
import os
import re
from operator import itemgetter
from pathlib import Path

from ..checkpoint import Checkpoint, gc_paused
from ..errors import FormatError
from ..io import atomic_file
from . import container, torchscript
from .locate import tensor_infos
from .torch_pickle import Unpickled, unpickle
from .writing import Payload
from .zip_index import STORED, ZipIndex

MAX_PICKLE_BYTES = 512 * 1024 * 1024
MAX_INFLATION = 64  # largest ratio accepted for a compressed data.pkl


def read_zip(path: Path, accept: frozenset[str] = frozenset(), select: str | None = None,
             base: int = 0, length: int | None = None, display: str | None = None, extra: dict | None = None):
    """Unpickle ``data.pkl`` and locate every storage. Returns (unpickled, storage offsets).
    ``extra``: a reader's own records for some globals (as ``unpickle`` takes them)."""
    src = display or str(path)
    try:
        return _read_zip(path, accept, base, length, src, extra)
    except OSError as e:  # a seek or read that a lying central directory sent astray
        raise FormatError(f"{src}: zip archive cannot be read ({e.strerror or e}); its central directory is corrupt") from None


def _read_zip(path: Path, accept: frozenset[str], base: int, length: int | None, src: str, extra: dict | None = None):
    with open(path, "rb") as raw:
        size = os.fstat(raw.fileno()).st_size
        zf = ZipIndex(raw.fileno(), base, (size - base) if length is None else length, src)
        names = zf.names
        _check_names(zf.twice, src)
        prefix = _record_prefix(zf, src)
        pkl = zf.find(prefix + "data.pkl")  # the one torch.load reads: in the first entry's folder
        if pkl is None:
            if any(n.endswith("model.json") for n in names) and any("/code/" in n or n.startswith("code/") for n in names):
                raise FormatError(f"{src}: a TorchScript archive of torch < 1.4 (model.json); load it with a torch of "
                                  f"that era (torch.jit.load) and save model.state_dict()")
            raise FormatError(f"{src}: zip archive has no {prefix}data.pkl, so it is not a torch checkpoint "
                              f"(entries: {', '.join(names[:5])})")
        _check_records(zf, prefix, src)
        data = _read_entry(zf, pkl, MAX_PICKLE_BYTES, src)
        if torchscript.is_torchscript(names, prefix):
            if not _read_entry(zf, zf.find(prefix + "constants.pkl"), MAX_PICKLE_BYTES, src).startswith(b"\x80"):
                raise FormatError(f"{src}: {prefix}constants.pkl is not a pickle; torch.jit.load refuses the archive")
            def read_code(name: str) -> bytes | None:
                found = zf.find(name)
                return None if found is None else _read_entry(zf, found, torchscript.MAX_CODE_BYTES, src)

            up = torchscript.read_torchscript(data, src, accept, torchscript.Declarations(read_code, prefix, src))
            up.torchscript = True  # type: ignore[attr-defined]
        else:
            up = unpickle(data, src, accept, extra=extra)
        offsets = _storage_offsets(zf, up.storages, prefix, src)
    return up, offsets


def _record_prefix(zf: ZipIndex, src: str) -> str:
    """torch's reader looks every record up in the folder of the archive's first entry
    (``ARCHIVE/data.pkl``) by the offsets the end record gives: an entry outside that folder, or a
    directory placed where the end record does not say, is read by no torch and by other readers."""
    if zf.concat:
        raise FormatError(f"{src}: zip archive's central directory does not end where its end record begins: bytes "
                          f"before the archive starts or a second central directory; torch and other zip readers "
                          f"would read different entries, refusing it")
    first = zf.names[0] if zf.names else ""
    if "/" not in first:
        raise FormatError(f"{src}: zip archive's first entry {first[:80]!r} is not in a folder; torch reads only "
                          f"archives whose entries share one top folder")
    prefix = first[:first.index("/") + 1]
    outside = [n for n in zf.names if not n.startswith(prefix)]
    if outside:
        shown = ", ".join(repr(n[:60]) for n in outside[:3])
        raise FormatError(f"{src}: zip archive has entries outside its top folder {prefix!r} ({shown}); torch never "
                          f"reads them and another reader could, refusing it")
    return prefix


# the file format versions torch's archive reader accepts (kMinSupportedFileFormatVersion ..
# kMaxSupportedFileFormatVersion); a file outside them torch refuses, and so does surgery
FORMAT_VERSIONS = range(1, 11)
_VERSION = re.compile(rb"[ \t\n\v\f\r]*\+?([0-9]+)")  # what C's stoull reads: spaces, a sign, digits


def _check_records(zf: ZipIndex, prefix: str, src: str) -> None:
    """The records torch checks before it reads anything: ``version`` (``.data/version`` first)
    must parse as a supported format version, ``.storage_alignment``, when present, as an integer,
    and ``byteorder``, when present, must be exactly ``little`` or ``big``. torch refuses a file that fails either, so surgery does too: a file
    torch cannot load must not look clean here."""
    found = zf.find(prefix + ".data/version") or zf.find(prefix + "version")
    if found is None:
        raise FormatError(f"{src}: zip archive has no {prefix}version record; torch refuses such a file, so it is "
                          f"not a torch checkpoint (or it was re-zipped without it)")
    m = _VERSION.match(_read_entry(zf, found, 4096, src))
    if m is None or int(m.group(1)) not in FORMAT_VERSIONS:
        raise FormatError(f"{src}: {found} does not hold a file format version torch reads "
                          f"({FORMAT_VERSIONS.start}..{FORMAT_VERSIONS.stop - 1}); torch refuses the file")
    align = zf.find(prefix + ".storage_alignment")
    if align is not None:
        try:  # torch.load calls int() on the record's bytes before it reads anything
            int(_read_entry(zf, align, 4096, src))
        except ValueError:
            raise FormatError(f"{src}: {align} does not hold an integer; torch refuses the file") from None
    bo = zf.find(prefix + "byteorder")
    order = None if bo is None else _read_entry(zf, bo, 64, src)
    if order == b"big":
        raise FormatError(f"{src}: big-endian checkpoints are not supported")
    if order not in (None, b"little"):
        raise FormatError(f"{src}: {bo} holds {order[:16]!r}, not 'little' or 'big'; torch refuses the file")


def _storage_offsets(zf: ZipIndex, storages, prefix: str, src: str) -> dict[str, tuple[int, int]]:
    """Each storage's (absolute offset, bytes): a stored entry wholly inside the archive."""
    keys = list(storages)
    by_name = zf.entries
    names = [f"{prefix}data/{key}" for key in keys]
    # the exact name is the entry `find` returns: `_check_names` refused two names equal ignoring case
    found = names if all(map(by_name.__contains__, names)) else [n if n in by_name else zf.find(n) for n in names]
    infos = list(map(by_name.get, found))
    if None in infos or any(map(STORED.__ne__, map(itemgetter(1), infos))):  # an entry missing or not stored
        for key, name, zi in zip(keys, names, infos):
            if zi is None:
                raise FormatError(f"{src}: storage {key!r} is referenced but {name!r} is missing; the file is incomplete")
            if zi.method != STORED:
                raise FormatError(f"{src}: storage {key!r} is compressed; torch never writes that, the file was re-zipped")
    offsets: dict[str, tuple[int, int]] = {}
    base, end = zf.base, zf.length
    for key, zi, start in zip(keys, infos, zf.data_offsets(found, infos)):
        nbytes = zi.file_size
        if start + nbytes > end:
            raise FormatError(f"{src}: storage {key!r} runs past the end of the file; the file is truncated")
        offsets[key] = (base + start, nbytes)
    return offsets


def _check_names(twice: list[str], src: str) -> None:
    """Refuse an archive that names one entry twice (ignoring ASCII case and the UTF-8 flag, as torch's
    lookup does): which copy a reader takes differs (zipfile the last, torch's sorted lookup either),
    so what surgery shows would not be what torch.load runs."""
    dups = sorted(set(twice))
    if dups:
        raise FormatError(f"{src}: zip archive holds {len(dups)} entr{'y' if len(dups) == 1 else 'ies'} twice "
                          f"({', '.join(repr(d) for d in dups[:3])}); torch and other zip readers would disagree on "
                          f"its content, refusing it")


def _read_entry(zf: ZipIndex, name: str, limit: int, src: str) -> bytes:
    """One small entry's bytes, its declared sizes checked against ``limit`` and the archive
    before anything is allocated (a deflated entry can claim gigabytes in a few bytes)."""
    info = zf.entries[name]
    if info.file_size > limit:
        raise FormatError(f"{src}: {name} declares {info.file_size} bytes, far more than it ever holds (limit {limit})")
    if info.compress_size > zf.length:
        raise FormatError(f"{src}: {name} declares sizes that do not fit the archive; the file is truncated or corrupt")
    if info.method != STORED and info.file_size > zf.length + (1 << 20):
        # a real checkpoint's pickle is small beside its storages; a deflated one larger than the
        # whole archive would make a small file cost what a large one does
        raise FormatError(f"{src}: {name} inflates to {info.file_size} bytes, more than the whole archive "
                          f"({zf.length}) plus 1 MiB; refusing a zip bomb")
    if info.method != STORED and info.file_size > MAX_INFLATION * info.compress_size + (1 << 20):
        # torch stores every entry; a deflated one inflating 1000x is a zip bomb, not a re-zipped checkpoint
        raise FormatError(f"{src}: {name} inflates {info.compress_size} bytes to {info.file_size}; refusing a zip bomb")
    try:
        return zf.read(name, MAX_INFLATION if info.method != STORED else None)
    except FormatError as e:
        raise FormatError(f"{src}: cannot read {name} ({e}); the file is truncated or corrupt") from None


def open_zip(path: Path, accept: frozenset[str] = frozenset(), select: str | None = None) -> Checkpoint:
    with gc_paused():
        up, offsets = read_zip(path, accept)
        fmt = "torchscript" if getattr(up, "torchscript", False) else "torch-zip"
        return checkpoint_from_pickle(path, fmt, up, offsets, str(path), select)


def checkpoint_from_pickle(path: Path, fmt: str, up: Unpickled, offsets, file: str, select: str | None) -> Checkpoint:
    obj = up.obj
    chosen, listed = container.choose(obj, str(path), select, up.size)
    return Checkpoint(
        path=Path(path), format=fmt, file_size=os.path.getsize(file),
        tensors=tensor_infos(chosen.tensors, offsets, file, str(path)),
        container=chosen.path, containers=[f.path for f in listed],
        extras=container.extras(obj, chosen), files=[file], **container.file_shape(obj, chosen, listed),
    )


__all__ = ["open_zip", "read_zip", "checkpoint_from_pickle"]


# ---------------------------------------------------------------------------- writing

def write(dst: Path, payload: Payload) -> list[str]:
    """Write ``payload.state_dict()`` with ``torch.save`` at ``dst`` (through a temp file beside it)."""
    import torch

    sd = payload.state_dict()
    with atomic_file(dst) as tmp:
        try:
            torch.save(sd, tmp)
        except RuntimeError as e:  # torch's writer reports a failed write (EFBIG, ENOSPC) as RuntimeError
            first = (str(e).strip().splitlines() or [""])[0][:160]
            raise OSError(errno.EIO, f"torch.save could not finish writing ({first}); is the disk full?") from None
        payload.finish()  # a torch file keeps no metadata of its own
    return [str(dst)]
